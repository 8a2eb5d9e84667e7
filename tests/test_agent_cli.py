"""The ``mproxy-agent`` command line (``python -m agent``): options, exit statuses, and
what it does to its process at start: inherited fds marked close-on-exec, RLIMIT_NOFILE
raised for itself but not for its children."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from agent_harness import spawned
from conftest import AGENT_ARGV

import agent
from protocol import (
    DEFAULT_MAX_FRAME,
    Close,
    Connection,
    FrameDecoder,
    Goodbye,
    Hello,
    Log,
    Ping,
    Pong,
    Role,
    Shutdown,
    encode,
)

_O_CLOEXEC = 0o2000000


def test_version() -> None:
    result = subprocess.run([*AGENT_ARGV, "--version"], capture_output=True, timeout=30,
                            check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"mproxy-agent {agent.__version__}"


@pytest.mark.parametrize("args", [["--bogus"], ["--grace", "-1"], ["--grace", "soon"],
                                  ["--max-children", "0"], ["--log-level", "loud"],
                                  ["extra-argument"]])
def test_bad_options_exit_2_with_usage(args: list[str]) -> None:
    result = subprocess.run([*AGENT_ARGV, *args], capture_output=True, timeout=30,
                            check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.decode().startswith("usage: mproxy-agent")
    assert result.stdout == b""


def test_help() -> None:
    result = subprocess.run([*AGENT_ARGV, "--help"], capture_output=True, timeout=30,
                            check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 0
    for option in ("--version", "--log-level", "--grace", "--max-children"):
        assert option in result.stdout.decode()


async def test_python_m_agent_speaks_the_protocol() -> None:
    async with spawned() as agent_process:
        raw = agent_process.raw
        hello = raw.hello
        assert hello is not None
        assert (hello.impl, hello.impl_version) == ("mproxy-agent", agent.__version__)
        child = await raw.run(["echo", "hello"])
        assert child.output(1) == b"hello\n"
        raw.send(Shutdown())
        await raw.wait(lambda: raw.goodbye, 10, "goodbye")
        with trio.fail_after(10):
            assert await agent_process.process.wait() == 0


def test_frames_from_a_regular_file(tmp_path: Path) -> None:
    # Frames replayed from a file: regular files cannot be polled, so the agent reads them
    # without waiting for readiness, answers, and takes their end for the controller's.
    ctrl = Connection(Role.CONTROLLER)
    session = tmp_path / "session"
    session.write_bytes(ctrl.initiate() + encode(Ping(n=7)) + encode(Ping(n=8)))
    with session.open("rb") as stdin:
        result = subprocess.run(AGENT_ARGV, stdin=stdin, capture_output=True, timeout=30,
                                check=False)
    assert result.returncode == 0, result.stderr
    decoder = FrameDecoder(DEFAULT_MAX_FRAME)
    decoder.feed(result.stdout)
    frames = list(iter(decoder.next_frame, None))
    assert isinstance(frames[0], Hello)
    assert frames[1:] == [Pong(n=7), Pong(n=8)]


async def test_console_script_is_installed() -> None:
    script = shutil.which("mproxy-agent", path=os.path.dirname(sys.executable))
    assert script is not None
    result = await trio.run_process([script, "--version"], capture_stdout=True)
    assert result.stdout.decode().strip() == f"mproxy-agent {agent.__version__}"


async def test_log_level_selects_the_log_frames_sent() -> None:
    async with spawned("--log-level", "debug") as debug:
        await debug.raw.run(["true"])
        await debug.raw.wait(lambda: any(log.msg == "started" for log in debug.raw.logs),
                             10, "a debug log frame")
        assert all(isinstance(log, Log) and log.level == "debug" for log in debug.raw.logs
                   if log.msg == "started")
    async with spawned("--log-level", "warning", stderr=subprocess.DEVNULL) as quiet:
        await quiet.raw.run(["true"])
        quiet.raw.send(Shutdown())
        await quiet.raw.wait(lambda: quiet.raw.goodbye, 10, "goodbye")
        assert quiet.raw.logs == []
        assert isinstance(quiet.raw.frames[-1], Goodbye)


async def test_max_children() -> None:
    async with spawned("--max-children", "2") as agent_process:
        raw = agent_process.raw
        first = raw.exec(["cat"])
        second = raw.exec(["cat"])
        await raw.started(first)
        await raw.started(second)
        third = raw.exec(["cat"])
        error = await raw.error(third, "too-many-children")
        assert (error.id, error.ref) == (third.id, "exec")
        assert (await raw.exited(third)).code == 126
        assert third.started is None
        raw.close(third.id)
        await raw.closed(third)
        # An exited child still counts until it is closed.
        raw.eof(first.id)
        await raw.finished(first)
        fourth = raw.exec(["true"])
        await raw.error(fourth, "too-many-children")
        raw.close(fourth.id)
        await raw.closed(fourth)
        # Room again as soon as the controller closes a child: a close and an exec read
        # together find room, though the closed child is torn down only afterwards.
        fifth = raw.exec(["echo", "room"], before=[Close(first.id)])
        raw.eof(fifth.id)
        await raw.finished(fifth)
        assert fifth.output(1) == b"room\n" and not fifth.errors
        await raw.closed(first)
        await raw.echo(second, b"the second is fine\n")


# ---------------------------------------------------------------------------- process setup

async def test_inherited_fds_are_made_close_on_exec(tmp_path: Path) -> None:
    extra = os.open(tmp_path / "inherited", os.O_CREAT | os.O_RDWR)
    high = 57
    os.dup2(extra, high, inheritable=True)
    try:
        async with spawned(pass_fds=[high]) as agent_process:
            # The agent still has it (it does not close what it was given)...
            flags = int(Path(f"/proc/{agent_process.pid}/fdinfo/{high}").read_text()
                        .split("flags:")[1].split()[0], 8)
            assert flags & _O_CLOEXEC
            # ...and nothing the agent starts sees it.
            child = await agent_process.raw.run(["sh", "-c", "ls /proc/$$/fd"])
            assert sorted(int(fd) for fd in child.output(1).split()) == [0, 1, 2]
            plain = await agent_process.raw.run(
                ["python3", "-c", f"import os; os.fstat({high})"])
            assert plain.exit is not None and plain.exit.code == 1
            assert b"Bad file descriptor" in plain.output(2)
    finally:
        os.close(high)
        os.close(extra)


async def test_fd_limit_raised_for_the_agent_not_for_children() -> None:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is not installed")
    async with spawned(prefix=[prlimit, "--nofile=512:4096", "--"]) as agent_process:
        limits = Path(f"/proc/{agent_process.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"]
        raw = agent_process.raw
        # The child reads a line first: the limit is restored right after the spawn.
        child = raw.exec(["sh", "-c", "read x; ulimit -n; ulimit -Hn"])
        await raw.started(child)
        await raw.write(child.id, 0, b"go\n")
        raw.eof(child.id)
        await raw.finished(child)
        assert child.output(1) == b"512\n4096\n"
