"""The agent's payload: one zip of every module the agent side runs, shipped over ssh to
hosts where nothing of ours is installed (see ``_stage``).

It holds the sources (never compiled code: the remote Python's version is not ours) of
``protocol``, ``childproc``, ``link`` and ``agent``, of trio and its pure-Python
dependencies, and of msgpack's pure-Python implementation (its C extension is built for
this interpreter and platform, not necessarily the remote's). Only the modules the agent
imports on Linux are in it: no tests, no tools, no Windows or kqueue back ends.

The same installed sources give the same bytes (sorted names, fixed timestamps and
modes), hence the same sha256, which names the payload in the remote's cache. Building
takes a few tenths of a second, so the zip is also kept in this user's cache, under a key
made of every source file's path, size and modification time: a controller process that
starts once per command (``mproxy-exec``) pays for a ``stat`` of each file, not a build.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import os
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["Payload", "cache_root", "payload"]

#: Top-level packages the agent side needs, each found where this interpreter imports it.
PACKAGES: Final = (
    "agent", "childproc", "link", "protocol",
    "trio", "outcome", "sniffio", "attr", "attrs", "sortedcontainers", "idna", "msgpack",
)

#: Modules of those packages the agent never imports on Linux (checked by
#: tests/test_agentless.py against what a bare Python imports from the payload), besides
#: test packages (``_tests``, ``tests``). A name ending in "." excludes a subpackage.
EXCLUDED: Final = frozenset({
    "agent.__main__",
    "trio.__main__", "trio._repl", "trio._wait_for_object", "trio._windows_pipes",
    "trio._core._generated_windows_ffi", "trio._core._io_kqueue", "trio._core._io_windows",
    "trio._core._generated_io_windows", "trio._core._windows_cffi",
    "trio._core._generated_io_kqueue", "trio._subprocess_platform.windows",
    "trio._subprocess_platform.kqueue", "trio._tools.", "trio.testing.",
    "idna.__main__", "idna.cli", "idna.codec", "idna.compat", "idna.uts46data",
})

#: Bump when what goes into the zip changes for the same sources (part of the cache key).
_FORMAT: Final = "1"
#: Every member's timestamp: the zip's bytes must not depend on when files were written.
_EPOCH: Final = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Payload:
    data: bytes
    sha256: str  # hex

    @property
    def size(self) -> int:
        return len(self.data)


def cache_root() -> Path:
    """This user's cache directory for mproxy-agent: ``$XDG_CACHE_HOME/mproxy-agent``
    (when absolute), else ``~/.cache/mproxy-agent``: the same rule the remote stage uses."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "mproxy-agent"


@functools.cache
def payload() -> Payload:
    """The payload for the agent as installed here: built once per process, and kept in
    this user's cache (a cache that cannot be read or written is skipped, silently: it
    only saves time)."""
    sources = sorted(_sources())
    key = hashlib.sha256(_FORMAT.encode())
    for module, _, path in sources:
        st = path.stat()
        key.update(f"{module}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cached = cache_root() / "controller" / f"payload-{key.hexdigest()}.zip"
    with contextlib.suppress(OSError):
        data = cached.read_bytes()
        return Payload(data, hashlib.sha256(data).hexdigest())
    data = _build(sources)
    with contextlib.suppress(OSError):
        _store(cached, data)
    return Payload(data, hashlib.sha256(data).hexdigest())


def _sources() -> Iterator[tuple[str, str, Path]]:
    """(module name, name in the zip, source file) of every module in the payload."""
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"the agent's payload needs the package {package!r}: not found")
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in root.rglob("*.py"):
            relative = path.relative_to(root.parent).with_suffix("")
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            module = ".".join(parts)
            if not _excluded(module):
                yield module, path.relative_to(root.parent).as_posix(), path


def _excluded(module: str) -> bool:
    if module in EXCLUDED or {"_tests", "tests"} & set(module.split(".")):
        return True
    prefix = ""
    for part in module.split("."):
        prefix += part + "."
        if prefix in EXCLUDED:
            return True
    return False


def _build(sources: list[tuple[str, str, Path]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for _, name, path in sources:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes(), compresslevel=9)
    return buffer.getvalue()


def _store(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, in a directory only this user can enter."""
    old_umask = os.umask(0o077)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    finally:
        os.umask(old_umask)
