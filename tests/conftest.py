"""Shared fixtures and helpers. Tests use real processes, pipes and signals; none sleeps
to synchronise: they wait for a condition with a deadline."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

import agent
import controller
from agent import _cgroup

ROOT = Path(__file__).resolve().parent.parent
AGENT_ARGV = [sys.executable, "-m", "agent"]
#: A short grace for the agents of the tests: a test's leftovers do not keep it long.
GRACE_ARGS = ["--grace", "2"]


@functools.cache
def cgroups_usable() -> bool:
    """Whether this machine lets the agent make a cgroup of its own (cgroup v2, write
    access, cgroup.kill), found out by making one. Where it cannot, the agent falls back
    to guarding process groups, and the tests of the cgroup are skipped."""
    try:
        probe = _cgroup.own_cgroup().path
        os.mkdir(probe)
    except (_cgroup.NoCgroup, OSError):
        return False
    try:
        return os.path.exists(os.path.join(probe, "cgroup.kill"))
    finally:
        os.rmdir(probe)


@contextlib.asynccontextmanager
async def _inproc_agent() -> AsyncIterator[controller.Agent]:
    agent_side, controller_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.serve, agent.StreamTransport(agent_side, agent_side))
        async with controller.connect(controller_side) as connected:
            yield connected


@pytest.fixture
async def inproc_agent() -> AsyncIterator[controller.Agent]:
    """A controller connected over in-memory streams to an agent served in this process."""
    async with _inproc_agent() as connected:
        yield connected


@pytest.fixture
async def local_agent() -> AsyncIterator[controller.Agent]:
    """A controller connected to a real `python -m agent` subprocess over pipes."""
    async with controller.open_agent(agent_args=GRACE_ARGS) as connected:
        yield connected


@pytest.fixture(params=["local", "inproc"])
async def any_agent(request: pytest.FixtureRequest) -> AsyncIterator[controller.Agent]:
    """Each of the two agents above, one per run of the test."""
    if request.param == "local":
        async with controller.open_agent(agent_args=GRACE_ARGS) as connected:
            yield connected
    else:
        async with _inproc_agent() as connected:
            yield connected


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0,
                     what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything up to EOF."""
    out = bytearray()
    while chunk := await stream.receive_some():
        out += chunk
    return bytes(out)


# ---------------------------------------------------------------------------- /proc


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state is [0]), or None
    when there is no such process (not even a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2 :].decode().split()


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process, or None if it is gone."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    return fields[0], int(fields[1]), int(fields[2])


def gone(pid: int) -> bool:
    """No such process, not even a zombie: it was reaped."""
    return stat_fields(pid) is None


def dead(pid: int) -> bool:
    """Reaped, or a zombie (that nobody we control may reap: a re-parented orphan)."""
    stat = proc_stat(pid)
    return stat is None or stat[0] == "Z"


def all_procs() -> dict[int, tuple[str, int, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st is not None:
                out[int(entry)] = st
    return out


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes (not zombies) in process group ``pgid``."""
    return [pid for pid, (state, _, pgrp) in all_procs().items()
            if pgrp == pgid and state != "Z"]


def group_all(pgid: int) -> list[int]:
    """Pids of every process in process group ``pgid``, zombies included."""
    return [pid for pid, (_, _, pgrp) in all_procs().items() if pgrp == pgid]


def session_members(sid: int) -> list[int]:
    """Pids (zombies included) of every process in session ``sid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None and int(fields[3]) == sid:
                found.append(int(entry))
    return found


async def wait_all_gone(pids: Sequence[int], pgids: Sequence[int], timeout: float,
                        what: str) -> None:
    """Wait until none of ``pids`` exists (not even as a zombie) and no process (zombie or
    not) is left in any of ``pgids``."""
    def done() -> bool:
        return all(gone(p) for p in pids) and not any(group_all(g) for g in pgids)

    with trio.move_on_after(timeout):
        while not done():
            await trio.sleep(0.02)
        return
    left = {p: stat_fields(p) for p in pids if not gone(p)}
    groups = {g: group_all(g) for g in pgids if group_all(g)}
    raise AssertionError(f"{what}: still there after {timeout}s: pids {left}, groups {groups}")


_PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Make this (test) process a child subreaper for the duration: orphans of processes
    we started come to us (to be reaped with os.waitpid) instead of to pid 1."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def children_of(pid: int) -> dict[int, str]:
    return {p: state for p, (state, ppid, _) in all_procs().items() if ppid == pid}


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def guardian_of(agent_pid: int) -> int | None:
    """The agent's guardian: its fork (the same command line), leading a group (its own
    session) of its own."""
    command = _cmdline(agent_pid)
    found = [p for p, (_, ppid, pgrp) in all_procs().items()
             if ppid == agent_pid and pgrp == p and _cmdline(p) == command]
    return found[0] if found else None


def agent_children(agent_pid: int) -> dict[int, str]:
    """The agent's children but its guardian: those it started and those it adopted."""
    guardian = guardian_of(agent_pid)
    return {p: state for p, state in children_of(agent_pid).items() if p != guardian}


def fd_count(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or 'self'}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
