"""``mproxy-exec``: run one program through an agent, as if it were local.

Exit status: the program's (128+N when killed by signal N); 127 when it was not found,
126 when it could not be executed; 255 when the agent or its transport failed; 2 for
usage errors. Never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import logging
import os
import shlex
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Final

import trio

import childproc

from ._agent import Agent, _collapse, open_agent
from ._errors import AgentError, RemoteError
from ._process import RemoteProcess
from ._streams import RemoteFdStream, RemoteReceiveStream

__all__ = ["main"]

FORWARDED_SIGNALS: Final = (
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
    signal.SIGUSR2,
)
_READ_SIZE: Final = 1 << 18
#: Most bytes written to our fd at once: each write is a worker-thread round trip.
_WRITE_SIZE: Final = 1 << 20
_EXIT_AGENT_FAILED: Final = 255
_USAGE: Final = 2


_OutputStream = RemoteReceiveStream | RemoteFdStream


class _UsageError(Exception):
    pass


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="mproxy-exec",
        description="Run PROG through an mproxy agent (local by default, or over ssh) with "
        "this terminal's stdin, stdout and stderr, forwarding signals and the exit status.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--agent", metavar="CMD",
                       help="command that starts an agent, split like a shell would "
                       "(e.g. 'ssh -p 2222 host /opt/bin/mproxy-agent')")
    where.add_argument("--ssh", metavar="DEST",
                       help="short for --agent 'ssh DEST mproxy-agent'")
    parser.add_argument("-o", dest="ssh_options", action="append", default=[],
                        metavar="SSH_OPTION", help="ssh -o option (with --ssh)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="set a variable in the child's environment")
    parser.add_argument("--unset", action="append", default=[], metavar="NAME",
                        help="remove a variable from the child's environment")
    parser.add_argument("--clear-env", action="store_true",
                        help="start from an empty environment (then apply --env)")
    parser.add_argument("--cwd", metavar="DIR", help="the child's working directory")
    parser.add_argument("--fd", action="append", type=int, default=[], metavar="N",
                        help="bridge our fd N to the child's fd N (N >= 3)")
    parser.add_argument("--drop-sudo", action="store_true",
                        help="run as $SUDO_UID/$SUDO_GID when the agent runs as root")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the agent's log records on stderr (the default "
                        "and --ssh agents are asked for debug records)")
    parser.add_argument("prog", metavar="PROG")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG")
    return parser


def _agent_command(args: argparse.Namespace) -> list[str] | None:
    if args.agent is not None:
        try:
            command = shlex.split(args.agent)
        except ValueError as exc:
            raise _UsageError(f"--agent: {exc}") from None
        if not command:
            raise _UsageError("--agent: empty command")
        return command
    if args.ssh is not None:
        options = [item for opt in args.ssh_options for item in ("-o", opt)]
        return ["ssh", *options, "--", args.ssh, "mproxy-agent"]
    if args.ssh_options:
        raise _UsageError("-o is only for --ssh")
    return None


def _directions(fd: int) -> tuple[bool, bool]:
    """(we read it → child, child → we write it) for our fd N."""
    try:
        mode = os.fstat(fd).st_mode
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        raise _UsageError(f"--fd {fd}: {exc.strerror}") from None
    if stat.S_ISSOCK(mode):
        return True, True
    access = flags & os.O_ACCMODE
    return access in (os.O_RDONLY, os.O_RDWR), access in (os.O_WRONLY, os.O_RDWR)


def _private_pipe(fd: int, access: int) -> trio.lowlevel.FdStream | None:
    """A stream on a private, non-blocking open file description of the pipe at our fd
    N, or None.

    O_NONBLOCK on fd N itself would change the description we share with the shell that
    started us (and with the other processes of a pipeline): they would meet EAGAIN.
    Linux gives a pipe a new description when it is opened again through /proc: that
    one is ours alone, and trio can wait on it. None for anything but a pipe (a file
    opened again would not share our offset), or where /proc does not serve it."""
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return None
    try:
        private = os.open(f"/proc/self/fd/{fd}", access | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    return trio.lowlevel.FdStream(private)


class _LocalInput:
    """Our fd N, read on the event loop when it is a pipe (see :func:`_private_pipe`);
    otherwise in a worker thread, each read a round trip (~0.1 ms). A pipe fed by
    ``head -c 1G`` (8 KiB writes, so a round trip per 8 KiB) took 6.2-7.2 s through
    threads, 2.3-2.7 s on the loop (start-up of ~0.6 s included)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pipe = _private_pipe(fd, os.O_RDONLY)

    async def read(self) -> bytes:
        """The next bytes, ``b""`` at EOF; raises OSError for a read error."""
        if self._pipe is None:
            return await trio.to_thread.run_sync(os.read, self._fd, _READ_SIZE,
                                                 abandon_on_cancel=True)
        try:
            return await self._pipe.receive_some(_READ_SIZE)
        except trio.BrokenResourceError as exc:
            raise _os_error(exc) from None

    async def aclose(self) -> None:
        if self._pipe is not None:
            await self._pipe.aclose()


class _LocalOutput:
    """Our fd N, written like :class:`_LocalInput` reads. A write is never abandoned
    half-way (it is shielded from cancellation): what was taken from the child's stream
    reaches the fd or fails."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pipe = _private_pipe(fd, os.O_WRONLY)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``; raises OSError (BrokenPipeError: the reader is gone)."""
        with trio.CancelScope(shield=True):
            if self._pipe is None:
                await trio.to_thread.run_sync(self._write_all, data)
                return
            try:
                await self._pipe.send_all(data)
            except trio.BrokenResourceError as exc:
                raise _os_error(exc) from None

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    async def aclose(self) -> None:
        if self._pipe is not None:
            await self._pipe.aclose()


def _os_error(exc: trio.BrokenResourceError) -> OSError:
    """The OSError behind a broken trio stream (trio raises ``from`` it)."""
    if isinstance(exc.__cause__, OSError):
        return exc.__cause__
    return OSError(errno.EIO, str(exc))


class _Signals:
    """What a forwarded signal (SIGINT, SIGTERM, ...) does, from start to finish: before
    the child runs, it ends mproxy-exec with 128+N (the agent sees its stream end and
    cleans up); while the child runs, it goes to the child's process group; once the
    child has exited, it is ignored, and the child's status is what we report. (A
    receiver installed only while the child runs left a gap after its exit in which the
    signal's default action killed mproxy-exec: 9 runs of 12 with a signal sent 0-100 ms
    after the exit.)"""

    def __init__(self, scope: trio.CancelScope) -> None:
        self._scope = scope
        self.process: RemoteProcess | None = None  # the child, once it runs
        self.ended_by: int | None = None  # the signal that ended us before it ran

    async def handle(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if self.process is None:
                self.ended_by = signum
                self._scope.cancel()
                return
            if self.process.returncode is None:
                sig = signal.Signals(signum)
                try:
                    await self.process.send_signal(sig)
                except OSError as exc:
                    print(f"mproxy-exec: forwarding {sig.name}: {exc}", file=sys.stderr)


class _Session:
    def __init__(self, agent: Agent, process: RemoteProcess, fds: dict[int, tuple[bool, bool]]):
        self.agent = agent
        self.process = process
        self.fds = fds

    async def pump_in(self, fd: int, stream: trio.abc.SendStream) -> None:
        """Our fd → the child; eof (half-close) when our side ends."""
        local = _LocalInput(fd)
        try:
            while data := await local.read():
                await stream.send_all(data)
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: a terminal hung up, i.e. end of input
                print(f"mproxy-exec: reading fd {fd}: {exc.strerror}; sending EOF",
                      file=sys.stderr)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the child stopped reading: like a local pipe, nothing to report
        finally:
            with trio.CancelScope(shield=True):
                await local.aclose()
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        else:
            await stream.aclose()

    async def pump_out(self, stream: _OutputStream, local: _LocalOutput, fd: int,
                       is_socket: bool) -> None:
        """The child → our fd until EOF; a closed reader on our side gets the child a
        SIGPIPE, as a local pipeline would. At EOF our end goes too (a socket is shut
        down for writing), so that the reader sees the end when the child closed its
        end, not when we exit; not stderr (ours too) nor an fd we also read."""
        buffer = memoryview(bytearray(_WRITE_SIZE))  # reused: no allocation per chunk
        while count := await stream.receive_into(buffer):
            try:
                await local.write(buffer[:count])
            except BrokenPipeError:
                await self.process.send_signal("PIPE")
                await stream.aclose()
                return
            except OSError as exc:  # ENOSPC, EIO...: like a lost reader, minus the signal
                print(f"mproxy-exec: writing fd {fd}: {exc.strerror}; discarding the rest",
                      file=sys.stderr)
                await stream.aclose()
                return
        if is_socket:
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_WR)
        elif fd == 1 or (fd > 2 and not self.fds[fd][0]):
            await local.aclose()
            _let_go(fd)

    async def run(self) -> int:
        process = self.process
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.pump_in, 0, process.stdin)
            outputs: list[tuple[_OutputStream, int, bool]] = [
                (process.stdout, 1, stat.S_ISSOCK(os.fstat(1).st_mode)),
                (process.stderr, 2, False)]
            for n, (readable, writable) in self.fds.items():
                if readable:
                    nursery.start_soon(self.pump_in, n, process.fds[n])
                else:
                    await process.fds[n].send_eof()
                if writable:
                    outputs.append((process.fds[n], n, stat.S_ISSOCK(os.fstat(n).st_mode)))
            local_outputs = {fd: _LocalOutput(fd) for _, fd, _ in outputs}
            try:
                async with trio.open_nursery() as output_nursery:
                    for stream, fd, is_socket in outputs:
                        output_nursery.start_soon(self.pump_out, stream, local_outputs[fd], fd,
                                                  is_socket)
                    returncode = await process.wait()
                    # Everything written before the exit arrived before it: write what is
                    # buffered, but do not wait for a background process holding the pipes.
                    output_nursery.cancel_scope.cancel()
                for stream, fd, _ in outputs:
                    for chunk in _buffered(stream):
                        try:
                            await local_outputs[fd].write(chunk)
                        except BrokenPipeError:
                            break
                        except OSError as exc:
                            print(f"mproxy-exec: writing fd {fd}: {exc.strerror}; "
                                  "discarding the rest", file=sys.stderr)
                            break
            finally:
                with trio.CancelScope(shield=True):
                    for local in local_outputs.values():
                        await local.aclose()
            nursery.cancel_scope.cancel()
        assert process.exit_code is not None
        del returncode
        return process.exit_code


def _let_go(fd: int) -> None:
    """Drop our reference to what fd N is open on (/dev/null takes its place, so the
    number stays valid)."""
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.dup2(devnull, fd, inheritable=False)
    finally:
        os.close(devnull)


def _buffered(stream: _OutputStream) -> list[bytes]:
    incoming = getattr(stream, "_in", None)
    return incoming.take_buffered() if incoming is not None else []


def _env_overrides(items: list[str]) -> dict[str | bytes, str | bytes]:
    env_overrides: dict[str | bytes, str | bytes] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _UsageError(f"--env {item!r}: expected K=V")
        env_overrides[key] = value
    return env_overrides


async def _main(
    args: argparse.Namespace, command: list[str] | None, fds: dict[int, tuple[bool, bool]]
) -> int:
    with trio.open_signal_receiver(*FORWARDED_SIGNALS) as signals:
        status = _EXIT_AGENT_FAILED
        async with trio.open_nursery() as nursery:
            policy = _Signals(nursery.cancel_scope)
            nursery.start_soon(policy.handle, signals)
            status = await _run(args, command, fds, policy)
            nursery.cancel_scope.cancel()
    return status if policy.ended_by is None else 128 + policy.ended_by


async def _run(args: argparse.Namespace, command: list[str] | None,
               fds: dict[int, tuple[bool, bool]], policy: _Signals) -> int:
    env_overrides = _env_overrides(args.env)
    # Without debug records from the agent, -v would show nothing in a normal run. An
    # --agent CMD is used exactly as given: its author chooses the agent's options.
    verbose_args = ["--log-level", "debug"] if args.verbose and args.agent is None else []
    async with open_agent(command, agent_args=verbose_args) as agent:
        try:
            process = agent._start(
                [args.prog, *args.args],
                env=env_overrides if args.clear_env else None,
                env_overrides=None if args.clear_env else env_overrides,
                env_remove=() if args.clear_env else args.unset,
                cwd=args.cwd,
                extra_fds=sorted(fds),
                drop_sudo_credentials=args.drop_sudo,
            )
        except (ValueError, TypeError) as exc:  # e.g. an empty --cwd or --unset name
            raise _UsageError(str(exc)) from None
        except OSError as exc:  # E2BIG: arguments beyond the agent's frame limit
            print(f"mproxy-exec: {args.prog}: {exc.strerror}", file=sys.stderr)
            return 126  # what a shell exits with when exec fails so
        async with process:
            try:
                await process._wait_started()
            except (OSError, RemoteError) as exc:
                message = exc.strerror if isinstance(exc, OSError) else exc.message
                print(f"mproxy-exec: {args.prog}: {message or exc}", file=sys.stderr)
                # The agent's exit frame follows its error: 127 when the program was not
                # found, 126 for any other failure (a missing --cwd, no permission...).
                await process.wait()
                assert process.exit_code is not None
                return process.exit_code
            policy.process = process
            return await _Session(agent, process, fds).run()


def _check_fds(fds: list[int]) -> None:
    for n in fds:
        if n < 3:
            raise _UsageError(f"--fd {n}: extra fds must be >= 3 (0-2 are bridged already)")


def main(argv: Sequence[str] | None = None) -> int:
    """The program: returns the exit status. Meant to be the process's main: on return it
    has set the forwarded signals to be ignored, so that none turns the status it
    returns into 128+N while the process exits."""
    childproc.fill_standard_fds()  # a closed stdin reads as empty, not as trio's own fd
    try:
        args = _parser().parse_args(argv)
        command = _agent_command(args)
        _check_fds(args.fd)
        _env_overrides(args.env)
        # Before trio.run: afterwards an fd the caller never opened could be trio's own.
        fds = {n: _directions(n) for n in args.fd}
    except _UsageError as exc:
        print(f"mproxy-exec: {exc}\n{_parser().format_usage()}", end="", file=sys.stderr)
        return _USAGE
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.ERROR, stream=sys.stderr,
        format="mproxy-exec: agent %(levelname)s: %(message)s",
    )
    try:
        return trio.run(_main, args, command, fds)
    except BaseException as exc:  # each is reported; a bug is re-raised
        return _failure_status(exc)
    finally:
        # The child's status is decided: a signal from now on must not turn it into
        # 128+N while this process exits (the receiver is gone with trio.run).
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _failure_status(exc: BaseException) -> int:
    """Report ``exc`` in one line and return the exit status; re-raise what is a bug."""
    if isinstance(exc, BaseExceptionGroup):
        single = _collapse(exc)  # e.g. AgentLost hit by several tasks at once
        if single is exc:
            raise exc
        exc = single
    if isinstance(exc, _UsageError):
        print(f"mproxy-exec: {exc}", file=sys.stderr)
        return _USAGE
    if isinstance(exc, (AgentError, trio.BrokenResourceError)):
        print(f"mproxy-exec: agent failed: {exc}", file=sys.stderr)
        return _EXIT_AGENT_FAILED
    if isinstance(exc, OSError):
        print(f"mproxy-exec: cannot start the agent: {exc}", file=sys.stderr)
        return _EXIT_AGENT_FAILED
    if isinstance(exc, KeyboardInterrupt):
        return 130
    raise exc
