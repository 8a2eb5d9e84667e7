"""``mproxy-exec`` as a real subprocess: data through stdin/stdout, exit statuses, signal
forwarding, extra fds, environment, cwd, --drop-sudo, background holders and -v."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pty
import random
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import cgroups_usable

from controller._cli import main as exec_main

EXEC = [sys.executable, "-m", "controller"]
TIMEOUT = 30.0


def run_exec(*args: str, input: bytes | None = None, env: dict[str, str] | None = None,
             pass_fds: tuple[int, ...] = (), cwd: str | None = None,
             timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run([*EXEC, *args], input=input, capture_output=True, env=env,
                          pass_fds=pass_fds, cwd=cwd, timeout=timeout, check=False)
    assert b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    return done


def python_child(script: str) -> list[str]:
    return ["--", sys.executable, "-c", script]


@asynccontextmanager
async def spawned(argv: list[str], **options: Any) -> AsyncIterator[trio.Process]:
    """A subprocess killed (if still running) and waited for on the way out."""
    proc = await trio.lowlevel.open_process(argv, **options)
    try:
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    await stream.aclose()


# ---------------------------------------------------------------- the command itself


def test_console_script_is_installed_next_to_python() -> None:
    script = Path(sys.executable).parent / "mproxy-exec"
    assert script.is_file()
    assert os.access(script, os.X_OK)
    done = subprocess.run([str(script), "--", "echo", "via console script"],
                          capture_output=True, timeout=TIMEOUT, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"via console script\n", b"")


async def test_100_mib_through_stdin_and_stdout_byte_exact() -> None:
    blocks, block_size = 100, 1 << 20
    rng = random.Random(7)
    sent, received = hashlib.sha256(), hashlib.sha256()
    total = 0
    with trio.fail_after(110):
        async with spawned([*EXEC, "--", "cat"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE) as proc, trio.open_nursery() as nursery:
            assert proc.stdin is not None and proc.stdout is not None
            stdin, stdout = proc.stdin, proc.stdout

            async def feed() -> None:
                for _ in range(blocks):
                    block = rng.randbytes(block_size)
                    sent.update(block)
                    await stdin.send_all(block)
                await stdin.aclose()

            nursery.start_soon(feed)
            while chunk := await stdout.receive_some(1 << 20):
                received.update(chunk)
                total += len(chunk)
            assert await proc.wait() == 0
    assert total == blocks * block_size
    assert received.hexdigest() == sent.hexdigest()


async def test_our_pipes_stay_blocking_for_whoever_shares_them() -> None:
    # mproxy-exec reads and writes pipes on its event loop, through open file
    # descriptions of its own: O_NONBLOCK on the ones it was given would reach every
    # process sharing them (a shell's next command would meet EAGAIN).
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        with trio.fail_after(TIMEOUT):
            async with spawned([*EXEC, "--", "sh", "-c", "echo ready; cat"], stdin=in_r,
                               stdout=out_w) as proc:
                to_child = trio.lowlevel.FdStream(os.dup(in_w))
                from_child = trio.lowlevel.FdStream(os.dup(out_r))
                async with to_child, from_child:
                    output = b""
                    while output != b"ready\n":
                        output += await from_child.receive_some()
                    await to_child.send_all(b"pumping\n")
                    while output != b"ready\npumping\n":
                        output += await from_child.receive_some()
                    # Both pumps are running: the descriptions we share are untouched.
                    for fd in (in_r, out_w):
                        assert os.get_blocking(fd), fd
                    os.close(in_w)
                    in_w = -1
                    await to_child.aclose()  # the last writer: the child sees EOF
                    assert await proc.wait() == 0
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)


def test_stdin_from_a_file_goes_on_from_its_offset(tmp_path: Path) -> None:
    # A file is not opened again (that would start at 0): it is read where we are.
    path = tmp_path / "input"
    path.write_bytes(b"skipped|" + bytes(range(256)) * 4096)
    with path.open("rb") as source:
        os.read(source.fileno(), len(b"skipped|"))
        done = subprocess.run([*EXEC, "--", "cat"], stdin=source, capture_output=True,
                              timeout=TIMEOUT, check=False)
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout == bytes(range(256)) * 4096


async def test_closed_reader_gets_the_child_a_sigpipe() -> None:
    # Like `yes | head -1`: our reader goes away, the remote writer dies of SIGPIPE.
    with trio.fail_after(TIMEOUT):
        async with spawned([*EXEC, "--", "yes"], stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            assert (await proc.stdout.receive_some(2)) == b"y\n"
            await proc.stdout.aclose()
            assert await proc.wait() == 128 + signal.SIGPIPE


async def test_a_python_writer_whose_reader_left_ends_as_locally() -> None:
    # Python ignores SIGPIPE: it has to get EPIPE (BrokenPipeError, exit 1) as it would
    # writing into `| head -1` here. It used to run for ever: its output was read and
    # discarded.
    script = "import sys\nwhile True: sys.stdout.write('line\\n')"
    with trio.fail_after(10):
        async with spawned([*EXEC, *python_child(script)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            assert (await proc.stdout.receive_some(5)) == b"line\n"
            await proc.stdout.aclose()
            assert await proc.wait() == 1
            err = bytearray()
            while chunk := await proc.stderr.receive_some():
                err += chunk
            assert b"BrokenPipeError" in err


@pytest.mark.parametrize("where", ["stdout", "stderr", "extra fd"])
async def test_a_sigpipe_ignoring_writer_whose_reader_left_gets_epipe(where: str) -> None:
    # `sh -c 'trap "" PIPE; yes; exit 9' | head -1`: yes gets EPIPE and stops, sh exits
    # 9, and so does mproxy-exec; on stdout, stderr and an --fd output alike. (The PIPE
    # signal sent to the child's group instead used to go unheeded: yes ran for ever.)
    reader, writer = os.pipe()
    fd = {"stdout": 1, "stderr": 2, "extra fd": writer}[where]
    extra = ["--fd", str(fd)] if where == "extra fd" else []
    streams: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
                               "stderr": subprocess.DEVNULL}
    if where == "extra fd":
        streams["pass_fds"] = (writer,)
    else:
        streams[where] = writer
    # (dash takes no fd above 9 in a redirection: yes is given its stdout by python)
    yes = (f"yes >&{fd}" if fd < 3 else f"{sys.executable} -c 'import os; os.dup2({fd}, 1); "
           "os.execvp(\"yes\", [\"yes\"])'")
    try:
        with trio.fail_after(10):
            async with spawned([*EXEC, *extra, "--", "sh", "-c", f"trap '' PIPE; {yes}; exit 9"],
                               **streams) as proc:
                os.close(writer)
                async with trio.lowlevel.FdStream(reader) as ours:
                    assert (await ours.receive_some(2)) == b"y\n"
                assert await proc.wait() == 9
    finally:
        for each in (reader, writer):
            with contextlib.suppress(OSError):
                os.close(each)


def test_failed_write_to_our_stdout_is_reported() -> None:
    with open("/dev/full", "wb") as full:
        done = subprocess.run([*EXEC, "--", "echo", "hi"], stdout=full, stderr=subprocess.PIPE,
                              timeout=TIMEOUT, check=False)
    # The child's own write succeeded (into the agent's pipe): its status stands.
    assert done.returncode == 0
    assert done.stderr == (b"mproxy-exec: writing fd 1: No space left on device; "
                           b"discarding the rest\n")


# ---------------------------------------------------------------- exit statuses


def test_exit_status_of_the_program() -> None:
    assert run_exec("--", "true").returncode == 0
    done = run_exec("--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, b"out\n", b"err\n")
    assert run_exec("--", "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM
    assert run_exec("--", "sh", "-c", "kill -USR1 $$").returncode == 128 + signal.SIGUSR1


def test_not_executable_is_126_and_missing_is_127(tmp_path: Path) -> None:
    not_executable = tmp_path / "script.sh"
    not_executable.write_text("#!/bin/sh\necho never\n")
    not_executable.chmod(0o644)
    done = run_exec("--", str(not_executable))
    assert done.returncode == 126
    assert done.stdout == b""
    assert done.stderr.startswith(b"mproxy-exec: ")
    assert b"Permission denied" in done.stderr
    done = run_exec("--", "no-such-program-mproxy", "arg")
    assert done.returncode == 127
    assert done.stderr.startswith(b"mproxy-exec: no-such-program-mproxy: ")
    done = run_exec("--cwd", str(tmp_path / "missing"), "--", "true")
    assert done.returncode == 126  # not found, but not the program: the agent's status
    assert b"cannot enter directory" in done.stderr


def test_empty_prog_is_not_found_without_asking_an_agent() -> None:
    # As bash: `'' ` is never a command. The agent command would fail (255): not started.
    done = run_exec("--agent", "false", "--", "")
    assert (done.returncode, done.stdout) == (127, b"")
    assert done.stderr == b"mproxy-exec: '': command not found (PROG is empty)\n"


def test_an_undecodable_name_is_shown_as_a_shell_would_read_it() -> None:
    # Not as the surrogate Python decodes the byte to ("\\udcff").
    prog = os.fsdecode(b"no-such-\xff-mproxy")
    done = run_exec("--", prog)
    assert done.returncode == 127
    assert done.stderr.startswith(b"mproxy-exec: $'no-such-\\xff-mproxy': "), done.stderr
    done = run_exec("--unset", os.fsdecode(b"\xff=1"), "--", "true")
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == (
        b"mproxy-exec: --unset $'\\xff=1': not a variable name (empty, or containing '=')")
    done = run_exec("--", "no such program")
    assert done.stderr.startswith(b"mproxy-exec: 'no such program': "), done.stderr


def test_a_spawn_error_is_one_line_naming_the_program(tmp_path: Path) -> None:
    script = tmp_path / "s.sh"
    script.write_text("#!/no/such/sh\necho never\n")
    script.chmod(0o755)
    missing = tmp_path / "missing"
    for argv, status, line in [
        (["no-such-program-mproxy", "arg"], 127,
         "no-such-program-mproxy: No such file or directory (searched $PATH)"),
        (["--cwd", str(tmp_path), "--", "./s.sh"], 127,
         "./s.sh: interpreter '/no/such/sh' (from #!) not found"),
        (["--cwd", str(missing), "--", "true"], 126,
         f"true: cannot enter directory {str(missing)!r}: No such file or directory"),
        (["--", str(tmp_path)], 126, f"{tmp_path}: Permission denied"),
    ]:
        done = run_exec(*argv)
        assert (done.returncode, done.stdout) == (status, b"")
        assert done.stderr.decode() == f"mproxy-exec: {line}\n"


def test_a_script_without_shebang_runs_with_sh(tmp_path: Path) -> None:
    script = tmp_path / "nosb.sh"
    script.write_text('echo "$0|$#|$*"; echo err >&2; exit 3\n')
    script.chmod(0o755)
    bash = subprocess.run(["bash", "-c", './nosb.sh "a b" c'], cwd=tmp_path,
                          capture_output=True, check=False)
    done = run_exec("--", "./nosb.sh", "a b", "c", cwd=str(tmp_path))
    assert (done.stdout, done.stderr, done.returncode) == (b"./nosb.sh|2|a b c\n", b"err\n", 3)
    assert (done.stdout, done.stderr, done.returncode) == (
        bash.stdout, bash.stderr, bash.returncode)


@pytest.mark.skipif(os.geteuid() != 0, reason="the credential drop needs root")
def test_drop_sudo_that_drops_nothing_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SUDO_UID", "SUDO_GID")}
    done = run_exec("--drop-sudo", "--", "id", "-u", env=env)
    assert (done.returncode, done.stdout) == (0, b"0\n")
    assert done.stderr == (b"mproxy-exec: --drop-sudo: the child runs as uid 0 (SUDO_UID is "
                           b"not set, or is 0, in the agent's environment)\n")
    done = run_exec("--drop-sudo", "--", "id", "-u", env={**env, "SUDO_UID": "65534"})
    assert (done.returncode, done.stdout, done.stderr) == (0, b"65534\n", b"")
    done = run_exec("--", "id", "-u", env=env)  # no --drop-sudo: nothing to say
    assert (done.returncode, done.stdout, done.stderr) == (0, b"0\n", b"")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT, signal.SIGHUP])
def test_a_terminal_signal_to_our_process_group_goes_to_the_child(sig: signal.Signals) -> None:
    # Ctrl-C (Ctrl-\, a hangup) reaches the whole foreground process group: the agent
    # must not be in it, or it stops (or dies) and the child's handler never runs.
    name = sig.name[3:]
    child = f"trap 'echo trapped; exit 7' {name}; echo ready; while :; do sleep 0.05; done"
    with subprocess.Popen([*EXEC, "--", "sh", "-c", child], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True) as proc:  # a terminal's job, in effect
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=TIMEOUT)
    # (sh may report its sleep killed by the signal: "Quit", "Hangup", as it would here.)
    assert (proc.returncode, out) == (7, b"trapped\n") and b"mproxy" not in err, err


def test_a_signal_after_the_child_exited_leaves_its_status() -> None:
    # Once the exit is in, a signal is the child's no longer, nor may it end us: the
    # status stays the child's. The agent command lingers 2 s after the agent is done,
    # which keeps mproxy-exec waiting for it while the signals arrive.
    lingering = f"{shlex.quote(sys.executable)} -m agent; sleep 2"
    child = "trap '' TERM INT HUP; echo $$; exit 4"
    with subprocess.Popen([*EXEC, "--agent", f"sh -c {shlex.quote(lingering)}", "--",
                           "sh", "-c", child], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        deadline = time.monotonic() + TIMEOUT
        while os.path.exists(f"/proc/{pid}"):  # reaped by the agent: its exit is sent
            assert time.monotonic() < deadline, "the child did not end"
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=TIMEOUT)
    assert (proc.returncode, out, err) == (4, b"", b"")


@pytest.mark.parametrize("where", ["stdout", "extra fd", "stdout socket"])
def test_a_child_closing_its_output_early_gives_our_reader_eof_at_once(where: str) -> None:
    # The reader of our output sees the end when the child closes its end, as it would
    # with the child run here, not when the child (and mproxy-exec) exit.
    if where == "stdout socket":
        ours, theirs = socket.socketpair()
        reader, writer = ours.detach(), theirs.detach()
    else:
        reader, writer = os.pipe()
    fd = writer if where == "extra fd" else 1
    child = (f"import os, sys, time; os.write({fd}, b'out\\n'); os.close({fd}); "
             "sys.stderr.write('closed\\n'); sys.stderr.flush(); time.sleep(30)")
    extra = ["--fd", str(fd)] if fd != 1 else []
    try:
        with subprocess.Popen([*EXEC, *extra, *python_child(child)],
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              stdout=writer if fd == 1 else subprocess.DEVNULL,
                              pass_fds=(writer,) if fd != 1 else ()) as proc:
            os.close(writer)
            with os.fdopen(reader, "rb") as stream:
                assert stream.read() == b"out\n"  # to the end, while the child sleeps on
            assert proc.poll() is None
            # The child writes this after its close: signalled before, it would not.
            assert proc.stderr is not None and proc.stderr.readline() == b"closed\n"
            proc.send_signal(signal.SIGTERM)  # forwarded: ends the sleep
            _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        for each in (reader, writer):
            with contextlib.suppress(OSError):
                os.close(each)
    assert (proc.returncode, err) == (-signal.SIGTERM, b"")


def test_agent_dying_mid_run_is_255() -> None:
    # PPID: the agent. Killed at once, it may not have told its guardian of the child's
    # group yet; the child lives on in the agent's cgroup, where the guardian ends it.
    done = run_exec("--", "sh", "-c", "echo started; kill -KILL $PPID; exec sleep 100")
    assert done.returncode == 255
    assert done.stdout in (b"", b"started\n")
    lines = sorted(done.stderr.splitlines())  # "mproxy-agent" < "mproxy-exec"
    assert lines[-1].startswith(b"mproxy-exec: agent failed: "), done.stderr
    if not cgroups_usable() and len(lines) == 1:
        return  # the agent died before announcing the group: nothing holds the child
    # Two lines: ours, and the guardian's (it shares our stderr) as it ends the child.
    guardian, _ = lines
    assert guardian.startswith(b"mproxy-agent[") and (
        b"WARNING the agent ended without ending its children: ending " in guardian
    ), done.stderr
    if cgroups_usable():
        assert b" every process in " in guardian, done.stderr


@pytest.mark.parametrize("agent", [
    "false", "/nonexistent/mproxy-agent", 'sh -c "exit 0"',
    "sh -c 'echo this is no frame; exec cat >/dev/null'",
], ids=["false", "missing", "exit-0", "garbage"])
def test_agent_failure_is_255(agent: str) -> None:
    done = run_exec("--agent", agent, "--", "echo", "never")
    assert done.returncode == 255
    assert done.stdout == b""
    assert done.stderr.startswith(b"mproxy-exec: ")


def test_an_agent_command_that_prints_a_banner_first_still_connects() -> None:
    """What a login's start-up file prints before the agent's hello is skipped."""
    agent = str(Path(sys.executable).parent / "mproxy-agent")
    command = f"sh -c 'echo Welcome to host; printf \"\\\\0\\\\377x\"; exec {agent}'"
    done = run_exec("--agent", command, "--", "echo", "hi")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"hi\n", b"")


def test_an_agent_command_that_prints_but_never_says_hello_is_quoted() -> None:
    done = run_exec("--agent", "sh -c 'echo Welcome to host; exit 3'", "--", "true")
    assert done.returncode == 255
    assert b"(agent exit status 3); it wrote 'Welcome to host\\n'" in done.stderr, done.stderr


def test_an_agent_command_that_echoes_is_255_at_once() -> None:
    started = time.monotonic()
    done = run_exec("--agent", "cat", "--", "true", timeout=5)
    assert time.monotonic() - started < 3
    assert (done.returncode, done.stdout) == (255, b"")
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        b"mproxy-exec: agent failed: the agent broke the protocol: hello frame: the peer's "
        b"hello says role 'controller', this side's own: the agent command echoed our "
        b"frames back (is it `cat`?)"
    ), line


@pytest.mark.parametrize("args", [
    ["--no-such-option", "--", "true"],
    ["--fd", "1", "--", "true"],
    ["--fd", "x", "--", "true"],
    ["--fd", "99", "--", "true"],  # not open here
    ["--fd", "3", "--", "true"],  # not open here either, whatever trio opens later
    ["--cwd", "", "--", "true"],
    ["--unset", "", "--", "true"],
    ["--unset", "A=B", "--", "true"],
    ["--env", "=x", "--", "true"],
    [],
    ["--"],
    ["-v", "--"],
    ["--agent", "", "--", "true"],
    ["--agent", "'unterminated", "--", "true"],
    ["--ssh", "host", "--agent", "x", "--", "true"],
    ["-o", "BatchMode=yes", "--", "true"],
    ["--env", "NOEQUALS", "--", "true"],
], ids=["unknown-option", "fd-1", "fd-not-int", "fd-99-not-open", "fd-3-not-open",
        "empty-cwd", "empty-unset", "unset-with-equals", "env-empty-key", "no-prog",
        "dashdash-only", "option-then-dashdash-only", "empty-agent",
        "bad-quoting", "ssh-and-agent", "o-without-ssh", "env-without-equals"])
def test_usage_errors_are_2(args: list[str]) -> None:
    done = run_exec(*args)
    assert done.returncode == 2
    assert done.stdout == b""
    # One line naming the problem, then the usage; nothing from an agent.
    message, usage = done.stderr.decode().split("\n", 1)
    assert message.startswith("mproxy-exec: ") and "frame" not in message, message
    assert usage.startswith("usage: mproxy-exec [-h] [--version] "), usage
    assert usage.endswith(" [--] PROG [ARG...]\n"), usage


@pytest.mark.parametrize(("args", "message"), [
    ([], "PROG is missing (the program to run)"),
    (["--"], "PROG is missing (the program to run)"),
    (["--unset", "A=B", "--", "true"],
     "--unset A=B: not a variable name (empty, or containing '=')"),
    (["--unset", "", "--", "true"], "--unset '': not a variable name (empty, or containing '=')"),
    (["--cwd", "", "--", "true"], "--cwd '': empty directory name"),
    (["--env", "=x", "--", "true"], "--env =x: expected K=V with a non-empty K"),
], ids=["no-prog", "dashdash-only", "unset-with-equals", "empty-unset", "empty-cwd",
        "env-empty-key"])
def test_usage_errors_say_what_is_wrong_before_any_agent_starts(
        args: list[str], message: str) -> None:
    # An agent that cannot start (255) shows that none was asked.
    done = run_exec("--agent", "false", *args)
    assert done.returncode == 2
    assert done.stderr.decode().splitlines()[0] == f"mproxy-exec: {message}"


@pytest.mark.parametrize(("args", "message"), [
    (["--env", "A=\0"], "--env $'A=\\x00': contains a NUL byte"),
    (["--unset", "A\0"], "--unset $'A\\x00': contains a NUL byte"),
    (["--cwd", "/\0"], "--cwd $'/\\x00': contains a NUL byte"),
    (["--", "echo", "a\0"], "ARG $'a\\x00': contains a NUL byte"),
], ids=["env", "unset", "cwd", "arg"])
def test_a_nul_is_a_usage_error(args: list[str], message: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    # No command line carries a NUL: main(argv), in this process, can. It returns before
    # starting anything.
    argv = args if "--" in args else [*args, "--", "true"]
    assert exec_main(argv) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"mproxy-exec: {message}"


def test_version_is_the_agents() -> None:
    ours = run_exec("--version")
    agents = subprocess.run([sys.executable, "-m", "agent", "--version"], capture_output=True,
                            timeout=TIMEOUT, check=True)
    assert (ours.returncode, ours.stderr) == (0, b"")
    name, version = ours.stdout.decode().split()
    assert name == "mproxy-exec"
    assert agents.stdout.decode() == f"mproxy-agent {version}\n"


def test_every_dashdash_after_prog_is_passed_on() -> None:
    done = run_exec("echo", "--", "a")
    assert (done.returncode, done.stdout) == (0, b"-- a\n")
    done = run_exec("--", "echo", "--", "b")
    assert (done.returncode, done.stdout) == (0, b"-- b\n")


# ---------------------------------------------------------------- signals


TRAP_SCRIPT = 'trap "echo got-usr1; exit 5" USR1; echo ready; while :; do sleep 0.1; done'


@pytest.mark.parametrize(("sig", "status", "output"), [
    (signal.SIGUSR1, 5, b"ready\ngot-usr1\n"),
    # Killed by the signal forwarded to it, the child takes mproxy-exec with it.
    (signal.SIGTERM, -signal.SIGTERM, b"ready\n"),
    (signal.SIGINT, -signal.SIGINT, b"ready\n"),
    (signal.SIGHUP, -signal.SIGHUP, b"ready\n"),
], ids=["USR1", "TERM", "INT", "HUP"])
async def test_signals_are_forwarded(sig: signal.Signals, status: int, output: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with spawned([*EXEC, "--", "sh", "-c", TRAP_SCRIPT], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            out = bytearray()
            while b"ready\n" not in out:  # the trap is set and mproxy-exec forwards
                chunk = await proc.stdout.receive_some()
                assert chunk, bytes(out)
                out += chunk
            proc.send_signal(sig)
            while chunk := await proc.stdout.receive_some():
                out += chunk
            err = bytearray()
            while chunk := await proc.stderr.receive_some():
                err += chunk
            assert await proc.wait() == status
    assert bytes(out) == output
    assert b"Traceback" not in err


READY_THEN_SLEEP = ["--", "sh", "-c", "echo ready; exec sleep 30"]


def test_a_child_killed_by_the_signal_forwarded_to_it_ends_us_by_that_signal() -> None:
    with subprocess.Popen([*EXEC, *READY_THEN_SLEEP], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"  # the child runs: SIGINT is forwarded
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    assert (proc.returncode, out, err) == (-signal.SIGINT, b"", b"")


def test_ending_us_by_sigquit_dumps_no_core_of_ours(tmp_path: Path) -> None:
    # The core would be mproxy-exec's, not the child's. Cores are allowed (`ulimit -c` in
    # the sh mproxy-exec is exec'd from); waitpid tells whether one was dumped.
    if resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        pytest.skip("no core dumps allowed at all")
    # Both run in tmp_path, where a core would go (core_pattern "core").
    read_end, write_end = os.pipe()
    argv = ["sh", "-c", 'ulimit -c unlimited && cd "$1" && shift && exec "$@"', "sh",
            str(tmp_path), *EXEC, "--cwd", str(tmp_path), *READY_THEN_SLEEP]
    actions = [(os.POSIX_SPAWN_DUP2, write_end, 1), (os.POSIX_SPAWN_CLOSE, read_end)]
    pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as stdout:
            assert stdout.readline() == b"ready\n"
            os.kill(pid, signal.SIGQUIT)
            _, status = os.waitpid(pid, 0)
            pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGQUIT, status
    assert not os.WCOREDUMP(status)


def test_a_child_killed_by_another_signal_than_the_forwarded_one_is_128_plus_n() -> None:
    # We forward INT; the child's trap kills it with TERM, which we did not forward.
    child = "trap 'kill -TERM $$' INT; echo ready; while :; do sleep 0.05; done"
    with subprocess.Popen([*EXEC, "--", "sh", "-c", child], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    assert (proc.returncode, out, err) == (128 + signal.SIGTERM, b"", b"")


def test_a_signal_before_the_child_runs_ends_us_by_that_signal() -> None:
    # The agent command never says hello: mproxy-exec waits for it, the child unstarted.
    # (cat ends when mproxy-exec, giving up, closes the agent's stdin.) sh stays, holding
    # the agent's stdout open: with `exec cat >/dev/null` the stdout closed at once, and
    # mproxy-exec took that for the agent's loss (255) when it came before the signal.
    never = "sh -c 'echo agent-started >&2; cat >/dev/null'"
    with subprocess.Popen([*EXEC, "--agent", never, "--", "true"], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        assert proc.stderr.readline() == b"agent-started\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    assert (proc.returncode, out, err) == (-signal.SIGTERM, b"", b"")


def test_a_signal_while_the_agent_command_hangs_ends_us_at_once() -> None:
    # An agent command that never says hello and ignores its input's end (an ssh still
    # connecting; here sleep): mproxy-exec used to wait shutdown_timeout (30 s) for it.
    hanging = "sh -c 'echo agent-started >&2; exec sleep 60'"
    with subprocess.Popen([*EXEC, "--agent", hanging, "--", "true"], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        assert proc.stderr.readline() == b"agent-started\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=5)
    assert (proc.returncode, out, err) == (-signal.SIGINT, b"", b"")


def test_ctrl_c_stops_a_shell_loop_of_mproxy_exec() -> None:
    # Ctrl-C goes to the foreground process group: here bash and mproxy-exec (the agent
    # and the child have groups of their own). bash waits for mproxy-exec, and ends the
    # loop only if it died of SIGINT; had it exited 130, the next iteration would start.
    loop = (f"for i in 1 2 3; do echo iteration $i; {shlex.join(EXEC)} "
            f"{shlex.join(READY_THEN_SLEEP)}; done; echo after the loop")
    with subprocess.Popen(["bash", "-c", loop], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True) as proc:
        assert proc.stdout is not None
        try:
            assert proc.stdout.readline() == b"iteration 1\n"
            assert proc.stdout.readline() == b"ready\n"
            os.killpg(proc.pid, signal.SIGINT)
            rest, err = proc.communicate(timeout=TIMEOUT)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert (rest, err) == (b"", b"")
    assert proc.returncode == -signal.SIGINT  # bash, too, ends itself by it


# ---------------------------------------------------------------- extra fds


def test_fd_open_for_writing_receives_the_childs_writes(tmp_path: Path) -> None:
    target = tmp_path / "from-child"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # Our fd is write-only: the child's fd sees EOF at once, and what it writes lands
        # in our file.
        script = (f"import os, sys; os.write({fd}, b'via-fd\\n'); "
                  f"sys.exit(0 if os.read({fd}, 10) == b'' else 9)")
        done = run_exec("--fd", str(fd), *python_child(script), pass_fds=(fd,))
    finally:
        os.close(fd)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    assert target.read_bytes() == b"via-fd\n"


def test_fd_open_for_reading_feeds_the_child() -> None:
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"from-our-pipe\n" * 100)
        os.close(write_end)
        script = (f"import os, sys\nwhile chunk := os.read({read_end}, 65536):\n"
                  f"    sys.stdout.buffer.write(chunk)\n")
        done = run_exec("--fd", str(read_end), *python_child(script), pass_fds=(read_end,))
    finally:
        os.close(read_end)
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout == b"from-our-pipe\n" * 100


async def test_fd_socket_carries_both_directions_with_half_close() -> None:
    ours, theirs = socket.socketpair()
    n = theirs.fileno()
    # The child answers only after our EOF reached it, then half-closes its side and waits
    # for its stdin to end: our EOF must arrive while the child still runs.
    script = (
        f"import socket, sys\ns = socket.socket(fileno={n})\ndata = b''\n"
        "while chunk := s.recv(65536):\n    data += chunk\n"
        "s.sendall(data.upper()); s.shutdown(socket.SHUT_WR)\n"
        "sys.stdin.read(); print('child done')\n"
    )
    with trio.fail_after(TIMEOUT), ours:
        async with spawned([*EXEC, "--fd", str(n), *python_child(script)], pass_fds=(n,),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
            theirs.close()
            assert proc.stdin is not None and proc.stdout is not None
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
            await stream.send_all(b"ping over fd\n")
            await stream.send_eof()
            answer = bytearray()
            while chunk := await stream.receive_some():
                answer += chunk
            assert bytes(answer) == b"PING OVER FD\n"
            assert proc.returncode is None
            await proc.stdin.aclose()
            # To the end: print() writes the line in two when unbuffered (PYTHONUNBUFFERED
            # in our environment, which the child gets).
            output = b""
            while piece := await proc.stdout.receive_some():
                output += piece
            assert output == b"child done\n"
            assert await proc.wait() == 0


# ---------------------------------------------------------------- environment, cwd, sudo


def child_environment(output: bytes) -> dict[bytes, bytes]:
    """What /usr/bin/env printed (no value here spans lines)."""
    return dict(line.split(b"=", 1) for line in output.splitlines())


def test_the_local_agent_passes_our_environment_whole() -> None:
    # As a child run here would get it: not the few names the agent's policy keeps.
    env = {**os.environ, "FOO": "bar", "LD_LIBRARY_PATH": "/opt/mproxy-test/lib",
           "MPROXY_TEST": "1", "LC_ALL": "C"}
    done = run_exec("--", "/usr/bin/env", env=env)
    assert (done.returncode, done.stderr) == (0, b"")
    assert child_environment(done.stdout) == {os.fsencode(k): os.fsencode(v)
                                              for k, v in env.items()}
    done = run_exec("--unset", "FOO", "--unset", "LD_LIBRARY_PATH", "--env", "NEW=v", "--",
                    "/usr/bin/env", env=env)
    expected = {k: v for k, v in env.items() if k not in ("FOO", "LD_LIBRARY_PATH")}
    assert child_environment(done.stdout) == {os.fsencode(k): os.fsencode(v)
                                              for k, v in {**expected, "NEW": "v"}.items()}


def test_an_explicit_agent_applies_its_policy() -> None:
    # --agent (or --ssh): the agent's own environment, filtered by its policy, which the
    # default agent's run of mproxy-exec bypasses.
    env = {**os.environ, "FOO": "bar", "LD_LIBRARY_PATH": "/opt/mproxy-test/lib",
           "HOME": "/home/somebody"}
    done = run_exec("--agent", f"{shlex.quote(sys.executable)} -m agent", "--env", "NEW=v",
                    "--", "/usr/bin/env", env=env)
    assert (done.returncode, done.stderr) == (0, b"")
    child_env = child_environment(done.stdout)
    assert b"FOO" not in child_env and b"LD_LIBRARY_PATH" not in child_env
    assert (child_env[b"HOME"], child_env[b"NEW"]) == (b"/home/somebody", b"v")
    assert child_env[b"PATH"] == os.environb[b"PATH"]


def test_env_unset_and_clear_env() -> None:
    env = {**os.environ, "MPX_KEPT": "no", "HOME": "/home/somebody", "LANG": "C.UTF-8"}
    done = run_exec("--clear-env", "--env", "A=1", "--env", "B=x=y", "--env", "EMPTY=",
                    "--", "/usr/bin/env", env=env)
    assert (done.returncode, done.stderr) == (0, b"")
    assert sorted(done.stdout.splitlines()) == [b"A=1", b"B=x=y", b"EMPTY="]

    done = run_exec("--unset", "HOME", "--env", "LANG=C", "--env", "NEW=v", "--",
                    "/usr/bin/env", env=env)
    child_env = child_environment(done.stdout)
    assert b"HOME" not in child_env
    assert child_env[b"LANG"] == b"C"
    assert child_env[b"NEW"] == b"v"
    assert child_env[b"PATH"] == os.environb[b"PATH"]


def test_cwd(tmp_path: Path) -> None:
    done = run_exec("--cwd", str(tmp_path), "--", "pwd", "-P")
    assert (done.returncode, done.stdout) == (0, os.fsencode(tmp_path.resolve()) + b"\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="--drop-sudo only drops from root")
def test_drop_sudo() -> None:
    # The agent reads SUDO_* from its own environment, which it inherits from us.
    env = {**os.environ, "SUDO_UID": "65534", "SUDO_GID": "65534"}
    done = run_exec("--drop-sudo", "--", "sh", "-c", "id -u; id -g", env=env, cwd="/")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"65534\n65534\n", b"")
    done = run_exec("--", "id", "-u", env=env, cwd="/")
    assert done.stdout == b"0\n"


# ---------------------------------------------------------------- lifetime and logging


def test_background_holder_does_not_delay_the_exit() -> None:
    done = run_exec("--", "sh", "-c", "echo hi; sleep 100 &", timeout=20)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"hi\n", b"")


def test_verbose_shows_agent_log_records() -> None:
    done = run_exec("-v", "--", "echo", "hello")
    assert (done.returncode, done.stdout) == (0, b"hello\n")
    lines = done.stderr.decode().splitlines()
    assert any(line.startswith("mproxy-exec: agent DEBUG: started id=1 pid=")
               for line in lines), lines
    quiet = run_exec("--", "echo", "hello")
    assert quiet.stderr == b""


def test_n_leaves_our_stdin_to_a_while_read_loop(tmp_path: Path) -> None:
    # -n: the child reads EOF at once and mproxy-exec never reads fd 0, so the loop's
    # input is the loop's. Without it, the first run's child (cat) reads the rest.
    lines = tmp_path / "lines"
    lines.write_text("one\ntwo\nthree\n")
    exec_cmd = shlex.join(EXEC)
    loop = f'while read l; do echo "got $l"; {exec_cmd} {{}} -- cat || exit 9; done < {lines}'
    with_n = subprocess.run(["bash", "-c", loop.format("-n")], capture_output=True,
                            timeout=TIMEOUT, check=False)
    assert (with_n.returncode, with_n.stderr) == (0, b"")
    assert with_n.stdout == b"got one\ngot two\ngot three\n"
    without = subprocess.run(["bash", "-c", loop.format("")], capture_output=True,
                             timeout=TIMEOUT, check=False)
    assert (without.returncode, without.stderr) == (0, b"")
    assert without.stdout == b"got one\ntwo\nthree\n"


async def test_n_ends_the_childs_stdin_while_ours_stays_open() -> None:
    # Our stdin is a pipe nobody closes: only -n lets `cat` end.
    with trio.fail_after(TIMEOUT):
        async with spawned([*EXEC, "-n", "--", "sh", "-c", "cat; echo cat-ended"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            await proc.stdin.send_all(b"never read\n")
            output = b""
            while chunk := await proc.stdout.receive_some():
                output += chunk
            assert (await proc.wait(), output) == (0, b"cat-ended\n")


def test_closed_stdin_reads_as_empty() -> None:
    # With fd 0 closed, trio's own fds could land on it; mproxy-exec must read "no input".
    done = subprocess.run(
        ["sh", "-c", 'exec 0<&- "$@"', "sh", *EXEC, "--", "sh", "-c", "cat; echo done"],
        capture_output=True, timeout=TIMEOUT, check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, b"done\n", b"")


def test_a_child_cannot_use_our_terminal() -> None:
    # Started at a terminal (a pty that is our controlling terminal), the child is in a
    # session of its own: `cat /dev/tty` fails at once with ENXIO, it never stops on
    # SIGTTIN and hangs mproxy-exec.
    primary, secondary = pty.openpty()
    at_a_terminal = ("import fcntl, os, sys, termios\n"
                     "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
                     "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n")
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", at_a_terminal, *EXEC[1:], "--", "cat", "/dev/tty"],
            stdin=secondary, stdout=secondary, stderr=subprocess.PIPE,
            start_new_session=True)
        os.close(secondary)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 1
        assert b"No such device or address" in err
    finally:
        os.close(primary)
