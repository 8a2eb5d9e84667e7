"""childproc with real processes: fd layouts, stdio, env, cwd, signals, errors, fd hygiene.

Most tests run once per start mechanism; each Case's extra-fd layout (and credential drop)
selects one. The child's fd table is read from /proc/<pid>/fd by the test, while the child
(cat) is blocked reading stdin after echoing a line, so the listing is exact.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import io
import os
import pty
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest
from conftest import fd_count

from childproc import (
    Command,
    CredentialError,
    Pipes,
    SpawnError,
    Spec,
    build,
    close_child_side,
    exit_code,
)

IS_ROOT = os.geteuid() == 0
CAT = shutil.which("cat") or "/bin/cat"
SH = "/bin/sh"
ENV = shutil.which("env") or "/usr/bin/env"
PWD = shutil.which("pwd") or "/bin/pwd"
YES = shutil.which("yes") or "/usr/bin/yes"
NOBODY = 65534


@dataclass(frozen=True)
class Case:
    mechanism: str
    extra_fds: tuple[int, ...] = ()
    drop: bool = False  # drop to SUDO_UID=SUDO_GID=65534 (root only)
    id: str = field(default="", compare=False)

    def spec(
        self,
        path: str | bytes | os.PathLike[str],
        argv: Sequence[str | bytes],
        env: Sequence[str | bytes] | None = None,
        cwd: str | bytes | os.PathLike[str] | None = None,
    ) -> Spec:
        return Spec(
            os.fsencode(path),
            argv,
            env=env,
            cwd=None if cwd is None else os.fsencode(cwd),
            extra_fds=self.extra_fds,
            drop_sudo_credentials=self.drop,
        )


CASES = [
    Case("popen", id="popen"),
    Case("posix_spawn", (3,), id="posix_spawn-3"),
    Case("posix_spawn", (3, 7, 200), id="posix_spawn-3-7-200"),
    # More than 1024 unused numbers below the highest fd: the trampoline places them.
    Case("trampoline", (3, 1100), id="trampoline-3-1100"),
    Case("trampoline", drop=True, id="credentials"),
    Case("trampoline", (3, 7, 200), drop=True, id="credentials-3-7-200"),
]


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Case:
    c: Case = request.param
    if c.drop:
        if not IS_ROOT:
            pytest.skip("the credential drop needs root")
        monkeypatch.setenv("SUDO_UID", str(NOBODY))
        monkeypatch.setenv("SUDO_GID", str(NOBODY))
    if c.extra_fds and c.extra_fds[-1] >= resource.getrlimit(resource.RLIMIT_NOFILE)[0]:
        pytest.skip("RLIMIT_NOFILE hard limit too low for this layout")
    return c


@pytest.fixture(autouse=True, scope="module")
def fd_headroom() -> Iterator[None]:
    """Room for fd 1100 even where the soft RLIMIT_NOFILE is 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 and (hard == resource.RLIM_INFINITY or hard >= 4096):
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory that uid 65534 can enter (pytest's tmp_path is under a 0700 directory)."""
    path = Path(os.path.realpath(tempfile.mkdtemp(prefix="childproc-test-", dir="/tmp")))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


class LocalChild:
    """A child of this process, started with build + start + close_child_side, and
    cleaned up: the way the agent uses childproc."""

    def __init__(self, spec: Spec) -> None:
        self.cmd: Command
        self.pipes: Pipes
        self.cmd, self.pipes = build(spec)
        try:
            self.proc = self.cmd.start()
        except BaseException:
            self.pipes.close()
            raise
        finally:
            close_child_side(self.cmd)

    def __enter__(self) -> LocalChild:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.pipes.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def communicate(self, data: bytes = b"") -> tuple[bytes, bytes, int]:
        self.pipes.stdin.write(data)
        self.pipes.stdin.close()
        out = self.pipes.stdout.readall()
        err = self.pipes.stderr.readall()
        return out, err, self.proc.wait()

    def sync(self) -> None:
        """Round-trip a line through cat: the program has been exec'd and is running."""
        self.pipes.stdin.write(b"ping\n")
        assert read_exactly(self.pipes.stdout, 5) == b"ping\n"

    def fd_table(self) -> dict[int, str]:
        base = f"/proc/{self.proc.pid}/fd"
        return {int(n): os.readlink(f"{base}/{n}") for n in os.listdir(base)}

    def fd_flags(self, fd: int) -> int:
        with open(f"/proc/{self.proc.pid}/fdinfo/{fd}") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))


def read_exactly(f: io.FileIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def run(spec: Spec, data: bytes = b"") -> tuple[bytes, bytes, int]:
    with LocalChild(spec) as child:
        return child.communicate(data)


def proc_status(text: bytes) -> dict[str, str]:
    lines = (line.split(":", 1) for line in text.decode().splitlines())
    return {k: v.strip() for k, v in lines}


def pipe_name(f: io.FileIO) -> str:
    return f"pipe:[{os.fstat(f.fileno()).st_ino}]"


# ---------------------------------------------------------------------------- structure


def test_mechanism_per_case(case: Case) -> None:
    with LocalChild(case.spec("/bin/true", ["true"])) as child:
        assert child.cmd.mechanism == case.mechanism
        assert child.communicate() == (b"", b"", 0)


# Run inside a pseudo-terminal that is its controlling terminal: starts the case's child,
# which reports whether it leads a session of its own and what opening /dev/tty gives.
_AT_A_TERMINAL = """
import fcntl, os, sys, termios
from childproc import Spec, build, close_child_side
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
os.close(os.open("/dev/tty", os.O_RDWR))  # we do have a controlling terminal
extra = tuple(int(n) for n in sys.argv[2].split(",") if n)
probe = ("import errno, os\\n"
         "try:\\n    os.open('/dev/tty', os.O_RDWR); tty = 'opened'\\n"
         "except OSError as e:\\n    tty = errno.errorcode[e.errno]\\n"
         "print(os.getsid(0) == os.getpgid(0) == os.getpid(), tty)")
command, pipes = build(Spec(os.fsencode(sys.argv[4]), [sys.argv[4], "-c", probe],
                            extra_fds=extra, drop_sudo_credentials=sys.argv[3] == "1"))
try:
    proc = command.start()
finally:
    close_child_side(command)
pipes.stdin.close()
out = pipes.stdout.read()
proc.wait()
os.write(int(sys.argv[1]), out)
"""


def test_child_leads_a_session_of_its_own_without_a_terminal(case: Case) -> None:
    # setsid on every spawn path: the child can never read, write or stop on the
    # caller's terminal (opening /dev/tty fails with ENXIO), as sshd's sessions.
    primary, secondary = pty.openpty()
    result_r, result_w = os.pipe()
    try:
        helper = subprocess.Popen(
            [sys.executable, "-c", _AT_A_TERMINAL, str(result_w),
             ",".join(map(str, case.extra_fds)), "1" if case.drop else "0",
             # The dropped user may not enter this venv: the probe needs only the stdlib.
             "/usr/bin/python3" if case.drop else sys.executable],
            stdin=secondary, stdout=secondary, stderr=secondary, pass_fds=(result_w,),
            start_new_session=True, cwd=Path(__file__).parent.parent)
        os.close(result_w)
        os.close(secondary)
        assert helper.wait(timeout=30) == 0, os.read(primary, 65536)
        assert os.read(result_r, 1024) == b"True ENXIO\n"
    finally:
        for fd in (primary, result_r):
            os.close(fd)


def test_exact_fd_table_and_new_session(case: Case) -> None:
    with LocalChild(case.spec(CAT, ["cat"])) as child:
        child.sync()
        assert os.getpgid(child.proc.pid) == os.getsid(child.proc.pid) == child.proc.pid
        table = child.fd_table()
        assert sorted(table) == [0, 1, 2, *case.extra_fds]
        assert table[0] == pipe_name(child.pipes.stdin)
        assert table[1] == pipe_name(child.pipes.stdout)
        assert table[2] == pipe_name(child.pipes.stderr)
        sockets = {table[n] for n in case.extra_fds}
        assert all(s.startswith("socket:[") for s in sockets)
        assert len(sockets) == len(case.extra_fds)
        for fd in table:  # the child's ends are blocking
            assert not child.fd_flags(fd) & os.O_NONBLOCK, fd
        assert child.communicate() == (b"", b"", 0)


def test_each_extra_fd_reaches_its_parent_socket(case: Case) -> None:
    # sh redirections take one digit, so the shell writes to the fds below 10 and python
    # (not runnable by uid 65534 everywhere) is not needed.
    fds = [n for n in case.extra_fds if n < 10]
    script = "".join(f"echo fd{n} >&{n}; " for n in fds)
    with LocalChild(case.spec(SH, ["sh", "-c", script])) as child:
        assert child.communicate() == (b"", b"", 0)
        for n in fds:
            assert child.pipes.extra[n].recv(100) == f"fd{n}\n".encode()


def test_high_extra_fds_reach_their_sockets(case: Case) -> None:
    if case.drop or not case.extra_fds:
        pytest.skip("needs extra fds and a python runnable by the child")
    code = "import os, sys\nfor n in sys.argv[1:]: os.write(int(n), b'fd' + n.encode())"
    argv = ["python", "-I", "-S", "-c", code, *map(str, case.extra_fds)]
    with LocalChild(case.spec(sys.executable, argv)) as child:
        assert child.communicate() == (b"", b"", 0)
        for n in case.extra_fds:
            assert child.pipes.extra[n].recv(100) == f"fd{n}".encode()


def test_extra_fd_both_directions_and_half_close(case: Case) -> None:
    n = min(case.extra_fds, default=None)
    if n is None:
        pytest.skip("no extra fd")
    # cat gets fd n as stdin and stdout: it echoes until our half-close, then exits.
    with LocalChild(case.spec(SH, ["sh", "-c", f"exec cat <&{n} >&{n}"])) as child:
        sock = child.pipes.extra[n]
        payload = bytes(range(256)) * 128  # 32 KiB: fits the socket buffers either way
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        echoed = b"".join(iter(lambda: sock.recv(65536), b""))
        assert echoed == payload
        assert child.communicate() == (b"", b"", 0)


def test_stdio_and_eof_after_close_child_side(case: Case) -> None:
    script = "cat; echo to-stderr >&2"
    out, err, code = run(case.spec(SH, ["sh", "-c", script]), b"to-stdout\n")
    assert (out, err, code) == (b"to-stdout\n", b"to-stderr\n", 0)


def test_parent_ends_are_close_on_exec_and_blocking(case: Case) -> None:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)  # would make new sockets non-blocking
    try:
        cmd, pipes = build(case.spec("/bin/true", ["true"]))
    finally:
        socket.setdefaulttimeout(old)
    with pipes:
        close_child_side(cmd)
        for f in (pipes.stdin, pipes.stdout, pipes.stderr):
            assert not os.get_inheritable(f.fileno())
            assert os.get_blocking(f.fileno())
        for sock in pipes.extra.values():
            assert not sock.get_inheritable()
            assert sock.gettimeout() is None
            assert sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
        assert sorted(pipes.extra) == list(case.extra_fds)


def test_inheritable_fds_of_the_parent_do_not_leak(case: Case) -> None:
    leaked = []
    with open("/dev/null") as f:
        low = os.dup(f.fileno())
        leaked.append(low)
        for floor in (5, 100, 1500):  # in the gaps and above the highest requested fd
            leaked.append(fcntl.fcntl(f.fileno(), fcntl.F_DUPFD, floor))  # not close-on-exec
        try:
            for fd in leaked:
                os.set_inheritable(fd, True)
            with LocalChild(case.spec(CAT, ["cat"])) as child:
                child.sync()
                assert sorted(child.fd_table()) == [0, 1, 2, *case.extra_fds]
                child.communicate()
        finally:
            for fd in leaked:
                os.close(fd)


def test_signal_dispositions_and_mask(case: Case) -> None:
    out, _, code = run(case.spec(CAT, ["cat", "/proc/self/status"]))
    assert code == 0
    child = proc_status(out)
    with open("/proc/self/status", "rb") as f:
        parent = proc_status(f.read())
    ignored = int(parent["SigIgn"], 16)
    assert ignored & (1 << (signal.SIGPIPE - 1))  # Python ignores it...
    default = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
    # ...the child does not, nor glibc's internal signals 32 and 33; the rest is inherited.
    assert int(child["SigIgn"], 16) == ignored & ~default
    assert int(child["SigBlk"], 16) == 0


def test_argv_exact_including_argv0_and_non_utf8(case: Case) -> None:
    argv: list[str | bytes] = [b"weird \xff argv0", "/proc/self/cmdline"]
    out, _, code = run(case.spec(CAT, argv))
    assert code == 0
    assert out == b"weird \xff argv0\0/proc/self/cmdline\0"


def test_env_exact(case: Case) -> None:
    env: list[str | bytes] = ["A=1", b"B=x=y \xfe", "EMPTY=", "A=2"]
    out, _, code = run(case.spec(ENV, ["env"], env=env))
    assert code == 0
    assert out == b"B=x=y \xfe\nEMPTY=\nA=2\n"  # last A wins, in its position (as Go)
    assert run(case.spec(ENV, ["env"], env=[]))[0] == b""


def test_env_none_inherits(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHILDPROC_TEST_MARK", "inherited")
    out, _, code = run(case.spec(ENV, ["env"]))
    assert code == 0
    assert b"CHILDPROC_TEST_MARK=inherited\n" in out.splitlines(keepends=True)


def test_path_lookup_uses_the_childs_path(case: Case, public_dir: Path) -> None:
    prog = public_dir / "childproc-test-prog"
    prog.write_text("#!/bin/sh\necho found $0\n")
    prog.chmod(0o755)
    spec = case.spec("childproc-test-prog", ["x"], env=[f"PATH=/nonexistent:{public_dir}"])
    cmd, pipes = build(spec)
    close_child_side(cmd)
    pipes.close()
    assert cmd.path == os.fsencode(prog)
    assert run(spec)[0] == f"found {prog}\n".encode()


def test_cwd_exact_and_relative_program(case: Case, public_dir: Path) -> None:
    target = public_dir / "d\udcff"  # a non-UTF-8 name
    target.mkdir()
    target.chmod(0o755)
    out, _, code = run(case.spec(PWD, ["pwd", "-P"], cwd=os.fsencode(target)))
    assert (out, code) == (os.fsencode(target) + b"\n", 0)
    prog = target / "prog"
    prog.write_text("#!/bin/sh\necho relative\n")
    prog.chmod(0o755)
    assert run(case.spec("./prog", ["prog"], cwd=str(target)))[0] == b"relative\n"


def test_cwd_none_or_empty_inherits(case: Case) -> None:
    cwd = os.fsencode(os.path.realpath(os.getcwd()))
    for value in (None, ""):
        assert run(case.spec(PWD, ["pwd", "-P"], cwd=value))[0] == cwd + b"\n"


# ---------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(("script", "code"), [("exit 0", 0), ("exit 3", 3), ("exit 255", 255)])
def test_exit_code_of_exits(script: str, code: int) -> None:
    _, _, returncode = run(Spec(SH, ["sh", "-c", script]))
    assert exit_code(returncode) == code


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGPIPE])
def test_exit_code_of_signals(case: Case, sig: int) -> None:
    _, _, returncode = run(case.spec(SH, ["sh", "-c", f"kill -{int(sig)} $$"]))
    assert returncode == -sig
    assert exit_code(returncode) == 128 + sig


def test_sigpipe_kills_a_child_writing_to_a_closed_pipe(case: Case) -> None:
    with LocalChild(case.spec(YES, ["yes"])) as child:
        child.pipes.stdout.close()
        assert exit_code(child.proc.wait()) == 128 + signal.SIGPIPE


def test_exit_code_values() -> None:
    assert [exit_code(r) for r in (0, 1, 127, -1, -9, -15)] == [0, 1, 127, 129, 137, 143]


# ---------------------------------------------------------------------------- errors


def start_error(spec: Spec) -> SpawnError:
    """Build and start spec, expecting start to fail; checks that no fd is left behind."""
    before = fd_count()
    cmd, pipes = build(spec)
    with pipes:
        try:
            with pytest.raises(SpawnError) as info:
                cmd.start()
        finally:
            close_child_side(cmd)
    assert fd_count() == before
    return info.value


def test_nonexistent_program(case: Case) -> None:
    e = start_error(case.spec("/nonexistent/prog", ["prog"]))
    assert (e.errno, e.step, e.filename) == (errno.ENOENT, "exec", "/nonexistent/prog")
    assert str(e) == "[Errno 2] No such file or directory: '/nonexistent/prog'"  # as subprocess
    assert isinstance(e, OSError)


def test_a_missing_interpreter_is_named(case: Case, public_dir: Path) -> None:
    # The kernel's ENOENT is about the #! interpreter, not the script that exists.
    script = public_dir / "s.sh"
    script.write_text("#! /no/such/sh -e\necho never\n")
    script.chmod(0o755)
    e = start_error(case.spec("./s.sh", ["s.sh"], cwd=public_dir))
    assert (e.errno, e.step, e.filename) == (errno.ENOENT, "exec", "./s.sh")
    assert str(e) == "[Errno 2] interpreter '/no/such/sh' (from #!) not found: './s.sh'"
    script.write_bytes(b"#!/bin/sh\r\necho never\r\n")  # written on Windows
    e = start_error(case.spec(script, ["s.sh"]))
    assert e.strerror == "interpreter '/bin/sh\\r' (from #!) not found"


def test_a_script_without_shebang_runs_with_sh(case: Case, public_dir: Path) -> None:
    # As glibc's execvp, env and the shells do: /bin/sh runs it, with the script's path
    # in place of argv[0].
    script = public_dir / "nosb.sh"
    script.write_text('echo "$0|$#|$*"; exit 3\n')
    script.chmod(0o755)
    bash = subprocess.run(["bash", "-c", './nosb.sh "a b" c'], cwd=public_dir,
                          capture_output=True, check=False)
    assert (bash.stdout, bash.returncode) == (b"./nosb.sh|2|a b c\n", 3)
    out, err, code = run(case.spec("./nosb.sh", ["argv0", "a b", "c"], cwd=public_dir))
    assert (out, err, code) == (bash.stdout, b"", 3)


@pytest.mark.skipif(not IS_ROOT, reason="a mount namespace needs root")
def test_without_a_shell_the_scripts_own_error_is_raised(public_dir: Path) -> None:
    script = public_dir / "nosb.sh"
    script.write_text("echo never\n")
    script.chmod(0o755)
    code = """if True:
        import sys
        from childproc import SpawnError, Spec, build, close_child_side
        for fds in ((), (3,)):
            cmd, pipes = build(Spec(sys.argv[1], ["x"], extra_fds=fds))
            try:
                cmd.start()
            except SpawnError as e:
                print(cmd.mechanism, e.errno, e.step, e.filename)
            finally:
                close_child_side(cmd)
                pipes.close()
    """
    # /bin/sh made unexecutable (a device) in a mount namespace of the test's own.
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", 'mount --bind /dev/null /bin/sh || exit 99; "$@"',
         "sh", sys.executable, "-c", code, str(script)],
        capture_output=True, check=False, timeout=30,
    )  # fmt: skip
    if done.returncode == 99 or (done.returncode != 0 and b"unshare" in done.stderr):
        pytest.skip(f"no mount namespace here: {done.stderr.decode().strip()}")
    assert (done.stdout.decode(), done.stderr, done.returncode) == (
        f"popen 8 exec {script}\nposix_spawn 8 exec {script}\n", b"", 0)


def test_program_not_executable(case: Case, public_dir: Path) -> None:
    path = public_dir / "not-executable"
    path.write_text("#!/bin/sh\n")
    e = start_error(case.spec(path, ["x"]))
    assert (e.errno, e.step, e.filename) == (errno.EACCES, "exec", str(path))
    assert str(path) in str(e)
    e = start_error(case.spec(public_dir, ["x"]))  # a directory
    assert (e.errno, e.step) == (errno.EACCES, "exec")


def test_bad_cwd(case: Case, public_dir: Path) -> None:
    e = start_error(case.spec("/bin/true", ["true"], cwd="/nonexistent/dir"))
    assert (e.errno, e.step, e.filename) == (errno.ENOENT, "chdir", "/bin/true")
    who = " as uid 65534" if case.drop else ""
    assert str(e) == (
        f"[Errno 2] cannot enter directory '/nonexistent/dir'{who}: No such file or directory: "
        "'/bin/true'"
    )
    file = public_dir / "file"
    file.write_text("")
    e = start_error(case.spec("/bin/true", ["true"], cwd=file))
    assert (e.errno, e.step) == (errno.ENOTDIR, "chdir")


def test_program_not_in_path_fails_in_build() -> None:
    before = fd_count()
    with pytest.raises(SpawnError) as info:
        build(Spec("childproc-no-such-program", ["x"], env=["PATH=/bin:/usr/bin"]))
    e = info.value
    assert (e.errno, e.step, e.filename) == (errno.ENOENT, "exec", "childproc-no-such-program")
    assert str(e) == (
        "[Errno 2] No such file or directory (searched $PATH): 'childproc-no-such-program'"
    )
    assert fd_count() == before


def test_relative_path_entries_are_skipped(
    public_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # They would resolve against the agent's cwd, not the child's; Go refuses them too.
    prog = public_dir / "childproc-test-prog"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    monkeypatch.chdir(public_dir)
    for search in ("", ".", "./", f"{public_dir.name}/..", ":"):
        with pytest.raises(SpawnError):
            build(Spec(prog.name, ["x"], env=[f"PATH={search}"]))
    monkeypatch.setenv("PATH", f"/nonexistent:{public_dir}")
    cmd, pipes = build(Spec(prog.name, ["x"]))  # env None: the agent's PATH
    close_child_side(cmd)
    pipes.close()
    assert cmd.path == os.fsencode(prog)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (Spec("/bin/true", ["true"], env=["NOEQUALS"]), "env[0] is not a NAME=VALUE entry"),
        (Spec("/bin/true", ["true"], env=["A=1", "=x"]), "env[1] is not a NAME=VALUE entry"),
        (Spec("/bin/true", ["true"], env=["A=\0"]), "env[0] contains a NUL byte"),
        (Spec("/bin/true", ["true", "a\0b"]), "argv[1] contains a NUL byte"),
        (Spec("/bin/tr\0ue", ["true"]), "path contains a NUL byte"),
        (Spec("/bin/true", ["true"], cwd="/t\0mp"), "cwd contains a NUL byte"),
        (Spec("", ["true"]), "path is empty"),
        (Spec("/bin/true", []), "argv is empty"),
        (Spec("/bin/true", ["true"], extra_fds=[2]), "extra fd 2 is below 3"),
        (Spec("/bin/true", ["true"], extra_fds=[-1]), "extra fd -1 is below 3"),
        (Spec("/bin/true", ["true"], extra_fds=[3, 5, 3]), "extra fd 3 is listed more than once"),
    ],
)
def test_invalid_spec(spec: Spec, message: str) -> None:
    before = fd_count()
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        build(spec)
    assert fd_count() == before


def test_wrong_types() -> None:
    with pytest.raises(TypeError, match="argv must be a sequence"):
        build(Spec("/bin/true", "true"))
    with pytest.raises(TypeError, match="env must be a sequence"):
        build(Spec("/bin/true", ["true"], env="A=1"))
    with pytest.raises(TypeError):
        build(Spec("/bin/true", ["true"], extra_fds=[True]))


def test_fd_above_the_soft_limit() -> None:
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    before = fd_count()
    with pytest.raises(SpawnError) as info:
        build(Spec("/bin/true", ["true"], extra_fds=[3, limit]))
    assert (info.value.errno, info.value.step) == (errno.EBADF, "fds")
    assert f"fd {limit}" in str(info.value)
    assert fd_count() == before


def test_start_once(case: Case) -> None:
    cmd, pipes = build(case.spec("/bin/true", ["true"]))
    with pipes:
        try:
            proc = cmd.start()
            with pytest.raises(RuntimeError):
                cmd.start()
        finally:
            close_child_side(cmd)
            close_child_side(cmd)  # idempotent
        assert proc.wait() == 0
    pipes.close()  # idempotent
    cmd, pipes = build(case.spec("/bin/true", ["true"]))
    with pipes:
        close_child_side(cmd)
        with pytest.raises(RuntimeError):
            cmd.start()


# ---------------------------------------------------------------------------- credentials

needs_root = pytest.mark.skipif(not IS_ROOT, reason="the credential drop needs root")


def status_as(monkeypatch: pytest.MonkeyPatch, uid: str, gid: str | None) -> dict[str, str]:
    monkeypatch.setenv("SUDO_UID", uid)
    if gid is None:
        monkeypatch.delenv("SUDO_GID", raising=False)
    else:
        monkeypatch.setenv("SUDO_GID", gid)
    spec = Spec(CAT, ["cat", "/proc/self/status"], drop_sudo_credentials=True)
    out, err, code = run(spec)
    assert code == 0, err
    return proc_status(out)


def expected_groups(uid: int, gid: int) -> set[int]:
    try:
        return set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        return set()


@needs_root
def test_credential_drop(monkeypatch: pytest.MonkeyPatch) -> None:
    status = status_as(monkeypatch, "65534", "65534")
    assert status["Uid"].split() == ["65534"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    assert {int(g) for g in status["Groups"].split()} == expected_groups(NOBODY, NOBODY)
    assert "0" not in status["Groups"].split()


@needs_root
def test_credential_drop_gid_and_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    status = status_as(monkeypatch, "65534", "100")  # nobody with gid 100
    assert status["Gid"].split() == ["100"] * 4
    assert {int(g) for g in status["Groups"].split()} == expected_groups(NOBODY, 100)


@needs_root
def test_credential_drop_gid_falls_back_to_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    # 54321 has no passwd entry: gid = uid, and no supplementary groups (never root's).
    status = status_as(monkeypatch, "54321", None)
    assert status["Uid"].split() == ["54321"] * 4
    assert status["Gid"].split() == ["54321"] * 4
    assert status["Groups"] == ""


@needs_root
def test_no_drop_without_the_flag_or_sudo_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_UID", "65534")
    out, _, _ = run(Spec(CAT, ["cat", "/proc/self/status"]))
    assert proc_status(out)["Uid"].split() == ["0"] * 4
    monkeypatch.delenv("SUDO_UID")
    cmd, pipes = build(Spec(CAT, ["cat"], drop_sudo_credentials=True))
    close_child_side(cmd)
    pipes.close()
    assert (cmd.credentials, cmd.mechanism) == (None, "popen")


@needs_root
@pytest.mark.parametrize(
    ("uid", "gid", "culprit"),
    [
        ("abc", "1", "SUDO_UID='abc'"),
        ("-1", "1", "SUDO_UID='-1'"),
        ("4294967295", None, "SUDO_UID='4294967295'"),
        ("", None, "SUDO_UID=''"),
        (" 1", None, "SUDO_UID=' 1'"),
        ("9" * 5000, None, "SUDO_UID='999"),
        ("1000", "x1", "SUDO_GID='x1'"),
        ("1000", "", "SUDO_GID=''"),
    ],
)
def test_invalid_sudo_ids(
    monkeypatch: pytest.MonkeyPatch, uid: str, gid: str | None, culprit: str
) -> None:
    monkeypatch.setenv("SUDO_UID", uid)
    if gid is None:
        monkeypatch.delenv("SUDO_GID", raising=False)
    else:
        monkeypatch.setenv("SUDO_GID", gid)
    before = fd_count()
    with pytest.raises(CredentialError, match="^invalid " + re.escape(culprit)) as info:
        build(Spec(CAT, ["cat"], extra_fds=[3], drop_sudo_credentials=True))
    assert isinstance(info.value, ValueError)
    assert fd_count() == before


@needs_root
def test_cwd_is_entered_after_the_drop(monkeypatch: pytest.MonkeyPatch, public_dir: Path) -> None:
    private = public_dir / "root-only"
    private.mkdir(mode=0o700)
    monkeypatch.setenv("SUDO_UID", "65534")
    monkeypatch.setenv("SUDO_GID", "65534")
    for fds in ((), (3,)):
        spec = Spec("/bin/true", ["true"], cwd=str(private), extra_fds=fds)
        e = start_error(dataclasses.replace(spec, drop_sudo_credentials=True))
        assert (e.errno, e.step, e.filename) == (errno.EACCES, "chdir", "/bin/true")
        assert f"cannot enter directory {str(private)!r} as uid 65534" in str(e)
        # Without the drop, root enters it.
        assert run(spec)[2] == 0


@needs_root
def test_program_the_user_cannot_execute(monkeypatch: pytest.MonkeyPatch, public_dir: Path) -> None:
    prog = public_dir / "root-only-prog"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o700)
    monkeypatch.setenv("SUDO_UID", "65534")
    e = start_error(Spec(str(prog), ["x"], drop_sudo_credentials=True))
    assert (e.errno, e.step) == (errno.EACCES, "exec")


def test_credentials_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_UID", "65534")
    monkeypatch.setenv("SUDO_GID", "100")
    cmd, pipes = build(Spec(CAT, ["cat"], drop_sudo_credentials=True))
    close_child_side(cmd)
    pipes.close()
    if IS_ROOT:
        assert cmd.credentials is not None
        assert (cmd.credentials.uid, cmd.credentials.gid) == (NOBODY, 100)
        assert set(cmd.credentials.groups) == expected_groups(NOBODY, 100)
    else:  # not root: a no-op
        assert cmd.credentials is None


@pytest.mark.skipif(not IS_ROOT, reason="the credential drop needs root")
def test_only_the_trampoline_must_be_started_from_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SUDO_UID", "65534")
    expected = [
        (Spec(CAT, ["cat"]), "popen", True),
        (Spec(CAT, ["cat"], extra_fds=[3]), "posix_spawn", True),
        (Spec(CAT, ["cat"], drop_sudo_credentials=True), "trampoline", False),
    ]
    for spec, mechanism, brief in expected:
        command, pipes = build(spec)
        with pipes:
            close_child_side(command)
            assert (command.mechanism, command.start_is_brief) == (mechanism, brief)
