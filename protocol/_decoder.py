"""Incremental frame decoders: feed bytes (or read into their buffer), take frames."""

from __future__ import annotations

from typing import Final

import msgpack

from ._codec import (
    DATA_MAP_START,
    HEADER_SIZE,
    MAX_ID,
    FrameInvalid,
    decode_body,
    msgpack_type,
    unpack_length,
)
from ._errors import ErrorKind, RemoteProtocolError
from ._frames import Data, Frame

__all__ = ["FrameDecoder", "ZeroCopyFrameDecoder"]

# Compact the buffer once this much of its front has been consumed: keeps both the
# memmove cost and the dead space bounded.
_COMPACT_AT: Final = 1 << 16


class FrameDecoder:
    """Splits a byte stream into frames.

    Memory: the buffer holds at most one incomplete frame (bounded by ``max_frame_size``,
    checked from the 4-byte header before any body byte is needed) plus whatever one
    ``feed`` call added. Call :meth:`next_frame` until it returns None before feeding more.

    Errors: a stream that cannot be split or unpacked (including a map with non-string
    keys, refused while unpacking) raises a fatal :class:`RemoteProtocolError`; after that
    the decoder must not be used again. A frame that unpacks to a map with string keys
    but bad content raises a non-fatal one; the frame has been consumed and decoding
    continues with the next frame.
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        # Frames are parsed straight out of what was fed last when the previous feed
        # ended on a frame boundary (the caller's object, not a copy: ``_own`` is False);
        # only a frame split across feeds is copied into a bytearray of our own. Large
        # data frames thus cost one copy (into their payload) here, and a caller may read
        # into one reused buffer.
        self._buf: bytes | bytearray | memoryview = b""
        self._own = False
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as frames."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes.

        ``data`` may be parsed in place: the decoder holds on to it until
        :meth:`next_frame` returns None, so a caller who reuses its buffer changes it
        only after that (frames returned before then hold no reference to it).
        """
        if self._pos == len(self._buf):
            self._buf = data
            self._own = False
            self._pos = 0
            return
        self._keep_partial()
        assert isinstance(self._buf, bytearray)
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        buf = self._buf
        start = self._pos
        available = len(buf) - start
        if available < HEADER_SIZE:
            self._keep_partial()
            return None
        length = unpack_length(buf, start)
        _check_length(length, self.max_frame_size)
        end = start + HEADER_SIZE + length
        if len(buf) < end:
            self._keep_partial()
            return None
        try:
            with memoryview(buf) as view:
                body = view[start + HEADER_SIZE : end]
                layout = _data_layout(body)
                if layout is not None:
                    id, ch, payload = layout
                    data = bytes(body[payload:])
                    body.release()
                    return Data(id, ch, data)
                return _decode_frame(body, length)
        finally:
            # Consumed even when it was bad: decoding goes on after a non-fatal error.
            self._pos = end
            if end == len(buf):
                self._buf = b""
                self._own = False
                self._pos = 0
            elif end >= _COMPACT_AT and self._own:
                assert isinstance(buf, bytearray)
                del buf[:end]
                self._pos = 0

    def _keep_partial(self) -> None:
        """Copy the unparsed rest of the caller's object into a buffer of our own: once
        next_frame has returned None, the caller may overwrite what it fed."""
        if not self._own and self._pos < len(self._buf):
            self._buf = bytearray(memoryview(self._buf)[self._pos :])
            self._own = True
            self._pos = 0


def _check_length(length: int, limit: int) -> None:
    if length == 0 or length > limit:
        raise RemoteProtocolError(
            ErrorKind.FRAME_TOO_LARGE if length else ErrorKind.MALFORMED,
            f"frame header announces {length} bytes; the limit is {limit}"
            if length
            else "frame header announces an empty frame",
            fatal=True,
        )


def _decode_frame(body_view: memoryview, length: int) -> Frame:
    """The frame in one complete body; releases ``body_view``. The frame holds no view
    of it: bin fields are copied out."""
    try:
        body = msgpack.unpackb(body_view, raw=False, unicode_errors="surrogateescape")
    except Exception as exc:  # msgpack raises many types for bad input
        raise RemoteProtocolError(
            ErrorKind.MALFORMED,
            f"frame body ({length} bytes) is not one msgpack value{_why_unpack_failed(exc)}",
            fatal=True,
        ) from None
    finally:
        body_view.release()
    if type(body) is not dict:
        raise RemoteProtocolError(
            ErrorKind.MALFORMED,
            f"frame body is a msgpack {msgpack_type(body)}, not a map",
            fatal=True,
        )
    try:
        return decode_body(body)
    except FrameInvalid as exc:
        ref = body.get("t")
        child = body.get("id")
        raise RemoteProtocolError(
            exc.kind,
            exc.message,
            id=child if type(child) is int and 0 <= child <= MAX_ID else None,
            # bounded: the ref of an unknown type goes back to the peer in an error
            ref=ref[:64] if type(ref) is str else None,
        ) from None


# The unpacker's stack: arrays and maps nested deeper than this are refused.
_MAX_NESTING: Final = 1024
# msgpack's refusal of a map key names the key's Python type.
_KEY_TYPES: Final = {"int": "integer", "NoneType": "nil", "bool": "boolean", "float": "float",
                     "list": "array", "tuple": "array", "dict": "map", "ExtType": "ext",
                     "Timestamp": "timestamp"}


def _why_unpack_failed(exc: Exception) -> str:
    """Why msgpack refused a body, in the protocol's words (msgpack's own messages name
    its API and options): ``": <reason>"``, or nothing when it gave no known reason."""
    text = str(exc)
    if isinstance(exc, msgpack.ExtraData):
        return ": more bytes follow the first value"
    if isinstance(exc, msgpack.StackError):
        return f": arrays and maps nested more than {_MAX_NESTING} deep"
    if isinstance(exc, msgpack.FormatError):
        return ": it holds the byte 0xc1, which starts no msgpack value"
    if text.endswith("is not allowed for map key when strict_map_key=True"):
        # Refused while unpacking: a map of colliding integer keys would make
        # decoding quadratic. "int is not allowed ..." names the key's Python type.
        key_type = _KEY_TYPES.get(text.split(" ", 1)[0], "value")
        return f" with str or bin map keys: a map key is a msgpack {key_type}"
    if text == "Unpack failed: incomplete input" or " exceeds max_" in text:
        # max_*_len is the body's own length: a count beyond it cannot be there.
        return ": it ends inside a value"
    if text.startswith("invalid timestamp"):
        return ": it holds an invalid timestamp (ext type -1)"
    return ""


# ZeroCopyFrameDecoder's slabs: this large, or one frame's size when that is larger.
# get_buffer offers at least 1/32 of it (64 KiB), so reads stay large.
_SLAB_SIZE: Final = 1 << 21
_FIRST_SLAB_SIZE: Final = 1 << 16
# Free slabs kept for reuse; more are left to the garbage collector.
_SPARE_SLABS: Final = 2


class ZeroCopyFrameDecoder:
    """A :class:`FrameDecoder` whose data payloads are views of its own buffers.

    Read straight into :meth:`get_buffer` and report with :meth:`buffer_updated` (like
    asyncio's BufferedProtocol); :meth:`feed` copies bytes in for callers that have them
    already. Data frames in the canonical layout (the one :func:`encode_data_header`
    writes) carry their payload as a read-only ``memoryview`` of the buffer it was read
    into: no copy, and no fresh allocation per frame. Every other frame, and a data frame
    laid out otherwise, is decoded as by :class:`FrameDecoder` (its bin fields copied).

    Buffers ("slabs") start at 64 KiB and double with each change of slab up to 2 MiB
    (or one frame, if larger); they are reused once no payload view of them is alive,
    and two spares are kept. A view pins its whole slab, so a consumer that keeps
    payloads for long should copy them (``bytes(view)``) and drop the view; one that
    consumes them soon should just drop (or release) each view once done, and the same
    few slabs serve the whole stream. Errors and ``max_frame_size`` are as for
    :class:`FrameDecoder`.
    """

    def __init__(self, max_frame_size: int, *, slab_size: int = _SLAB_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._slab_size = slab_size
        self._min_space = max(1, slab_size // 32)
        # Small at first: many connections that carry little should not hold 2 MiB each.
        self._slab = bytearray(min(slab_size, _FIRST_SLAB_SIZE))
        self._pos = 0  # start of the first frame not yet returned
        self._fill = 0  # end of the bytes written into the slab
        # Slabs left behind: those payload views still pin, and a few free spares.
        self._retired: list[bytearray] = []
        #: Slabs allocated so far (a measure of memory churn, for tests and diagnostics).
        self.slabs_allocated = 1

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._fill - self._pos

    @property
    def held_bytes(self) -> int:
        """Bytes of all the slabs the decoder holds: current, spare and pinned."""
        return len(self._slab) + sum(map(len, self._retired))

    @property
    def pinned_bytes(self) -> int:
        """Bytes of earlier slabs that payload views still hold: memory that consumers
        keep alive beyond what the decoder needs."""
        return sum(len(slab) for slab in self._retired if _in_use(slab))

    def get_buffer(self) -> memoryview:
        """Writable space for the next bytes received: at least 1/32 of a slab, and
        enough for the frame in progress to complete. Write into it, release it (use it
        in a ``with``), then call :meth:`buffer_updated` with the bytes written."""
        needed = self._min_space
        if self._fill - self._pos >= HEADER_SIZE:
            # The frame in progress must end inside this slab: a view cannot span two.
            # A length beyond the limit gets no room: next_frame rejects it.
            length = unpack_length(self._slab, self._pos)
            if length <= self.max_frame_size:
                frame_end = self._pos + HEADER_SIZE + length
                needed = max(needed, frame_end - self._fill)
        if len(self._slab) - self._fill < needed:
            self._move_to_new_slab(needed)
        return memoryview(self._slab)[self._fill :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were written at the start of the last :meth:`get_buffer`."""
        if not 0 <= nbytes <= len(self._slab) - self._fill:
            raise ValueError(f"buffer_updated({nbytes}): beyond the buffer handed out")
        self._fill += nbytes

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Copy received bytes in."""
        with memoryview(data) as view:
            done = 0
            while done < len(view):
                with self.get_buffer() as space:
                    size = min(len(space), len(view) - done)
                    space[:size] = view[done : done + size]
                self.buffer_updated(size)
                done += size

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        start = self._pos
        if self._fill - start < HEADER_SIZE:
            return None
        length = unpack_length(self._slab, start)
        _check_length(length, self.max_frame_size)
        end = start + HEADER_SIZE + length
        if self._fill < end:
            return None
        try:
            with memoryview(self._slab) as view:
                body = view[start + HEADER_SIZE : end]
                layout = _data_layout(body)
                if layout is not None:
                    id, ch, payload = layout
                    return Data(id, ch, body[payload:].toreadonly())
                return _decode_frame(body, length)
        finally:
            self._pos = end  # consumed even when bad: decoding goes on after non-fatal errors

    def _move_to_new_slab(self, needed: int) -> None:
        """Continue in a slab with ``needed`` bytes free after the unreturned bytes,
        which are copied over (at most one frame; usually a few bytes)."""
        pending = self._fill - self._pos
        old = self._slab
        if not _in_use(old) and len(old) >= pending + needed:
            # Nothing points into this slab: shift the pending bytes to its front (through
            # a copy: the two ranges may overlap).
            old[:pending] = old[self._pos : self._fill]
        else:
            self._slab = self._next_slab(old, pending + needed)
            with memoryview(old) as view:
                self._slab[:pending] = view[self._pos : self._fill]
        self._pos, self._fill = 0, pending

    def _next_slab(self, old: bytearray, needed: int) -> bytearray:
        """A free slab with room for ``needed`` bytes, reused or new; ``old`` is retired."""
        pinned: list[bytearray] = []
        spares: list[bytearray] = []
        for slab in self._retired:
            (pinned if _in_use(slab) else spares).append(slab)
        # Doubling: an idle connection keeps a small slab, a busy one soon has full-size
        # ones; what must grow beyond that gets room to grow (feeding one huge chunk
        # stays linear).
        size = min(2 * len(old), self._slab_size)
        if needed > size:
            size = 2 * needed
        fits = [slab for slab in spares if len(slab) >= size]
        if fits:
            slab = fits[0]
            spares.remove(slab)
        else:
            slab = bytearray(size)
            self.slabs_allocated += 1
        (pinned if _in_use(old) else spares).append(old)
        spares.sort(key=len, reverse=True)  # keep the largest: small ones are outgrown
        self._retired = pinned + spares[:_SPARE_SLABS]
        return slab


def _in_use(slab: bytearray) -> bool:
    """Whether a memoryview of ``slab`` is alive. CPython refuses to resize a bytearray
    whose buffer is exported, and resizing by one byte and back is O(1)."""
    try:
        slab.append(0)
    except BufferError:
        return True
    del slab[-1]
    return False


# The canonical data frame: {"t": "data", "id": uint, "ch": uint, "d": bin}, in that order.
_DATA_PREFIX: Final[bytes] = DATA_MAP_START + msgpack.packb("id")
_KEY_CH: Final[bytes] = msgpack.packb("ch")
_KEY_D: Final[bytes] = msgpack.packb("d")
_UINT_SIZES: Final = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_BIN_SIZES: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def _data_layout(body: memoryview) -> tuple[int, int, int] | None:
    """(id, ch, offset of the payload) of a data frame in the canonical layout, whose
    payload is the rest of ``body``; None for anything else (decode it in full). Parsing
    the layout directly is several times faster than unpacking a map and checking its
    fields, and data frames are most of the stream."""
    if body[: len(_DATA_PREFIX)] != _DATA_PREFIX:
        return None
    id, pos = _uint_at(body, len(_DATA_PREFIX))
    if id is None or body[pos : pos + 3] != _KEY_CH:
        return None
    ch, pos = _uint_at(body, pos + 3)
    if ch is None or body[pos : pos + 2] != _KEY_D or pos + 3 > len(body):
        return None
    width = _BIN_SIZES.get(body[pos + 2])
    if width is None:
        return None
    start = pos + 3 + width
    if int.from_bytes(body[pos + 3 : start], "big") != len(body) - start:
        return None  # a payload that is not the rest of the body: let msgpack say why
    return id, ch, start


def _uint_at(body: memoryview, pos: int) -> tuple[int | None, int]:
    """The msgpack unsigned integer at ``pos`` and the position after it."""
    if pos >= len(body):
        return None, pos
    first = body[pos]
    if first < 0x80:
        return first, pos + 1
    width = _UINT_SIZES.get(first)
    if width is None or pos + 1 + width > len(body):
        return None, pos
    return int.from_bytes(body[pos + 1 : pos + 1 + width], "big"), pos + 1 + width
