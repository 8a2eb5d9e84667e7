"""scripts/bench must not rot: a quick run (tiny sizes, one round) produces every figure,
and --ssh adds the OpenSSH comparison against a real sshd. No timing is asserted."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

from conftest import ROOT
from sshd import SshServer, sshd

__all__ = ["sshd"]

BENCH = [sys.executable, str(ROOT / "scripts" / "bench.py")]


def _run(*args: str) -> dict[str, object]:
    done = subprocess.run([*BENCH, "--quick", "--rounds", "1", "--json", *args],
                          capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    return result


def _medians(figure: dict[str, object], side: str) -> object:
    values = figure[side]
    assert isinstance(values, dict)
    return values["median"]


def test_quick_bench_produces_every_figure() -> None:
    result = _run()
    assert "cpus" in str(result["machine"])
    figures = result["figures"]
    assert isinstance(figures, list)
    names = [f["name"] for f in figures]
    for expected in ("stdout throughput", "stdin throughput", "exec rate, sequential",
                     "exec rate, 32-way", "exec rate, extra fd [3], sequential",
                     "echo round trip p50 (64 B via cat)",
                     "echo p99 while another child floods stdout"):
        assert expected in names
    assert any(name.endswith("agent peak RSS") for name in names)
    for figure in figures:
        agent = _medians(figure, "agent")
        assert isinstance(agent, float) and agent > 0, figure
        if figure["baseline_name"] != "-":
            ratio = figure["ratio"]
            assert isinstance(ratio, float) and ratio > 0, figure


def test_bench_compares_against_openssh(sshd: SshServer) -> None:
    *ssh_command, dest = sshd.ssh_prefix
    result = _run("--only", "stdout", "--ssh", dest, "--ssh-command", shlex.join(ssh_command),
                  "--ssh-agent", sshd.agent_path)
    figures = result["figures"]
    assert isinstance(figures, list)
    ssh_figures = [f for f in figures if str(f["name"]).startswith("OpenSSH")]
    assert len(ssh_figures) == 2
    for figure in ssh_figures:
        assert isinstance(_medians(figure, "baseline"), float)
        assert isinstance(_medians(figure, "agent"), float)


def test_instruction_counts_run() -> None:
    # The callgrind mode (scripts/test installs valgrind where it can), quick: the echo
    # only. The count is checked for sanity, not against a figure.
    done = subprocess.run([*BENCH, "--instructions", "--quick", "--json"],
                          capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    (count,) = result["instructions"]
    assert count["per"] == "echo"
    assert isinstance(count["instructions"], int) and count["instructions"] > 0
