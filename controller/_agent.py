"""The controller's side of a connection to one agent."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from typing import Final, Protocol

import trio

from link import FdTransport, Link, StreamTransport, Transport, __version__, enlarge_pipe
from protocol import (
    DEFAULT_MAX_FRAME,
    Closed,
    Config,
    Connection,
    Data,
    Eof,
    Error,
    ErrorKind,
    Exec,
    Exit,
    Frame,
    Goodbye,
    Hello,
    LocalProtocolError,
    Log,
    Ping,
    Pong,
    RemoteProtocolError,
    Role,
    Shutdown,
    SignalAck,
    Started,
    Window,
)

from ._errors import (
    AgentClosed,
    AgentLost,
    AgentStartError,
    NoPython,
    PayloadUploadFailed,
    RemoteError,
    SshFailed,
    collapse_group,
    raise_if_lost,
)
from ._payload import Payload
from ._process import _KILL_WAIT, RemoteProcess
from ._start import HelloSync, StageEnded, StderrTail, quote, run_stage

__all__ = ["Agent", "connect", "open_agent", "open_command_agent"]

agent_logger = logging.getLogger("mproxy.agent")
#: Credit the controller grants per output channel (the agent's hello window bounds the
#: other direction). Larger than the protocol default: a bulk reader keeps the pipes
#: full (~570 → ~800 MB/s on a 2-core machine); the cost is that much unread output a
#: stream may buffer here, in this process.
RECEIVE_WINDOW: Final = 4 << 20
#: Receive-buffer memory that buffered output may pin beyond twice its own size, and
#: how often (in bytes of output received) that is checked: between checks at most one
#: more buffer can be pinned.
_PIN_SLACK: Final = 8 << 20
_PIN_CHECK_EVERY: Final = 1 << 20
_LOG_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO,
                      "warning": logging.WARNING, "error": logging.ERROR}
StrOrBytes = str | bytes


class EnvMapping(Protocol):
    """What ``env`` and ``env_overrides`` take: a mapping (a dict, ``os.environ``, ...)
    of str or bytes names to str or bytes values. Not ``Mapping[str | bytes, ...]``: a
    Mapping's key type is invariant, so ``dict[str, str]`` would not be one."""

    def items(self) -> AbstractSet[tuple[StrOrBytes, StrOrBytes]]: ...


#: The largest fd number a child can have (the protocol's limit, that of a C int).
_MAX_FD: Final = 2**31 - 1


class Agent:
    """A connected agent. Obtain one from :func:`open_agent` or :func:`connect`."""

    # The receiver of its link: frames about a process go to that process's _receive.

    def __init__(
        self, transport: Transport, *, window: int, max_frame: int, shutdown_timeout: float
    ) -> None:
        conn = Connection(
            Role.CONTROLLER, max_frame_size=max_frame, window=window,
            impl="mproxy-controller", impl_version=__version__, zero_copy=True,
        )
        self._link = Link(conn, transport, self)
        self.processes: dict[int, RemoteProcess] = {}
        self.lost: AgentLost | None = None
        #: pid of the local agent (or ssh) process started by open_agent, else None.
        self.agent_pid: int | None = None
        self._next_id = 1
        self._shutdown_timeout = shutdown_timeout
        self._closed = False  # aclose() began (or the block was left): no new requests
        self._aborted = False  # the block was left by an exception: nothing to finish
        self._hello = trio.Event()
        self._goodbye = trio.Event()
        self._pings: dict[int, trio.Event] = {}
        self._ping_ids = itertools.count(1)
        self._received_since_check = 0

    @property
    def conn(self) -> Connection:
        """The protocol connection (its state: credit, bytes sent and received, ...)."""
        return self._link.conn

    @property
    def info(self) -> Hello:
        """The agent's hello: its implementation, version, limits and capabilities."""
        assert self.conn.their_hello is not None
        return self.conn.their_hello

    # ------------------------------------------------------------------ plumbing

    def send(self, frame: Frame) -> None:
        self.raise_if_lost()
        self._link.send(frame)

    def raise_if_lost(self) -> None:
        raise_if_lost(self._link)

    def _check_open(self) -> None:
        """Refuse a new request: AgentClosed once the agent was closed by us (its block
        ended), AgentLost if it was lost before that."""
        if self._closed:
            raise AgentClosed(
                "the agent is closed (its block has ended or aclose() was called); "
                "open a new agent"
            )
        self.raise_if_lost()

    def link_ended(self, reason: str) -> None:
        """The agent is lost: every pending call wakes up and raises AgentLost."""
        self.lost = AgentLost(reason)
        self._hello.set()
        self._goodbye.set()
        for event in self._pings.values():
            event.set()
        for process in self.processes.values():
            process._lost()

    def _limit_pinned(self) -> None:
        """Bound the memory that buffered output keeps alive. Each buffered payload is a
        view that pins its whole receive buffer (2 MiB); when the pinned buffers exceed
        twice the bytes the views hold plus 8 MiB (small outputs of many children left
        unread), every process copies its views out, which frees the buffers."""
        self._received_since_check = 0
        pinned = self.conn.pinned_bytes
        if pinned <= _PIN_SLACK:
            return
        incoming = [i for p in self.processes.values() for i in p._incoming_streams()]
        if pinned > 2 * sum(i.buffered_views() for i in incoming) + _PIN_SLACK:
            for each in incoming:
                each.copy_out()

    def protocol_error(self, error: RemoteProtocolError) -> None:
        if error.fatal:  # the AgentLost that follows says it
            self._link.end(f"the agent broke the protocol: {error.message}")
        else:
            agent_logger.error("protocol error from the agent: %s", error.message)

    async def stream_ended(self) -> None:
        if not self._goodbye.is_set():
            self._link.end("the agent closed the connection without goodbye")

    def frame_received(self, frame: Frame) -> None:
        if isinstance(frame, Data):
            self.processes[frame.id]._receive(frame)
            self._received_since_check += len(frame.data)
            if self._received_since_check >= _PIN_CHECK_EVERY:
                self._limit_pinned()
        elif isinstance(frame, (Window, Eof, Started, Exit, SignalAck)):
            self.processes[frame.id]._receive(frame)
        elif isinstance(frame, Closed):
            self.processes.pop(frame.id)._receive(frame)
        elif isinstance(frame, Error):
            process = self.processes.get(frame.id) if frame.id is not None else None
            if process is None:
                agent_logger.error("agent error: %s", RemoteError(frame.kind, frame.msg,
                                                                  frame.errno))
            else:
                process._receive(frame)
        elif isinstance(frame, Log):
            agent_logger.log(_LOG_LEVELS.get(frame.level, logging.INFO), "%s%s", frame.msg,
                             "".join(f" {k}={v}" for k, v in frame.attrs.items()),
                             extra={"attrs": frame.attrs})
        elif isinstance(frame, Hello):
            self._hello.set()
        elif isinstance(frame, Ping):
            self.send(Pong(frame.n))
        elif isinstance(frame, Pong):
            event = self._pings.pop(frame.n, None)
            if event is not None:
                event.set()
        elif isinstance(frame, Goodbye):
            self._goodbye.set()

    # ------------------------------------------------------------------ API

    def start_process_soon(
        self,
        argv: Sequence[StrOrBytes | os.PathLike[str]],
        *,
        path: StrOrBytes | os.PathLike[str] | None = None,
        env: EnvMapping | None = None,
        env_overrides: EnvMapping | None = None,
        env_remove: Sequence[StrOrBytes] = (),
        cwd: StrOrBytes | os.PathLike[str] | None = None,
        extra_fds: Sequence[int] = (),
        drop_sudo_credentials: bool = False,
        stdin_eof: bool = False,
    ) -> RemoteProcess:
        """Send the exec for ``argv`` and return its process at once, before the agent
        has started it (no round trip): :meth:`RemoteProcess.wait_started` waits for
        the start and raises a spawn failure; after a failure ``wait()`` returns the
        exit status (127 or 126). The arguments are :meth:`open_process`'s; with
        ``stdin_eof`` the end of the child's stdin goes with the exec, in the same write
        (the child reads end of input at once; ``process.stdin`` is closed).

        Bad arguments raise ValueError or TypeError naming the argument, and argv and
        env beyond the agent's frame limit OSError (E2BIG), before anything is sent or
        an id is taken; raises :class:`AgentLost`, and :class:`AgentClosed` once the
        agent's block has ended. Otherwise the caller owns the process from the return
        on, whether it starts or not: use ``async with`` or ``aclose()`` to release
        it."""
        self._check_open()
        if not isinstance(drop_sudo_credentials, bool):
            raise TypeError(
                "drop_sudo_credentials must be a bool, not "
                f"{type(drop_sudo_credentials).__name__}"
            )
        fds = _extra_fds(extra_fds)
        frame = Exec(
            id=self._next_id,
            argv=_argv(argv),
            path=None if path is None else _os_path(path, "path"),
            env=None if env is None else _env_entries(env, "env"),
            env_set=() if env_overrides is None else _env_entries(env_overrides, "env_overrides"),
            env_unset=_env_names(env_remove),
            cwd=None if cwd is None else _os_path(cwd, "cwd"),
            fds=fds,
            drop_sudo=drop_sudo_credentials,
        )
        try:
            data = self._link.conn.send(frame)
        except LocalProtocolError as exc:
            if exc.kind != ErrorKind.FRAME_TOO_LARGE:
                raise  # every other rule is checked above: a bug of ours
            # What exec(2) says of arguments beyond its limit.
            raise OSError(errno.E2BIG, f"argv and env too long for the agent: {exc.message}"
                          ) from None
        id = self._next_id
        self._next_id += 1
        process = RemoteProcess(self._link, id, list(argv), fds,  # type: ignore[arg-type]
                                argv[0] if path is None else path, stdin_eof_sent=stdin_eof)
        self.processes[id] = process
        if stdin_eof:
            # exec and the stdin eof in one write: one wakeup of the agent, not two.
            self._link.writer.send_data(data, self._link.conn.send(Eof(id, 0)))
        else:
            self._link.writer.send_control(data)
        return process

    async def open_process(
        self,
        argv: Sequence[StrOrBytes | os.PathLike[str]],
        *,
        path: StrOrBytes | os.PathLike[str] | None = None,
        env: EnvMapping | None = None,
        env_overrides: EnvMapping | None = None,
        env_remove: Sequence[StrOrBytes] = (),
        cwd: StrOrBytes | os.PathLike[str] | None = None,
        extra_fds: Sequence[int] = (),
        drop_sudo_credentials: bool = False,
    ) -> RemoteProcess:
        """Start ``argv`` on the agent's machine and return once it is running.

        ``path`` is the program (default ``argv[0]``, looked up in the child's PATH when it
        has no "/"); argv[0] is passed as given. ``env`` is the exact environment; without
        it the child inherits the agent's (filtered by its environment policy), with
        ``env_remove`` names removed and ``env_overrides`` applied. ``extra_fds`` are
        child fd numbers (≥ 3) that appear as ``process.fds[n]``.

        Bad arguments raise ValueError or TypeError naming the argument (an empty argv,
        a NUL byte, an env name with "=", an extra fd below 3...) before anything is
        sent; argv and env beyond the agent's frame limit raise OSError (E2BIG).

        Raises OSError (FileNotFoundError, PermissionError, ...) when the program cannot
        be started, :class:`RemoteError` for other refusals, :class:`AgentLost`, and
        :class:`AgentClosed` once the agent's block has ended. The caller owns the
        process: use ``async with`` or ``aclose()`` to release it.
        """
        process = self.start_process_soon(
            argv, path=path, env=env, env_overrides=env_overrides, env_remove=env_remove,
            cwd=cwd, extra_fds=extra_fds, drop_sudo_credentials=drop_sudo_credentials,
        )
        try:
            await process.wait_started()
        except BaseException:
            await process.aclose()
            raise
        return process

    async def run_process(
        self,
        argv: Sequence[StrOrBytes | os.PathLike[str]],
        *,
        stdin: bytes | bytearray | memoryview | int = b"",
        capture_stdout: bool = False,
        capture_stderr: bool = False,
        check: bool = True,
        path: StrOrBytes | os.PathLike[str] | None = None,
        env: EnvMapping | None = None,
        env_overrides: EnvMapping | None = None,
        env_remove: Sequence[StrOrBytes] = (),
        cwd: StrOrBytes | os.PathLike[str] | None = None,
        drop_sudo_credentials: bool = False,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` to completion, like :func:`trio.run_process`.

        Exec, stdin and its eof are sent at once (no round trip before the data).
        ``stdin`` is bytes, bytearray or memoryview, or ``subprocess.DEVNULL`` (the same
        as ``b""``: the child reads end of input at once); anything else, a local fd or
        file included (it cannot be handed to a remote child), raises TypeError. Output
        that is not captured goes to this process's stdout/stderr. With ``check``, a
        non-zero exit raises :class:`subprocess.CalledProcessError`; a spawn failure, a
        bad argument, a lost or closed agent raise as in :meth:`open_process`. On
        cancellation the remote process group is killed and the child reaped before this
        returns. After a normal exit it returns once the exit status is in: the close it
        sends then (which kills anything left in the child's process group) reaches the
        agent ahead of any later request.
        """
        stdin_data = _stdin_bytes(stdin)
        process = self.start_process_soon(
            argv, path=path, env=env, env_overrides=env_overrides, env_remove=env_remove,
            cwd=cwd, drop_sudo_credentials=drop_sudo_credentials, stdin_eof=not stdin_data,
        )
        outputs: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        capture = {1: capture_stdout, 2: capture_stderr}

        async def sink(ch: int, chunk: bytes) -> None:
            if capture[ch]:
                outputs[ch] += chunk
            else:
                await _write_local(ch, chunk)

        async def collect(ch: int) -> None:
            stream = process.stdout if ch == 1 else process.stderr
            while chunk := await stream.receive_some():
                await sink(ch, chunk)

        async def feed() -> None:
            try:
                await process.stdin.send_all(stdin_data)
                await process.stdin.aclose()
            except trio.BrokenResourceError:
                pass  # the child stopped reading its stdin: like trio, not an error

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                if stdin_data:
                    nursery.start_soon(feed)
                async with trio.open_nursery() as readers:
                    readers.start_soon(collect, 1)
                    readers.start_soon(collect, 2)
                    await process.wait_started()
                    await process.wait()
                    # All output written before the exit arrived before it; a background
                    # process still holding the pipes must not keep us waiting.
                    readers.cancel_scope.cancel()
                for ch, stream in ((1, process.stdout), (2, process.stderr)):
                    if rest := stream.receive_buffered():
                        await sink(ch, rest)
                nursery.cancel_scope.cancel()

        try:
            await _collapsing(run)  # a spawn failure or AgentLost as itself, not a group
        finally:
            if process.returncode is None:
                await process.aclose()  # kill, wait for the exit and for closed
            else:
                # Exited: the close needs no answer before we return. The agent handles
                # it before any later frame of ours, and waiting for its closed would
                # add a round trip to every run (about a fifth of the exec rate).
                process._release()
        assert process.returncode is not None
        if check and process.returncode:
            raise subprocess.CalledProcessError(
                process.returncode, process.args, bytes(outputs[1]) if capture_stdout else None,
                bytes(outputs[2]) if capture_stderr else None,
            )
        return subprocess.CompletedProcess(
            process.args, process.returncode,
            bytes(outputs[1]) if capture_stdout else None,
            bytes(outputs[2]) if capture_stderr else None,
        )

    async def configure_env(
        self, *, keep: Sequence[str] | None = None, remove: Sequence[str] | None = None
    ) -> None:
        """Replace the agent's environment policy lists for later inherited environments
        (globs, or ``/regex/``); None leaves a list as it is. Returns once the agent has
        applied them; raises AgentLost, or AgentClosed once the agent's block has ended."""
        self._check_open()
        self.send(Config(
            env_keep=None if keep is None else tuple(keep),
            env_remove=None if remove is None else tuple(remove),
        ))
        await self.ping()  # the config is applied once the pong arrives (frames are ordered)

    async def ping(self) -> float:
        """Round trip to the agent, in seconds. Raises AgentLost, or AgentClosed once the
        agent's block has ended."""
        self._check_open()
        n = next(self._ping_ids)
        event = trio.Event()
        self._pings[n] = event
        start = trio.current_time()
        self.send(Ping(n))
        await event.wait()
        self.raise_if_lost()
        return trio.current_time() - start

    async def aclose(self) -> None:
        """Finish gracefully, within a bound: close every process's stdin and discard
        its unread output; give the processes until ``shutdown_timeout`` seconds (of
        :func:`open_agent` or :func:`connect`) from now to exit; kill the process group of
        each one still running, wait for its exit and release it; then shutdown and wait
        for the agent's goodbye.

        With an agent that answers, this takes at most ``shutdown_timeout`` plus the
        round trips of the kills (milliseconds). An agent that does not finish within
        10 s after that is taken for lost. From the start of the call, new requests
        raise :class:`AgentClosed`.

        Raises :class:`AgentLost` if the agent is lost, before or meanwhile: how the
        processes ended is then unknown. Called again, waits for the first call's
        goodbye. After the block was left by an exception or cancellation (the stream
        closed at once, see :func:`connect`), it does nothing."""
        if self._aborted:
            return
        self.raise_if_lost()
        if self._closed:  # closed already, or being closed by another task
            await self._goodbye.wait()
            self.raise_if_lost()
            return
        self._closed = True
        deadline = trio.current_time() + self._shutdown_timeout

        async with trio.open_nursery() as nursery:
            for process in list(self.processes.values()):
                nursery.start_soon(process._finish, deadline)
        self.raise_if_lost()
        self.send(Shutdown())
        # The kills above were each given _KILL_WAIT: so is the agent's whole answer.
        with trio.move_on_at(deadline + _KILL_WAIT):
            await self._goodbye.wait()
        if not self._goodbye.is_set():
            self._link.end(
                f"the agent sent no goodbye within {self._shutdown_timeout + _KILL_WAIT} s")
        self.raise_if_lost()

    def _abort(self) -> None:
        """Stop everything at once: the agent sees the stream end and kills every child."""
        if self.lost is None:  # else the loss stays the reason later calls fail
            self._closed = True
            self._aborted = True
        self._link.end("the controller left")


def _os_string(value: object, what: str) -> bytes:
    """``value`` (str, bytes or path-like) as the bytes the child gets; ``what`` names it
    in the TypeError or ValueError that bad input raises."""
    if not isinstance(value, (str, bytes, os.PathLike)):
        raise TypeError(f"{what} must be str, bytes or os.PathLike, not {type(value).__name__}")
    try:
        encoded = os.fsencode(value)
    except UnicodeEncodeError as exc:  # a lone surrogate other than surrogateescape's
        raise ValueError(f"{what} cannot be encoded: {exc.reason}") from None
    if b"\0" in encoded:
        raise ValueError(f"{what} contains a NUL byte")
    return encoded


def _os_path(value: object, what: str) -> bytes:
    encoded = _os_string(value, what)
    if not encoded:
        raise ValueError(f"{what} must not be empty")
    return encoded


def _argv(argv: object) -> tuple[bytes, ...]:
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence):
        raise TypeError(
            "argv must be a sequence of arguments (a list or tuple), not "
            + ("a single string" if isinstance(argv, (str, bytes)) else type(argv).__name__)
        )
    if not argv:
        raise ValueError("argv must not be empty")
    return tuple(_os_string(arg, f"argv[{index}]") for index, arg in enumerate(argv))


def _env_name(name: object, what: str) -> bytes:
    encoded = _os_string(name, f"{what}: variable name {name!r}")
    if not encoded:
        raise ValueError(f"{what}: a variable name must not be empty")
    if b"=" in encoded:
        raise ValueError(f"{what}: variable name {name!r} contains '='")
    return encoded


def _env_entries(env: EnvMapping, what: str) -> tuple[bytes, ...]:
    """``env`` or ``env_overrides`` as "K=V" entries."""
    if not callable(getattr(env, "items", None)):
        raise TypeError(f"{what} must be a mapping of names to values, not {type(env).__name__}")
    return tuple(
        _env_name(name, what) + b"=" + _os_string(value, f"{what}: the value of {name!r}")
        for name, value in env.items()
    )


def _env_names(names: object) -> tuple[bytes, ...]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError("env_remove must be a sequence of variable names, not "
                        + ("a single string" if isinstance(names, (str, bytes))
                           else type(names).__name__))
    return tuple(_env_name(name, "env_remove") for name in names)


def _extra_fds(fds: object) -> tuple[int, ...]:
    if not isinstance(fds, Sequence) or isinstance(fds, (str, bytes)):
        raise TypeError(f"extra_fds must be a sequence of fd numbers, not {type(fds).__name__}")
    seen: set[int] = set()
    for fd in fds:
        if not isinstance(fd, int) or isinstance(fd, bool):
            raise TypeError(f"extra_fds: {fd!r} is not an fd number (an int)")
        if fd < 0 or fd > _MAX_FD:
            raise ValueError(f"extra_fds: {fd} is not a valid fd number (extra fds are >= 3)")
        if fd < 3:
            raise ValueError(f"extra_fds: {fd} is a standard stream (extra fds are >= 3)")
        if fd in seen:
            raise ValueError(f"extra_fds: {fd} appears twice")
        seen.add(fd)
    return tuple(fds)


def _stdin_bytes(stdin: object) -> bytes | bytearray | memoryview:
    """run_process's ``stdin``: the bytes to send (DEVNULL: none, an immediate eof)."""
    if isinstance(stdin, (bytes, bytearray, memoryview)):
        return stdin
    if type(stdin) is int and stdin == subprocess.DEVNULL:
        return b""
    given = repr(stdin) if isinstance(stdin, int) else type(stdin).__name__
    raise TypeError(
        f"stdin must be bytes, bytearray, memoryview or subprocess.DEVNULL, not {given}: "
        "a local fd or file cannot be handed to a remote child (read it and pass the "
        "bytes, or send them to open_process's stdin)"
    )


async def _write_local(ch: int, chunk: bytes) -> None:
    """Write to our stdout (1) or stderr (2); never cancelled halfway (no chunk is lost)."""
    stream = sys.stdout.buffer if ch == 1 else sys.stderr.buffer

    def write() -> None:
        stream.write(chunk)
        stream.flush()

    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(write)


async def _collapsing(body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` (which opens nurseries of ours, running none of the caller's code),
    raising a single failure as itself rather than inside ExceptionGroups."""
    try:
        await body()
    except BaseExceptionGroup as group:
        exc = collapse_group(group)
        if exc is group:
            raise
        raise exc from exc.__cause__


@asynccontextmanager
async def _serve(
    transport: Transport, *, window: int, max_frame: int, handshake_timeout: float,
    shutdown_timeout: float,
) -> AsyncIterator[Agent]:
    """Run the frame loops around the caller's block.

    An exception from the handshake or from the caller's block propagates as itself, not
    wrapped in the loops' nursery's ExceptionGroup: callers can catch AgentLost,
    CalledProcessError, ... around ``async with`` (the loops themselves never raise)."""
    try:
        async with _serve_in_nursery(
            transport, window=window, max_frame=max_frame, handshake_timeout=handshake_timeout,
            shutdown_timeout=shutdown_timeout,
        ) as agent:
            yield agent
    except BaseExceptionGroup as group:
        # Only our nursery's level: a group raised by the caller's block stays a group.
        if len(group.exceptions) != 1:
            raise
        exc = group.exceptions[0]
        raise exc from exc.__cause__


@asynccontextmanager
async def _serve_in_nursery(
    transport: Transport, *, window: int, max_frame: int, handshake_timeout: float,
    shutdown_timeout: float,
) -> AsyncIterator[Agent]:
    agent = Agent(transport, window=window, max_frame=max_frame,
                  shutdown_timeout=shutdown_timeout)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent._link.run)
        try:
            with trio.move_on_after(handshake_timeout):
                await agent._hello.wait()
            if not agent._hello.is_set():
                agent._link.end(f"the agent sent no hello within {handshake_timeout} s")
            agent.raise_if_lost()
            yield agent
            await agent.aclose()
        except BaseException:
            agent._abort()
            raise
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await transport.aclose()


@asynccontextmanager
async def connect(
    send_stream: trio.abc.SendStream | Transport,
    receive_stream: trio.abc.ReceiveStream | None = None,
    *,
    window: int = RECEIVE_WINDOW,
    max_frame: int = DEFAULT_MAX_FRAME,
    handshake_timeout: float = 30.0,
    shutdown_timeout: float = 30.0,
) -> AsyncIterator[Agent]:
    """Speak to an agent over already-open streams (a bidirectional trio stream, a
    send/receive pair, or a :class:`~link.Transport`).

    Performs the handshake and yields the :class:`Agent`. No hello within
    ``handshake_timeout`` seconds raises :class:`AgentLost`.

    Leaving the block normally shuts the agent down gracefully within a bound
    (``Agent.aclose``): every process's stdin is closed and its unread output
    discarded; processes still running ``shutdown_timeout`` seconds after the block's
    end are killed (their process groups) and reaped; then the agent says goodbye. With
    an agent that answers, that takes at most ``shutdown_timeout`` plus a few round
    trips; one that does not finish within 10 s more is lost. :class:`AgentLost` is
    raised if the agent was lost before or meanwhile. Leaving by an exception or
    cancellation closes the stream at once, upon which the agent kills every child. The
    streams are closed either way. Afterwards every request raises
    :class:`AgentClosed`.
    """
    if receive_stream is None and hasattr(send_stream, "receive_into"):
        transport: Transport = send_stream  # type: ignore[assignment]
    else:
        receive = receive_stream if receive_stream is not None else send_stream
        if not isinstance(send_stream, trio.abc.SendStream) or not isinstance(
            receive, trio.abc.ReceiveStream
        ):
            raise TypeError(
                "connect() takes a bidirectional trio stream, a send stream and a receive "
                f"stream, or a Transport; got {type(send_stream).__name__} and "
                f"{type(receive_stream).__name__}"
            )
        transport = StreamTransport(send_stream, receive)
    async with _serve(
        transport, window=window, max_frame=max_frame, handshake_timeout=handshake_timeout,
        shutdown_timeout=shutdown_timeout,
    ) as agent:
        yield agent


@asynccontextmanager
async def open_agent(
    command: Sequence[str] | None = None,
    *,
    window: int = RECEIVE_WINDOW,
    max_frame: int = DEFAULT_MAX_FRAME,
    agent_args: Sequence[str] = (),
    stderr: int | None = None,
    shutdown_timeout: float = 30.0,
    handshake_timeout: float = 30.0,
) -> AsyncIterator[Agent]:
    """Start an agent process and connect to it.

    ``command`` is the argv that starts the agent: by default this Python running the
    ``agent`` package locally; e.g. ``["ssh", "host", "mproxy-agent"]`` for a remote one.
    ``agent_args`` are appended (e.g. ``["--grace", "1"]``). No hello within
    ``handshake_timeout`` seconds (an ssh asking for a password, a wrong command that
    waits) raises :class:`AgentLost`. The agent's stderr goes to
    ours unless ``stderr`` says otherwise (a subprocess-style fd or DEVNULL).

    Leaving the block normally shuts the agent down gracefully within a bound (see
    :func:`connect`): every process's stdin is closed and its unread output discarded;
    processes still running ``shutdown_timeout`` seconds after the block's end are
    killed (their process groups) and reaped; then the agent says goodbye and exits.
    Leaving by an exception or cancellation closes the agent's stdin at once, upon which
    it kills every child. Either way the agent process is then given ``shutdown_timeout``
    seconds to exit and killed after. A command that never said hello (the handshake
    timed out, or the caller was cancelled or interrupted while waiting for it) runs
    nothing of ours: it is given half a second and then killed. After the block every
    request raises :class:`AgentClosed`.

    The agent runs in a process group of its own: Ctrl-C at a terminal reaches this
    process only (its KeyboardInterrupt or handler decides), not the agent or the ssh
    that carries it. So an agent command must not need the terminal (no ssh password
    prompt: use keys).
    """
    argv = list(command) if command is not None else [sys.executable, "-m", "agent"]
    async with open_command_agent(
        [*argv, *agent_args], where=None, window=window, max_frame=max_frame, stderr=stderr,
        shutdown_timeout=shutdown_timeout, handshake_timeout=handshake_timeout,
    ) as agent:
        yield agent


@asynccontextmanager
async def open_command_agent(
    argv: Sequence[str],
    *,
    where: str | None,
    payload: Payload | None = None,
    python: str = "python3",
    window: int,
    max_frame: int,
    stderr: int | None,
    shutdown_timeout: float,
    handshake_timeout: float,
) -> AsyncIterator[Agent]:
    """:func:`open_agent` for ``argv``, which is ``ssh ... where`` when ``where`` (the
    destination) is given. With ``payload``, ``argv`` runs the agentless first stage
    (``_stage``) with ``python``, and the dialogue with it comes first. Failures to
    start raise :class:`AgentStartError` subclasses where the cause is known."""
    to_agent_r, to_agent_w = os.pipe()
    from_agent_r, from_agent_w = os.pipe()
    enlarge_pipe(to_agent_w)
    enlarge_pipe(from_agent_r)
    pipes = [to_agent_r, to_agent_w, from_agent_r, from_agent_w]
    if stderr is None:
        # Copied to ours by StderrTail, which keeps the end for a failed start's message.
        stderr_r, stderr_w = os.pipe()
        pipes += [stderr_r, stderr_w]
    try:
        # A process group of its own: the signals a terminal sends to its foreground
        # group (Ctrl-C, Ctrl-\, a hangup) are ours to handle, not the agent's (or ssh's).
        process = await trio.lowlevel.open_process(
            list(argv), stdin=to_agent_r, stdout=from_agent_w,
            stderr=stderr_w if stderr is None else stderr, process_group=0,
        )
    except BaseException:
        for fd in pipes:
            os.close(fd)
        raise
    os.close(to_agent_r)
    os.close(from_agent_w)
    tail = None
    if stderr is None:
        os.close(stderr_w)
        tail = StderrTail(stderr_r)
    transport = FdTransport(from_agent_r, to_agent_w)
    label = where if where is not None else "the agent command"
    # Until its hello, the command has not shown itself to be an agent, and nothing of
    # ours runs under it: there is no teardown to wait for. A command that never says
    # hello and ignores its input's end (`sleep`, an ssh still connecting) would
    # otherwise hold a Ctrl-C or a handshake timeout up for shutdown_timeout more.
    reap_timeout = min(shutdown_timeout, _UNGREETED_EXIT_WAIT)
    synced = HelloSync(transport, where=label)
    deadline = trio.current_time() + handshake_timeout
    noise = bytearray()
    try:
        async with trio.open_nursery() as nursery:
            if tail is not None:
                nursery.start_soon(tail.run)
            try:
                if payload is not None:
                    synced = await _staged(transport, payload, where=label, python=python,
                                           deadline=deadline, noise=noise)
                async with _serve(
                    synced, window=window, max_frame=max_frame,
                    handshake_timeout=max(0.0, deadline - trio.current_time()),
                    shutdown_timeout=shutdown_timeout,
                ) as agent:
                    reap_timeout = shutdown_timeout
                    agent.agent_pid = process.pid
                    yield agent
            except StageEnded as ended:
                await _reap(process, reap_timeout)
                raise _start_failure(label, process.returncode, tail, ended.output,
                                     uploads=ended.uploads, python=python,
                                     ssh=where is not None) from None
            except AgentStartError:
                raise
            except AgentLost as exc:
                await _reap(process, reap_timeout)
                if not synced.found:
                    output = bytes(synced.skipped)
                    raise _start_failure(label, process.returncode, tail, output, uploads=0,
                                         python=None, ssh=where is not None,
                                         reason=str(exc)) from None
                raise AgentLost(f"{exc} (agent exit status {process.returncode})") from None
            finally:
                with trio.CancelScope(shield=True):
                    await transport.aclose()
                await _reap(process, reap_timeout)
                if tail is not None:
                    # ssh is gone; what it started (a ProxyCommand) may hold its stderr.
                    with trio.move_on_after(_UNGREETED_EXIT_WAIT):
                        await tail.ended.wait()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The stderr copier's nursery wraps what the block raised: unwrap that level, as
        # _serve does, so that callers can catch AgentLost around ``async with``.
        if len(group.exceptions) != 1:
            raise
        only = group.exceptions[0]
        raise only from only.__cause__


async def _staged(transport: FdTransport, payload: Payload, *, where: str, python: str,
                  deadline: float, noise: bytearray) -> HelloSync:
    """Hold the first stage's dialogue (``run_stage``) until ``deadline``; the transport
    from the agent's hello on."""
    with trio.move_on_at(deadline):
        pending = await run_stage(transport, payload, where=where, python=python,
                                  noise=noise)
        return HelloSync(transport, pending, where=where)
    wrote = f"; it wrote {quote(bytes(noise))}" if noise.strip() else ""
    raise AgentStartError(f"{where}: the agent's first stage did not start in time{wrote}")


def _start_failure(
    where: str, status: int | None, tail: StderrTail | None, output: bytes, *, uploads: int,
    python: str | None, ssh: bool, reason: str | None = None,
) -> AgentLost:
    """Why an agent command ended (or was given up on) before its hello: the most
    specific error its exit status and messages allow."""
    said = tail.last_lines() if tail is not None else ""
    shown = f": {said}" if said else ""
    wrote = f"; it wrote {quote(output)}" if output.strip(b"\n") else ""
    if uploads:
        return PayloadUploadFailed(
            f"{where}: the connection ended while the agent's payload was being sent "
            f"(exit status {status}){shown}")
    if ssh and status == _SSH_FAILED:
        return SshFailed(f"ssh {where} failed (exit status 255){shown or wrote}")
    if python is not None and status == _NOT_FOUND:
        return NoPython(f"{where}: no {python} in the login's PATH (exit status 127){shown}")
    if reason is not None:
        return AgentLost(f"{reason} (agent exit status {status}){wrote}{shown}")
    return AgentStartError(
        f"{where}: the agent's first stage exited with status {status} before it "
        f"started{shown}{wrote}")


#: ssh's exit status for its own failures; a shell's for a command it did not find.
_SSH_FAILED: Final = 255
_NOT_FOUND: Final = 127


#: How long a command that never said hello is given to exit by itself (so that its own
#: status, e.g. `false`'s 1, is the one reported) before it is killed.
_UNGREETED_EXIT_WAIT: Final = 0.5


async def _reap(process: trio.Process, timeout: float) -> None:
    """Wait for the agent process to exit, killing it after ``timeout`` seconds; runs to
    completion even when cancelled."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(timeout):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
