"""Load through the controller library against a real local agent: a thousand children
at once, ten thousand execs in a row without leaks, running out of file descriptors, and
one child flooding while others keep their turn.

(The agent-level counterparts: tests/test_agent_streams.py has a thousand children over
the raw protocol and the 1 GiB unread-output memory bound.)
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from conftest import agent_children, fd_count, read_all, rss_bytes, wait_until

import controller

GRACE_ARGS = ["--grace", "2"]


async def agent_pid_of(agent: controller.Agent) -> int:
    """The agent's pid, as its children see it."""
    done = await agent.run_process(["sh", "-c", "echo $PPID"], capture_stdout=True)
    assert done.stdout is not None
    return int(done.stdout)


def zombies_of(pid: int) -> list[int]:
    return [p for p, state in agent_children(pid).items() if state == "Z"]


@asynccontextmanager
async def agent_with_stderr(tmp_path: Path, command: list[str] | None = None
                            ) -> AsyncIterator[tuple[controller.Agent, Path]]:
    """A local agent whose stderr goes to a file (to check it printed no traceback)."""
    path = tmp_path / "agent-stderr.txt"
    with path.open("wb") as stderr:
        async with controller.open_agent(command, agent_args=GRACE_ARGS,
                                         stderr=stderr.fileno()) as agent:
            yield agent, path


# ---------------------------------------------------------------------------- scale


@pytest.mark.slow
async def test_a_thousand_children_at_once_through_the_library(tmp_path: Path) -> None:
    count = 1000
    with trio.fail_after(100):
        async with agent_with_stderr(tmp_path) as (agent, stderr):
            procs: dict[int, controller.RemoteProcess] = {}

            async def start(i: int) -> None:
                procs[i] = await agent.open_process(["cat"])

            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(start, i)
            # Every cat is alive at once, blocked on its stdin.
            assert len({p.pid for p in procs.values()}) == count
            assert all(p.returncode is None for p in procs.values())

            payloads = {i: f"child {i} ".encode() * (i % 50 + 1) + os.urandom(64)
                        for i in range(count)}
            echoed: dict[int, bytes] = {}

            async def echo(i: int) -> None:
                proc = procs[i]
                async with proc, trio.open_nursery() as nursery:
                    async def feed() -> None:
                        await proc.stdin.send_all(payloads[i])
                        await proc.stdin.aclose()

                    nursery.start_soon(feed)
                    echoed[i] = await read_all(proc.stdout)
                    assert await read_all(proc.stderr) == b""
                    assert await proc.wait() == 0

            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(echo, i)
            assert echoed == payloads
    assert "Traceback" not in stderr.read_text()


@pytest.mark.slow
async def test_ten_thousand_execs_in_a_row_leak_nothing() -> None:
    """No growth of the agent's fds or RSS, and no zombie left, between a warm-up of 500
    execs and the 10,000th."""
    warmup, total = 500, 10_000
    with trio.fail_after(300):
        async with controller.open_agent(agent_args=GRACE_ARGS) as agent:
            pid = await agent_pid_of(agent)
            for _ in range(warmup):
                await agent.run_process(["/bin/true"])
            await wait_until(lambda: not zombies_of(pid), 10, "no zombie after the warm-up")
            fds, rss = fd_count(pid), rss_bytes(pid)
            for _ in range(total - warmup):
                await agent.run_process(["/bin/true"])
            # A released child's last fd closes and its zombie is reaped as its close frame
            # is handled: allow for the last one to be in flight.
            await wait_until(lambda: not zombies_of(pid), 10, "no zombie after 10,000 execs")
            await wait_until(lambda: fd_count(pid) <= fds + 5, 10,
                             f"the agent's fd count to return near {fds}")
            assert rss_bytes(pid) <= rss + (20 << 20), (rss, rss_bytes(pid))
            assert agent_children(pid) == {}


async def test_running_out_of_fds_is_an_error_and_the_agent_recovers(tmp_path: Path) -> None:
    """With RLIMIT_NOFILE capped at 64 (hard, so the agent cannot raise it), execs fail
    with EMFILE once the fds are used up; the agent stays up, the running children are
    unaffected, and execs work again once some children are released."""
    prlimit = shutil.which("prlimit")
    assert prlimit is not None, "prlimit (util-linux) is needed"
    command = [prlimit, "--nofile=64:64", "--", sys.executable, "-m", "agent"]
    with trio.fail_after(60):
        async with agent_with_stderr(tmp_path, command) as (agent, stderr):
            procs: list[controller.RemoteProcess] = []
            with pytest.raises(OSError) as info:
                for _ in range(64):  # each child costs the agent at least one fd
                    procs.append(await agent.open_process(["cat"]))
            assert info.value.errno == errno.EMFILE
            assert len(procs) >= 5
            await agent.ping()
            # The children that did start are intact.
            await check_echo(procs[0], b"still here\n")
            for proc in procs[-3:]:
                await proc.aclose()
            del procs[-3:]
            async with await agent.open_process(["cat"]) as fresh:
                await check_echo(fresh, b"room again\n")
            await check_echo(procs[-1], b"and the last one\n")
            for proc in procs:
                await proc.aclose()
    assert "Traceback" not in stderr.read_text()


async def check_echo(cat: controller.RemoteProcess, line: bytes) -> None:
    await cat.stdin.send_all(line)
    got = b""
    while len(got) < len(line):
        chunk = await cat.stdout.receive_some()
        assert chunk, "EOF"
        got += chunk
    assert got == line


# ---------------------------------------------------------------------------- fairness


async def test_a_flooding_child_does_not_starve_the_others(local_agent: controller.Agent
                                                           ) -> None:
    """While one child writes as fast as it can (and we read it all), another child's
    small round trips complete and a signal to the flooder takes effect."""
    agent = local_agent
    flooded = 0
    with trio.fail_after(60):
        async with (
            await agent.open_process(["cat", "/dev/zero"]) as flood,
            await agent.open_process(["cat"]) as echo,
            trio.open_nursery() as nursery,
        ):
            async def drain() -> None:
                nonlocal flooded
                while chunk := await flood.stdout.receive_some():
                    flooded += len(chunk)

            nursery.start_soon(drain)
            await wait_until(lambda: flooded > 8 << 20, 20, "the flood to be under way")
            for i in range(100):
                await check_echo(echo, i.to_bytes(2, "big") * 32)  # 64 bytes
            assert flood.returncode is None  # still flooding all along
            await flood.send_signal(signal.SIGTERM)
            assert await flood.wait() == -signal.SIGTERM
            assert flood.exit_code == 143
            await echo.stdin.aclose()
            assert await echo.wait() == 0
