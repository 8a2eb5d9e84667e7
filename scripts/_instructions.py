"""scripts/bench --instructions: the agent's instructions per operation, under callgrind.

Timings on a shared machine move by ±30 % between runs; instruction counts do not (the
same code, inputs and environment give the same count whatever else the machine does).
Each workload drives ``python -m agent`` under ``valgrind --tool=callgrind`` from a plain
blocking controller (no trio on this side) twice, with a small and a larger number of
operations, and reports the slope: start-up and teardown cancel out. Only the agent's
own user-space instructions are counted (not the children's, not the kernel's).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from protocol import (
    NEED_DATA,
    Close,
    Closed,
    Connection,
    Data,
    Eof,
    Exec,
    Exit,
    Frame,
    Role,
    Started,
    Window,
)

__all__ = ["Count", "instruction_counts"]

_ROOT = Path(__file__).resolve().parent.parent
_MiB = 1 << 20


@dataclass(frozen=True)
class Count:
    name: str
    per: str
    instructions: int  # per operation


class _RawAgent:
    """An agent under callgrind, driven with blocking reads and writes."""

    def __init__(self, out: Path) -> None:
        self.conn = Connection(Role.CONTROLLER, window=4 * _MiB)
        self.process = subprocess.Popen(
            # %p: the agent's guardian (a fork, still under callgrind) dumps its own.
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p",
             "--dump-instr=no", sys.executable, "-m", "agent"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=_ROOT, env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict orders
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._w = self.process.stdin.fileno()
        self._r = self.process.stdout.fileno()
        self.send_raw(self.conn.initiate())
        self._frames = self._read_frames()
        next(self._frames)  # the agent's hello

    def _read_frames(self) -> Iterator[Frame]:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                data = os.read(self._r, _MiB)
                if not data:
                    raise RuntimeError("the agent under callgrind ended early")
                self.conn.receive_data(data)
                continue
            assert isinstance(event, Frame)
            yield event

    def send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._w, view):]

    def until(self, done: Callable[[Frame], bool]) -> None:
        for frame in self._frames:
            if done(frame):
                return

    def finish(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()  # the agent sees EOF and ends
        self.process.wait(timeout=120)


def _echo(agent: _RawAgent, count: int) -> None:
    conn = agent.conn
    agent.send_raw(conn.send(Exec(id=1, argv=(b"cat",))))
    agent.until(lambda f: isinstance(f, Started))
    payload = b"x" * 64
    for _ in range(count):
        agent.send_raw(conn.send_data(1, 0, payload) + payload)
        got = 0

        def echoed(frame: Frame) -> bool:
            nonlocal got
            if isinstance(frame, Data):
                got += len(frame.data)
            return got >= len(payload)

        agent.until(echoed)


def _exec(agent: _RawAgent, count: int) -> None:
    conn = agent.conn
    for id in range(1, count + 1):
        agent.send_raw(conn.send(Exec(id=id, argv=(b"/bin/true",))) + conn.send(Eof(id, 0)))
        agent.until(lambda f: isinstance(f, Exit))
        agent.send_raw(conn.send(Close(id)))
        agent.until(lambda f: isinstance(f, Closed))


def _stdout(agent: _RawAgent, mib: int) -> None:
    conn = agent.conn
    agent.send_raw(conn.send(Exec(id=1, argv=(b"head", b"-c", str(mib * _MiB).encode(),
                                              b"/dev/zero"))))
    unacknowledged = 0

    def read(frame: Frame) -> bool:
        nonlocal unacknowledged
        if isinstance(frame, Data):
            unacknowledged += len(frame.data)
            if unacknowledged >= 2 * _MiB:
                agent.send_raw(conn.send(Window(1, 1, unacknowledged)))
                unacknowledged = 0
        return isinstance(frame, Eof) and frame.ch == 1

    agent.until(read)


_WORKLOADS: dict[str, tuple[str, Callable[[_RawAgent, int], None], int, int]] = {
    # name: (per, workload, small count, large count)
    "64 B echo through cat": ("echo", _echo, 100, 600),
    "exec /bin/true, eof, close": ("exec", _exec, 20, 120),
    "stdout of head -c": ("MiB", _stdout, 64, 320),
}


def _total(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def instruction_counts(quick: bool) -> list[Count]:
    """Instructions per operation of each workload. With ``quick``, only the echo, with
    10 and 50 echoes (each run under callgrind starts Python and trio at ~1/50 speed,
    which is most of the time; the slope is still within ~1 % of the full count)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("scripts/bench --instructions needs valgrind "
                         "(Debian: apt-get install valgrind)")
    workloads = list(_WORKLOADS.items())
    if quick:
        name, (per, workload, _, _) = workloads[0]
        workloads = [(name, (per, workload, 10, 50))]
    counts = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (per, workload, small, large) in workloads:
            totals = []
            for n in (small, large):
                out = Path(tmp) / f"{per}-{n}.out"
                agent = _RawAgent(out)
                workload(agent, n)
                agent.finish()
                totals.append(_total(out.with_name(f"{out.name}.{agent.process.pid}")))
            counts.append(Count(name, per, (totals[1] - totals[0]) // (large - small)))
    return counts
