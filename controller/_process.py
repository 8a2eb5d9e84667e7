"""A child process running under an agent, with trio's Process API."""

from __future__ import annotations

import errno as errno_module
import os
import signal as signal_module
from collections import deque
from collections.abc import Awaitable, Generator
from types import TracebackType
from typing import Any

import trio

from link import Link
from protocol import (
    SIGNAL_NAMES,
    Close,
    Closed,
    Data,
    Eof,
    Error,
    Exit,
    Frame,
    Signal,
    SignalAck,
    Started,
    Window,
)

from ._errors import RemoteError, raise_if_lost
from ._streams import (
    RemoteFdStream,
    RemoteReceiveStream,
    RemoteSendStream,
    _Incoming,
    _Outgoing,
)

__all__ = ["RemoteProcess", "wire_signal_name"]

#: How long leaving a RemoteProcess block waits for the killed child's exit frame.
_KILL_WAIT = 10.0


def wire_signal_name(sig: signal_module.Signals | int | str) -> str:
    """The wire name of a signal: "TERM" for signal.SIGTERM, 15, "SIGTERM" or "term".

    Raises ValueError for a signal the protocol cannot carry (an unknown name or number,
    a real-time signal), TypeError for what is no signal at all (a float, a bool)."""
    if isinstance(sig, str):
        name = sig.upper().removeprefix("SIG")
    elif isinstance(sig, int) and not isinstance(sig, bool):
        try:
            name = signal_module.Signals(sig).name.removeprefix("SIG")
        except ValueError:
            raise ValueError(f"not a signal the protocol can carry: {sig!r}") from None
    else:
        raise TypeError(
            f"a signal is a signal.Signals, an int or a name, not {type(sig).__name__}"
        )
    if name not in SIGNAL_NAMES:
        raise ValueError(f"not a signal the protocol can carry: {sig!r}")
    return name


class _SignalDelivery:
    """One signal sent to a child (what ``send_signal`` returns). Awaiting it waits for
    the agent's acknowledgement and raises the OSError of a failed delivery; a failure
    that nobody has awaited when the acknowledgement arrives is raised by the process's
    next ``wait()`` instead."""

    def __init__(self, process: RemoteProcess, name: str) -> None:
        self._process = process
        self._name = name
        self._done = trio.Event()  # answered, or the agent was lost
        self._answered = False
        self._awaited = False
        self.error: OSError | None = None

    def _answer(self, errno_name: str | None) -> None:
        """The agent's answer: None when delivered. ESRCH (the child exited meanwhile)
        counts as delivered, as a signal to an exited Popen is a no-op."""
        if errno_name is not None and errno_name != "ESRCH":
            self.error = OSError(getattr(errno_module, errno_name, 0),
                                 f"signal {self._name} to process {self._process._pid}: "
                                 f"{errno_name}")
        self._answered = True
        self._done.set()

    def __await__(self) -> Generator[Any, None, None]:
        return self._wait().__await__()

    async def _wait(self) -> None:
        self._awaited = True
        try:
            await self._done.wait()
        except trio.Cancelled:
            self._awaited = False  # a failure still to come is wait()'s to raise
            raise
        if not self._answered:
            raise_if_lost(self._process._link)
        self._process._claim(self)
        if self.error is not None:
            raise self.error


class RemoteProcess:
    """A child of the agent. Mirrors :class:`trio.Process`.

    ``stdin``, ``stdout``, ``stderr`` and ``fds[n]`` are trio streams wired through the
    agent. ``returncode`` follows the subprocess convention (-N for signal N);
    ``exit_code`` the seed's (128+N). ``uid`` and ``gid`` are the effective ids the child
    was started with, so that a caller can see whether ``drop_sudo_credentials`` took
    effect (None until it has started, or from an agent that does not report them).
    Leaving ``async with`` kills the process group if the child is still running, waits
    for its exit and releases it on the agent.
    """

    def __init__(
        self, link: Link, id: int, args: list[bytes | str], fds: tuple[int, ...],
        program: str | bytes | os.PathLike[str], *, stdin_eof_sent: bool = False,
    ) -> None:
        self._link = link
        self.id = id
        self.args = args
        self._pid: int | None = None  # None until started (see wait_started)
        self.returncode: int | None = None
        self.exit_code: int | None = None
        self.signal: str | None = None  # name of the signal that killed it
        self.core_dumped = False
        self.closed = False  # close sent: nothing more flows either way
        self.spawn_error: RemoteError | OSError | None = None
        self._program = os.fsdecode(program)  # as given (path, else argv[0]), for errors
        self.uid: int | None = None
        self.gid: int | None = None
        self.errors: list[RemoteError] = []
        self.credit_lot = trio.lowlevel.ParkingLot()
        self._started = trio.Event()
        self._exited = trio.Event()
        self._released = trio.Event()  # the agent sent closed (or is lost)
        self._wait_lot = trio.lowlevel.ParkingLot()  # wait(): an exit, a failed delivery
        self._signal_waiters: deque[_SignalDelivery] = deque()  # sent, not yet answered
        self._undelivered: deque[_SignalDelivery] = deque()  # failed, nobody awaited them
        self._stdin = _Outgoing(link, self, 0)
        self._stdin.eof_sent = stdin_eof_sent  # the caller sent it with the exec
        self._outputs = {1: _Incoming(link, self, 1), 2: _Incoming(link, self, 2)}
        self._fd_out = {n: _Outgoing(link, self, n) for n in fds}
        for n in fds:
            self._outputs[n] = _Incoming(link, self, n)
        self.stdin = RemoteSendStream(self._stdin)
        self.stdout = RemoteReceiveStream(self._outputs[1])
        self.stderr = RemoteReceiveStream(self._outputs[2])
        self.fds = {n: RemoteFdStream(self._fd_out[n], self._outputs[n]) for n in fds}

    def __repr__(self) -> str:
        state = f"returncode={self.returncode}" if self.returncode is not None else "running"
        return f"<RemoteProcess id={self.id} pid={self._pid} {self.args!r}: {state}>"

    @property
    def pid(self) -> int:
        """The child's process id on the agent's machine, also its process group's id.

        A process from open_process has started; one from ``start_process_soon`` (or
        seen in ``Agent.processes``) may not have yet, and raises RuntimeError until it
        has (see :meth:`wait_started`)."""
        if self._pid is None:
            raise RuntimeError(f"process {self.id} has not started yet")
        return self._pid

    # ------------------------------------------------------------------ frames in

    def _receive(self, frame: Frame) -> None:
        """A frame from the agent about this process: its one way in."""
        if isinstance(frame, Data):
            self._outputs[frame.ch].feed(frame.data)
        elif isinstance(frame, Window):
            if self.credit_lot:  # unpark_all costs even when nobody is parked
                self.credit_lot.unpark_all()
        elif isinstance(frame, Eof):
            self._outputs[frame.ch].feed_eof()
        elif isinstance(frame, Started):
            self._pid = frame.pid
            self.uid = frame.uid
            self.gid = frame.gid
            self._started.set()
        elif isinstance(frame, Exit):
            self._exit(frame)
        elif isinstance(frame, SignalAck):
            if self._signal_waiters:
                self._signal_done(frame.errno)
        elif isinstance(frame, Closed):
            self._released.set()
        elif isinstance(frame, Error):
            self._error(frame)

    def _exit(self, frame: Exit) -> None:
        self.exit_code = frame.code
        self.signal = frame.sig
        self.core_dumped = frame.core
        number = getattr(signal_module, f"SIG{frame.sig}", None) if frame.sig else None
        self.returncode = -int(number) if number is not None else frame.code
        self._exited.set()
        self._started.set()
        self._wait_lot.unpark_all()

    def _error(self, frame: Error) -> None:
        error = RemoteError(frame.kind, frame.msg, frame.errno)
        if frame.ref == "exec":
            number = getattr(errno_module, error.errno or "", None)
            # The agent's msg says why, to be read after the program's name: OSError's
            # "[Errno 2] No such file or directory (searched $PATH): 'prog'".
            self.spawn_error = (
                OSError(number, error.message, self._program) if number else error
            )
            self._started.set()
        elif frame.ref == "signal" and self._signal_waiters:
            self._signal_done(error.errno or "ESRCH")
        elif frame.ref == "data" and error.kind == "write-failed":
            outgoing = {0: self._stdin, **self._fd_out}
            # Only that channel: the child may still read the others.
            for ch in outgoing if frame.ch is None else [frame.ch]:
                if ch in outgoing:
                    outgoing[ch].broken = f"the child no longer reads this stream: {error}"
            self.credit_lot.unpark_all()
        else:
            self.errors.append(error)

    def _signal_done(self, errno_name: str | None) -> None:
        delivery = self._signal_waiters.popleft()
        delivery._answer(errno_name)
        if delivery.error is not None and not delivery._awaited:
            self._undelivered.append(delivery)
            self._wait_lot.unpark_all()

    def _claim(self, delivery: _SignalDelivery) -> None:
        """``delivery``'s failure is its awaiter's to raise, not wait()'s."""
        if delivery in self._undelivered:
            self._undelivered.remove(delivery)

    def _lost(self) -> None:
        """The agent is lost: wake every task waiting on this process."""
        for event in (self._started, self._exited, self._released,
                      *(delivery._done for delivery in self._signal_waiters)):
            event.set()
        self._wait_lot.unpark_all()
        self.credit_lot.unpark_all()
        for incoming in self._outputs.values():
            incoming.wake()

    # ------------------------------------------------------------------ API

    async def wait_started(self) -> None:
        """Wait until the agent has started the child (``pid``, ``uid`` and ``gid`` are
        set then); return at once if it has. For a process from
        :meth:`Agent.start_process_soon` (one from ``open_process`` has started).

        Raises the child's spawn failure, each time it is called (``spawn_error`` keeps
        it): OSError (FileNotFoundError, PermissionError, ...; ``filename`` is the
        program) when it could not be started, :class:`RemoteError` for another refusal
        (``too-many-children``). The exit status follows such a failure: ``wait()``
        returns it, with ``exit_code`` 127 when the program was not found and 126 for
        any other failure, as a shell reports them. Raises AgentLost once the agent is
        lost. Cancelling the wait leaves the process as it is."""
        await self._started.wait()
        if self.spawn_error is not None:
            raise self.spawn_error
        raise_if_lost(self._link)

    async def wait(self) -> int:
        """Wait for the child to exit; return ``returncode``. Raises AgentLost if the
        agent goes away first. Cancelling the wait leaves the child running.

        A signal whose delivery failed (``send_signal`` returned, and nobody awaited
        what it returned) makes the next ``wait()`` raise its OSError, at once if the
        wait is pending: so ``proc.terminate(); await proc.wait()`` cannot wait for
        ever on a signal that was refused (EPERM).

        The exit arrives after everything the child wrote before it (the protocol's
        ordering), so output nobody reads beyond a stream's window (4 MiB) holds it
        back, as a full pipe holds back a writer. Read such a stream, or ``aclose()`` it
        to discard what comes, before waiting."""
        await trio.lowlevel.checkpoint()
        while self.returncode is None and not self._undelivered:
            raise_if_lost(self._link)
            await self._wait_lot.park()
        if self._undelivered:
            error = self._undelivered.popleft().error
            assert error is not None
            raise error
        assert self.returncode is not None
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: signal_module.Signals | int | str) -> Awaitable[None]:
        """Send ``sig`` to the child's process group, like :meth:`trio.Process.send_signal`:
        the frame is queued at once and the call returns without waiting. A no-op once
        the child has exited (as with Popen); ``0`` (an existence check in trio) sends
        nothing.

        Returns an awaitable: awaiting it waits for the agent's acknowledgement and
        raises OSError with the errno the agent reported (EPERM, ...). A failure nobody
        awaits is raised by the next :meth:`wait`. Raises ValueError for a signal the
        protocol cannot carry, TypeError for a float or a bool, AgentLost if the agent
        is lost."""
        is_zero = isinstance(sig, int) and not isinstance(sig, bool) and sig == 0
        name = "0" if is_zero else wire_signal_name(sig)
        delivery = _SignalDelivery(self, name)
        if is_zero or self.returncode is not None or self.closed:
            delivery._answer(None)
            return delivery
        # Queued only once the frame is sent: answers are matched to deliveries in order.
        raise_if_lost(self._link)
        self._link.send(Signal(self.id, name))
        self._signal_waiters.append(delivery)
        return delivery

    def terminate(self) -> Awaitable[None]:
        """``send_signal(signal.SIGTERM)``."""
        return self.send_signal("TERM")

    def kill(self) -> Awaitable[None]:
        """``send_signal(signal.SIGKILL)``."""
        return self.send_signal("KILL")

    async def aclose(self) -> None:
        """Discard unread output, kill the child's group if it is still running, wait for
        its exit, release it on the agent and wait until the agent confirms (``closed``:
        the child is reaped and nothing of its process group is left).

        Output is discarded first: the exit follows the output written before it, which
        could otherwise wait for credit that nobody reading would grant.

        Safe to call more than once; runs to completion even when cancelled (bounded by
        a few seconds when the agent does not answer)."""
        with trio.CancelScope(shield=True), trio.move_on_after(_KILL_WAIT):
            if not self.closed and self._link.ended is None:
                self._close_streams()
                if self.returncode is None and self._pid is not None:
                    self.kill()
                await self._exited.wait()
            self._release()
            await self._released.wait()

    async def _finish(self, deadline: float) -> None:
        """For the agent's shutdown: close stdin and discard the output; once the child
        has exited, or at ``deadline``, close it (which kills it if it still runs)."""
        if self.closed:
            return
        await self.stdin.aclose()
        for incoming in self._outputs.values():
            incoming.stop_reading()
        with trio.move_on_at(deadline):
            await self._exited.wait()
        await self.aclose()

    def _incoming_streams(self) -> list[_Incoming]:
        """The output buffers, for the agent's bound on pinned receive buffers."""
        return list(self._outputs.values())

    def _release(self) -> None:
        """Stop the streams and send close (once): the agent kills what is left of the
        group, reaps the child and frees its id before it reads any later frame. Does not
        wait for the agent's closed."""
        self._close_streams()
        if not self.closed and self._link.ended is None:
            # The close overtakes queued input (a control frame), which the agent would
            # then refuse: that input is for a child being closed, so it never goes.
            self._link.writer.drop_queued(self.id)
            self._link.send(Close(self.id))
        self.closed = True

    def _close_streams(self) -> None:
        self._stdin.eof_sent = True
        for out in self._fd_out.values():
            out.eof_sent = True
        self.credit_lot.unpark_all()  # a send waiting for credit fails now, not never
        for incoming in self._outputs.values():
            incoming.stop_reading()

    async def __aenter__(self) -> RemoteProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
