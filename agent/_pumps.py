"""Per-channel pumps between a child's pipes/sockets and the controller's link."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import itertools
import os
import socket
import termios
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

import trio

from link import Link
from protocol import Data, Eof, Error, ErrorKind

__all__ = ["OUTPUT_BUDGET", "ByteBudget", "Endpoint", "InPump", "OutPump", "PumpOwner",
           "fionread"]

#: Bytes of child output the agent may hold (read but not yet written) across all children.
OUTPUT_BUDGET: Final = 4 << 20

#: Largest read from a child's pipe: one data frame.
READ_CHUNK: Final = 1 << 18
# Frames a pump may have queued in the writer but not yet written: lets the next read
# overlap the previous write without letting one channel hog the writer's queue.
_MAX_IN_FLIGHT: Final = 2
# Output at least this large is spliced rather than read; at most this much per frame.
# Measured per GiB of stdout (agent CPU + controller CPU) and the echo p99 of another
# child meanwhile, with the zero-copy controller: 512 KiB frames 0.53 + 0.75 s / 2.0 ms,
# 1 MiB 0.41-0.45 + 0.6-0.7 s / 2.7 ms (the pipes hold 1 MiB: larger gains nothing).
_SPLICE_MIN: Final = 1 << 16
_SPLICE_CHUNK: Final = 1 << 20


class ByteBudget:
    """A semaphore counted in bytes; a request larger than the limit waits for zero."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.used = 0
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, size: int) -> None:
        while self.used and self.used + size > self._limit:
            await self._lot.park()
        self.used += size

    def release(self, size: int) -> None:
        if size:
            self.used -= size
            if self._lot:  # unpark_all costs even when nobody is parked
                self._lot.unpark_all()


class PumpOwner(Protocol):
    """What a pump needs of the child it serves."""

    @property
    def id(self) -> int: ...

    @property
    def credit_lot(self) -> trio.lowlevel.ParkingLot:
        """Unparked when the controller grants credit for any of the child's channels."""
        ...

    def pump_finished(self) -> None:
        """An output pump has finished (sent its eof, or given up)."""
        ...


def fionread(fd: int) -> int:
    """Bytes waiting to be read on a pipe or socket."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return buf[0]


# Reads of interactive (small) output go through this one buffer and are copied out.
# ``os.read(fd, 256 KiB)`` allocates the full size before reading: above glibc's mmap
# threshold that is an mmap, an mremap to shrink it to the 64 bytes read, an munmap when
# it is freed and a page fault, for every echo (measured: the agent's CPU per 64 B echo
# 263 -> 210 us, its p50 350 -> 288 us). Bulk reads keep ``os.read``: there the
# allocation is needed anyway and a copy would come on top. Shared by every pump: the
# read and the copy happen with no checkpoint between them.
_SMALL_READ: Final = _SPLICE_MIN  # a read that fills it is bulk
_small_read_buffer = memoryview(bytearray(_SMALL_READ))


def _read_small(fd: int, size: int) -> bytes:
    count = os.readv(fd, (_small_read_buffer[:size],))
    return _small_read_buffer[:count].tobytes()


class Endpoint:
    """The parent's end of one channel: a pipe end (one direction) or a socket (both).

    Closes the fd once every direction using it is done. Closing first tells trio, so a
    task waiting on the fd wakes up with ClosedResourceError rather than hanging.
    """

    def __init__(self, fd: int, directions: int, on_close: Callable[[], None]) -> None:
        self.fd = fd
        self._remaining = directions
        self._on_close = on_close
        self.closed = False

    def done(self, how: int | None = None) -> None:
        """One direction finished; ``how`` is the socket shutdown to apply, if any."""
        if self.closed:
            return
        self._remaining -= 1
        if self._remaining > 0:
            if how is not None:
                with contextlib.suppress(OSError):
                    _shutdown(self.fd, how)
            return
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.fd)
            self._on_close()


def _shutdown(fd: int, how: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(how)
    finally:
        sock.detach()


class OutPump:
    """Child → controller on one channel (1, 2 or an extra fd).

    Reads only while the channel has credit and the agent's output budget allows, so a
    controller that stops reading stops the child (its pipe fills) instead of growing the
    agent's memory. Sends ``eof`` with the byte count when the child's end closes, or
    when the controller sends ``stop`` (:meth:`stop`).
    """

    def __init__(self, link: Link, budget: ByteBudget, child: PumpOwner, ch: int,
                 endpoint: Endpoint) -> None:
        self._link = link
        self._budget = budget
        self._child = child
        self.ch = ch
        self.endpoint = endpoint
        self.read_total = 0
        self.written_total = 0
        self.finished = False
        self.dropped = False  # output is no longer wanted (the child closed, or stopped)
        self.stopped = False  # the controller reads no more of this channel
        self._scope = trio.CancelScope()  # cancelled by stop()
        self._in_flight = 0
        self._progress = trio.lowlevel.ParkingLot()
        # Bulk output of a pipe is spliced to the controller (Linux): the kernel moves the
        # pages, the agent never copies them. At most one splice at a time: its bytes are
        # still in the pipe, so nothing else may read the pipe until it is done.
        self._can_splice = link.transport.can_splice and ch in (1, 2)
        self._splicing = 0
        # Whether the last read found bulk output: then look (FIONREAD) for more to
        # splice and read with a large buffer; not while reads find only small output,
        # as interactive output does. Off at first (most children write little); a read
        # that fills the small buffer turns it on.
        self._bulk = False

    async def run(self) -> None:
        """Pump until the child's end closes or the controller stops the channel, then
        send its eof, and close our end (a socket's read side only). Returns without eof
        when the child is closed."""
        ended = False
        try:
            with self._scope:
                ended = await self._pump()
            if ended or self.stopped:
                self._link.writer.send_data(self._link.conn.send(Eof(self._child.id, self.ch)))
        except trio.ClosedResourceError:
            pass  # the child was released while we waited
        finally:
            self.finished = True
            self._progress.unpark_all()
            # After a stop this is what makes the child's writes fail with EPIPE: the
            # pipe has no reader left (once a splice under way, which reads through a
            # dup, is done); a socket is shut down for reading, its other direction
            # goes on.
            self.endpoint.done(socket.SHUT_RD)
            self._child.pump_finished()

    def stop(self) -> None:
        """The controller reads no more of this channel: read nothing more, end it with
        its eof (frames already queued for the writer still go: the eof counts them)
        and close our read end. Exit no longer waits for its output."""
        self.stopped = True
        self.dropped = True
        self._progress.unpark_all()
        self._scope.cancel()

    async def _pump(self) -> bool:
        """Move the child's output until its end closes (True); False when the child
        was closed or the channel stopped. A stop may come while this task is being
        woken (too late to cancel that wait): it is checked after each wait."""
        link, budget, child, conn = self._link, self._budget, self._child, self._link.conn
        fd = self.endpoint.fd
        while not self.stopped:
            credit = conn.send_credit(child.id, self.ch)
            if credit == 0 or self._in_flight >= _MAX_IN_FLIGHT or self._splicing:
                if not conn.can_send(child.id, self.ch):
                    return False  # the controller closed the child
                if credit or self._splicing:
                    await self._progress.park()
                elif await self._ends_before_credit(fd):
                    return True  # eof carries no data: it needs no credit
                continue
            # Bulk output usually waits already when the last splice is written:
            # splice it without a wait, which would cost a scheduling round (the
            # park for the splice's completion is this iteration's checkpoint).
            bulk = self._can_splice and self._bulk
            if bulk and self._splice(credit):
                continue
            # Wait for output before taking budget: an idle child must hold none.
            await trio.lowlevel.wait_readable(fd)
            if self.stopped:
                break
            if bulk and self._splice(credit):
                continue
            size = min(credit, READ_CHUNK if self._bulk else _SMALL_READ,
                       conn.max_data_payload)
            await budget.acquire(size)
            if self.stopped:
                budget.release(size)
                break
            try:
                data = os.read(fd, size) if self._bulk else _read_small(fd, size)
            except BlockingIOError:
                data = None
            except OSError as exc:  # ECONNRESET on a socket: its end is gone
                if exc.errno not in (errno.ECONNRESET, errno.EIO):
                    budget.release(size)
                    raise
                data = b""
            budget.release(size - len(data or b""))
            if data is None:
                continue
            if not data:
                return True
            self._bulk = len(data) >= _SPLICE_MIN
            self.read_total += len(data)
            header = conn.send_data(child.id, self.ch, data)
            if not header:  # the controller closed the child meanwhile
                budget.release(len(data))
                self.dropped = True
                return False
            self._in_flight += 1
            link.writer.send_data(header, data, on_written=self._written_cb(len(data)))
        return False

    def _splice(self, credit: int) -> bool:
        """Queue a splice of what the pipe holds, if that is bulk; False to read instead."""
        conn, child = self._link.conn, self._child
        waiting = fionread(self.endpoint.fd)
        if waiting < _SPLICE_MIN:
            return False  # small output (or eof): a read is cheaper and sees eof
        size = min(waiting, credit, _SPLICE_CHUNK, conn.max_data_payload)
        header = conn.send_data_header(child.id, self.ch, size)
        if not header:  # the controller closed the child
            self.dropped = True
            raise trio.ClosedResourceError("the child was closed")
        self.read_total += size
        self._splicing = size
        self._link.writer.send_splice(header, self.endpoint.fd, size, self._moved)
        return True

    def _moved(self, size: int) -> None:
        """A piece of the splice under way left the child's pipe (is written)."""
        self._splicing -= size
        self.written_total += size
        if not self._splicing:
            self._progress.unpark_all()

    async def _ends_before_credit(self, fd: int) -> bool:
        """Wait for credit, or for the child's end to close with nothing left unread
        (True). Without this a controller that granted exactly what the child wrote
        would never see the channel's eof."""
        ended = closed = False

        async def watch(scope: trio.CancelScope) -> None:
            nonlocal ended, closed
            try:
                if fionread(fd) == 0:
                    await trio.lowlevel.wait_readable(fd)
                    # Readable with nothing to read: the other end closed.
                    ended = fionread(fd) == 0
            except (trio.ClosedResourceError, OSError):
                closed = True
                scope.cancel()
                return
            if ended:
                scope.cancel()
            # Else data is waiting: only credit can move this channel on.

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            await self._child.credit_lot.park()
            nursery.cancel_scope.cancel()
        if closed:
            raise trio.ClosedResourceError("the child was released")
        return ended

    def _written_cb(self, size: int) -> Callable[[], None]:
        def written() -> None:
            self._in_flight -= 1
            self.written_total += size
            self._budget.release(size)
            if self._progress:  # unpark_all costs even when nobody is parked
                self._progress.unpark_all()
        return written

    def drain_target(self) -> int:
        """The byte count at which everything the channel holds right now is written out:
        what was read (some of it may still wait in the writer's queue) plus what the
        pipe holds."""
        if self.finished or self.endpoint.closed:
            return self.read_total
        try:
            # What is left of the splice under way is counted in read_total and is still
            # in the pipe: count it once (_splicing shrinks as the splice moves).
            return self.read_total + fionread(self.endpoint.fd) - self._splicing
        except OSError:
            return self.read_total

    async def drain(self, target: int) -> None:
        """Return once ``target`` bytes have been written out, or output was dropped
        because the controller closed the child or stopped the channel. Written, not
        merely queued (even when the pump has finished reading): exit is a control
        frame, which the writer sends ahead of queued data."""
        while self.written_total < target and not self.dropped:
            await self._progress.park()


class InPump:
    """Controller → child on one channel (0 or an extra fd).

    Buffers at most the credit it granted (the protocol enforces it) and grants more as
    it writes into the child. If the child's end is gone (EPIPE), reports ``write-failed``
    once, then discards further data for the channel while still granting credit, so the
    controller is told rather than blocked.
    """

    def __init__(self, link: Link, child: PumpOwner, ch: int, endpoint: Endpoint) -> None:
        self._link = link
        self._child = child
        self.ch = ch
        self.endpoint = endpoint
        self._chunks: deque[memoryview] = deque()
        self._eof = False
        self._broken = False
        self._wakeup = trio.lowlevel.ParkingLot()

    def feed(self, frame: Data) -> None:
        if self._broken or self.endpoint.closed:
            self._grant(len(frame.data))
        elif frame.data:
            idle = not self._chunks  # the task is parked, not in the middle of a write
            self._chunks.append(memoryview(frame.data))
            if idle:
                # Write from the reader right away: an interactive byte reaches the child
                # without waiting for the pump task's turn. Errors are the task's to report.
                with contextlib.suppress(OSError):
                    self._write_some()
            if self._chunks or self._broken:
                self._wakeup.unpark_all()

    def feed_eof(self) -> None:
        self._eof = True
        self._wakeup.unpark_all()

    def _grant(self, size: int) -> None:
        # Once broken, everything is discarded: its credit goes back at once.
        self._link.return_credit(self._child.id, self.ch, size, now=self._broken)

    async def run(self) -> None:
        try:
            while not self._broken:
                if not self._chunks:
                    if self._eof:
                        break
                    await self._wakeup.park()
                    continue
                if not self._write_some():
                    await trio.lowlevel.wait_writable(self.endpoint.fd)
        except trio.ClosedResourceError:
            pass
        finally:
            self.endpoint.done(socket.SHUT_WR)

    def _write_some(self) -> bool:
        """One non-blocking write of the queued chunks; False when the pipe is full.

        EPIPE (the child's end is gone) marks the channel broken; other errors raise."""
        try:
            written = os.writev(self.endpoint.fd, list(itertools.islice(self._chunks, 64)))
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise
            self._fail(exc)
            return True
        self._consume(written)
        return True

    def _consume(self, written: int) -> None:
        self._grant(written)
        while written:
            head = self._chunks[0]
            if written >= len(head):
                written -= len(head)
                self._chunks.popleft()
            else:
                self._chunks[0] = head[written:]
                written = 0

    def _fail(self, exc: OSError) -> None:
        self._broken = True
        pending = sum(len(c) for c in self._chunks)
        self._chunks.clear()
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self._link.send(
            Error(
                kind=ErrorKind.WRITE_FAILED,
                msg=f"writing channel {self.ch} of child {self._child.id}: {exc.strerror}; "
                f"{pending} buffered bytes discarded",
                id=self._child.id,
                errno=name,
                ref="data",
                ch=self.ch,
            )
        )
        self._grant(pending)
