"""The guardian: ends the agent's children when the agent itself is killed outright.

The agent ends every child's process group itself whenever it stops in a way it can see
(EOF, EPIPE, a signal it can catch, an error). It cannot when it is SIGKILLed or taken by
the OOM killer, and PR_SET_PDEATHSIG is no help: it is per child, tied to the thread
that forked, and posix_spawn cannot set it. So the agent forks a guardian at start-up,
before any thread exists. The guardian keeps only the read end of a pipe (and stderr),
sits in a session of its own (a signal to the agent's process group does not reach it)
and ignores SIGHUP, SIGINT, SIGTERM and SIGQUIT. The agent writes ``+PGID`` when a child
starts (each child leads its own group) and ``-PGID`` just before it reaps one, and
``cHEX`` with the path of its own cgroup when it has one (see :mod:`._cgroup`; the
guardian stays outside it). When the pipe reaches EOF (the agent is gone, however it
went) the guardian ends what is left as the agent would: SIGHUP, SIGTERM and SIGCONT to
the groups it still knows and to every process in the cgroup, SIGKILL after the grace
period; then it removes the cgroup and exits. After a normal teardown nothing is left
and it exits at once.

Limits without a cgroup: a child started in the instant before the agent is killed may
not have been announced yet, and descendants that left their group (setsid) are not
known to the guardian. A cgroup holds both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Final

from . import _cgroup
from ._orphans import groups_alive

__all__ = ["Guardian", "start_guardian"]

#: Announcements the agent keeps while the guardian does not read (a stopped guardian):
#: beyond this it gives up on the guardian rather than grow without bound.
_MAX_PENDING: Final = 1 << 20
_POLL: Final = 0.05  # how often the guardian looks whether the groups are gone
#: How long the guardian waits, at EOF, for the dying agent to leave its cgroup: a task
#: closes its files before it leaves its cgroup, in the same exit.
_AGENT_EXIT: Final = 1.0


class Guardian:
    """The agent's end of the guardian: announces groups, never blocks.

    If the guardian is gone (EPIPE) or stops reading, :attr:`failure` says why and
    further announcements are dropped; the agent goes on unguarded."""

    def __init__(self, pid: int, write_fd: int) -> None:
        self.pid = pid
        self._fd: int | None = write_fd
        self._pending = bytearray()
        self.failure: str | None = None

    def contain(self, cgroup: str) -> None:
        """The agent is about to create cgroup ``cgroup`` and move into it (before
        starting any child): the guardian ends what is in it and removes it, if it
        exists."""
        self._send(b"c%s\n" % os.fsencode(cgroup).hex().encode())

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
    agent_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # the guardian (tests check it from outside: it never returns)
        status = 1
        try:
            os.close(write_fd)
            _become_guardian(read_fd)
            _guard(read_fd, grace, agent_pid)
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


def _guard(read_fd: int, grace: float, agent_pid: int) -> None:
    groups: set[int] = set()
    cgroup: str | None = None
    rest = b""
    while data := os.read(read_fd, 65536):
        *lines, rest = (rest + data).split(b"\n")
        for line in lines:
            if line[:1] == b"+":
                groups.add(int(line[1:]))
            elif line[:1] == b"-":
                groups.discard(int(line[1:]))
            else:
                cgroup = os.fsdecode(bytes.fromhex(line[1:].decode()))
    if cgroup is not None:
        _wait_left(cgroup, agent_pid, _AGENT_EXIT)
    left = _Leftovers(groups, cgroup, agent_pid)
    what = [f"{len(groups)} process group(s)"] if groups else []
    if left.in_cgroup():
        what.append(f"every process in {cgroup}")
    if what:
        sys.stderr.write(
            f"mproxy-agent[{os.getpid()}] WARNING the agent ended without ending its "
            f"children: ending {' and '.join(what)}\n"
        )
        left.end(grace)
    if cgroup is not None:
        _cgroup.remove(cgroup)


class _Leftovers:
    """What the agent left running: the groups it announced, and the processes in its
    cgroup but the agent itself (on its way out, or moved out at a normal end)."""

    def __init__(self, groups: set[int], cgroup: str | None, agent_pid: int) -> None:
        self.groups = groups
        self.cgroup = cgroup
        self.agent_pid = agent_pid

    def in_cgroup(self) -> set[int]:
        if self.cgroup is None:
            return set()
        return _cgroup.members(self.cgroup) - {self.agent_pid}

    def alive(self) -> bool:
        return bool(self.in_cgroup()) or _any_alive(self.groups)

    def end(self, grace: float) -> None:
        """The agent's own policy: HUP, TERM and CONT, KILL after ``grace``."""
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGCONT):
            self._signal(signum)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.alive():
            time.sleep(_POLL)
        if self.cgroup is not None and self.agent_pid not in _cgroup.members(self.cgroup):
            _cgroup.kill(self.cgroup)  # at once: nothing can fork its way out
        self._signal(signal.SIGKILL)
        if self.cgroup is not None:  # SIGKILLed processes leave the cgroup as they exit
            _wait_left(self.cgroup, self.agent_pid, _AGENT_EXIT, everyone=True)

    def _signal(self, signum: int) -> None:
        for pgid in self.groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signum)
        for pid in self.in_cgroup():
            with contextlib.suppress(OSError):
                if os.getpgid(pid) not in self.groups:  # each process gets it once
                    os.kill(pid, signum)


def _wait_left(cgroup: str, agent_pid: int, timeout: float, *, everyone: bool = False) -> None:
    """Wait at most ``timeout`` seconds until the agent (or, with ``everyone``, every
    process but the agent) has left ``cgroup``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inside = _cgroup.members(cgroup)
        if not (inside - {agent_pid} if everyone else agent_pid in inside):
            return
        time.sleep(0.001)


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
