"""build, Command, Pipes, close_child_side, exit_code."""

from __future__ import annotations

import dataclasses
import errno
import functools
import io
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from types import TracebackType
from typing import Any, Literal

from . import _posix_spawn, _trampoline
from ._creds import Credentials, sudo_credentials
from ._errors import SpawnError, StepFailed, popen_step
from ._fdplan import plan
from ._limits import child_fd_limit
from ._spec import ResolvedSpec, Spec, validate

if sys.platform != "win32":
    import fcntl
    import resource

Mechanism = Literal["popen", "posix_spawn", "trampoline"]
_Owned = list[int | io.FileIO | socket.socket]  # what build closes if it fails midway

# The shell that runs a program the kernel refuses for its format (glibc's _PATH_BSHELL).
_SHELL = b"/bin/sh"

# Above this many fds to close between the requested ones (one posix_spawn close action,
# about 2 us of ctypes call each), the trampoline's close_range is cheaper.
_MAX_CLOSE_ACTIONS = 1024


class Pipes:
    """The parent's ends of the child's stdio pipes and extra-fd socketpairs.

    stdin, stdout and stderr are unbuffered binary files (fileno() gives the fd); extra
    maps each extra child fd number to the parent's socket. All are close-on-exec and
    blocking as created. The caller closes them with close() (idempotent) or by using
    the Pipes as a context manager.
    """

    __slots__ = ("extra", "stderr", "stdin", "stdout")

    def __init__(
        self,
        stdin: io.FileIO,
        stdout: io.FileIO,
        stderr: io.FileIO,
        extra: dict[int, socket.socket],
    ) -> None:
        self.stdin = stdin  # parent writes -> child's stdin
        self.stdout = stdout  # parent reads <- child's stdout
        self.stderr = stderr  # parent reads <- child's stderr
        self.extra = extra

    def close(self) -> None:
        self.stdin.close()
        self.stdout.close()
        self.stderr.close()
        for sock in self.extra.values():
            sock.close()

    def __enter__(self) -> Pipes:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Command:
    """A child ready to start: the output of build.

    Read-only attributes: spec; path, the executable as resolved (bytes); credentials, the
    identity the child gets (None: the agent's); mechanism, how start will spawn it
    ("popen", "posix_spawn" or "trampoline"; see the package docstring).
    """

    __slots__ = (
        "_extra", "_lock", "_resolved", "_state", "_stdio",
        "credentials", "mechanism", "path", "spec",
    )  # fmt: skip

    def __init__(
        self,
        *,
        spec: Spec,
        resolved: ResolvedSpec,
        credentials: Credentials | None,
        mechanism: Mechanism,
        stdio: tuple[int, int, int],
        extra: dict[int, int],
    ) -> None:
        self.spec = spec
        self.path = resolved.path
        self.credentials = credentials
        self.mechanism = mechanism
        self._resolved = resolved
        self._stdio = stdio  # the child's ends of its stdin, stdout and stderr pipes
        self._extra = extra  # child fd number -> the child's end of its socketpair
        self._lock = threading.Lock()
        self._state: Literal["built", "started", "closed"] = "built"

    @property
    def start_is_brief(self) -> bool:
        """Whether start() returns within about a millisecond, so that an event loop may
        call it directly: true for popen and posix_spawn, whose parent waits only until
        the child has exec'd (vfork). False for the trampoline, whose start waits for a
        Python interpreter to come up (~15 ms): call that one from a worker thread."""
        return self.mechanism != "trampoline"

    def start(self) -> subprocess.Popen[bytes]:
        """Start the child; it runs in a new session, without a controlling terminal, whose
        id is its pid and so is its process group's.

        Blocks for about the cost of one spawn (well under a millisecond for popen and
        posix_spawn, ~15 ms for the trampoline) and holds no lock shared with other
        Commands: an async runtime may call it directly when ``start_is_brief``, and
        otherwise from a worker thread (e.g. trio.to_thread.run_sync(cmd.start)); it is
        thread-safe. May be called once. Raises SpawnError when
        the child could not be started; no child is left behind then.

        A program the kernel refuses for its format (ENOEXEC: typically a script without
        a #! line) is run by /bin/sh instead, as glibc's execvp, env and the shells do:
        the child is then /bin/sh with argv ["/bin/sh", path, *argv[1:]] (path as
        resolved; argv[0] is lost, as with execvp), started again the same way, which
        doubles the cost of this start. When /bin/sh cannot be run either, the
        program's ENOEXEC is raised.

        Afterwards the caller must, in this order or concurrently:
        - call close_child_side(cmd), whether start succeeded or failed, so that the child
          is the only holder of its ends (the parent then sees EOF when the child exits);
        - wait for the child and reap it. Popen.wait() does; an event loop instead waits
          on the pid (e.g. a pidfd) and reaps it with os.waitpid(pid, ...) itself, then
          sets popen.returncode, keeping the Popen referenced until then: a Popen
          collected with returncode None is reaped by subprocess behind the caller's back;
        - close the Pipes once done with them.
        """
        with self._lock:
            if self._state != "built":
                raise RuntimeError(f"Command.start called on a {self._state} command")
            self._state = "started"
            try:
                proc = self._spawn(self._resolved)
            except StepFailed as e:
                if e.step != "exec" or e.errno != errno.ENOEXEC or e.strerror is not None:
                    raise self._error(e) from None
                proc = self._spawn_with_shell(e)
        limit = child_fd_limit()
        if limit is not None and self.mechanism != "trampoline":
            # The child may already have run a little with the raised limit; only the
            # trampoline can set it before exec. A child that exited or exec'd a setuid
            # program keeps what it has.
            with suppress(ProcessLookupError, PermissionError):
                resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, limit)
        return proc

    def _spawn(self, resolved: ResolvedSpec) -> subprocess.Popen[bytes]:
        if self.mechanism == "popen":
            return self._start_popen(resolved)
        if self.mechanism == "posix_spawn":
            return _SpawnedPopen(resolved.argv, functools.partial(self._posix_spawn, resolved))
        return self._start_trampoline(resolved)

    def _spawn_with_shell(self, refused: StepFailed) -> subprocess.Popen[bytes]:
        """Start the program as a shell script: glibc's execvp on ENOEXEC."""
        resolved = self._resolved
        script = dataclasses.replace(
            resolved, path=_SHELL, argv=(_SHELL, resolved.path, *resolved.argv[1:])
        )
        try:
            return self._spawn(script)
        except StepFailed as e:
            # Without a usable shell, the program's own error is the one that explains.
            raise self._error(refused if e.step == "exec" else e) from None

    def _start_popen(self, resolved: ResolvedSpec) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(
                resolved.argv,
                executable=resolved.path,
                stdin=self._stdio[0],
                stdout=self._stdio[1],
                stderr=self._stdio[2],
                env=None if resolved.env is None else dict(resolved.env),
                cwd=resolved.cwd,
                close_fds=True,
                start_new_session=True,
                restore_signals=True,
            )
        except OSError as e:
            step = popen_step(e, resolved.path, resolved.cwd)
            raise StepFailed(step, e.errno or errno.EIO) from None

    def _posix_spawn(self, resolved: ResolvedSpec) -> int:
        env = (None if resolved.env is None
               else [name + b"=" + value for name, value in resolved.env])
        sys.audit("subprocess.Popen", resolved.path, resolved.argv, resolved.cwd, env)
        targets = dict(enumerate(self._stdio)) | self._extra
        try:
            return _posix_spawn.spawn(resolved.path, resolved.argv, env, resolved.cwd,
                                      plan(targets))
        except _posix_spawn.FileActionError as e:
            raise StepFailed("fds", e.errno or errno.EIO) from None
        except OSError as e:
            # glibc reports the errno of whichever of chdir, the fd actions or exec failed.
            chdir = resolved.cwd is not None and not _can_enter(resolved.cwd)
            raise StepFailed("chdir" if chdir else "exec", e.errno or errno.EIO) from None

    def _start_trampoline(self, resolved: ResolvedSpec) -> subprocess.Popen[bytes]:
        return _trampoline.spawn(
            path=resolved.path,
            argv=resolved.argv,
            env=tuple(os.environb.items()) if resolved.env is None else resolved.env,
            cwd=resolved.cwd,
            creds=self.credentials,
            stdio=self._stdio,
            extra=self._extra,
            rlimit=child_fd_limit(),
        )

    def _error(self, failed: StepFailed) -> SpawnError:
        step, number, resolved, creds = failed.step, failed.errno, self._resolved, self.credentials
        program = os.fsdecode(self.spec.path)
        if failed.strerror is not None:
            return SpawnError(number, step, program, failed.strerror)
        if step == "exec":
            missing = _missing_interpreter(resolved) if number == errno.ENOENT else None
            return SpawnError(number, step, program, missing)
        strerror = os.strerror(number)
        if step == "chdir":
            assert resolved.cwd is not None
            who = "" if creds is None else f" as uid {creds.uid}"
            what = f"cannot enter directory {_q(resolved.cwd)}{who}"
        elif step == "credentials":
            assert creds is not None
            what = f"cannot switch to uid {creds.uid}, gid {creds.gid}, groups {list(creds.groups)}"
        else:
            what = f"cannot set up fds {', '.join(map(str, (0, 1, 2, *self._extra)))} for the child"
        return SpawnError(number, step, program, f"{what}: {strerror}")

    def _close_child_side(self) -> None:
        with self._lock:
            if self._state != "closed":
                self._state = "closed"
                for fd in (*self._stdio, *self._extra.values()):
                    os.close(fd)


class _SpawnedPopen(subprocess.Popen[bytes]):
    """A Popen whose child is started by a given function returning its pid.

    Everything else (wait, poll, send_signal, returncode, __del__'s reaping) is Popen's.
    """

    def __init__(self, args: Sequence[bytes], spawn: Callable[[], int]) -> None:
        self._spawn = spawn
        super().__init__(args)

    def _execute_child(self, *args: Any, **kwargs: Any) -> None:
        self.pid = self._spawn()
        self._child_created = True


def build(spec: Spec) -> tuple[Command, Pipes]:
    """Prepare spec's child: validate, resolve, and create its pipes and socketpairs.

    The child will get a session of its own (setsid: its sid and pgid equal its pid, and
    it has no controlling terminal, so it can never stop on or read the caller's); the credential
    drop when spec asks for it and it applies (see Spec); pipes for stdin, stdout and
    stderr; one AF_UNIX SOCK_STREAM socketpair per extra fd, whose child end appears in
    the child at exactly that number; nothing else open (only 0, 1, 2 and the extra fds);
    default SIGPIPE and SIGXFSZ dispositions; blocking ends.

    Raises ValueError or TypeError for an invalid spec, CredentialError for an invalid
    $SUDO_UID/$SUDO_GID, SpawnError when the program is not found in PATH (step "exec")
    or the fds cannot be created (step "fds"); nothing is left open then.

    The caller then calls Command.start() (see it for what follows) or, not starting it,
    close_child_side(command); and closes the Pipes when done with them.
    """
    if sys.platform == "win32":
        raise NotImplementedError(
            "childproc.build is not implemented on Windows: the Go original's elevated-token "
            "and console process group handling has not been ported"
        )
    resolved = validate(spec)
    credentials = sudo_credentials(spec.drop_sudo_credentials)
    mechanism = _mechanism(spec, resolved, credentials)
    owned: _Owned = []
    try:
        stdin, stdin_r = _pipe(owned, "w")
        stdout, stdout_w = _pipe(owned, "r")
        stderr, stderr_w = _pipe(owned, "r")
        extra: dict[int, socket.socket] = {}
        child_extra: dict[int, int] = {}
        for number in resolved.extra_fds:
            extra[number], child_extra[number] = _socketpair(owned)
    except OSError as e:
        _close_all(owned)
        number = e.errno or errno.EIO
        raise SpawnError(
            number, "fds", os.fsdecode(spec.path),
            f"cannot create the child's pipes and sockets: {os.strerror(number)}",
        ) from e  # fmt: skip
    except BaseException:
        _close_all(owned)
        raise
    command = Command(
        spec=spec,
        resolved=resolved,
        credentials=credentials,
        mechanism=mechanism,
        stdio=(stdin_r, stdout_w, stderr_w),
        extra=child_extra,
    )
    return command, Pipes(stdin, stdout, stderr, extra)


def _mechanism(spec: Spec, resolved: ResolvedSpec, credentials: Credentials | None) -> Mechanism:
    if not resolved.extra_fds:
        return "popen" if credentials is None else "trampoline"
    highest = resolved.extra_fds[-1]
    limit = os.sysconf("SC_OPEN_MAX")
    if highest >= limit:
        raise SpawnError(
            errno.EBADF, "fds", os.fsdecode(spec.path),
            f"cannot place fd {highest} in the child (RLIMIT_NOFILE soft limit {limit}): "
            f"{os.strerror(errno.EBADF)}",
        )  # fmt: skip
    gaps = highest - 2 - len(resolved.extra_fds)  # fds in 3..highest that the child must not get
    if credentials is None and gaps <= _MAX_CLOSE_ACTIONS and _posix_spawn.available():
        return "posix_spawn"
    return "trampoline"


def _pipe(owned: _Owned, parent_mode: Literal["r", "w"]) -> tuple[io.FileIO, int]:
    """A pipe as (the parent's end as a file, the child's end)."""
    read, write = os.pipe2(os.O_CLOEXEC)
    parent, child = (read, write) if parent_mode == "r" else (write, read)
    owned.append(child)
    try:
        file = io.FileIO(parent, parent_mode)
    except BaseException:
        os.close(parent)
        raise
    owned.append(file)
    return file, child


def _socketpair(owned: _Owned) -> tuple[socket.socket, int]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    owned.append(parent)
    fd = child.detach()
    if fd < 3:
        # Only when the process runs with fd 0, 1 or 2 closed. The trampoline's Popen
        # would overwrite a passed fd below 3 with the child's stdio.
        low = fd
        try:
            fd = fcntl.fcntl(low, fcntl.F_DUPFD_CLOEXEC, 3)
        finally:
            os.close(low)
    owned.append(fd)
    parent.setblocking(True)  # socket.setdefaulttimeout() would have made them non-blocking
    os.set_blocking(fd, True)
    return parent, fd


def _close_all(owned: _Owned) -> None:
    for item in owned:
        if isinstance(item, int):
            os.close(item)
        else:
            item.close()


def _can_enter(directory: bytes) -> bool:
    return os.path.isdir(directory) and os.access(directory, os.X_OK)


def _q(name: bytes) -> str:
    return repr(os.fsdecode(name))


def _missing_interpreter(resolved: ResolvedSpec) -> str | None:
    """Why exec failed with ENOENT although the program exists: the interpreter its #!
    line names does not exist (the kernel reports that as the program's ENOENT). None
    when the program itself is missing, or the cause is something else (a missing
    dynamic loader)."""
    try:
        head = _read_head(resolved.path, resolved.cwd)
    except OSError:
        return None  # the program itself is not there
    if not head.startswith(b"#!"):
        return None
    # The kernel's parsing: blanks are only spaces and tabs, so a CRLF script names
    # "/bin/sh\r", which repr() then shows.
    line = head[2:].split(b"\n", 1)[0].lstrip(b" \t")
    interpreter = line.split(b" ", 1)[0].split(b"\t", 1)[0]
    if not interpreter:
        return None
    try:
        _read_head(interpreter, resolved.cwd)
    except FileNotFoundError:
        return f"interpreter {_q(interpreter)} (from #!) not found"
    except OSError:
        pass
    return None


def _read_head(path: bytes, cwd: bytes | None) -> bytes:
    """The first bytes of a file, as much as the kernel reads to recognise its format."""
    if cwd is not None:
        path = os.path.join(cwd, path)  # an absolute path stays as it is
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # never block on a FIFO
    try:
        return os.read(fd, 256)  # BINPRM_BUF_SIZE
    finally:
        os.close(fd)


def close_child_side(cmd: Command) -> None:
    """Close the child's ends of its pipes and socketpairs in this process. Idempotent.

    Call it once start() has returned or raised (or instead of starting): until then the
    parent holds the child's ends too, so it never sees EOF from the child. It waits for a
    start() running in another thread to finish.
    """
    cmd._close_child_side()


def exit_code(returncode: int) -> int:
    """The exit code from a Popen returncode: 128+N when the child was killed by signal N."""
    return returncode if returncode >= 0 else 128 - returncode
