"""The first stage of an agentless start: a short program given to the remote ``python3``
on its command line, which finds the payload (see ``_payload``) in the user's cache or
asks for it, checks its sha256, and runs the agent from it on the same stdin and stdout.

What it says to the controller are lines on stdout, each ``\\0mproxy-stage WORD DETAIL``
(a marker no login banner prints, so that whatever a shell start-up file printed before
it can be skipped):

- ``old X.Y.Z``: this Python is older than the agent needs; the stage exits 1.
- ``note TEXT``: something for the controller's debug log (e.g. the cache is not used).
- ``need REASON``: send the payload: exactly ``size`` bytes on stdin, nothing before.
- ``bad SHA256``: what arrived does not match; after a second ``bad`` the stage exits 3.
- ``run``: the agent starts; its hello frame is the next thing on stdout.

The program travels in the ssh command line, which a login shell (sh, bash, zsh, fish,
csh) parses: it is compressed and base64-encoded, so that the one quoted word holds no
quote, backslash, dollar or newline that any of them would change. It is written for
Python 2.7 and 3.x syntax alike up to the version check, so that an old interpreter
reports its version instead of a SyntaxError.

Cache (``$XDG_CACHE_HOME/mproxy-agent``, else ``~/.cache/mproxy-agent``): created 0700
under a umask of 077; used only when it is a directory owned by this user that neither
group nor others may write, opened without following a symbolic link, and the payload
file in it likewise. ``<sha256>`` is the payload, verified on every start; a copy that
fails is replaced, never run. ``<sha256>.<cache_tag>`` holds the payload's modules
compiled by this interpreter, behind the sha256 of its own bytes, so that a warm start
compiles nothing. Files are written to a temporary name and renamed into place: any
number of stages installing at once leave one good copy. Where the cache cannot be used
(a read-only or full home, wrong ownership or mode), the payload is run from memory,
and the stage says why in a note.
"""

from __future__ import annotations

import base64
import shlex
import zlib
from collections.abc import Sequence
from typing import Final

from ._payload import Payload

__all__ = ["MARKER", "MIN_PYTHON", "stage_command"]

#: Starts each line the stage writes.
MARKER: Final = b"\0mproxy-stage "
#: The oldest Python the agent runs on (pyproject.toml's requires-python).
MIN_PYTHON: Final = (3, 11)

_STAGE: Final = r'''
import os, sys


def say(word, detail=""):
    os.write(1, ("\n\0mproxy-stage %s %s\n" % (word, detail)).encode("utf-8", "replace"))


if sys.version_info[:2] < MIN_PYTHON:
    say("old", "%d.%d.%d" % tuple(sys.version_info[:3]))
    sys.exit(1)

import hashlib, marshal, stat, zipfile
from importlib.machinery import ModuleSpec

SHA, SIZE, ARGS = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def private(st, kind):
    if st.st_uid != os.geteuid():
        return "is owned by uid %d, not by us" % st.st_uid
    if st.st_mode & 0o022:
        return "is writable by group or others (mode %o)" % stat.S_IMODE(st.st_mode)
    if not kind(st.st_mode):
        return "is not a %s" % ("directory" if kind is stat.S_ISDIR else "regular file")
    return None


def open_cache():
    """The cache directory's fd, or None and a note saying why it is not used."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "mproxy-agent")
    try:
        os.makedirs(path, 0o700, exist_ok=True)
        fd = os.open(path, OPEN_FLAGS | os.O_DIRECTORY)
    except OSError as exc:
        return None, "cache %s unusable (%s): running from memory" % (path, exc)
    why = private(os.fstat(fd), stat.S_ISDIR)
    if why:
        os.close(fd)
        return None, "cache %s %s: not used, running from memory" % (path, why)
    return fd, None


def read_cached(cache, name):
    """The file's bytes, or None and why not."""
    try:
        fd = os.open(name, OPEN_FLAGS, dir_fd=cache)
    except FileNotFoundError:
        return None, "absent"
    except OSError as exc:
        return None, "unreadable (%s)" % exc
    with os.fdopen(fd, "rb") as file:
        why = private(os.fstat(fd), stat.S_ISREG)
        if why:
            return None, "cached copy %s" % why
        return file.read(), None


def store(cache, name, data):
    """Write atomically (a private temporary name, then rename); a note if it failed."""
    temporary = ".tmp-%d-%s" % (os.getpid(), name)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=cache)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.rename(temporary, name, src_dir_fd=cache, dst_dir_fd=cache)
        except BaseException:
            os.unlink(temporary, dir_fd=cache)
            raise
    except OSError as exc:
        say("note", "cannot cache %s (%s): running from memory" % (name, exc))


def receive_payload():
    for attempt in (1, 2):
        data = bytearray()
        while len(data) < SIZE:
            chunk = os.read(0, SIZE - len(data))
            if not chunk:
                say("short", "%d of %d bytes" % (len(data), SIZE))
                sys.exit(3)
            data += chunk
        got = hashlib.sha256(data).hexdigest()
        if got == SHA:
            return bytes(data)
        say("bad", got)
        if attempt == 1:
            say("need", "the upload failed verification")
    sys.exit(3)


def compile_all(archive):
    modules = {}
    for name in archive.namelist():
        parts = name[:-3].split("/")
        package = parts[-1] == "__init__"
        if package:
            parts.pop()
        filename = "<mproxy-agent payload>/" + name
        code = compile(archive.read(name), filename, "exec", dont_inherit=True)
        modules[".".join(parts)] = (package, filename, code)
    return modules


class Finder:
    """Imports the payload's modules from their compiled code; sources for tracebacks."""

    def __init__(self, modules, archive):
        self.modules = modules
        self.archive = archive

    def find_spec(self, name, path=None, target=None):
        entry = self.modules.get(name)
        if entry is None:
            return None
        spec = ModuleSpec(name, self, origin=entry[1], is_package=entry[0])
        spec.has_location = False
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        package, filename, code = self.modules[module.__name__]
        module.__file__ = filename
        exec(code, module.__dict__)

    def get_source(self, name):
        package, filename, code = self.modules[name]
        return self.archive.read(filename.split(">/", 1)[1]).decode("utf-8")


def main():
    umask = os.umask(0o077)
    cache, note = open_cache()
    if note:
        say("note", note)
    payload, why = (None, "no cache") if cache is None else read_cached(cache, SHA)
    if payload is not None and hashlib.sha256(payload).hexdigest() != SHA:
        payload, why = None, "cached copy failed verification"
    if payload is None:
        say("need", why)
        payload = receive_payload()
        if cache is not None:
            store(cache, SHA, payload)
    import io
    archive = zipfile.ZipFile(io.BytesIO(payload))
    modules = None
    compiled_name = "%s.%s" % (SHA, sys.implementation.cache_tag)
    if cache is not None:
        compiled, why = read_cached(cache, compiled_name)
        body = compiled[64:] if compiled is not None else b""
        if compiled is not None and hashlib.sha256(body).hexdigest().encode() == compiled[:64]:
            try:
                modules = marshal.loads(body)
            except (EOFError, ValueError, TypeError):
                modules = None
    if modules is None:
        modules = compile_all(archive)
        if cache is not None:
            body = marshal.dumps(modules)
            store(cache, compiled_name, hashlib.sha256(body).hexdigest().encode() + body)
    if cache is not None:
        os.close(cache)
    sys.meta_path.insert(0, Finder(modules, archive))
    os.umask(umask)
    say("run")
    from agent._cli import main as agent_main
    sys.exit(agent_main(ARGS))


main()
'''


def stage_command(python: str, payload: Payload, agent_args: Sequence[str]) -> str:
    """The remote command line that runs the first stage with ``python`` for
    ``payload``: one string for ssh, which hands it to the login shell."""
    source = _STAGE.replace("MIN_PYTHON", repr(MIN_PYTHON), 1)
    encoded = base64.b64encode(zlib.compress(source.encode(), 9)).decode()
    code = f'import base64,zlib;exec(zlib.decompress(base64.b64decode("{encoded}")))'
    # -I: no PYTHON* variables, no user site; -S: no site-packages either, so nothing
    # installed there (another msgpack, a .pth file) comes between us and the payload.
    return shlex.join([python, "-I", "-S", "-c", code, payload.sha256, str(payload.size),
                       *agent_args])
