"""childproc under load: many cycles without fd growth, many concurrent spawns from threads."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import fd_count

from childproc import Pipes, SpawnError, Spec, build, close_child_side

IS_ROOT = os.geteuid() == 0
CAT = shutil.which("cat") or "/bin/cat"
# Sparse, dense, high, and the numbers of the stray fds this process may have inherited.
LAYOUTS: list[tuple[int, ...]] = [(), (3,), (3, 4), (5,), (3, 7, 200), (10, 251), (), (4, 9)]


@pytest.fixture(autouse=True, scope="module")
def fd_headroom() -> Iterator[None]:
    """300 live children hold ~1,500 fds here: more than a 1024 soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192 and (hard == resource.RLIM_INFINITY or hard >= 8192):
        resource.setrlimit(resource.RLIMIT_NOFILE, (8192, hard))
    elif soft < 4096:
        pytest.skip("RLIMIT_NOFILE hard limit too low for 300 concurrent children")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(60)
def test_1000_cycles_without_fd_growth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_UID", "65534")
    before = fd_count()
    for i in range(1000):
        layout = LAYOUTS[i % len(LAYOUTS)]
        drop = IS_ROOT and i % 50 == 0  # the trampoline costs ~15 ms
        path = "/nonexistent" if i % 10 == 3 else "/bin/true"
        cmd, pipes = build(Spec(path, ["true"], extra_fds=layout, drop_sudo_credentials=drop))
        with pipes:
            try:
                proc = cmd.start()
            except SpawnError:
                assert path == "/nonexistent"
                continue
            finally:
                close_child_side(cmd)
            assert proc.wait() == 0
    assert fd_count() == before


def start(i: int) -> tuple[tuple[int, ...], Pipes, subprocess.Popen[bytes]]:
    layout = LAYOUTS[i % len(LAYOUTS)]
    drop = IS_ROOT and i % 10 == 0
    cmd, pipes = build(Spec(CAT, ["cat"], extra_fds=layout, drop_sudo_credentials=drop))
    try:
        proc = cmd.start()
    except BaseException:
        pipes.close()
        raise
    finally:
        close_child_side(cmd)
    return layout, pipes, proc


@pytest.mark.timeout(90)
def test_300_concurrent_spawns_from_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_UID", "65534")
    before = fd_count()
    with ThreadPoolExecutor(max_workers=6) as pool:
        children = list(pool.map(start, range(300)))
    try:
        # All 300 are alive at once; each must hold exactly its own fds, none of the
        # pipes and sockets created for its siblings by the other threads.
        for layout, pipes, proc in children:
            pipes.stdin.write(b"ping\n")
            echoed = b""
            while len(echoed) < 5 and (chunk := pipes.stdout.read(5 - len(echoed))):
                echoed += chunk
            assert echoed == b"ping\n"  # cat has been exec'd and is running
            base = f"/proc/{proc.pid}/fd"
            table = {int(n): os.readlink(f"{base}/{n}") for n in os.listdir(base)}
            assert sorted(table) == [0, 1, 2, *layout]
            for fd, parent_end in enumerate((pipes.stdin, pipes.stdout, pipes.stderr)):
                assert table[fd] == f"pipe:[{os.fstat(parent_end.fileno()).st_ino}]"
            assert all(table[n].startswith("socket:[") for n in layout)
            assert os.getpgid(proc.pid) == proc.pid
    finally:
        for _, pipes, proc in children:
            pipes.close()
            proc.wait()
    assert all(proc.returncode == 0 for _, _, proc in children)
    assert fd_count() == before
