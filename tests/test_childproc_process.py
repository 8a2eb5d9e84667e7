"""childproc behaviour that changes process-wide state, each run in a fresh interpreter:
RLIMIT_NOFILE raising and restoring, the startup fd sweep, running with stdio closed,
fd exhaustion, and importing on Windows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

IS_ROOT = os.geteuid() == 0

PRELUDE = """\
import errno, json, os, resource, sys
from childproc import *

def run(spec, data=b""):
    cmd, pipes = build(spec)
    with pipes:
        try:
            proc = cmd.start()
        finally:
            close_child_side(cmd)
        pipes.stdin.write(data)
        pipes.stdin.close()
        out = pipes.stdout.readall()
        err = pipes.stderr.readall()
        return cmd.mechanism, out.decode(), err.decode(), proc.wait()

def open_fds():
    return sorted(int(n) for n in os.listdir("/proc/self/fd"))

# Room for the layouts with fd 1100, where the soft limit is 1024.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(_soft, min(_hard, 4096)), _hard))
"""


def run_script(body: str, *args: str) -> Any:
    """Run PRELUDE + body in a new interpreter; it prints its result as JSON, if any."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), SUDO_UID="65534", SUDO_GID="65534")
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body), *args],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout) if proc.stdout else None


def test_children_get_the_original_fd_limit() -> None:
    result = run_script(
        """
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raised = raise_fd_limit()
        again = raise_fd_limit()
        limits = {}
        cases = [("popen", ()), ("posix_spawn", (3,))]
        if hard > 1200:
            cases.append(("trampoline", (3, 1100)))
        for name, fds in cases + [("credentials", ())] * (os.geteuid() == 0):
            # The child reads its limit only after start() has returned.
            spec = Spec("/bin/sh", ["sh", "-c", "read x; exec cat /proc/self/limits"],
                        extra_fds=fds, drop_sudo_credentials=name == "credentials")
            mechanism, out, _, _ = run(spec, b"go\\n")
            line = next(l for l in out.splitlines() if l.startswith("Max open files"))
            limits[name] = [mechanism, line.split()[3:5]]
        print(json.dumps({"raised": raised, "again": again, "hard": hard, "limits": limits,
                          "now": resource.getrlimit(resource.RLIMIT_NOFILE)}))
        """
    )
    hard = result["hard"]
    assert result["raised"] == [256, hard]
    assert result["again"] == [hard, hard]
    assert result["now"] == [hard, hard]
    for name, (mechanism, (soft, child_hard)) in result["limits"].items():
        assert mechanism == ("trampoline" if name == "credentials" else name)
        assert (int(soft), int(child_hard)) == (256, hard), name


def test_mark_inherited_fds_cloexec() -> None:
    result = run_script(
        """
        fd = os.open("/dev/null", os.O_RDONLY)
        os.set_inheritable(fd, True)
        high = os.dup2(fd, 300)
        already = os.open("/dev/null", os.O_RDONLY)  # close-on-exec already
        marked = mark_inherited_fds_cloexec()
        print(json.dumps({
            "fds": [fd, high, already],
            "marked": marked,
            "inheritable": [os.get_inheritable(n) for n in (0, 1, 2, fd, high, already)],
        }))
        """
    )
    fd, high, already = result["fds"]
    assert fd in result["marked"] and high in result["marked"]
    assert already not in result["marked"]
    assert result["inheritable"] == [True, True, True, False, False, False]


def test_works_with_stdio_closed(tmp_path: Path) -> None:
    # An agent may start with fd 0, 1 or 2 closed: its pipes and sockets then get those
    # numbers, which every mechanism must still place correctly.
    report = tmp_path / "report.json"
    run_script(
        """
        for fd in (0, 1, 2):
            os.close(fd)
        results = {}
        cases = [("popen", ()), ("posix_spawn", (3, 7)), ("trampoline", (3, 7, 1100))]
        for name, fds in cases + [("credentials", (3, 7))] * (os.geteuid() == 0):
            script = "cat; echo err >&2" + "".join(f"; echo fd{n} >&{n}" for n in fds if n < 10)
            spec = Spec("/bin/sh", ["sh", "-c", script], extra_fds=fds,
                        drop_sudo_credentials=name == "credentials")
            cmd, pipes = build(spec)
            with pipes:
                try:
                    proc = cmd.start()
                finally:
                    close_child_side(cmd)
                pipes.stdin.write(b"in\\n")
                pipes.stdin.close()
                got = [pipes.stdout.readall().decode(), pipes.stderr.readall().decode()]
                got += [pipes.extra[n].recv(100).decode() for n in fds if n < 10]
                results[name] = [cmd.mechanism, got, proc.wait()]
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
        """,
        str(report),
    )
    results = json.loads(report.read_text())
    for name, (mechanism, got, code) in results.items():
        assert mechanism == ("trampoline" if name == "credentials" else name)
        extra = ["fd3\n", "fd7\n"] if name != "popen" else []
        assert (got, code) == (["in\n", "err\n", *extra], 0), name


@pytest.mark.parametrize("mechanism", ["popen", "posix_spawn", "trampoline", "credentials"])
def test_fd_exhaustion_leaks_nothing(mechanism: str) -> None:
    if mechanism == "credentials" and not IS_ROOT:
        pytest.skip("the credential drop needs root")
    result = run_script(
        """
        os.closerange(3, 1 << 16)  # stray inherited fds
        fds = {"popen": (), "posix_spawn": (3,), "trampoline": (3, 1100),
               "credentials": ()}[sys.argv[1]]
        spec = Spec("/bin/true", ["true"], extra_fds=fds,
                    drop_sudo_credentials=sys.argv[1] == "credentials")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        before = open_fds()
        errors = []

        def exhaust():
            fillers = []
            while True:
                try:
                    fillers.append(os.dup(0))
                except OSError:
                    return fillers

        # build: room for two pipes only.
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
        fillers = exhaust()
        for fd in fillers[-4:]:
            os.close(fd)
        del fillers[-4:]
        try:
            build(spec)
        except SpawnError as e:
            errors.append([e.errno, e.step])
        for fd in fillers:
            os.close(fd)

        # start: every fd in use, so whatever the mechanism needs in the parent fails.
        cmd, pipes = build(spec)
        fillers = exhaust()
        with pipes:
            try:
                cmd.start().wait()
                errors.append("started")
            except SpawnError as e:
                errors.append([e.errno, e.step])
            finally:
                close_child_side(cmd)
                for fd in fillers:
                    os.close(fd)
        print(json.dumps({"errors": errors, "leaked": sorted(set(open_fds()) - set(before))}))
        """,
        mechanism,
    )
    emfile = [24, "fds"]
    build_error, start_error = result["errors"]
    assert build_error == emfile
    # posix_spawn needs no new fd in the parent, so it starts even then.
    assert start_error == ("started" if mechanism == "posix_spawn" else emfile)
    assert result["leaked"] == []


def test_imports_on_windows_and_build_refuses() -> None:
    # Simulated: the POSIX-only modules are made unimportable and sys.platform says win32
    # (the stdlib modules childproc shares with Windows are imported for real first).
    result = run_script(
        """
        for name in list(sys.modules):
            if name == "childproc" or name.startswith("childproc."):
                del sys.modules[name]
        for name in ("fcntl", "resource", "pwd", "grp", "termios"):
            sys.modules[name] = None
        sys.platform = "win32"
        import childproc
        try:
            childproc.build(childproc.Spec("cmd.exe", ["cmd"]))
        except NotImplementedError as e:
            print(json.dumps(str(e)))
        """
    )
    assert result.startswith("childproc.build is not implemented on Windows")
