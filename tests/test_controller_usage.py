"""The controller library used as a new user would: wrong arguments, calls after the
agent's block, processes left running at its end, a pytest-trio fixture around it."""

from __future__ import annotations

import errno
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import GRACE_ARGS, dead

import agent
import controller

Opener = Callable[..., AbstractAsyncContextManager[controller.Agent]]


def open_local(**kwargs: Any) -> AbstractAsyncContextManager[controller.Agent]:
    return controller.open_agent(agent_args=GRACE_ARGS, **kwargs)


@asynccontextmanager
async def open_inproc(**kwargs: Any) -> AsyncIterator[controller.Agent]:
    """An agent served in this process over memory streams, reached with connect()."""
    agent_side, controller_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.serve, agent.StreamTransport(agent_side, agent_side))
        async with controller.connect(controller_side, **kwargs) as connected:
            yield connected


openers = pytest.mark.parametrize("open_", [open_local, open_inproc], ids=["local", "inproc"])


# ---------------------------------------------------------------- leaving the block


@openers
async def test_processes_left_running_are_killed_after_shutdown_timeout(open_: Opener) -> None:
    # Leaving normally closes stdin (cat ends by itself) and gives the rest
    # shutdown_timeout; a sleep 4 must not keep the block for 4 s.
    with trio.fail_after(3):
        async with open_(shutdown_timeout=1) as conn:
            sleeper = await conn.open_process(["sleep", "4"])
            deaf = await conn.open_process(["sh", "-c", "trap '' TERM HUP; exec sleep 4"])
            reader = await conn.open_process(["cat"])
    assert (sleeper.returncode, deaf.returncode, reader.returncode) == (-9, -9, 0)
    assert dead(sleeper.pid) and dead(deaf.pid)


async def test_processes_that_end_in_time_are_not_killed() -> None:
    with trio.fail_after(10):
        async with open_local(shutdown_timeout=5) as conn:
            proc = await conn.open_process(["sh", "-c", "read x; sleep 0.2; exit 3"])
    assert proc.returncode == 3


async def test_a_pytest_trio_fixture_ends_after_a_failed_test_left_a_process(
    tmp_path: Path,
) -> None:
    # The teardown of `async with open_agent() as a: yield a` is a normal exit of the
    # block, also after a failed test: a sleep 31337 left running hung the whole run.
    pid_file = tmp_path / "pid"
    (tmp_path / "test_user.py").write_text(textwrap.dedent(f"""\
        import pytest
        import controller

        @pytest.fixture
        async def agent():
            async with controller.open_agent(shutdown_timeout=1) as a:
                yield a

        async def test_that_fails(agent):
            proc = await agent.open_process(["sleep", "31337"])
            open({str(pid_file)!r}, "w").write(str(proc.pid))
            assert False, "the test failed"
    """))
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "-o", "trio_mode=true", "test_user.py"],
            cwd=tmp_path, capture_stdout=True, capture_stderr=True, check=False,
        )
    output = done.stdout.decode()
    assert done.returncode == 1, output + done.stderr.decode()
    assert "1 failed" in output and "the test failed" in output, output
    assert dead(int(pid_file.read_text()))


# ---------------------------------------------------------------- after the block


def after_block_calls(conn: controller.Agent) -> dict[str, Callable[[], Any]]:
    return {
        "ping": conn.ping,
        "configure_env": lambda: conn.configure_env(keep=["PATH"]),
        "open_process": lambda: conn.open_process(["true"]),
        "run_process": lambda: conn.run_process(["true"]),
    }


async def assert_each_call_raises(conn: controller.Agent,
                                  expected: type[controller.AgentError]) -> None:
    for name, call in after_block_calls(conn).items():
        with trio.fail_after(2), pytest.raises(expected) as info:
            await call()
        assert isinstance(info.value, trio.ClosedResourceError) == (
            expected is controller.AgentClosed), name


@openers
async def test_every_call_after_the_block_raises_agent_closed(open_: Opener) -> None:
    async with open_() as conn:
        await conn.run_process(["true"])
    with pytest.raises(controller.AgentClosed, match="open a new agent"):
        await conn.ping()
    await assert_each_call_raises(conn, controller.AgentClosed)


async def test_calls_after_a_block_left_by_an_exception_raise_agent_closed() -> None:
    with pytest.raises(KeyError):
        async with open_local() as conn:
            raise KeyError("boom")
    await assert_each_call_raises(conn, controller.AgentClosed)


async def test_calls_after_aclose_raise_agent_closed() -> None:
    async with open_local() as conn:
        await conn.aclose()
        await assert_each_call_raises(conn, controller.AgentClosed)


async def test_calls_after_the_agent_was_lost_still_raise_agent_lost() -> None:
    with trio.fail_after(30), pytest.raises(controller.AgentLost):
        async with open_local(stderr=subprocess.DEVNULL) as conn:
            assert conn.agent_pid is not None
            os.kill(conn.agent_pid, signal.SIGKILL)
            with pytest.raises(controller.AgentLost):
                await conn.ping()
    await assert_each_call_raises(conn, controller.AgentLost)


# ---------------------------------------------------------------- run_process stdin


async def test_run_process_stdin_takes_bytes_likes_and_devnull(
    local_agent: controller.Agent,
) -> None:
    with trio.fail_after(10):
        for given in (b"bytes", bytearray(b"bytearray"), memoryview(b"memoryview")):
            done = await local_agent.run_process(["cat"], stdin=given, capture_stdout=True)
            assert done.stdout == bytes(given)
        done = await local_agent.run_process(["cat"], stdin=subprocess.DEVNULL,
                                             capture_stdout=True)
        assert done.stdout == b""


@pytest.mark.parametrize("stdin", [9, "text", None, True, subprocess.PIPE, sys.stdin],
                         ids=["int", "str", "None", "bool", "PIPE", "file"])
async def test_run_process_refuses_other_stdin(local_agent: controller.Agent,
                                               stdin: Any) -> None:
    with pytest.raises(TypeError, match=r"^stdin must be bytes.*DEVNULL.*cannot be handed"):
        await local_agent.run_process(["cat"], stdin=stdin)
    assert not local_agent.processes


# ---------------------------------------------------------------- argument errors


BAD_ARGUMENTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"argv": []}, ValueError, "argv must not be empty"),
    ({"argv": ["echo", "a\0b"]}, ValueError, r"argv\[1\] contains a NUL byte"),
    ({"argv": ["echo", 3]}, TypeError, r"argv\[1\] must be str, bytes or os.PathLike"),
    ({"argv": "echo hi"}, TypeError, "argv must be a sequence.*single string"),
    ({"path": ""}, ValueError, "path must not be empty"),
    ({"cwd": ""}, ValueError, "cwd must not be empty"),
    ({"cwd": "/tmp\0"}, ValueError, "cwd contains a NUL byte"),
    ({"env": {"A=B": "c"}}, ValueError, "env: variable name 'A=B' contains '='"),
    ({"env": {"": "c"}}, ValueError, "env: a variable name must not be empty"),
    ({"env": {"A\0": "c"}}, ValueError, r"env: variable name 'A\\x00' contains a NUL byte"),
    ({"env": {"A": "c\0"}}, ValueError, "env: the value of 'A' contains a NUL byte"),
    ({"env": {"A": 1}}, TypeError, "env: the value of 'A' must be str, bytes"),
    ({"env": [("A", "b")]}, TypeError, "env must be a mapping"),
    ({"env_overrides": {b"X=Y": b"z"}}, ValueError, "env_overrides: variable name b'X=Y' "
                                                     "contains '='"),
    ({"env_remove": ["A=B"]}, ValueError, "env_remove: variable name 'A=B' contains '='"),
    ({"env_remove": [""]}, ValueError, "env_remove: a variable name must not be empty"),
    ({"env_remove": "PATH"}, TypeError, "env_remove must be a sequence.*single string"),
    ({"extra_fds": [1]}, ValueError, r"extra_fds: 1 is a standard stream \(extra fds are >= 3\)"),
    ({"extra_fds": [-1]}, ValueError,
     r"extra_fds: -1 is not a valid fd number \(extra fds are >= 3\)"),
    ({"extra_fds": [2**31]}, ValueError, "extra_fds: 2147483648 is not a valid fd number"),
    ({"extra_fds": ["3"]}, TypeError, r"extra_fds: '3' is not an fd number \(an int\)"),
    ({"extra_fds": [3, 3]}, ValueError, "extra_fds: 3 appears twice"),
    ({"drop_sudo_credentials": "yes"}, TypeError, "drop_sudo_credentials must be a bool"),
]


@pytest.mark.parametrize(("arguments", "error", "message"), BAD_ARGUMENTS,
                         ids=[repr(a)[:40] for a, _, _ in BAD_ARGUMENTS])
async def test_argument_errors_name_the_argument_before_anything_is_sent(
    local_agent: controller.Agent, arguments: dict[str, Any], error: type[Exception],
    message: str,
) -> None:
    with trio.fail_after(10):
        first = await local_agent.open_process(["true"])
        await first.aclose()
        call = {"argv": ["true"], **arguments}
        for method in ("open_process", "run_process"):
            if method == "run_process" and "extra_fds" in call:
                continue  # run_process has no extra fds
            with pytest.raises(error, match=f"^{message}"):
                await getattr(local_agent, method)(**call)
            assert not local_agent.processes
        # Nothing was sent and no id was taken: the next process gets the next id.
        after = await local_agent.open_process(["true"])
        assert after.id == first.id + 1
        assert await after.wait() == 0
        await after.aclose()


async def test_arguments_beyond_the_frame_limit_are_e2big(local_agent: controller.Agent
                                                          ) -> None:
    with trio.fail_after(10), pytest.raises(OSError, match="frame limit") as info:
        await local_agent.run_process(["true", "x" * (5 << 20)])
    assert info.value.errno == errno.E2BIG
    assert (await local_agent.run_process(["true"])).returncode == 0


async def test_mproxy_exec_arguments_beyond_the_frame_limit_exit_126() -> None:
    # An agent announcing the smallest frame limit the protocol allows (64 KiB): the
    # arguments fit our own exec but not one exec frame. As a shell does for E2BIG.
    small_agent = shlex.join([
        sys.executable, "-c",
        "import trio, agent\n"
        "trio.run(lambda: agent.serve(agent.FdTransport(0, 1), max_frame=65536))",
    ])
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "controller", "--agent", small_agent, "--",
             "true", "x" * 40_000, "y" * 40_000],
            stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False,
        )
    assert done.returncode == 126, done.stderr
    assert done.stderr.startswith(b"mproxy-exec: true: argv and env too long for the agent")
    assert b"Traceback" not in done.stderr
