"""Spec, its validation, and the PATH lookup done at build time."""

from __future__ import annotations

import errno
import operator
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from ._errors import SpawnError


@dataclass(frozen=True)
class Spec:
    """The command to launch; decoupled from any wire protocol so the package is reusable.

    Strings are encoded with os.fsencode; bytes (which may be any non-NUL bytes on POSIX)
    are used as they are.

    path: the program. Without a "/" it is looked up in the PATH of the child's environment
        at build time (absolute PATH entries only); with a "/" it is used as is, so a relative
        path is relative to the child's working directory, as for execve after chdir. A
        file the kernel refuses for its format (ENOEXEC: a script without a #! line) is
        run by /bin/sh, as glibc's execvp does (see Command.start).
    argv: the full argument vector; argv[0] is passed as given.
    env: "NAME=VALUE" entries (NAME not empty); when a NAME repeats, the last entry wins
        (as Go's os/exec). None inherits the agent's environment at start time; [] is an
        empty environment.
    cwd: the child's working directory; None (or "", as in Go) inherits the agent's.
    extra_fds: child fd numbers >= 3, each connected to a Unix stream socketpair.
    drop_sudo_credentials: when the agent runs as root (euid 0) and $SUDO_UID is set, the
        child runs as uid $SUDO_UID, gid $SUDO_GID (default: the uid) and that user's own
        supplementary groups (none when the uid has no passwd entry).
    """

    path: str | bytes
    argv: Sequence[str | bytes]
    env: Sequence[str | bytes] | None = None
    cwd: str | bytes | None = None
    extra_fds: Sequence[int] = ()
    drop_sudo_credentials: bool = False


@dataclass(frozen=True)
class ResolvedSpec:
    """A Spec validated and resolved (path looked up in PATH, strings encoded, env
    names made unique), in the form the spawn mechanisms consume."""

    path: bytes  # resolved against PATH when the spec's path had no "/"
    argv: tuple[bytes, ...]
    env: tuple[tuple[bytes, bytes], ...] | None  # (name, value), names unique
    cwd: bytes | None
    extra_fds: tuple[int, ...]  # sorted


def validate(spec: Spec) -> ResolvedSpec:
    """Check and encode every field of spec; ValueError/TypeError names the culprit."""
    path = _encode(spec.path, "path")
    if not path:
        raise ValueError("path is empty")
    if isinstance(spec.argv, str | bytes):
        raise TypeError(f"argv must be a sequence of arguments, not {type(spec.argv).__name__}")
    argv = tuple(_encode(arg, f"argv[{i}]") for i, arg in enumerate(spec.argv))
    if not argv:
        raise ValueError("argv is empty; it must hold at least argv[0]")
    env = None if spec.env is None else _dedup_env(spec.env)
    cwd = None if spec.cwd is None else _encode(spec.cwd, "cwd") or None
    return ResolvedSpec(_lookpath(path, env), argv, env, cwd, _check_fds(spec.extra_fds))


def _encode(value: str | bytes, what: str) -> bytes:
    encoded = os.fsencode(value)
    if b"\0" in encoded:
        raise ValueError(f"{what} contains a NUL byte: {value!r}")
    return encoded


def _dedup_env(entries: Sequence[str | bytes]) -> tuple[tuple[bytes, bytes], ...]:
    if isinstance(entries, str | bytes):
        kind = type(entries).__name__
        raise TypeError(f"env must be a sequence of NAME=VALUE entries, not {kind}")
    env: dict[bytes, bytes] = {}
    for i, entry in enumerate(entries):
        name, sep, value = _encode(entry, f"env[{i}]").partition(b"=")
        if not sep or not name:
            raise ValueError(f"env[{i}] is not a NAME=VALUE entry: {entry!r}")
        env.pop(name, None)  # the last entry wins, and takes the last position (as Go)
        env[name] = value
    return tuple(env.items())


def _check_fds(fds: Sequence[int]) -> tuple[int, ...]:
    seen: set[int] = set()
    for fd in fds:
        if isinstance(fd, bool):
            raise TypeError(f"extra fd must be an int, not bool: {fd!r}")
        number = operator.index(fd)
        if number < 3:
            raise ValueError(f"extra fd {number} is below 3; fds 0, 1 and 2 are the child's stdio")
        if number in seen:
            raise ValueError(f"extra fd {number} is listed more than once")
        seen.add(number)
    return tuple(sorted(seen))


def _lookpath(path: bytes, env: tuple[tuple[bytes, bytes], ...] | None) -> bytes:
    """Go's exec.LookPath, done at build time against the child's PATH.

    Relative PATH entries (including the empty entry, meaning ".") are skipped: they would
    resolve against the agent's working directory, not the child's; Go refuses them too
    (exec.ErrDot).
    """
    if b"/" in path:
        return path
    if env is None:
        search = os.environb.get(b"PATH", os.fsencode(os.defpath))
    else:
        search = dict(env).get(b"PATH", os.fsencode(os.defpath))
    for directory in search.split(b":"):
        if not directory.startswith(b"/"):
            continue
        candidate = os.path.join(directory, path)
        try:
            mode = os.stat(candidate).st_mode
        except OSError:
            continue
        if not stat.S_ISDIR(mode) and mode & 0o111:
            return candidate
    raise SpawnError(
        errno.ENOENT, "exec", os.fsdecode(path), f"{os.strerror(errno.ENOENT)} (searched $PATH)"
    )
