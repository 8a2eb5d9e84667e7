"""The README's Python example runs as printed and prints what its comments say."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_readme_python_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python\n") + len("```python\n")
    code = readme[start : readme.index("```", start)]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    assert lines[0].startswith("b'") and "Linux" in lines[0]  # uname -a
    assert lines[1:] == ["b'hello'", "-15 143", "b'via fd 3' 0"]
