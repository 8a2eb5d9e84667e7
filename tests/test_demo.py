"""scripts/demo.py (without the .venv bootstrap of scripts/demo) runs to its summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

SUMMARY = re.compile(rb"^demo: 9 commands through one agent, all as expected in [0-9.]+ s$")


def test_demo_runs_and_ends_with_its_summary() -> None:
    script = ROOT / "scripts" / "demo.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60,
                          cwd=ROOT, check=False)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    lines = done.stdout.splitlines()
    assert SUMMARY.match(lines[-1]), lines[-1]
    assert b"NOT AS EXPECTED" not in done.stdout
    for label in (b"[alpha] alpha line 3", b"'HELLO FROM THE CONTROLLER'", b"'via-fd3'",
                  b"0 processes left", b"exit code 143", b"FileNotFoundError"):
        assert label in done.stdout, label
    assert b"Traceback" not in done.stderr


def test_demo_launcher_is_an_executable_bash_script() -> None:
    launcher = ROOT / "scripts" / "demo"
    assert os.access(launcher, os.X_OK)
    text = launcher.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert 'source "$(dirname "${BASH_SOURCE[0]}")/_bootstrap.sh"' in text
    assert "python scripts/demo.py" in text
    assert subprocess.run(["bash", "-n", str(launcher)], timeout=10, check=False).returncode == 0
