"""``mproxy-exec``: run one program through an agent, as if it were local.

Exit status: the program's (128+N when killed by a signal N that we did not forward to
it); 127 when it was not found, 126 when it could not be executed; 255 when the agent or
its transport failed; 2 for usage errors. A program killed by the signal we forwarded
ends mproxy-exec by that signal. Never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import logging
import os
import resource
import shlex
import signal
import socket
import stat
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from typing import Final

import trio

from link import __version__, fill_standard_fds
from protocol import CAP_STOP, DEFAULT_ENV_KEEP, DEFAULT_ENV_REMOVE

from . import (
    Agent,
    AgentError,
    AgentStartError,
    RemoteError,
    RemoteFdStream,
    RemoteProcess,
    RemoteReceiveStream,
    collapse_group,
    open_agent,
    open_ssh_agent,
    ssh_argv,
)

__all__ = ["main"]

FORWARDED_SIGNALS: Final = (
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
    signal.SIGUSR2,
)
_READ_SIZE: Final = 1 << 18
#: Most bytes written to our fd at once: each write is a worker-thread round trip.
_WRITE_SIZE: Final = 1 << 20
_EXIT_AGENT_FAILED: Final = 255
_EXIT_NOT_FOUND: Final = 127
_USAGE: Final = 2


_OutputStream = RemoteReceiveStream | RemoteFdStream


class _UsageError(Exception):
    pass


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


_USAGE_LINE: Final = """\
%(prog)s [-h] [--version] [--agent CMD | --ssh DEST [-o SSH_OPTION]... [--python PATH]] [-n]
                   [--env K=V]... [--unset NAME]... [--clear-env] [--cwd DIR] [--fd N]...
                   [--drop-sudo] [-v] [--] PROG [ARG...]"""

_EPILOG: Final = f"""\
environment:
  With the default agent (a local one), PROG gets exactly mproxy-exec's environment, as
  if it were run here. With --agent or --ssh, it gets the agent's own environment (over
  ssh: the remote login's) filtered by the agent's policy, which by default
{textwrap.fill(" ".join(DEFAULT_ENV_KEEP), 88, initial_indent="    keeps    ",
               subsequent_indent=" " * 13)}
{textwrap.fill(" ".join(DEFAULT_ENV_REMOVE), 88, initial_indent="    removes  ")}
  (remove wins; every other variable is dropped). Then --unset removes and --env sets
  variables; --clear-env starts from an empty environment instead.

exit status:
  PROG's (128+N when a signal N killed it); 127 PROG not found, 126 not executable, 255
  the agent or its transport failed, 2 usage error. SIGINT, SIGTERM, SIGHUP, SIGQUIT,
  SIGUSR1 and SIGUSR2 are forwarded to PROG while it runs: when PROG dies of the signal
  forwarded to it, mproxy-exec ends itself by that signal, as PROG did (so that a shell
  loop stops at Ctrl-C); such a signal before PROG runs ends mproxy-exec by it too."""


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="mproxy-exec",
        usage=_USAGE_LINE,
        description="Run PROG through an mproxy agent (local by default, or over ssh) with\n"
        "this terminal's stdin, stdout and stderr, forwarding signals and the exit status.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mproxy-exec {__version__}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--agent", metavar="CMD",
                       help="command that starts an agent, split like a shell would "
                       "(e.g. 'ssh -p 2222 host /opt/bin/mproxy-agent')")
    where.add_argument("--ssh", metavar="DEST",
                       help="run PROG on DEST over ssh, where nothing needs to be installed "
                       "but Python >= 3.11: the agent's code is sent the first time and "
                       "cached there (~/.cache/mproxy-agent)")
    parser.add_argument("-o", dest="ssh_options", action="append", default=[],
                        metavar="SSH_OPTION", help="ssh -o option (with --ssh)")
    parser.add_argument("--python", metavar="PATH",
                        help="the Python to run the agent with on DEST (with --ssh; "
                        "default: python3 from the login's PATH)")
    parser.add_argument("-n", dest="no_stdin", action="store_true",
                        help="stdin from /dev/null, as ssh -n: PROG reads EOF at once and "
                        "mproxy-exec never reads its own stdin (e.g. in a 'while read' loop)")
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
    # One REMAINDER positional rather than PROG then ARG...: argparse then keeps every
    # "--" after PROG (it dropped the first: `echo -- a` ran `echo a`), and an absent
    # PROG is ours to report.
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _shown(text: str) -> str:
    """``text`` (PROG, a path, a name) as a shell would read it back: shlex-quoted when it
    is printable UTF-8 (``echo``, ``'my file'``, ``''``); else in bash's ``$'...'`` with
    each undecodable or unprintable byte as ``\\xNN`` (not the ``\\udcNN`` Python
    decodes an undecodable byte to)."""
    decoded = os.fsencode(text).decode("utf-8", "surrogateescape")
    if decoded.isprintable():
        return shlex.quote(decoded)
    return "$'" + "".join(map(_escaped, decoded)) + "'"


def _escaped(char: str) -> str:
    if "\udc80" <= char <= "\udcff":  # an undecodable byte (surrogateescape)
        return f"\\x{ord(char) - 0xdc00:02x}"
    if char in "\\'":
        return "\\" + char
    if not char.isprintable():
        return "".join(f"\\x{byte:02x}" for byte in char.encode())
    return char


def _program(args: argparse.Namespace) -> list[str]:
    """PROG and its ARGs; raises _UsageError without PROG."""
    command: list[str] = args.command
    if command[:1] == ["--"]:  # the "--" before PROG, which argparse leaves in
        command = command[1:]
    if not command:
        raise _UsageError("PROG is missing (the program to run)")
    for index, arg in enumerate(command):
        _check_no_nul("PROG" if index == 0 else "ARG", arg)
    return command


def _check_no_nul(option: str, value: str) -> None:
    # A command line cannot carry a NUL, but main(argv) can: it would end the string
    # the child gets.
    if "\0" in value:
        raise _UsageError(f"{option} {_shown(value)}: contains a NUL byte")


def _check_environment(args: argparse.Namespace) -> None:
    """--unset names and --cwd, checked before the agent starts (``_env_overrides``
    checks --env)."""
    for name in args.unset:
        _check_no_nul("--unset", name)
        if not name or "=" in name:
            raise _UsageError(f"--unset {_shown(name)}: not a variable name "
                              "(empty, or containing '=')")
    if args.cwd is not None:
        _check_no_nul("--cwd", args.cwd)
        if not args.cwd:
            raise _UsageError("--cwd '': empty directory name")


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
        try:  # checks the destination; open_ssh_agent builds the command
            ssh_argv(args.ssh, [], ssh_options=args.ssh_options)
        except ValueError as exc:
            raise _UsageError(f"--ssh: {exc}") from None
        return None
    if args.ssh_options:
        raise _UsageError("-o is only for --ssh")
    if args.python is not None:
        raise _UsageError("--python is only for --ssh")
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
    the child runs, it ends mproxy-exec (the agent sees its stream end and cleans up),
    by that signal (see :meth:`fatal`); while the child runs, it goes to the child's
    process group; once the child has exited, it is ignored, and the child's status is
    what we report. (A receiver installed only while the child runs left a gap after its
    exit in which the signal's default action killed mproxy-exec: 9 runs of 12 with a
    signal sent 0-100 ms after the exit.)"""

    def __init__(self, scope: trio.CancelScope) -> None:
        self._scope = scope
        self.process: RemoteProcess | None = None  # the child, once it runs
        self._ended_by: signal.Signals | None = None  # what ended us before it ran
        self._forwarded: set[signal.Signals] = set()

    async def handle(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            sig = signal.Signals(signum)
            if self.process is None:
                self._ended_by = sig
                self._scope.cancel()
                return
            if self.process.returncode is None:
                # Counted before it is sent: the child may die of it, and we may be
                # done, before the acknowledgement is in.
                self._forwarded.add(sig)
                try:
                    await self.process.send_signal(sig)
                except OSError as exc:
                    print(f"mproxy-exec: forwarding {sig.name}: {exc}", file=sys.stderr)

    def fatal(self) -> signal.Signals | None:
        """The signal mproxy-exec must end itself by, as a program that a signal ended:
        the one that ended it before the child ran, or the forwarded signal the child
        died of. None when the child died of a signal we did not forward (``kill``
        from elsewhere, our SIGPIPE): that is reported as 128+N."""
        if self._ended_by is not None:
            return self._ended_by
        returncode = self.process.returncode if self.process is not None else None
        if returncode is not None and -returncode in self._forwarded:
            return signal.Signals(-returncode)
        return None


class _Session:
    def __init__(self, agent: Agent, process: RemoteProcess, fds: dict[int, tuple[bool, bool]],
                 *, stdin: bool):
        self.agent = agent
        self.process = process
        self.fds = fds
        self.stdin = stdin  # False (-n): the child's stdin ends at once; fd 0 is not read

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
        """The child → our fd until EOF. When our fd fails (its reader is gone), the
        stream is closed: the child's next write to it fails with EPIPE (SIGPIPE), as in
        a local pipeline. At EOF our end goes too (a socket is shut down for writing),
        so that the reader sees the end when the child closed its end, not when we
        exit; not stderr (ours too) nor an fd we also read."""
        buffer = memoryview(bytearray(_WRITE_SIZE))  # reused: no allocation per chunk
        while count := await stream.receive_into(buffer):
            try:
                await local.write(buffer[:count])
            except BrokenPipeError:
                if CAP_STOP not in self.agent.info.caps:
                    # An agent without stop would go on reading what the child writes:
                    # SIGPIPE to its group stands in for the EPIPE it cannot give.
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
            if self.stdin:
                nursery.start_soon(self.pump_in, 0, process.stdin)
            else:
                await process.stdin.aclose()
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
                    try:
                        rest = stream.receive_buffered()
                    except trio.ClosedResourceError:
                        continue  # pump_out closed it: its fd failed
                    if not rest:
                        continue
                    try:
                        await local_outputs[fd].write(rest)
                    except BrokenPipeError:
                        pass
                    except OSError as exc:
                        print(f"mproxy-exec: writing fd {fd}: {exc.strerror}; "
                              "discarding the rest", file=sys.stderr)
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


def _env_overrides(items: list[str]) -> dict[str | bytes, str | bytes]:
    env_overrides: dict[str | bytes, str | bytes] = {}
    for item in items:
        _check_no_nul("--env", item)
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _UsageError(f"--env {_shown(item)}: expected K=V with a non-empty K")
        env_overrides[key] = value
    return env_overrides


async def _main(
    args: argparse.Namespace, command: list[str] | None, fds: dict[int, tuple[bool, bool]]
) -> tuple[int, signal.Signals | None]:
    """The exit status, and the signal to end this process by instead (or None)."""
    with trio.open_signal_receiver(*FORWARDED_SIGNALS) as signals:
        status = _EXIT_AGENT_FAILED
        async with trio.open_nursery() as nursery:
            policy = _Signals(nursery.cancel_scope)
            nursery.start_soon(policy.handle, signals)
            status = await _run(args, command, fds, policy)
            nursery.cancel_scope.cancel()
    fatal = policy.fatal()
    return (status if fatal is None else 128 + fatal), fatal


def _environment(args: argparse.Namespace,
                 command: list[str] | None) -> dict[str | bytes, str | bytes] | None:
    """The exact environment the exec carries, or None for the agent's (filtered by its
    policy). The default agent is local, started by us with our environment: its child
    gets that environment whole, as a child run here would (LD_LIBRARY_PATH included),
    which the policy would cut to a few names. Sent rather than inherited, it is ours
    exactly, whatever the agent's process adds to its own."""
    if args.clear_env:
        return {}
    if command is None and args.ssh is None:
        return {key: value for key, value in os.environb.items()}
    return None


async def _run(args: argparse.Namespace, command: list[str] | None,
               fds: dict[int, tuple[bool, bool]], policy: _Signals) -> int:
    env_overrides = _env_overrides(args.env)
    # Without debug records from the agent, -v would show nothing in a normal run. An
    # --agent CMD is used exactly as given: its author chooses the agent's options.
    verbose_args = ["--log-level", "debug"] if args.verbose and args.agent is None else []
    if args.ssh is not None:
        opened = open_ssh_agent(args.ssh, ssh_options=args.ssh_options,
                                python=args.python or "python3", agent_args=verbose_args)
    else:
        opened = open_agent(command, agent_args=verbose_args)
    async with opened as agent:
        try:
            process = agent.start_process_soon(
                args.program,
                env=_environment(args, command),
                env_overrides=env_overrides,
                env_remove=args.unset,
                cwd=args.cwd,
                extra_fds=sorted(fds),
                drop_sudo_credentials=args.drop_sudo,
            )
        except (ValueError, TypeError) as exc:  # what main()'s checks let through
            raise _UsageError(str(exc)) from None
        except OSError as exc:  # E2BIG: arguments beyond the agent's frame limit
            print(f"mproxy-exec: {_shown(args.program[0])}: {exc.strerror}", file=sys.stderr)
            return 126  # what a shell exits with when exec fails so
        async with process:
            try:
                await process.wait_started()
            except (OSError, RemoteError) as exc:
                message = exc.strerror if isinstance(exc, OSError) else exc.message
                print(f"mproxy-exec: {_shown(args.program[0])}: {message or exc}",
                      file=sys.stderr)
                # The agent's exit frame follows its error: 127 when the program was not
                # found, 126 for any other failure (a missing --cwd, no permission...).
                await process.wait()
                assert process.exit_code is not None
                return process.exit_code
            if args.drop_sudo and process.uid == 0:
                # The seed's rule: no SUDO_UID, no drop. Said, so that it is not silent.
                print("mproxy-exec: --drop-sudo: the child runs as uid 0 (SUDO_UID is not set, "
                      "or is 0, in the agent's environment)", file=sys.stderr)
            policy.process = process
            return await _Session(agent, process, fds, stdin=not args.no_stdin).run()


def _check_fds(fds: list[int]) -> None:
    for n in fds:
        if n < 3:
            raise _UsageError(f"--fd {n}: extra fds must be >= 3 (0-2 are bridged already)")


def main(argv: Sequence[str] | None = None) -> int:
    """The program: returns the exit status, or ends this process by a signal (see
    :meth:`_Signals.fatal`). Meant to be the process's main: on return it has set the
    forwarded signals to be ignored, so that none turns the status it returns into
    128+N while the process exits."""
    fill_standard_fds()  # a closed stdin reads as empty, not as trio's own fd
    try:
        args = _parser().parse_args(argv)
        args.program = _program(args)
        command = _agent_command(args)
        _check_fds(args.fd)
        _env_overrides(args.env)
        _check_environment(args)
        # Before trio.run: afterwards an fd the caller never opened could be trio's own.
        fds = {n: _directions(n) for n in args.fd}
    except _UsageError as exc:
        print(f"mproxy-exec: {exc}\n{_parser().format_usage()}", end="", file=sys.stderr)
        return _USAGE
    if not args.program[0]:
        # No system has a program by that name (execvp fails with ENOENT): 127, as
        # bash says, without asking an agent.
        print("mproxy-exec: '': command not found (PROG is empty)", file=sys.stderr)
        return _EXIT_NOT_FOUND
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.ERROR, stream=sys.stderr,
        format="mproxy-exec: agent %(levelname)s: %(message)s",
    )
    try:
        status, fatal = trio.run(_main, args, command, fds)
    except BaseException as exc:  # each is reported; a bug is re-raised
        status, fatal = _failure_status(exc)
    finally:
        # The child's status is decided: a signal from now on must not turn it into
        # 128+N while this process exits (the receiver is gone with trio.run).
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    if fatal is not None:
        _end_by(fatal)
    return status


def _end_by(sig: signal.Signals) -> None:
    """End this process by ``sig``, its cleanup done: a shell tells a program that a
    signal ended from one that exited 128+N (bash ends a loop only for the first), and
    must see the signal it sent. The default action of each forwarded signal ends the
    process before ``os.kill`` returns; the core SIGQUIT would dump is turned off (it
    would be ours, not the child's)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):
            stream.flush()
    if sig == signal.SIGQUIT:
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


def _failure_status(exc: BaseException) -> tuple[int, signal.Signals | None]:
    """Report ``exc`` in one line and return the exit status, with the signal to end this
    process by instead (SIGINT for a KeyboardInterrupt: trio's own SIGINT handler got
    it, outside our receiver); re-raise what is a bug."""
    if isinstance(exc, BaseExceptionGroup):
        single = collapse_group(exc)  # e.g. AgentLost hit by several tasks at once
        if single is exc:
            raise exc
        exc = single
    if isinstance(exc, _UsageError):
        print(f"mproxy-exec: {exc}", file=sys.stderr)
        return _USAGE, None
    if isinstance(exc, AgentStartError):  # says what failed where, ssh's message included
        print(f"mproxy-exec: {exc}", file=sys.stderr)
        return _EXIT_AGENT_FAILED, None
    if isinstance(exc, (AgentError, trio.BrokenResourceError)):
        print(f"mproxy-exec: agent failed: {exc}", file=sys.stderr)
        return _EXIT_AGENT_FAILED, None
    if isinstance(exc, OSError):
        print(f"mproxy-exec: cannot start the agent: {exc}", file=sys.stderr)
        return _EXIT_AGENT_FAILED, None
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT, signal.SIGINT
    raise exc
