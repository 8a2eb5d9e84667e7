"""Frames over a transport.

:class:`FrameWriter` is a connection's single writer: control frames first, data in order,
batched ``writev``. :func:`receive_frames` turns what the transport delivers into frames.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Final

import trio

from protocol import CONNECTION_CLOSED, NEED_DATA, Connection, Frame, RemoteProtocolError

from ._transport import Buffer, Transport

__all__ = ["FrameWriter", "receive_frames"]

# One writev carries at most this many bytes of data frames (control frames always go):
# large enough to amortise the syscall, small enough that a control frame or another
# child's data never waits long behind one flood.
_BATCH_BYTES: Final = 1 << 20
_BATCH_ITEMS: Final = 256
# What one read of a copying connection's stream takes at most.
_RECEIVE_SIZE: Final = 1 << 20


class _DataItem:
    """Buffers to write, then optionally ``splice_size`` bytes moved from a pipe (whose
    fd the item owns: a dup, so the child's end may be closed meanwhile), each piece
    reported to ``on_moved``."""

    __slots__ = ("buffers", "on_moved", "on_written", "owner", "size", "splice_fd",
                 "splice_size")

    def __init__(
        self,
        buffers: tuple[Buffer, ...],
        on_written: Callable[[], None] | None,
        *,
        splice_fd: int | None = None,
        splice_size: int = 0,
        on_moved: Callable[[int], None] | None = None,
        owner: int | None = None,
    ) -> None:
        self.buffers = buffers
        self.owner = owner
        self.size = sum(len(b) for b in buffers) + splice_size
        self.on_written = on_written
        self.splice_fd = splice_fd
        self.splice_size = splice_size
        self.on_moved = on_moved

    def discard(self) -> None:
        if self.splice_fd is not None:
            os.close(self.splice_fd)
            self.splice_fd = None


class FrameWriter:
    """Serialises frames onto the transport.

    Control frames (everything but data and eof) are written before any queued data, so
    a signal acknowledgement or another child's exit never waits behind a flood. Data
    items keep their order: a channel's data, then its eof, in the order queued. The
    caller's ``on_written`` runs once an item's bytes are handed to the kernel, which is
    how a child's supervisor knows its output is out before it sends exit.

    Latency: when nothing is queued or being written, a frame is written at once from
    the caller (a non-blocking ``try_send``), saving the round trip through the writer
    task; whatever does not fit is queued, its unwritten rest ahead of everything else.

    Memory: control frames are small and produced in response to input; data items are
    bounded by the callers (each pump has a bounded number in flight).
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._control: deque[bytes] = deque()
        self._data: deque[_DataItem] = deque()
        self._wakeup = trio.Event()
        self._closed = False
        self._busy = False  # run() is inside a transport write
        self._partial: _DataItem | None = None  # the unwritten rest of a frame: goes first
        self._written = trio.lowlevel.ParkingLot()
        self.broken: BaseException | None = None

    @property
    def queued_control(self) -> int:
        return len(self._control)

    async def wait_written(self) -> None:
        """Wait until the next batch has been written (or the writer failed)."""
        if not self._closed:
            await self._written.park()

    def send_control(self, frame_bytes: bytes) -> None:
        """Queue an encoded control frame. Never blocks."""
        if frame_bytes and not self._closed and not self._write_now((frame_bytes,), None):
            self._control.append(frame_bytes)
            self._wakeup.set()

    def send_data(
        self, *buffers: Buffer, on_written: Callable[[], None] | None = None,
        owner: int | None = None,
    ) -> None:
        """Queue a data or eof frame (header and payload buffers). Never blocks. An
        ``owner`` (a child's id) lets :meth:`drop_queued` take it back."""
        if on_written is None and not any(buffers):
            return  # the connection dropped the frame: its child is being closed
        if not self._closed and not self._write_now(buffers, on_written):
            self._data.append(_DataItem(buffers, on_written, owner=owner))
            self._wakeup.set()

    def drop_queued(self, owner: int) -> None:
        """Drop ``owner``'s queued data items; those being written, or partly written,
        still go whole (frames never interleave). For a child about to be closed: a
        control frame overtakes queued data, so its data would reach the peer after the
        close, which refuses it."""
        if any(item.owner == owner for item in self._data):
            kept: deque[_DataItem] = deque()
            for item in self._data:
                if item.owner == owner:
                    item.discard()
                else:
                    kept.append(item)
            self._data = kept

    def send_splice(
        self, header: bytes, pipe_fd: int, size: int, on_moved: Callable[[int], None]
    ) -> None:
        """Queue a data frame whose ``size`` payload bytes wait in pipe ``pipe_fd``: the
        header is written, then the payload spliced (moved by the kernel, never copied into
        this process), ``on_moved(n)`` called for each piece as it leaves the pipe (see
        :meth:`Transport.send_spliced`). Only when ``transport.can_splice``. Never
        blocks."""
        if self._closed:
            return
        self._data.append(_DataItem((header,), None, splice_fd=os.dup(pipe_fd),
                                     splice_size=size, on_moved=on_moved))
        self._wakeup.set()

    def _write_now(
        self, buffers: tuple[Buffer, ...], on_written: Callable[[], None] | None
    ) -> bool:
        """Write at once when the writer is idle; False when the caller must queue it all.

        A partly written frame is kept in ``_partial``, to be finished before any other
        frame: bytes of two frames must never interleave."""
        if self._busy or self._partial is not None or self._control or self._data:
            return False
        written = self._transport.try_send(buffers)
        if not written:
            return False
        rest = _after(buffers, written)
        if rest:
            self._partial = _DataItem(tuple(rest), on_written)
            self._wakeup.set()
        elif on_written is not None:
            on_written()
        return True

    def close(self) -> None:
        """Stop accepting frames; ``run`` returns once what was queued is written."""
        self._closed = True
        self._wakeup.set()

    async def run(self) -> None:
        """Write until closed and drained. Raises BrokenResourceError if the peer is gone
        (also kept in ``broken``); on cancellation, unwritten frames are dropped."""
        try:
            while True:
                if not self._control and not self._data and self._partial is None:
                    if self._closed:
                        return
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                batch: list[_DataItem] = []
                buffers: list[Buffer] = []
                if self._partial is not None:
                    batch.append(self._partial)
                    buffers.extend(self._partial.buffers)
                    self._partial = None
                buffers.extend(self._control)
                self._control.clear()
                size = 0
                splice: _DataItem | None = None
                while self._data and size < _BATCH_BYTES and len(batch) < _BATCH_ITEMS:
                    item = self._data.popleft()
                    batch.append(item)
                    buffers.extend(item.buffers)
                    size += item.size
                    if item.splice_fd is not None:
                        splice = item  # its payload goes right after its header
                        break
                self._busy = True
                try:
                    if splice is None:
                        await self._transport.send_all(buffers)
                    else:
                        assert splice.splice_fd is not None
                        assert splice.on_moved is not None
                        await self._transport.send_spliced(
                            buffers, splice.splice_fd, splice.splice_size, splice.on_moved
                        )
                finally:
                    self._busy = False
                    for item in batch:
                        item.discard()
                for item in batch:
                    if item.on_written is not None:
                        item.on_written()
                if self._written:  # unpark_all costs even when nobody is parked
                    self._written.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.broken = exc
            self._closed = True
            raise
        finally:
            self._closed = True
            for item in self._data:
                item.discard()
            self._written.unpark_all()


def _after(buffers: tuple[Buffer, ...], written: int) -> list[memoryview]:
    """What is left of ``buffers`` once their first ``written`` bytes are gone."""
    rest: list[memoryview] = []
    for buffer in buffers:
        if written >= len(buffer):
            written -= len(buffer)
        else:
            rest.append(memoryview(buffer)[written:])
            written = 0
    return rest


async def receive_frames(
    transport: Transport, conn: Connection
) -> AsyncGenerator[Frame | RemoteProtocolError, None]:
    """Each frame from the peer as it arrives, and each protocol error in its place.

    After a non-fatal :class:`RemoteProtocolError` reading goes on; after a fatal one, or
    at a clean end of the stream, the iteration ends. Raises
    :class:`trio.BrokenResourceError` (or ClosedResourceError) when the transport fails.
    Use it inside ``contextlib.aclosing`` when the loop may be left early.
    """
    # A copying connection is done with what it was given once it has no more frames
    # (it copies the payloads and any partial frame), so one buffer serves every read;
    # reading into a fresh 1 MiB bytes object maps and unmaps memory for each message.
    scratch = None if conn.zero_copy else memoryview(bytearray(_RECEIVE_SIZE))
    while True:
        if scratch is None:
            with conn.get_buffer() as buffer:
                received = await transport.receive_into(buffer)
            conn.buffer_updated(received)
        else:
            received = await transport.receive_into(scratch)
            conn.receive_data(scratch[:received])
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                yield exc
                if exc.fatal:
                    return
                continue
            if event is NEED_DATA:
                break
            if event is CONNECTION_CLOSED:
                return
            assert isinstance(event, Frame)
            yield event
