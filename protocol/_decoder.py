"""Incremental frame decoder: feed bytes, take frames."""

from __future__ import annotations

from typing import Final

import msgpack

from ._codec import HEADER_SIZE, MAX_ID, FrameInvalid, decode_body, unpack_length
from ._errors import ErrorKind, RemoteProtocolError
from ._frames import Frame

__all__ = ["FrameDecoder"]

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
        # Frames are parsed straight out of the bytes object last fed when the previous
        # one ended on a frame boundary; only a frame split across feeds is copied into
        # a bytearray. Large data frames thus cost one copy (into their payload) here.
        self._buf: bytes | bytearray = b""
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as frames."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        if self._pos == len(self._buf):
            self._buf = data if isinstance(data, bytes) else bytes(data)
            self._pos = 0
            return
        if isinstance(self._buf, bytes):
            self._buf = bytearray(memoryview(self._buf)[self._pos :])
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        buf = self._buf
        start = self._pos
        available = len(buf) - start
        if available < HEADER_SIZE:
            return None
        length = unpack_length(buf, start)
        if length == 0 or length > self.max_frame_size:
            raise RemoteProtocolError(
                ErrorKind.FRAME_TOO_LARGE if length else ErrorKind.MALFORMED,
                f"frame header announces {length} bytes; the limit is {self.max_frame_size}"
                if length
                else "frame header announces an empty frame",
                fatal=True,
            )
        end = start + HEADER_SIZE + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            body_view = view[start + HEADER_SIZE : end]
            try:
                body = msgpack.unpackb(
                    body_view, raw=False, unicode_errors="surrogateescape"
                )
            except Exception as exc:  # msgpack raises many types for bad input
                # Map keys other than strings are refused here (strict_map_key): a map of
                # colliding integer keys would make decoding quadratic.
                raise RemoteProtocolError(
                    ErrorKind.MALFORMED,
                    f"frame body ({length} bytes) is not one msgpack value with string "
                    f"map keys: {type(exc).__name__} {exc}".rstrip(),
                    fatal=True,
                ) from None
            finally:
                body_view.release()
        self._pos = end
        if end == len(buf):
            self._buf = b""
            self._pos = 0
        elif end >= _COMPACT_AT and isinstance(buf, bytearray):
            del buf[:end]
            self._pos = 0
        if type(body) is not dict:
            raise RemoteProtocolError(
                ErrorKind.MALFORMED,
                f"frame body is a msgpack {type(body).__name__}, not a map",
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
