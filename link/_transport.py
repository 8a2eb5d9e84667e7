"""Byte transports under a protocol connection.

A transport moves bytes and nothing else: ``receive_into(buffer)`` puts the next chunk in
the caller's buffer (a zero-copy connection's, or one reused buffer) and returns its
size, 0 at end of stream; ``send_all(buffers)`` writes a list of buffers in order. The fd
transport writes with ``os.writev`` so a data frame's payload goes from the pipe it was
read from to the peer without being copied into a frame.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import trio

__all__ = [
    "Buffer", "FdTransport", "StreamTransport", "Transport", "enlarge_pipe", "fill_standard_fds",
]

#: Pipe buffer size asked for by enlarge_pipe (Linux's default pipe-max-size).
PIPE_SIZE: Final = 1 << 20
_F_SETPIPE_SZ: Final = 1031  # Linux; not in Python 3.11's fcntl module
# Linux's IOV_MAX; writev refuses more buffers than this in one call.
_IOV_MAX: Final = 1024

Buffer = bytes | bytearray | memoryview


class Transport(Protocol):
    async def receive_into(self, buffer: memoryview) -> int:
        """Put the next bytes from the peer at the start of ``buffer``; their number, 0
        once the stream has ended.

        Raises :class:`trio.BrokenResourceError` when the stream failed.
        """
        ...

    async def send_all(self, buffers: Sequence[Buffer]) -> None:
        """Write every buffer, in order. Raises :class:`trio.BrokenResourceError` when the
        peer is gone (EPIPE, ECONNRESET); on cancellation some prefix may have been sent."""
        ...

    def try_send(self, buffers: Sequence[Buffer]) -> int:
        """Write what the transport takes right now without blocking; bytes written
        (0 when it would block, or cannot write synchronously). Errors are left for
        ``send_all`` to report."""
        ...

    #: Whether :meth:`send_spliced` works (the kernel moves pipe pages, no copy).
    can_splice: bool

    async def send_spliced(self, buffers: Sequence[Buffer], pipe_fd: int, size: int,
                           on_moved: Callable[[int], None]) -> None:
        """Write every buffer, then move exactly ``size`` bytes, which must already wait
        in the pipe ``pipe_fd``, to the peer: one checkpoint for both. ``on_moved(n)``
        is called for each piece moved, before any checkpoint: at any checkpoint, the
        pipe still holds ``size`` minus the pieces reported. Raises
        BrokenResourceError when the peer is gone."""
        ...

    async def wait_peer_gone(self) -> None:
        """Return once the peer can no longer receive what we send (it closed its end of
        our output: a pipe's reader is gone, a socket hung up), found out without
        writing. Never returns where that cannot be known without writing: regular
        files, ``/dev/null``, trio streams."""
        ...

    async def aclose(self) -> None:
        """Release the transport. Idempotent."""
        ...


class FdTransport:
    """A transport over two file descriptors (pipes, sockets, ttys), owned by it.

    Both fds are switched to non-blocking mode, which changes the open file description:
    other holders of the same description (a parent shell) see it too, as with
    :class:`trio.lowlevel.FdStream`. Regular files, which cannot be polled, are read and
    written directly (they never block for long).
    """

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read_fd = read_fd
        self._write_fd = write_fd
        for fd in {read_fd, write_fd}:
            _make_nonblocking(fd)
        self._closed = False
        self.can_splice = hasattr(os, "splice")
        # After a read that took less than asked for, the fd was drained: the next read
        # waits for readiness first instead of trying and failing with EAGAIN (a syscall
        # and an exception per message). Regular files cannot be waited for.
        self._wait_first = False
        self._pollable = not stat.S_ISREG(os.fstat(read_fd).st_mode)

    async def receive_into(self, buffer: memoryview) -> int:
        self._check_open()
        waited = self._wait_first
        if waited:
            await trio.lowlevel.wait_readable(self._read_fd)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            # Checked after every wait too: a wait that readiness ended before aclose()
            # closed the fd does not see the close, and the number may be reused by then.
            self._check_open()
            try:
                received = os.readv(self._read_fd, (buffer,))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._read_fd)
                waited = True
                continue
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EIO):
                    raise trio.BrokenResourceError(f"reading the peer failed: {exc}") from exc
                raise
            if not waited:  # a wait is a checkpoint already; each costs a loop round
                await trio.lowlevel.cancel_shielded_checkpoint()
            self._wait_first = self._pollable and 0 < received < len(buffer)
            return received

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("transport is closed")

    async def send_all(self, buffers: Sequence[Buffer]) -> None:
        self._check_open()
        await trio.lowlevel.checkpoint_if_cancelled()
        if not await self._write(buffers):  # a wait is a checkpoint already
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_spliced(self, buffers: Sequence[Buffer], pipe_fd: int, size: int,
                           on_moved: Callable[[int], None]) -> None:
        self._check_open()
        await trio.lowlevel.checkpoint_if_cancelled()
        # Each checkpoint costs a scheduling round (~33,000 instructions): the header and
        # the payload of a spliced frame share one.
        waited = await self._write(buffers)
        if not await self._splice(pipe_fd, size, on_moved) and not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _write(self, buffers: Sequence[Buffer]) -> bool:
        """Write every buffer; whether that waited for room."""
        pending = [memoryview(b) for b in buffers if len(b)]
        waited = False
        while pending:
            self._check_open()  # after each wait too (see receive_into)
            try:
                written = os.writev(self._write_fd, pending[:_IOV_MAX])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._write_fd)
                waited = True
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise trio.BrokenResourceError(f"the peer is gone: {exc}") from exc
            # Drop what was written: whole buffers, then the front of a partial one.
            index = 0
            while index < len(pending) and written >= len(pending[index]):
                written -= len(pending[index])
                index += 1
            del pending[:index]
            if written:
                pending[0] = pending[0][written:]
        return waited

    async def _splice(self, pipe_fd: int, size: int, on_moved: Callable[[int], None]) -> bool:
        """Move ``size`` bytes from ``pipe_fd``; whether that waited for room."""
        waited = False
        while size:
            self._check_open()  # after each wait too (see receive_into)
            try:
                moved = os.splice(pipe_fd, self._write_fd, size,
                                  flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:  # the source holds the bytes: our side is full
                await trio.lowlevel.wait_writable(self._write_fd)
                waited = True
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise trio.BrokenResourceError(f"the peer is gone: {exc}") from exc
            if moved == 0:
                raise RuntimeError(f"pipe {pipe_fd} ended before the {size} bytes announced")
            size -= moved
            on_moved(moved)
        return waited

    def try_send(self, buffers: Sequence[Buffer]) -> int:
        if self._closed:
            return 0
        try:
            return os.writev(self._write_fd, buffers[:_IOV_MAX])
        except OSError:  # EAGAIN, or an error send_all will meet and report
            return 0

    async def wait_peer_gone(self) -> None:
        self._check_open()
        # The kernel always reports an error or hang-up on a polled fd, whatever events
        # were asked for: an epoll set holding only our output fd, asking for nothing,
        # turns readable exactly then. (trio's wait_writable would return at once, and
        # then on every round the fd has room.)
        with select.epoll() as watch:
            try:
                watch.register(self._write_fd, 0)
            except PermissionError:  # a regular file or /dev/null: cannot be polled
                await trio.sleep_forever()
            await trio.lowlevel.wait_readable(watch.fileno())

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in {self._read_fd, self._write_fd}:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        await trio.lowlevel.checkpoint()


def _make_nonblocking(fd: int) -> None:
    # Regular files and /dev/null never report EAGAIN, so they are never polled (epoll
    # refuses them); everything else waits for readiness when it would block.
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.set_blocking(fd, False)


class StreamTransport:
    """A transport over trio streams (memory streams in tests, sockets, process pipes)."""

    def __init__(self, send_stream: trio.abc.SendStream, receive_stream: trio.abc.ReceiveStream):
        self._send_stream = send_stream
        self._receive_stream = receive_stream

    async def receive_into(self, buffer: memoryview) -> int:
        data = await self._receive_stream.receive_some(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    async def send_all(self, buffers: Sequence[Buffer]) -> None:
        await self._send_stream.send_all(b"".join(buffers))

    def try_send(self, buffers: Sequence[Buffer]) -> int:
        return 0  # trio streams have no synchronous send

    can_splice = False

    async def send_spliced(self, buffers: Sequence[Buffer], pipe_fd: int, size: int,
                           on_moved: Callable[[int], None]) -> None:
        raise NotImplementedError("trio streams cannot splice")

    async def wait_peer_gone(self) -> None:
        await trio.sleep_forever()  # a trio stream tells only when written to

    async def aclose(self) -> None:
        await self._send_stream.aclose()
        await self._receive_stream.aclose()


def enlarge_pipe(fd: int) -> None:
    """Raise a pipe's buffer to 1 MiB where the OS allows (Linux; a no-op for non-pipes
    and when over the user's pipe quota): fewer, larger reads and writes per byte relayed,
    the difference between ~1.0 and ~1.6 GB/s on a 2-core machine."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)


def fill_standard_fds() -> list[int]:
    """Open /dev/null on each of fds 0, 1 and 2 that is closed; return those fds.

    A program started with a standard fd closed would otherwise get its next file, pipe or
    socket at that number, and reading "stdin" would read that instead. Call it first thing
    in ``main``, before anything opens an fd.
    """
    filled = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # the lowest free number is fd itself unless a lower one is free
                os.dup2(null, fd)
                os.close(null)
            filled.append(fd)
    return filled
