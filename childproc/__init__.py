"""Build and start one child process with exact stdio, fd, signal and credential plumbing.

A port of the Go system's childproc package, reusable on its own: it imports nothing
from the rest of the project and needs no event loop.

    command, pipes = build(Spec(path, argv, env, cwd, extra_fds, drop_sudo_credentials))
    try:
        proc = command.start()      # under an event loop: a worker thread unless
                                    # command.start_is_brief
    finally:
        close_child_side(command)
    ... use pipes.stdin/stdout/stderr/extra, wait for and reap proc, pipes.close() ...
    code = exit_code(proc.returncode)

Mechanism. Python offers no single primitive that does everything: Popen's pass_fds
keeps fd numbers but cannot remap them; preexec_fn forks (cost grows with the parent's
memory), runs Python in the child of a threaded process, and its dup2 targets can collide
with Popen's error pipe; posix_spawn remaps cheaply but (3.11) cannot chdir or change
credentials; Popen's user/group force a fork and chdir before dropping privileges. So
build picks one of three per spec (Command.mechanism):

1. "popen", no extra fds and no credential drop: subprocess.Popen(close_fds=True,
   start_new_session=True, restore_signals=True), which CPython 3.11 still runs with
   vfork (start_new_session does not disable it; only preexec_fn and user/group/
   extra_groups do).
2. "posix_spawn", extra fds without credential drop: glibc posix_spawn through ctypes,
   with a collision-safe dup2 plan, a close action per unused fd number below the highest
   requested one plus closefrom above it, addchdir_np, POSIX_SPAWN_SETSID, SETSIGDEF
   (SIGPIPE, SIGXFSZ, and glibc's internal signals 32 and 33, which its posix_spawn
   otherwise leaves ignored in the child) and SETSIGMASK (empty).
3. "trampoline", credential drop in effect (and extra fds whose layout would need more
   than 1024 close actions, or a libc without posix_spawn_file_actions_addclosefrom_np):
   Popen starts `python -I -S` running a short script that sets groups, gid and uid,
   enters cwd as that user, places the fds, restores RLIMIT_NOFILE and the signal
   dispositions, and execs; failures come back over a close-on-exec socket. With env
   None the child gets os.environ as it is when start() runs.

Measured cost of build + start + wait of /bin/true, as a ratio to subprocess.run(
["/bin/true"]) (~0.8 ms here), median of 300 interleaved rounds on 2 cores:
popen 1.1 (the three pipes; the same as Popen(start_new_session=True) with three PIPEs);
posix_spawn 1.2 for extra fd [3], 1.75 for [3, 7, 200] (each unused number below the
highest requested fd costs one close action, ~2 us of ctypes call); trampoline 15
(12-16 ms: an interpreter start-up). With a 1 GB parent these stay the same, where any
fork-based spawn (preexec_fn, Popen's user/group) takes 30-45 ms.

No mechanism forks the Python parent (so the cost does not grow with its memory and no
Python code runs in a child of a threaded process), and every child gets only 0, 1, 2 and
its extra fds even when the parent holds inheritable fds. PR_SET_PDEATHSIG is not used:
it fires when the thread that spawned the child exits, and event loops spawn from worker
threads that come and go.

RLIMIT_NOFILE. raise_fd_limit() raises the process's soft limit and records the original,
which children get back: the trampoline sets it before exec; for popen and posix_spawn,
start() applies it with prlimit(2) right after the spawn returns, so such a child may run
its first instructions with the raised limit (usually prlimit lands while the program is
still being loaded, but nothing guarantees it; only a Python child between fork and exec
could do better). Until raise_fd_limit() is called, nothing is done.

Linux is the supported platform; with a libc other than glibc >= 2.34 (musl) the
extra-fd case falls back to the trampoline. The package imports on Windows, where build
raises NotImplementedError.
"""

from ._build import Command, Pipes, build, close_child_side, exit_code
from ._creds import Credentials
from ._errors import CredentialError, SpawnError
from ._limits import mark_inherited_fds_cloexec, raise_fd_limit
from ._spec import Spec

__all__ = [
    "Command",
    "CredentialError",
    "Credentials",
    "Pipes",
    "SpawnError",
    "Spec",
    "build",
    "close_child_side",
    "exit_code",
    "mark_inherited_fds_cloexec",
    "raise_fd_limit",
]
