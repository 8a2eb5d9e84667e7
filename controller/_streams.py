"""The trio streams of a remote process: stdin, stdout, stderr and extra fds."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final, Protocol

import trio

from link import Link
from protocol import CAP_STOP, Eof, Stop

from ._errors import raise_if_lost

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["RemoteFdStream", "RemoteReceiveStream", "RemoteSendStream"]

#: Most bytes ``receive_some()`` returns without ``max_bytes``. Each read copies that
#: much out of the receive buffers into new bytes; glibc serves up to 128 KiB from
#: memory it keeps, while larger blocks come and go from the OS (measured: ~90,000 page
#: faults per GiB read in 512 KiB pieces, ~400 in 128 KiB ones).
DEFAULT_RECEIVE_SIZE: Final = 1 << 17


class _Process(Protocol):
    """What a stream needs of its process."""

    @property
    def id(self) -> int: ...

    @property
    def closed(self) -> bool:
        """Close sent: nothing more flows either way."""
        ...

    @property
    def credit_lot(self) -> trio.lowlevel.ParkingLot:
        """Unparked when the agent grants credit for any of the process's channels (and
        when a wait for it must end: the stream closed, the agent lost)."""
        ...


class _Outgoing:
    """Controller → child on one channel: chunks data by credit and frame size."""

    def __init__(self, link: Link, process: _Process, ch: int) -> None:
        self._link = link
        self._process = process
        self._ch = ch
        self._busy = False
        self.eof_sent = False
        self.broken: str | None = None  # why writes fail (EPIPE at the child)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._busy = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            view = memoryview(data if isinstance(data, bytes) else bytes(data))
            while True:
                self._check_open()
                if not view:
                    break
                credit = await self._wait_credit()
                size = min(credit, len(view), self._link.conn.max_data_payload)
                chunk = view[:size]
                header = self._link.conn.send_data(self._process.id, self._ch, chunk)
                self._link.writer.send_data(header, chunk, owner=self._process.id)
                view = view[size:]
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._busy = False

    async def _wait_credit(self) -> int:
        while True:
            self._check_open()
            credit = self._link.conn.send_credit(self._process.id, self._ch)
            if credit:
                return credit
            await self._process.credit_lot.park()

    def _check_open(self) -> None:
        raise_if_lost(self._link)
        if self.eof_sent or self._process.closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self.broken is not None:
            raise trio.BrokenResourceError(self.broken)

    async def wait_send_all_might_not_block(self) -> None:
        await self._wait_credit()

    def send_eof(self) -> None:
        """End the channel; a send of another task waiting for credit raises
        ClosedResourceError at once (as would every later one)."""
        if not self.eof_sent and not self._process.closed and self._link.ended is None:
            self.eof_sent = True
            # Through the data queue: the eof must not overtake the data before it.
            self._link.writer.send_data(self._link.conn.send(Eof(self._process.id, self._ch)),
                                        owner=self._process.id)
        self.eof_sent = True
        self._process.credit_lot.unpark_all()


class _Incoming:
    """Child → controller on one channel: buffers what arrived, grants credit as read.

    Payloads arrive as views of the connection's receive buffers (zero copy) and are
    copied into the bytes a reader gets only when it reads them: the buffered window
    lives in a few reused buffers instead of fresh allocations that the allocator hands
    back to the OS and faults in again (measured: ~100,000 page faults per GiB)."""

    def __init__(self, link: Link, process: _Process, ch: int) -> None:
        self._link = link
        self._process = process
        self._ch = ch
        self._chunks: deque[bytes | memoryview] = deque()
        self.eof = False
        self._lot = trio.lowlevel.ParkingLot()
        self._busy = False
        # Closed on our side (aclose, the process closed): reads raise
        # ClosedResourceError, what arrives is discarded with its credit granted back.
        self.closed = False

    def feed(self, data: bytes | memoryview) -> None:
        if self.closed:
            self._grant(len(data))
        elif data:
            self._chunks.append(data)
            if self._lot:  # unpark_all costs even when nobody is parked
                self._lot.unpark_all()

    def buffered_views(self) -> int:
        """Bytes buffered as views of the connection's receive buffers."""
        return sum(len(c) for c in self._chunks if _in_receive_buffer(c))

    def copy_out(self) -> None:
        """Turn the buffered views into bytes, unpinning the receive buffers."""
        self._chunks = deque(bytes(c) if _in_receive_buffer(c) else c for c in self._chunks)

    def feed_eof(self) -> None:
        self.eof = True
        self._lot.unpark_all()

    def wake(self) -> None:
        self._lot.unpark_all()

    def receive_buffered(self) -> bytes:
        """The streams' ``receive_buffered``: what has arrived and not been read, taken
        without waiting, its credit granted."""
        if self._busy:
            raise trio.BusyResourceError("another task is receiving on this stream")
        if self.closed:
            raise trio.ClosedResourceError("the stream was closed")
        parts = list(self._chunks)
        self._chunks.clear()
        self._grant(sum(map(len, parts)))
        return b"".join(parts)

    def close(self) -> None:
        """The stream's ``aclose``: :meth:`stop_reading`, and have the agent stop the
        channel (when it can), so that the child's writes fail with EPIPE as they would
        with its reader gone locally, instead of going on into the void. An agent
        without the ``stop`` capability keeps sending: what comes is discarded."""
        # (The link drops it once the agent is lost.)
        hello = self._link.conn.their_hello
        if (not self.closed and not self.eof and not self._process.closed
                and hello is not None and CAP_STOP in hello.caps):
            self._link.send(Stop(self._process.id, self._ch))
        self.stop_reading()

    def stop_reading(self) -> None:
        """Close the stream on our side: discard what is buffered and what arrives from
        now on; a read blocked in another task raises ClosedResourceError at once, and so
        does every later read."""
        self.closed = True
        pending = sum(len(c) for c in self._chunks)
        self._chunks.clear()
        self._grant(pending)
        self._lot.unpark_all()

    def _grant(self, size: int) -> None:
        self._link.return_credit(self._process.id, self._ch, size)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        return b"".join(await self._receive(max_bytes or DEFAULT_RECEIVE_SIZE))

    async def receive_into(self, buffer: Buffer) -> int:
        with memoryview(buffer) as view, view.cast("B") as target:
            if target.readonly:
                raise TypeError("receive_into() needs a writable buffer")
            if not target:
                raise ValueError("receive_into() needs a buffer of at least one byte")
            size = 0
            for part in await self._receive(len(target)):
                target[size: size + len(part)] = part
                size += len(part)
            return size

    async def _receive(self, max_bytes: int) -> list[bytes | memoryview]:
        """Waits for data or EOF and returns the parts of up to ``max_bytes`` of it (no
        parts at EOF), granting the credit for them. Raises ClosedResourceError once the
        stream is closed on our side, also while it waits.

        Up to ``max_bytes`` because every read is a trio checkpoint: a bulk stream
        arrives as payloads of any size, and returning one of them per call cost ~2.4
        calls per 128 KiB (measured: 19,234 reads per GiB instead of 8,192). The parts
        may be views of the connection's receive buffers: the caller copies them out
        and drops them before it next yields, which frees those buffers for reuse."""
        if self._busy:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._busy = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            parked = False  # a park is a full checkpoint: no second yield needed
            while True:
                if self.closed:
                    raise trio.ClosedResourceError("the stream was closed")
                if self._chunks or self.eof:
                    break
                raise_if_lost(self._link)
                await self._lot.park()
                parked = True
            parts = self._take(max_bytes)
            self._grant(sum(map(len, parts)))
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return parts
        finally:
            self._busy = False

    def _take(self, max_bytes: int) -> list[bytes | memoryview]:
        """Removes up to ``max_bytes`` from the front of the buffered chunks."""
        chunks = self._chunks
        parts: list[bytes | memoryview] = []
        size = 0
        while chunks and size + len(chunks[0]) <= max_bytes:
            part = chunks.popleft()
            parts.append(part)
            size += len(part)
        if chunks and size < max_bytes:
            view = memoryview(chunks[0])  # slices of it copy nothing, even of bytes
            parts.append(view[: max_bytes - size])
            chunks[0] = view[max_bytes - size:]
        return parts


def _in_receive_buffer(chunk: bytes | memoryview) -> bool:
    # The connection's receive buffers are bytearrays; a view of bytes is the rest of a
    # chunk read in part.
    return isinstance(chunk, memoryview) and isinstance(chunk.obj, bytearray)


class RemoteSendStream(trio.abc.SendStream):
    """The child's stdin. ``send_all`` waits for flow-control credit; ``aclose`` sends
    eof (the child sees end of input), and a ``send_all`` of another task waiting for
    credit then raises :class:`trio.ClosedResourceError`, as does every later one. If
    the child closed its stdin, ``send_all`` raises :class:`trio.BrokenResourceError`;
    if the agent is lost, :class:`AgentLost`."""

    def __init__(self, outgoing: _Outgoing) -> None:
        self._out = outgoing

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._out.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._out.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._out.send_eof()
        await trio.lowlevel.checkpoint()


class RemoteReceiveStream(trio.abc.ReceiveStream):
    """The child's stdout or stderr. Reading grants the agent credit to send more: a
    stream nobody reads stops the child once the window is full (bounded memory).
    Returns ``b""`` at EOF (the child's end closed); raises :class:`AgentLost` if the
    agent is lost first. Once the stream is closed here (``aclose``, or the process
    closed), a read blocked in another task raises :class:`trio.ClosedResourceError` at
    once, and so does every later read."""

    def __init__(self, incoming: _Incoming) -> None:
        self._in = incoming

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._in.receive_some(max_bytes)

    async def receive_into(self, buffer: Buffer) -> int:
        """Like ``receive_some(len(buffer))``, but copies the bytes into ``buffer`` (any
        writable buffer) and returns how many; 0 at EOF. Reading into one reused buffer
        allocates nothing, so large reads cost no page faults. Cancelled, it has taken
        nothing from the stream and written nothing into ``buffer``."""
        return await self._in.receive_into(buffer)

    def receive_buffered(self) -> bytes:
        """Take, without waiting, every byte that has arrived and not been read
        (``b""`` when none has), granting the agent credit for it; not a checkpoint.

        Everything the child wrote before it exited has arrived once
        :meth:`RemoteProcess.wait` has returned (the protocol's ordering). So a reader
        that stops at the exit, not at EOF (which a background process holding the
        stream can delay for ever), cancels its reading task once ``wait()`` returns and
        takes the rest with this: no byte written before the exit is lost.

        Raises :class:`trio.ClosedResourceError` once the stream is closed on our side
        (what arrived was discarded), :class:`trio.BusyResourceError` while another task
        is receiving on it."""
        return self._in.receive_buffered()

    async def aclose(self) -> None:
        """Read no more: the child's later writes to this stream fail with EPIPE (or
        kill it with SIGPIPE), as with a local pipe whose reader closed it."""
        self._in.close()
        await trio.lowlevel.checkpoint()


class RemoteFdStream(trio.abc.HalfCloseableStream):
    """An extra fd channel: bidirectional, with ``send_eof`` as a half-close (the
    child's socket is shut down for writing only)."""

    def __init__(self, outgoing: _Outgoing, incoming: _Incoming) -> None:
        self._out = outgoing
        self._in = incoming

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._out.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._out.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        self._out.send_eof()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._in.receive_some(max_bytes)

    async def receive_into(self, buffer: Buffer) -> int:
        """As :meth:`RemoteReceiveStream.receive_into`."""
        return await self._in.receive_into(buffer)

    def receive_buffered(self) -> bytes:
        """As :meth:`RemoteReceiveStream.receive_buffered`."""
        return self._in.receive_buffered()

    async def aclose(self) -> None:
        """Both directions: eof to the child, and what :meth:`RemoteReceiveStream.aclose`
        does for reading (the child's writes to the fd fail with EPIPE)."""
        self._out.send_eof()
        self._in.close()
        await trio.lowlevel.checkpoint()
