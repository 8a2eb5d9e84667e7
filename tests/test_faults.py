"""Misbehaving children and faults around them, through the controller library against a
real local agent.

Not repeated here (covered by tests/test_agent_lifecycle.py and test_agent_streams.py):
controller EOF, EPIPE, controller SIGKILLed and agent signalled (every child group gone,
no zombie); SIGKILL after the grace period for TERM-ignoring children; setsid'd orphans
adopted, reaped and killed; background holders of the pipes not delaying exit.
"""

from __future__ import annotations

import os

import pytest
import trio
from agent_harness import spawned
from conftest import all_procs, gone, group_members, proc_stat, read_all, wait_until

import controller

GRACE = 1.0
PYTHON3 = "/usr/bin/python3"


class Leave(Exception):
    """Raised to leave ``open_agent`` abnormally: the agent sees EOF and tears down."""


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while not out.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        assert chunk, f"EOF after {bytes(out)!r}"
        out += chunk
    return bytes(out)


# Forks a grandchild into a process group of its own, ignoring TERM and HUP, prints its
# pid and waits for it: the parent stays alive, in the child's group.
ESCAPE = """
import os, signal
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.execvp("sleep", ["sleep", "1000"])
try:
    os.setpgid(pid, pid)  # from both sides: done before we print, whoever runs first
except PermissionError:
    pass  # it ran execvp already, after its own setpgid
print(pid, flush=True)
os.wait()
"""


def pid_of(process: controller.RemoteProcess) -> int:
    assert process.pid is not None
    return process.pid


# ---------------------------------------------------------------------------- streams


async def test_child_that_closes_stdout_early_keeps_running(local_agent: controller.Agent
                                                            ) -> None:
    """Its stdout ends (EOF) while it runs; what it does afterwards still arrives and its
    exit status is exact."""
    script = 'echo early; exec >&-; read x; echo "late $x" >&2; exit 5'
    with trio.fail_after(20):
        async with await local_agent.open_process(["sh", "-c", script]) as proc:
            assert await read_all(proc.stdout) == b"early\n"
            assert proc.returncode is None  # blocked in read: EOF came before exit
            await proc.stdin.send_all(b"go\n")
            assert await read_all(proc.stderr) == b"late go\n"
            assert await proc.wait() == 5


async def test_child_exiting_while_we_write_its_stdin_breaks_only_that_stream(
    local_agent: controller.Agent,
) -> None:
    """head exits after 10 bytes while we keep writing: our send_all fails with
    BrokenResourceError (not AgentLost); a cat echoing concurrently loses nothing, and the
    agent carries on."""
    agent = local_agent
    payload = os.urandom(8 << 20)
    broken: list[BaseException] = []
    with trio.fail_after(60):
        async with (
            await agent.open_process(["head", "-c", "10"]) as head,
            await agent.open_process(["cat"]) as cat,
        ):
            async def flood_head() -> None:
                block = b"0123456789" * 100_000
                try:
                    for _ in range(64):  # 64 MB: far more than pipe and window hold
                        await head.stdin.send_all(block)
                except trio.BrokenResourceError as exc:
                    broken.append(exc)

            async def feed_cat() -> None:
                for start in range(0, len(payload), 100_000):
                    await cat.stdin.send_all(payload[start:start + 100_000])
                await cat.stdin.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood_head)
                nursery.start_soon(feed_cat)
                echoed = await read_all(cat.stdout)
            assert echoed == payload
            assert len(broken) == 1 and not isinstance(broken[0], controller.AgentLost)
            assert await read_all(head.stdout) == b"0123456789"
            assert await head.wait() == 0
            assert await cat.wait() == 0
        await agent.ping()
        done = await agent.run_process(["echo", "after"], capture_stdout=True)
        assert done.stdout == b"after\n"


async def test_output_we_stop_reading_never_blocks_the_child(local_agent: controller.Agent
                                                             ) -> None:
    """Closing a child's stdout stream on our side discards what follows (credit keeps
    flowing): a child writing 64 MiB runs to completion unread."""
    with trio.fail_after(60):
        async with await local_agent.open_process(
            ["sh", "-c", "head -c 67108864 /dev/zero; echo done >&2"]
        ) as proc:
            await proc.stdout.aclose()
            assert await read_all(proc.stderr) == b"done\n"
            assert await proc.wait() == 0


# ---------------------------------------------------------------------------- teardown


async def test_stopped_children_are_continued_so_they_handle_term() -> None:
    """A stopped child that handles SIGTERM cannot run its handler until continued
    (only default-action signals kill a stopped process outright): teardown sends SIGCONT
    after SIGTERM, so with a 60 s grace period the agent still ends at once.

    Driven over the raw protocol: open_agent's own wait for the agent is shielded, and
    the agent's end must be awaited under a deadline here."""
    handlers = [
        ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"],
        [PYTHON3, "-c", "import signal, sys\n"
         "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\nsignal.pause()"],
    ]
    async with spawned("--grace", "60") as agent_process:
        raw = agent_process.raw
        children = [raw.exec(argv) for argv in handlers]
        leaders = [await raw.started(child) for child in children]  # in the order of handlers
        await wait_until(lambda: len(group_members(leaders[0])) == 2, 10, "the grandchild")
        pids = [p for leader in leaders for p in group_members(leader)]
        for child in children:
            raw.signal(child.id, "STOP")
        await wait_until(lambda: all(_state(p) == "T" for p in pids), 10,
                         "every process to be stopped")
        await raw.aclose_write()
        with trio.fail_after(15):
            assert await agent_process.process.wait() == 0
    await wait_until(lambda: all(gone(p) for p in pids), 5, "the stopped processes to go")


async def test_descendants_in_groups_of_their_own_are_killed_at_teardown() -> None:
    """A grandchild that moved to a process group of its own (job control) while its
    parent is alive is outside every group the agent signals; it is killed anyway once
    its parent is gone and it is re-parented to the agent (a subreaper) — also when it
    ignores SIGTERM."""
    with trio.fail_after(30), pytest.raises(Leave):
        async with controller.open_agent(agent_args=["--grace", str(GRACE)]) as agent:
            proc = await agent.open_process(["python3", "-c", ESCAPE])
            escapee = int(await read_line(proc.stdout))
            await wait_until(lambda: _argv0(escapee) == b"sleep", 10, "the exec")
            # Its parent is the child, but its group is its own.
            stat = proc_stat(escapee)
            assert stat is not None and stat[1:] == (proc.pid, escapee)
            pids = [pid_of(proc), escapee]
            raise Leave
    await wait_until(lambda: all(gone(p) for p in pids), 5,
                     "the child and its escaped grandchild to be gone")


def _argv0(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0]
    except OSError:
        return None


def _state(pid: int) -> str | None:
    stat = proc_stat(pid)
    return None if stat is None else stat[0]


async def test_teardown_of_many_misbehaving_children_at_once() -> None:
    """Stopped, TERM-ignoring, pipe-holding, escaped and flooding children together: the
    agent exits and leaves no process behind."""
    scripts = [
        "trap '' TERM HUP INT; sleep 1000 & sleep 1000 & echo ready; wait",
        "sleep 1000 & echo ready",  # exits at once, its grandchild holds the pipes
        # "ready" once the escaped grandchild exists: its parent prints its pid first.
        f"python3 -c '{ESCAPE}' | (read pid; echo ready; cat >/dev/null)",
        "echo ready; exec cat /dev/zero",
        "echo ready; exec sleep 1000",
    ]
    with trio.fail_after(30), pytest.raises(Leave):
        async with controller.open_agent(agent_args=["--grace", str(GRACE)]) as agent:
            procs = [await agent.open_process(["sh", "-c", s]) for s in scripts]
            for proc in procs:
                assert (await proc.stdout.receive_some(6)) == b"ready\n"
            await procs[4].send_signal("STOP")
            leaders = [pid_of(p) for p in procs]
            pids = set(_descendants(leaders))
            assert len(pids) >= 11
            raise Leave
    await wait_until(lambda: all(gone(p) for p in pids), 5, "every process to be gone")


def _descendants(roots: list[int]) -> dict[int, tuple[str, int, int]]:
    """Every process whose group or ancestry leads to one of ``roots``."""
    procs = all_procs()
    found = {p: procs[p] for p in roots if p in procs}
    changed = True
    while changed:
        changed = False
        for pid, stat in procs.items():
            if pid not in found and (stat[1] in found or stat[2] in roots):
                found[pid] = stat
                changed = True
    return found

