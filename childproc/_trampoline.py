"""The trampoline: a fresh single-threaded Python process that sets up the child and execs.

Used when the child must change credentials (no spawn primitive can, and Popen's
user/group/extra_groups force a fork of the whole parent and chdir before dropping), and
for extra-fd layouts that posix_spawn cannot do cheaply or at all. The trampoline is
started by Popen (vfork) with the child's stdio at 0, 1, 2 and its other fds passed at
their parent numbers; it reads its instructions from a socket, then does, in Go's order:
setgroups, setgid, setuid; chdir (so a directory the user cannot enter is refused);
the fd plan; RLIMIT_NOFILE; default SIGPIPE/SIGXFSZ and an empty signal mask; execve.
The socket is close-on-exec: EOF without a report means the exec succeeded, and a failure
is reported as b"step:errno" (EINVAL when the exception has no errno) before the
trampoline exits 127. Only an interpreter that cannot start at all goes unreported: the
"child" then exits with Python's status and its message on the child's stderr.
"""

from __future__ import annotations

import errno
import functools
import marshal
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import cast

from ._creds import Credentials
from ._errors import Step, StepFailed, popen_step
from ._fdplan import plan

if sys.platform != "win32":
    import fcntl

# Runs with -I -S: no site, no environment variables, only builtin modules (_signal rather
# than signal, whose import of enum would double the start-up time; resource only when
# needed, before dropping privileges).
CODE = """\
import _signal, marshal, os, sys
ctl = int(sys.argv[1])
step = 'exec'
try:
    os.set_inheritable(ctl, False)
    data = b''
    while chunk := os.read(ctl, 1 << 16):
        data += chunk
    path, argv, env, cwd, creds, dups, closes, close_from, rlimit = marshal.loads(data)
    if rlimit is not None:
        import resource
    step = 'credentials'
    if creds is not None:
        os.setgroups(creds[2])
        os.setgid(creds[1])
        os.setuid(creds[0])
    step = 'chdir'
    if cwd is not None:
        os.chdir(cwd)
    step = 'fds'
    for source, target in dups:
        os.dup2(source, target)
    for low, high in closes:
        os.closerange(low, high)
    os.closerange(close_from, max(close_from, os.sysconf('SC_OPEN_MAX')))
    if rlimit is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, rlimit)
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
    step = 'exec'
    os.execve(path, argv, dict(env))
except Exception as e:
    os.write(ctl, b'%s:%d' % (step.encode(), getattr(e, 'errno', None) or 22))
os._exit(127)
"""


def spawn(
    *,
    path: bytes,
    argv: tuple[bytes, ...],
    env: tuple[tuple[bytes, bytes], ...],
    cwd: bytes | None,
    creds: Credentials | None,
    stdio: tuple[int, int, int],
    extra: Mapping[int, int],
    rlimit: tuple[int, int] | None,
) -> subprocess.Popen[bytes]:
    """Start the trampoline and wait until it has exec'd the program or failed.

    stdio holds the child's ends for fds 0, 1, 2; extra maps child fd numbers to the parent
    fds holding them. Returns the Popen of the trampoline, which is the program after the
    exec (its args are set to argv). A failed step raises StepFailed after the trampoline
    has been reaped; so does a trampoline that could not run at all (step "exec", its
    strerror naming the interpreter).
    """
    try:
        control, child_control = socket.socketpair()
    except OSError as e:
        raise StepFailed("fds", e.errno or errno.EIO) from None
    with control:
        try:
            # Above every target, so the plan's dups never overwrite it.
            control_fd = fcntl.fcntl(
                child_control.fileno(), fcntl.F_DUPFD_CLOEXEC, max(extra, default=2) + 1
            )
        except OSError as e:
            raise StepFailed("fds", e.errno or errno.EIO) from None
        finally:
            child_control.close()
        fds = plan(extra, keep=(control_fd,))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", CODE, str(control_fd)],
                executable=sys.executable,
                stdin=stdio[0],
                stdout=stdio[1],
                stderr=stdio[2],
                env={},
                close_fds=True,
                pass_fds=(*extra.values(), control_fd),
                start_new_session=True,
                restore_signals=True,
            )
        except OSError as e:
            if popen_step(e, sys.executable, None) == "exec":
                raise _trampoline_error(e) from None
            raise StepFailed("fds", e.errno or errno.EIO) from None
        finally:
            os.close(control_fd)
        request = marshal.dumps((
            path, argv, env, cwd,
            None if creds is None else (creds.uid, creds.gid, creds.groups),
            fds.dups, fds.close_ranges, fds.close_from, rlimit,
        ))  # fmt: skip
        try:
            control.sendall(request)
            control.shutdown(socket.SHUT_WR)
            report = b"".join(iter(functools.partial(control.recv, 256), b""))
        except OSError as e:  # it died before reading its request
            proc.wait()
            raise _trampoline_error(e) from None
    if report:
        proc.wait()
        step, _, number = report.decode("ascii").partition(":")
        raise StepFailed(cast(Step, step), int(number))
    proc.args = list(argv)
    return proc


def _trampoline_error(e: OSError) -> StepFailed:
    number = e.errno or errno.EIO
    return StepFailed(
        "exec", number, f"cannot run the trampoline {sys.executable!r}: {os.strerror(number)}"
    )
