"""The agent's own cgroup (Linux, cgroup v2): a place no descendant can leave.

A process group is left with setsid() or setpgid(), and a descendant is re-parented to
the agent (the subreaper) only once its own parent is gone. A cgroup is inherited by
every fork and left only by a write to ``cgroup.procs``, which needs write access to the
hierarchy. So at start-up the agent makes a cgroup of its own under the one it runs in
and moves itself there: every child, and all of theirs, is born in it. When the agent is
killed outright, its guardian (which stays outside) ends what is in it, forks in flight
included (``cgroup.kill``), and removes it. At a normal end the agent moves itself back
out and removes it; anything left inside (normally nothing) is the guardian's to end.

Needs cgroup v2 mounted, write access to the agent's cgroup (root, or a delegated
subtree: systemd's ``Delegate=``, a container's own cgroup namespace) and Linux ≥ 5.14
(``cgroup.kill``). Elsewhere :func:`own_cgroup` or :meth:`Cgroup.enter` raises
:class:`NoCgroup` and the agent goes on guarding process groups only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from dataclasses import dataclass

__all__ = ["Cgroup", "NoCgroup", "cgroup_dir", "kill", "members", "own_cgroup", "remove"]


class NoCgroup(Exception):
    """This process cannot have a cgroup of its own; the message says why."""


@dataclass(frozen=True)
class Cgroup:
    """A cgroup of this process's own (``path``), and the one it came from."""

    path: str
    origin: str

    def enter(self) -> None:
        """Create the cgroup and move this process (all its threads) into it. Call it
        before starting children: only later ones are born in it. The caller must
        :meth:`leave` it before exiting normally; if it dies instead, someone outside it
        (the guardian) must :func:`kill` and :func:`remove` it.

        Raises :class:`NoCgroup` with the reason (no write access, an old kernel),
        having changed nothing."""
        try:
            os.mkdir(self.path)
        except OSError as exc:
            raise NoCgroup(f"cannot create {self.path}: {_describe(exc)}") from None
        if not os.path.exists(os.path.join(self.path, "cgroup.kill")):
            _rmdir_quietly(self.path)
            raise NoCgroup("the kernel has no cgroup.kill (Linux < 5.14)")
        try:
            _write(self.path, "cgroup.procs", str(os.getpid()))
        except OSError as exc:
            _rmdir_quietly(self.path)
            raise NoCgroup(f"cannot move into {self.path}: {_describe(exc)}") from None

    def leave(self) -> None:
        """Move this process back to its original cgroup, and remove this one if nothing
        is left in it (what is left is the guardian's to end, and then remove). Errors
        are ignored: at worst an empty cgroup stays behind."""
        with contextlib.suppress(OSError):
            _write(self.origin, "cgroup.procs", str(os.getpid()))
        remove(self.path)


def own_cgroup() -> Cgroup:
    """Name a new cgroup under this process's current one (cgroup v2), not yet created:
    tell whoever must clean up after us its path, then :meth:`Cgroup.enter` it.
    Raises :class:`NoCgroup` where there is no cgroup v2."""
    origin = cgroup_dir()
    return Cgroup(os.path.join(origin, f"mproxy-agent.{os.getpid()}.{secrets.token_hex(4)}"),
                  origin)


def members(path: str) -> set[int]:
    """The live processes in cgroup ``path`` and in its descendant cgroups (those of
    nested agents); zombies are not members. Empty once it is gone."""
    found: set[int] = set()
    for cgroup, _, _ in os.walk(path):
        try:
            with open(os.path.join(cgroup, "cgroup.procs"), "rb") as f:
                found.update(map(int, f.read().split()))
        except OSError:
            continue  # removed meanwhile
    return found


def kill(path: str) -> None:
    """SIGKILL every process in cgroup ``path`` and its descendant cgroups at once,
    including processes they are forking meanwhile."""
    with contextlib.suppress(OSError):
        _write(path, "cgroup.kill", "1")


def remove(path: str) -> None:
    """Remove cgroup ``path`` and its descendant cgroups (those of nested agents whose
    guardians were ended with them). Only empty cgroups can go; the others stay."""
    for parent, children, _ in os.walk(path, topdown=False):
        for child in children:
            _rmdir_quietly(os.path.join(parent, child))
    _rmdir_quietly(path)


def _rmdir_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)


def cgroup_dir(pid: int | str = "self") -> str:
    """The directory of process ``pid``'s cgroup v2, from /proc/PID/cgroup ("0::PATH")
    and the cgroup2 mount in /proc/self/mountinfo. Raises :class:`NoCgroup`."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            own = next((line[3:].rstrip("\n") for line in f if line.startswith("0::")), None)
        with open("/proc/self/mountinfo") as f:
            mounts = f.read().splitlines()
    except OSError as exc:
        raise NoCgroup(f"cannot read /proc: {_describe(exc)}") from None
    if own is None:
        raise NoCgroup(f"process {pid} is in no cgroup v2 hierarchy")
    for line in mounts:
        # "ID PARENT DEV ROOT MOUNTPOINT OPTIONS [TAGS...] - FSTYPE SOURCE SUPEROPTIONS"
        before, _, after = line.partition(" - ")
        fields = before.split()
        if after.split()[:1] != ["cgroup2"] or len(fields) < 5:
            continue
        root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
        if own == root or own.startswith(root.rstrip("/") + "/"):
            return os.path.normpath(mountpoint + own[len(root.rstrip("/")):])
    raise NoCgroup(f"no cgroup2 mount shows process {pid}'s cgroup {own}")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _write(path: str, name: str, text: str) -> None:
    fd = os.open(os.path.join(path, name), os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _describe(exc: OSError) -> str:
    """The errno by name, then its meaning: ``EACCES (Permission denied)``."""
    return f"{errno.errorcode.get(exc.errno or 0, exc.errno)} ({exc.strerror})"
