"""RLIMIT_NOFILE handling and the startup sweep of inherited fds."""

from __future__ import annotations

import os
import sys
import threading

if sys.platform != "win32":
    import resource

# When the hard limit is unlimited, the soft limit is raised to this: Linux's default
# fs.nr_open, above which setrlimit fails.
_UNLIMITED_CAP = 1 << 20

_lock = threading.Lock()
_original: list[tuple[int, int]] = []  # the limit before the first raise, once raised


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; return (old, new) soft.

    The limit the process had before the first raise is recorded, and every child started
    afterwards gets it back (see the module docstring for how exactly): programs that size
    tables by the limit, or use select(), expect the usual value. An unlimited hard limit
    is treated as 2**20.
    """
    if sys.platform == "win32":
        raise NotImplementedError("childproc.raise_fd_limit is not implemented on Windows")
    with _lock:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = _UNLIMITED_CAP if hard == resource.RLIM_INFINITY else hard
        if target <= soft:
            return soft, soft
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if not _original:
            _original.append((soft, hard))
        return soft, target


def child_fd_limit() -> tuple[int, int] | None:
    """The RLIMIT_NOFILE children must start with, or None when it was never raised."""
    return _original[0] if _original else None


def mark_inherited_fds_cloexec(start: int = 3) -> list[int]:
    """Set close-on-exec on every open fd >= start; return the fds that lacked it.

    A process can inherit stray fds without close-on-exec from whatever started it (seen in
    practice: 10 and 251). childproc closes them in its children anyway, but every other
    exec in the process would leak them; the agent calls this once at startup.
    """
    if sys.platform == "win32":
        raise NotImplementedError(
            "childproc.mark_inherited_fds_cloexec is not implemented on Windows"
        )
    try:
        candidates = sorted(int(name) for name in os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: probe every possible number
        candidates = list(range(start, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
    marked = []
    for fd in candidates:
        if fd < start:
            continue
        try:
            if os.get_inheritable(fd):
                os.set_inheritable(fd, False)
                marked.append(fd)
        except OSError:  # not open: the listing's own fd, or one closed meanwhile
            continue
    return marked
