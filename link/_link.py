"""One connection's link: its Connection, its writer, and the loops that run them."""

from __future__ import annotations

import contextlib
from typing import Final, Protocol

import trio

from protocol import Connection, Error, Frame, RemoteProtocolError

from ._transport import Transport
from ._wire import FrameWriter, receive_frames

__all__ = ["Link", "Receiver"]

#: Pause reading frames while this many control frames wait to be written: a peer that
#: sends but never reads must not make us queue replies without bound.
_MAX_QUEUED_CONTROL: Final = 10_000


class Receiver(Protocol):
    """What a :class:`Link` delivers to: the end (agent or controller) it serves."""

    def frame_received(self, frame: Frame) -> None:
        """A frame the connection accepted. Runs in the link's reading task: must not
        block (frames behind it wait)."""
        ...

    def protocol_error(self, error: RemoteProtocolError) -> None:
        """The peer broke the protocol; the error frame that tells it is queued already.
        After a fatal error the link reads no more: the receiver ends it (:meth:`Link.end`)
        with the reason it gives."""
        ...

    async def stream_ended(self) -> None:
        """The peer's stream ended cleanly (end of file, or the end of the connection
        the protocol defines): whether that ends the link is the receiver's to say."""
        ...

    def link_ended(self, reason: str) -> None:
        """The link has ended, for ``reason`` (see :meth:`Link.end`)."""
        ...


class Link:
    """A protocol :class:`~protocol.Connection` carried over a :class:`Transport`.

    Owns the connection, its single :class:`FrameWriter` and whether the link has ended
    (``ended``: why, or None while it works). :meth:`run` writes our hello, then writes
    what is queued and reads: each frame from the peer goes to the receiver's
    ``frame_received``, in order; a protocol error of the peer is answered with its
    error frame and given to ``protocol_error``. The link ends (:meth:`end`) when
    writing or reading fails, or when the receiver says so (at a fatal protocol error,
    at the end of the peer's stream); the transport's failures end it rather than
    raise.
    """

    def __init__(self, conn: Connection, transport: Transport, receiver: Receiver) -> None:
        self.conn = conn
        self.transport = transport
        self.writer = FrameWriter(transport)
        self.ended: str | None = None
        self._receiver = receiver
        self._peer = conn.peer_role.value  # "agent" or "controller", for the reasons
        self._written = trio.Event()  # the writer is done: drained, failed or cancelled

    def send(self, frame: Frame) -> None:
        """Queue a control frame (written ahead of queued data). Never blocks. Once the
        link has ended, frames are dropped (those queued before are still written)."""
        if self.ended is None:
            self.writer.send_control(self.conn.send(frame))

    def send_after_data(self, frame: Frame) -> None:
        """Queue a frame behind every data and eof frame queued so far (control frames
        overtake those): for a frame that must come last, about a child (closed) or of
        the connection (goodbye). Dropped once the link has ended, like :meth:`send`."""
        if self.ended is None:
            self.writer.send_data(self.conn.send(frame))

    def return_credit(self, id: int, ch: int, size: int, *, now: bool = False) -> None:
        """``size`` more bytes of channel ``ch`` of child ``id`` were consumed: queue the
        window frame the Connection says is due (at half a window, or at once with
        ``now``; none for a channel or child that wants no more). Never blocks; dropped
        once the link has ended, like :meth:`send`."""
        if self.ended is None:
            window = self.conn.consumed(id, ch, size, now=now)
            if window:
                self.writer.send_control(window)

    def end(self, reason: str) -> None:
        """End the link: the first reason wins, and the receiver's ``link_ended`` is
        told it once. From now on :meth:`send` and :meth:`send_after_data` drop their
        frames (so an end that queues goodbye, then ends the link, sends nothing after
        it); what was queued is still written until :meth:`flush` or cancellation
        stops the writer."""
        if self.ended is None:
            self.ended = reason
            self._receiver.link_ended(reason)

    async def run(self) -> None:
        """Send our hello, then write and read until both are over or cancelled: the
        writer runs until :meth:`flush` (or a write fails), the reader until the peer's
        stream ends (and the receiver's ``stream_ended`` returns), a fatal protocol
        error, or a failed read. Never raises for the transport's failures."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write)
            self.writer.send_control(self.conn.initiate())
            nursery.start_soon(self._read)

    async def flush(self, timeout: float) -> None:
        """Stop accepting frames and wait until those queued are written, for at most
        ``timeout`` seconds (never for ever on a peer that stopped reading)."""
        self.writer.close()
        with trio.move_on_after(timeout):
            await self._written.wait()

    async def _write(self) -> None:
        try:
            await self.writer.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.end(f"writing to the {self._peer} failed: {exc}")
        finally:
            self._written.set()

    async def _read(self) -> None:
        receiver, writer = self._receiver, self.writer
        frame_received = receiver.frame_received
        try:
            async with contextlib.aclosing(receive_frames(self.transport, self.conn)) as frames:
                async for event in frames:
                    if isinstance(event, RemoteProtocolError):
                        self.send(Error.from_exception(event))
                        receiver.protocol_error(event)
                        if event.fatal:
                            return
                        continue
                    frame_received(event)
                    while writer.queued_control > _MAX_QUEUED_CONTROL:
                        await writer.wait_written()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.end(f"reading from the {self._peer} failed: {exc}")
            return
        await receiver.stream_ended()
