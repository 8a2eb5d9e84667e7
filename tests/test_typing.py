"""A user's ``mypy --strict`` of correct code using the controller library is clean, run
from outside the checkout (as a user's project would be) against the installed package."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import trio

USER_PROGRAM = textwrap.dedent("""\
    import os
    import signal
    import subprocess

    import trio

    import controller


    async def main() -> None:
        env: dict[str, str] = {"GREETING": "hi", "PATH": "/usr/bin:/bin"}
        raw: dict[bytes, bytes] = {b"RAW": b"\\xff"}
        async with controller.open_agent(shutdown_timeout=5) as agent:
            done: subprocess.CompletedProcess[bytes] = await agent.run_process(
                ["sh", "-c", "echo $GREETING"], env=env, capture_stdout=True,
                stdin=subprocess.DEVNULL,
            )
            await agent.run_process(["true"], env_overrides=raw, env_remove=["HOME"])
            await agent.run_process(["env"], env=os.environ, stdin=bytearray(b"x"))
            async with await agent.open_process(["sleep", "10"], env=env) as proc:
                pid: int = proc.pid
                os.getpgid(proc.pid)
                proc.send_signal(signal.SIGUSR1)
                await proc.send_signal("TERM")
                proc.terminate()
                proc.kill()
                code: int = await proc.wait()
            soon: controller.RemoteProcess = agent.start_process_soon(["cat"], stdin_eof=True)
            async with soon:
                await soon.wait_started()
                await soon.wait()
                rest: bytes = soon.stdout.receive_buffered()
            try:
                await agent.ping()
            except controller.AgentClosed:
                pass
            except BaseExceptionGroup as group:
                single: BaseException = controller.collapse_group(group)
                raise single from None
        print(done.stdout, pid, code, rest)


    trio.run(main)
""")


async def test_a_users_mypy_strict_of_correct_code_is_clean(tmp_path: Path) -> None:
    project = tmp_path / "user-project"  # outside the checkout: no path to our sources
    project.mkdir()
    (project / "user.py").write_text(USER_PROGRAM)
    environ = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    with trio.fail_after(100):
        done = await trio.run_process(
            [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "user.py"],
            cwd=project, env=environ, capture_stdout=True, capture_stderr=True, check=False,
        )
    report = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, report
    assert "Success: no issues found in 1 source file" in report
