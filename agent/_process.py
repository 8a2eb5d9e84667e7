"""Waiting for, signalling and reaping children by pid, without stealing statuses.

A child's exit status is *peeked* (``waitid(WNOWAIT)``) when it ends and the child is
reaped only when the agent releases it. Until then the zombie keeps its pid, and so its
process group id, from being reused: signalling ``-pgid`` can never hit a stranger.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import NamedTuple

import trio

__all__ = [
    "ExitStatus",
    "exit_signal_name",
    "kill_group",
    "open_pidfd",
    "peek_exit",
    "reap",
    "signal_number",
    "wait_for_exit",
]


class ExitStatus(NamedTuple):
    code: int  # exit status, or 128+N for signal N (the seed's ExitCode)
    sig: str | None  # signal name without SIG when killed by a signal
    core: bool
    returncode: int  # subprocess convention: -N for signal N


def signal_number(name: str) -> int | None:
    """This system's number for a signal name like "TERM", or None if it has none."""
    value = getattr(signal, "SIG" + name, None)
    return int(value) if isinstance(value, signal.Signals) else None


def exit_signal_name(number: int) -> str:
    """The name an exit frame gives this system's signal ``number``: without SIG ("TERM";
    "RTMIN" for Linux's 34, outside the protocol's list of signals it may send), or the
    number as text when the system has no name for it. Never fails."""
    try:
        return signal.Signals(number).name.removeprefix("SIG")
    except ValueError:
        return str(number)


def peek_exit(pid: int) -> ExitStatus | None:
    """The status of child ``pid`` if it has ended, leaving it unreaped."""
    result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if result is None or result.si_pid == 0:
        return None
    if result.si_code == os.CLD_EXITED:
        return ExitStatus(result.si_status, None, False, result.si_status)
    sig = result.si_status
    return ExitStatus(128 + sig, exit_signal_name(sig), result.si_code == os.CLD_DUMPED, -sig)


async def wait_for_exit(pid: int, pidfd: int | None) -> ExitStatus:
    """Wait until child ``pid`` ends and return its status, leaving it unreaped.

    Uses the pidfd when there is one (Linux ≥ 5.3), else a worker thread. Cancellable.
    """
    while True:
        status = peek_exit(pid)
        if status is not None:
            return status
        if pidfd is not None:
            await trio.lowlevel.wait_readable(pidfd)
        else:
            await trio.to_thread.run_sync(
                os.waitid, os.P_PID, pid, os.WEXITED | os.WNOWAIT, abandon_on_cancel=True
            )


def open_pidfd(pid: int) -> int | None:
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def kill_group(pgid: int, signum: int) -> str | None:
    """Send ``signum`` to process group ``pgid``; the errno name on failure, else None."""
    try:
        os.killpg(pgid, signum)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return None


def reap(pid: int) -> bool:
    """Reap child ``pid`` if it has ended; True when it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid
