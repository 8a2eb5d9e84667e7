"""glibc's posix_spawn through ctypes: exact fd placement and chdir without fork.

os.posix_spawn (3.11) has no chdir action, so the C function is called directly, with
glibc's posix_spawn_file_actions_addchdir_np (2.29) and _addclosefrom_np (2.34). glibc
clones with CLONE_VM|CLONE_VFORK on a separate stack: the cost does not grow with the
parent's memory, nothing runs Python code in the child, and ctypes releases the GIL for
the call, so concurrent spawns from many threads are fine.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
from collections.abc import Sequence
from typing import Any

from ._fdplan import FdPlan

# <spawn.h>
_POSIX_SPAWN_SETSID = 0x80  # glibc >= 2.26: setsid() in the child
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSIGMASK = 0x08

# posix_spawn_file_actions_t is 80 bytes and posix_spawnattr_t 336 on glibc x86-64 and
# aarch64; the buffers are generous and 8-byte aligned.
_Opaque = ctypes.c_uint64 * 128
_WORD_BITS = 8 * ctypes.sizeof(ctypes.c_ulong)
_SigSet = ctypes.c_ulong * (1024 // _WORD_BITS)  # glibc's sigset_t

_P = ctypes.c_void_p
_INT = ctypes.c_int


class FileActionError(OSError):
    """Adding a file action failed (e.g. EBADF: an fd number above the soft limit)."""


class _Libc:
    def __init__(self, lib: ctypes.CDLL) -> None:
        def fn(name: str, *argtypes: Any) -> Any:
            f = getattr(lib, name)
            f.argtypes = argtypes
            f.restype = ctypes.c_int
            return f

        self.spawn = fn("posix_spawn", _P, ctypes.c_char_p, _P, _P, _P, _P)
        self.fa_init = fn("posix_spawn_file_actions_init", _P)
        self.fa_destroy = fn("posix_spawn_file_actions_destroy", _P)
        self.adddup2 = fn("posix_spawn_file_actions_adddup2", _P, _INT, _INT)
        self.addclose = fn("posix_spawn_file_actions_addclose", _P, _INT)
        self.addclosefrom = fn("posix_spawn_file_actions_addclosefrom_np", _P, _INT)
        self.addchdir = fn("posix_spawn_file_actions_addchdir_np", _P, ctypes.c_char_p)
        self.attr_init = fn("posix_spawnattr_init", _P)
        self.attr_destroy = fn("posix_spawnattr_destroy", _P)
        self.setflags = fn("posix_spawnattr_setflags", _P, ctypes.c_short)
        self.setsigdefault = fn("posix_spawnattr_setsigdefault", _P, _P)
        self.setsigmask = fn("posix_spawnattr_setsigmask", _P, _P)
        self.lib = lib

        # The signals the child must start with at SIG_DFL. Python ignores SIGPIPE and
        # SIGXFSZ, and exec keeps ignored signals ignored (Popen's restore_signals resets
        # them too). glibc's posix_spawn sets its internal signals 32 and 33 (below
        # SIGRTMIN) to SIG_IGN in the child unless they are in this set, and sigaddset
        # refuses them, so the set is built bit by bit.
        self.default_signals = _SigSet()
        for signum in (signal.SIGPIPE, signal.SIGXFSZ, *range(32, signal.SIGRTMIN)):
            self.default_signals[(signum - 1) // _WORD_BITS] |= 1 << ((signum - 1) % _WORD_BITS)


@functools.cache
def _libc() -> _Libc | None:
    try:
        return _Libc(ctypes.CDLL(None))
    except (OSError, AttributeError):  # not Linux with glibc >= 2.34
        return None


def available() -> bool:
    """Whether this libc has everything spawn needs."""
    return _libc() is not None


def spawn(
    path: bytes,
    argv: Sequence[bytes],
    env: Sequence[bytes] | None,
    cwd: bytes | None,
    fds: FdPlan,
) -> int:
    """Start path in a new process group, with the fd plan, cwd and default SIGPIPE/SIGXFSZ.

    env None passes the C environ of the moment, as execv does. Returns the pid. Raises
    FileActionError when a file action cannot be added, and OSError with posix_spawn's
    errno when chdir, a file action or exec failed in the child (glibc has reaped it).
    """
    libc = _libc()
    assert libc is not None, "spawn called without checking available()"
    actions, attr = _Opaque(), _Opaque()
    _check(libc.fa_init(actions), OSError)
    try:
        _check(libc.attr_init(attr), OSError)
        try:
            if cwd is not None:
                _check(libc.addchdir(actions, cwd), FileActionError)
            for source, target in fds.dups:
                _check(libc.adddup2(actions, source, target), FileActionError)
            for low, high in fds.close_ranges:
                for fd in range(low, high):
                    # glibc ignores EBADF when the child closes an fd that is not open.
                    _check(libc.addclose(actions, fd), FileActionError)
            _check(libc.addclosefrom(actions, fds.close_from), FileActionError)

            _check(libc.setsigdefault(attr, libc.default_signals), OSError)
            # An empty mask: else the child inherits the calling thread's.
            _check(libc.setsigmask(attr, _SigSet()), OSError)
            _check(
                libc.setflags(
                    attr, _POSIX_SPAWN_SETSID | _POSIX_SPAWN_SETSIGDEF | _POSIX_SPAWN_SETSIGMASK
                ),
                OSError,
            )

            c_argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
            c_env: ctypes.Array[ctypes.c_char_p] | ctypes.c_void_p
            if env is None:
                c_env = ctypes.c_void_p.in_dll(libc.lib, "environ")
            else:
                c_env = (ctypes.c_char_p * (len(env) + 1))(*env, None)
            pid = ctypes.c_int()
            _check(libc.spawn(ctypes.byref(pid), path, actions, attr, c_argv, c_env), OSError)
            return pid.value
        finally:
            libc.attr_destroy(attr)
    finally:
        libc.fa_destroy(actions)


def _check(error: int, kind: type[OSError]) -> None:
    if error:
        raise kind(error, os.strerror(error))
