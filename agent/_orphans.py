"""Descendants that left their process group and were re-parented to the agent.

On Linux the agent is a child subreaper (PR_SET_CHILD_SUBREAPER), so a descendant whose
parent dies is re-parented to the agent rather than to init, even if it called setsid().
The agent must reap those (or they linger as zombies) and kill them at shutdown. It never
reaps a pid it tracks as a child: those are reaped only when released (see _process).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

__all__ = [
    "adopted",
    "become_subreaper",
    "groups_alive",
    "living_adopted",
    "reap_adopted_zombies",
]

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process a child subreaper; False where the OS has no such thing."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def adopted(known: set[int]) -> dict[int, str]:
    """Children of this process that it did not start itself: pid → state letter."""
    me = os.getpid()
    return {pid: state for pid, state, ppid, _ in _proc_stats() if ppid == me and pid not in known}


def living_adopted(known: set[int]) -> bool:
    """Whether an adopted child is still running (not yet a zombie)."""
    return any(state != "Z" for state in adopted(known).values())


def reap_adopted_zombies(known: set[int]) -> int:
    """Reap adopted children that have ended; returns how many. Costs O(children of
    this process) where the kernel lists them, not O(processes on the host): it runs
    after every burst of SIGCHLD. It may miss a child that comes or goes meanwhile; the
    next burst, or the teardown, reaps that one."""
    children = _children()
    if children is None:
        found = adopted(known)
    else:
        found = {pid: state for pid in children - known if (state := _state(pid))}
    count = 0
    for pid, state in found.items():
        if state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
                count += 1
    return count


def _children() -> set[int] | None:
    """This process's children, from /proc/self/task/*/children; None where the kernel
    has no such file (built without CONFIG_PROC_CHILDREN) or there is no /proc."""
    children: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children", "rb") as f:
                children.update(map(int, f.read().split()))
        except FileNotFoundError:
            if not os.path.exists(f"/proc/self/task/{task}"):
                continue  # the thread ended meanwhile
            return None
    return children


def _state(pid: int) -> str:
    """The state letter of process ``pid``; "" when it is gone."""
    fields = _stat_fields(pid)
    return fields[0].decode() if fields else ""


def _proc_stats() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgrp) of every process, from /proc; empty where there is none."""
    rows: list[tuple[int, str, int, int]] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return rows
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields is not None and len(fields) >= 3:  # None: gone meanwhile
            rows.append((int(entry), fields[0].decode(), int(fields[1]), int(fields[2])))
    return rows


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...);
    None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
    return stat[stat.rfind(b")") + 2 :].split()


def groups_alive(pgids: set[int]) -> set[int]:
    """Which of these process groups still have a live (non-zombie) member."""
    if not pgids:
        return set()
    return {pgrp for _, state, _, pgrp in _proc_stats() if pgrp in pgids and state != "Z"}
