"""scripts/bench: mproxy-agent's figures beside their baselines, interleaved.

Each figure runs baseline and agent alternately for ``--rounds`` rounds (default 3);
it reports the median with min-max of each, and the median of the per-round ratios,
so a noisy neighbour slows both sides of a pair rather than skewing the ratio.
``--instructions`` counts the agent's instructions per operation instead (callgrind):
no baseline, but the same figure on every run, for comparing two versions of the code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio

import controller

MiB = 1 << 20


@dataclass
class Figure:
    name: str
    unit: str
    baseline_name: str
    target: str
    higher_is_better: bool = True
    baseline: list[float] = field(default_factory=list)
    agent: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        pairs = zip(self.agent, self.baseline, strict=False)
        return [a / b for a, b in pairs if b] if self.baseline else []

    def summary(self) -> dict[str, object]:
        out = asdict(self)
        for side in ("baseline", "agent"):
            values = getattr(self, side)
            out[side] = {
                "median": statistics.median(values) if values else None,
                "min": min(values) if values else None,
                "max": max(values) if values else None,
                "rounds": values,
            }
        out["ratio"] = statistics.median(self.ratios) if self.ratios else None
        return out


# ---------------------------------------------------------------------- helpers

def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def _read_all(stream: trio.abc.ReceiveStream) -> int:
    total = 0
    while chunk := await stream.receive_some():
        total += len(chunk)
    return total


def _direct_stdout(size: int) -> float:
    """MB/s reading `head -c SIZE /dev/zero` straight from its pipe (default size) into
    one reused buffer: the fastest way Python reads a pipe. (``os.read`` allocates a
    fresh bytes object per read, and its speed then swings 0.6-3 GB/s with the state of
    the process's malloc heap: page faults, not reading, dominate.)"""
    start = time.perf_counter()
    proc = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = memoryview(bytearray(MiB))
    total = 0
    while count := os.readv(fd, (buffer,)):
        total += count
    proc.wait()
    assert total == size
    return size / (time.perf_counter() - start) / 1e6


async def _trio_stdout(size: int, prefix: Sequence[str] = ()) -> float:
    """MB/s reading the same child through trio's own process pipe; ``prefix`` runs it
    elsewhere (an ssh command line)."""
    start = time.perf_counter()
    argv = [*prefix, f"head -c {size} /dev/zero"] if prefix else [
        "head", "-c", str(size), "/dev/zero"]
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    total = await _read_all(proc.stdout)
    await proc.wait()
    assert total == size
    return size / (time.perf_counter() - start) / 1e6


def _direct_stdin(size: int) -> float:
    """MB/s writing SIZE bytes straight into `cat >/dev/null`'s stdin pipe."""
    block = b"\0" * MiB
    start = time.perf_counter()
    proc = subprocess.Popen(["sh", "-c", "cat >/dev/null"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    fd = proc.stdin.fileno()
    left = size
    while left:
        view = memoryview(block)[: min(left, MiB)]
        while view:
            n = os.write(fd, view)
            view = view[n:]
            left -= n
    proc.stdin.close()
    proc.wait()
    return size / (time.perf_counter() - start) / 1e6


async def _agent_stdout(agent: controller.Agent, size: int, *, reuse: bool = False) -> float:
    """MB/s reading the same child through the agent: with ``reuse``, the way the
    direct baseline reads (``receive_into`` one reused 1 MiB buffer), else the way
    trio's baseline reads (``receive_some``, fresh bytes each time)."""
    start = time.perf_counter()
    async with await agent.open_process(["head", "-c", str(size), "/dev/zero"]) as proc:
        if reuse:
            buffer = bytearray(MiB)
            total = 0
            while count := await proc.stdout.receive_into(buffer):
                total += count
        else:
            total = await _read_all(proc.stdout)
        await proc.wait()
    assert total == size, total
    return size / (time.perf_counter() - start) / 1e6


async def _agent_stdin(agent: controller.Agent, size: int) -> float:
    block = b"\0" * MiB
    start = time.perf_counter()
    async with await agent.open_process(["sh", "-c", "cat >/dev/null"]) as proc:
        left = size
        while left:
            chunk = block if left >= MiB else block[:left]
            await proc.stdin.send_all(chunk)
            left -= len(chunk)
        await proc.stdin.aclose()
        await proc.wait()
    return size / (time.perf_counter() - start) / 1e6


async def _rate(run_one: Callable[[], Awaitable[object]], count: int, width: int) -> float:
    """Execs per second running ``count`` commands, ``width`` at a time."""
    start = time.perf_counter()
    limiter = trio.Semaphore(width)

    async def one() -> None:
        async with limiter:
            await run_one()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return count / (time.perf_counter() - start)


async def _echo_times(send: Callable[[bytes], Awaitable[None]],
                      receive: Callable[[], Awaitable[bytes | bytearray]],
                      count: int) -> list[float]:
    payload = b"x" * 64
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await send(payload)
        got = b""
        while len(got) < len(payload):
            got += await receive()
        times.append(time.perf_counter() - start)
    return times


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _direct_echo(count: int) -> list[float]:
    proc = await trio.lowlevel.open_process(["cat"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    try:
        return await _echo_times(stdin.send_all, stdout.receive_some, count)
    finally:
        await stdin.aclose()
        await proc.wait()


async def _agent_echo(agent: controller.Agent, count: int) -> list[float]:
    async with await agent.open_process(["cat"]) as proc:
        times = await _echo_times(proc.stdin.send_all, proc.stdout.receive_some, count)
        await proc.stdin.aclose()
        await proc.wait()
    return times


# ---------------------------------------------------------------------- figures

async def bench(args: argparse.Namespace) -> list[Figure]:
    quick = args.quick
    size = 16 * MiB if quick else 1 << 30
    execs = 50 if quick else 1000
    echoes = 50 if quick else 2000
    scale = 50 if quick else 1000
    only = set(args.only.split(",")) if args.only else None
    figures: list[Figure] = []

    def wanted(name: str) -> bool:
        return only is None or name in only

    async with controller.open_agent() as agent:
        if wanted("stdout"):
            fig = Figure("stdout throughput", "MB/s", "direct pipe read", ">= 0.8x")
            via_trio = Figure("stdout throughput, against trio", "MB/s",
                              "trio.Process stdout", "-")
            for _ in range(args.rounds):
                fig.baseline.append(await trio.to_thread.run_sync(_direct_stdout, size))
                fig.agent.append(await _agent_stdout(agent, size, reuse=True))
                via_trio.baseline.append(await _trio_stdout(size))
                via_trio.agent.append(await _agent_stdout(agent, size))
            figures += [fig, via_trio]
        if wanted("stdin"):
            fig = Figure("stdin throughput", "MB/s", "direct pipe write", ">= 0.8x")
            for _ in range(args.rounds):
                fig.baseline.append(await trio.to_thread.run_sync(_direct_stdin, size))
                fig.agent.append(await _agent_stdin(agent, size))
            figures.append(fig)
        for width, label in ((1, "sequential"), (32, "32-way")):
            if not wanted("exec"):
                break
            fig = Figure(f"exec rate, {label}", "execs/s", "trio.run_process", ">= 0.6x")
            for _ in range(args.rounds):
                fig.baseline.append(await _rate(
                    lambda: trio.run_process(["/bin/true"]), execs, width))
                fig.agent.append(await _rate(
                    lambda: agent.run_process(["/bin/true"]), execs, width))
            figures.append(fig)
        if wanted("exec-fd"):
            fig = Figure("exec rate, extra fd [3], sequential", "execs/s",
                         "trio.run_process (no fd)", ">= 0.4x")
            for _ in range(args.rounds):
                fig.baseline.append(await _rate(
                    lambda: trio.run_process(["/bin/true"]), execs, 1))
                fig.agent.append(await _rate(lambda: _run_with_fd(agent), execs, 1))
            figures.append(fig)
        if wanted("echo"):
            p50 = Figure("echo round trip p50 (64 B via cat)", "us", "direct to cat",
                         "<= 2.5x", higher_is_better=False)
            p99 = Figure("echo round trip p99 (64 B via cat)", "us", "direct to cat", "-",
                         higher_is_better=False)
            for _ in range(args.rounds):
                direct = await _direct_echo(echoes)
                via = await _agent_echo(agent, echoes)
                p50.baseline.append(_pct(direct, 0.5) * 1e6)
                p50.agent.append(_pct(via, 0.5) * 1e6)
                p99.baseline.append(_pct(direct, 0.99) * 1e6)
                p99.agent.append(_pct(via, 0.99) * 1e6)
            figures += [p50, p99]
        if wanted("fairness"):
            fig = Figure("echo p99 while another child floods stdout", "us",
                         "echo p99 alone", "<= 10 ms", higher_is_better=False)
            for _ in range(args.rounds):
                alone = await _agent_echo(agent, echoes)
                fig.baseline.append(_pct(alone, 0.99) * 1e6)
                fig.agent.append(_pct(await _echo_during_flood(agent, echoes), 0.99) * 1e6)
            figures.append(fig)
    if wanted("scale"):
        fig = Figure(f"{scale} concurrent children: start all", "s", "-", "-",
                     higher_is_better=False)
        rss = Figure(f"{scale} concurrent children: agent peak RSS", "MiB", "-", "<= 100 MiB",
                     higher_is_better=False)
        for _ in range(args.rounds):
            seconds, peak = await _scale(scale)
            fig.agent.append(seconds)
            rss.agent.append(peak / MiB)
        figures += [fig, rss]
    if args.ssh:
        figures += await _ssh_figures(args, size)
    return figures


async def _run_with_fd(agent: controller.Agent) -> None:
    async with await agent.open_process(["/bin/true"], extra_fds=[3]) as proc:
        await proc.wait()


async def _echo_during_flood(agent: controller.Agent, count: int) -> list[float]:
    async with await agent.open_process(["cat", "/dev/zero"]) as flood:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_all, flood.stdout)
            times = await _agent_echo(agent, count)
            nursery.cancel_scope.cancel()
        flood.kill()
    return times


async def _scale(count: int) -> tuple[float, int]:
    async with controller.open_agent() as agent:
        pid = agent.agent_pid
        assert pid is not None
        start = time.perf_counter()
        procs = []

        async def start_one() -> None:
            procs.append(await agent.open_process(["cat"]))

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(start_one)
        seconds = time.perf_counter() - start
        peak = _peak_rss(pid)
        async with trio.open_nursery() as nursery:
            for proc in procs:
                nursery.start_soon(proc.aclose)
    return seconds, peak


async def _ssh_figures(args: argparse.Namespace, size: int) -> list[Figure]:
    ssh = [*shlex.split(args.ssh_command), args.ssh]
    fig = Figure("OpenSSH: stdout throughput", "MB/s", "plain ssh host 'head -c'",
                 "agent costs <= 10%")
    lat = Figure("OpenSSH: run /bin/true", "execs/s", "plain ssh host true (new session)",
                 "-")
    async with controller.open_agent([*ssh, args.ssh_agent]) as agent:
        for _ in range(args.rounds):
            fig.baseline.append(await _trio_stdout(size, ssh))
            fig.agent.append(await _agent_stdout(agent, size))
            lat.baseline.append(await _rate(lambda: trio.run_process([*ssh, "true"]), 10, 1))
            lat.agent.append(await _rate(lambda: agent.run_process(["/bin/true"]), 100, 1))
    return [fig, lat]


def _machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} cpus ({cpu}), "
            f"Python {platform.python_version()}")


def _print_table(figures: list[Figure]) -> None:
    print(f"machine: {_machine()}")
    header = f"{'figure':48} {'baseline':>22} {'agent':>22} {'ratio':>7}  target"
    print(header)
    print("-" * len(header))
    for fig in figures:
        def cell(values: list[float]) -> str:
            if not values:
                return "-"
            return f"{statistics.median(values):.4g} ({min(values):.3g}-{max(values):.3g})"
        ratio = f"{statistics.median(fig.ratios):.2f}x" if fig.ratios else "-"
        print(f"{fig.name + ' [' + fig.unit + ']':48} {cell(fig.baseline):>22} "
              f"{cell(fig.agent):>22} {ratio:>7}  {fig.target}")


def _print_instructions(args: argparse.Namespace) -> None:
    from _instructions import instruction_counts  # noqa: PLC0415 (needs valgrind)

    counts = instruction_counts(args.quick)
    if args.json:
        print(json.dumps({"machine": _machine(),
                          "instructions": [asdict(count) for count in counts]}, indent=2))
        return
    print(f"machine: {_machine()}")
    for count in counts:
        print(f"{count.name:40} {count.instructions:>12,} instructions per {count.per}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated: stdout,stdin,exec,exec-fd,echo,"
                        "fairness,scale")
    parser.add_argument("--ssh", metavar="DEST", help="also compare against OpenSSH")
    parser.add_argument("--ssh-command", default="ssh", help="ssh argv before DEST")
    parser.add_argument("--ssh-agent", default="mproxy-agent",
                        help="agent command on DEST (default: mproxy-agent)")
    parser.add_argument("--instructions", action="store_true",
                        help="instead: the agent's instructions per echo, exec and MiB of "
                        "stdout, counted by callgrind (repeatable on a noisy machine)")
    args = parser.parse_args()
    if args.instructions:
        _print_instructions(args)
        return 0
    figures = trio.run(bench, args)
    if args.json:
        print(json.dumps({"machine": _machine(), "figures": [f.summary() for f in figures]},
                         indent=2))
    else:
        _print_table(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
