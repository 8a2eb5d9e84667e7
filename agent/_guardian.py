"""The guardian: ends the agent's children when the agent itself is killed outright.

The agent ends every child's process group itself whenever it stops in a way it can see
(EOF, EPIPE, a signal it can catch, an error). It cannot when it is SIGKILLed or taken by
the OOM killer, and PR_SET_PDEATHSIG is no help: it is per child, tied to the thread
that forked, and posix_spawn cannot set it. So the agent forks a guardian at start-up,
before any thread exists. The guardian keeps only the read end of a pipe (and stderr),
sits in a session of its own (a signal to the agent's process group does not reach it)
and ignores SIGHUP, SIGINT, SIGTERM and SIGQUIT. The agent writes ``+PGID`` when a child
starts (each child leads its own group) and ``-PGID`` just before it reaps one. When the
pipe reaches EOF (the agent is gone, however it went) the guardian ends the groups it
still knows as the agent would: SIGHUP, SIGTERM and SIGCONT, SIGKILL after the grace
period; then it exits. After a normal teardown it knows none and exits at once.

Limits: a child started in the instant before the agent is killed may not have been
announced yet; descendants that left their group (setsid) are not known to the guardian.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Final

from ._orphans import groups_alive

__all__ = ["Guardian", "start_guardian"]

#: Announcements the agent keeps while the guardian does not read (a stopped guardian):
#: beyond this it gives up on the guardian rather than grow without bound.
_MAX_PENDING: Final = 1 << 20
_POLL: Final = 0.05  # how often the guardian looks whether the groups are gone


class Guardian:
    """The agent's end of the guardian: announces groups, never blocks.

    If the guardian is gone (EPIPE) or stops reading, :attr:`failure` says why and
    further announcements are dropped; the agent goes on unguarded."""

    def __init__(self, pid: int, write_fd: int) -> None:
        self.pid = pid
        self._fd: int | None = write_fd
        self._pending = bytearray()
        self.failure: str | None = None

    def watch(self, pgid: int) -> None:
        """A child leading process group ``pgid`` has started."""
        self._send(b"+%d\n" % pgid)

    def forget(self, pgid: int) -> None:
        """Group ``pgid`` is about to be reaped: its id may be reused from then on."""
        self._send(b"-%d\n" % pgid)

    def _send(self, line: bytes) -> None:
        if self._fd is None:
            return
        self._pending += line
        try:
            written = os.write(self._fd, self._pending)
        except BlockingIOError:
            if len(self._pending) > _MAX_PENDING:
                self._give_up("it stopped reading")
            return
        except OSError as exc:
            self._give_up(f"writing to it failed: {os.strerror(exc.errno or 0)}")
            return
        del self._pending[:written]

    def _give_up(self, why: str) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        self.failure = f"the guardian (pid {self.pid}) is lost, {why}"
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)  # reap it if it has died

    def close(self, timeout: float = 5.0) -> None:
        """End the guardian (it ends the groups still announced, normally none) and reap
        it, waiting at most ``timeout`` seconds: a stopped guardian is left behind."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        deadline = time.monotonic() + timeout
        while True:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done or time.monotonic() > deadline:
                return
            time.sleep(0.005)  # it exits as soon as it reads EOF: a few ms at most


def start_guardian(grace: float) -> Guardian | None:
    """Fork the guardian; None where the OS cannot fork. Call before any thread starts
    (a fork copies only the calling thread). The caller must :meth:`Guardian.close` it
    when it exits normally."""
    if not hasattr(os, "fork"):
        return None
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the guardian (tests check it from outside: it never returns)
        status = 1
        try:
            os.close(write_fd)
            _become_guardian(read_fd)
            _guard(read_fd, grace)
            status = 0
        finally:
            os._exit(status)  # never return into the agent's code, nor run its atexit
    os.close(read_fd)
    os.set_blocking(write_fd, False)
    return Guardian(pid, write_fd)


def _become_guardian(read_fd: int) -> None:
    """Hold nothing of the agent's but stderr: the controller must see EOF on the
    agent's stdout the moment the agent is gone."""
    os.setsid()
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDWR)  # >= 3: the agent filled fds 0-2 first
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    os.closerange(3, read_fd)
    os.closerange(read_fd + 1, os.sysconf("SC_OPEN_MAX"))


def _guard(read_fd: int, grace: float) -> None:
    groups: set[int] = set()
    rest = b""
    while data := os.read(read_fd, 65536):
        *lines, rest = (rest + data).split(b"\n")
        for line in lines:
            if line[:1] == b"+":
                groups.add(int(line[1:]))
            else:
                groups.discard(int(line[1:]))
    if groups:
        sys.stderr.write(
            f"mproxy-agent[{os.getpid()}] WARNING the agent ended without ending its "
            f"children: ending {len(groups)} process group(s)\n"
        )
        _end_groups(groups, grace)


def _end_groups(groups: set[int], grace: float) -> None:
    """The agent's own policy: HUP, TERM and CONT to every group, KILL after ``grace``."""
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGCONT):
        for pgid in groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signum)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _any_alive(groups):
        time.sleep(_POLL)
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)


def _any_alive(groups: set[int]) -> bool:
    """Whether any group has a live member. With /proc (one scan for all), zombies do not
    count: the agent's unreaped children went to init, which may take a moment to reap
    them."""
    if os.path.isdir("/proc/self"):
        return bool(groups_alive(groups))
    return any(map(_group_exists, groups))


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists
    return True
