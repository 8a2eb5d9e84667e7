"""The agent's single writer: control frames first, data round-robin, batched writev."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

import trio

from .transport import Buffer, Transport

__all__ = ["FrameWriter"]

# One writev carries at most this many bytes of data frames (control frames always go):
# large enough to amortise the syscall, small enough that a control frame or another
# child's data never waits long behind one flood.
_BATCH_BYTES: Final = 1 << 20
_BATCH_ITEMS: Final = 256


class _DataItem:
    __slots__ = ("buffers", "on_written", "size")

    def __init__(self, buffers: tuple[Buffer, ...], on_written: Callable[[], None] | None):
        self.buffers = buffers
        self.size = sum(len(b) for b in buffers)
        self.on_written = on_written


class FrameWriter:
    """Serialises frames onto the transport.

    Control frames (everything but data and eof) are written before any queued data, so
    a signal acknowledgement or another child's exit never waits behind a flood. Data
    items keep their order: a channel's data, then its eof, in the order queued. The
    caller's ``on_written`` runs once an item's bytes are handed to the kernel, which is
    how a child's supervisor knows its output is out before it sends exit.

    Memory: control frames are small and produced in response to input; data items are
    bounded by the callers (each pump has a bounded number in flight).
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._control: deque[bytes] = deque()
        self._data: deque[_DataItem] = deque()
        self._wakeup = trio.Event()
        self._closed = False
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
        if frame_bytes and not self._closed:
            self._control.append(frame_bytes)
            self._wakeup.set()

    def send_data(
        self, *buffers: Buffer, on_written: Callable[[], None] | None = None
    ) -> None:
        """Queue a data or eof frame (header and payload buffers). Never blocks."""
        if self._closed:
            return
        self._data.append(_DataItem(buffers, on_written))
        self._wakeup.set()

    def close(self) -> None:
        """Stop accepting frames; ``run`` returns once what was queued is written."""
        self._closed = True
        self._wakeup.set()

    async def run(self) -> None:
        """Write until closed and drained. Raises BrokenResourceError if the peer is gone
        (also kept in ``broken``); on cancellation, unwritten frames are dropped."""
        try:
            while True:
                if not self._control and not self._data:
                    if self._closed:
                        return
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                buffers: list[Buffer] = list(self._control)
                self._control.clear()
                batch: list[_DataItem] = []
                size = 0
                while self._data and size < _BATCH_BYTES and len(batch) < _BATCH_ITEMS:
                    item = self._data.popleft()
                    batch.append(item)
                    buffers.extend(item.buffers)
                    size += item.size
                await self._transport.send_all(buffers)
                for item in batch:
                    if item.on_written is not None:
                        item.on_written()
                self._written.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.broken = exc
            self._closed = True
            raise
        finally:
            self._written.unpark_all()
