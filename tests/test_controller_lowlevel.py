"""The library's lower-level API, what a program like mproxy-exec builds on:
``Agent.start_process_soon`` and ``RemoteProcess.wait_started`` (send the exec, learn
the start or the spawn failure and its 127/126 status), ``receive_buffered`` (the
output written before the exit, taken without waiting for EOF) and ``collapse_group``
(a nursery's group of AgentLost as one); and that mproxy-exec needs nothing else."""

from __future__ import annotations

import ast
import errno
import os
import signal
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import GRACE_ARGS, ROOT, wait_until

import controller

# ---------------------------------------------------------------- start_process_soon


async def test_start_process_soon_returns_before_the_start(any_agent: controller.Agent
                                                           ) -> None:
    with trio.fail_after(10):
        process = any_agent.start_process_soon(["cat"])
        async with process:
            # No checkpoint since the exec was queued: the agent cannot have answered.
            with pytest.raises(RuntimeError, match="has not started yet"):
                _ = process.pid
            assert process.uid is None
            await process.wait_started()
            assert process.pid > 0 and process.uid == os.geteuid()
            await process.wait_started()  # started already: returns at once
            await process.stdin.send_all(b"ping")
            assert await process.stdout.receive_some() == b"ping"
            await process.stdin.aclose()
            assert await process.wait() == 0


@pytest.mark.parametrize("case", ["no program", "no cwd", "not executable"])
async def test_wait_started_raises_the_spawn_failure_and_wait_gives_its_status(
    any_agent: controller.Agent, tmp_path: Path, case: str
) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    program, cwd, error, status = {
        "no program": ("no-such-program-x", None, FileNotFoundError, 127),
        "no cwd": ("true", str(tmp_path / "missing"), FileNotFoundError, 126),
        "not executable": (str(script), None, PermissionError, 126),
    }[case]
    with trio.fail_after(10):
        async with any_agent.start_process_soon([program], cwd=cwd) as process:
            with pytest.raises(error) as raised:
                await process.wait_started()
            assert raised.value.filename == program
            assert process.spawn_error is raised.value
            with pytest.raises(error):  # each call raises it
                await process.wait_started()
            # The exit status follows the failure, as a shell reports it.
            assert await process.wait() == status
            assert process.exit_code == status


async def test_start_process_soon_with_stdin_eof(any_agent: controller.Agent) -> None:
    with trio.fail_after(10):
        async with any_agent.start_process_soon(["cat"], stdin_eof=True) as process:
            with pytest.raises(trio.ClosedResourceError):
                await process.stdin.send_all(b"late")
            assert await process.stdout.receive_some() == b""  # cat read EOF at once
            assert await process.wait() == 0


async def test_start_process_soon_refuses_bad_arguments_before_taking_an_id(
    any_agent: controller.Agent
) -> None:
    with trio.fail_after(10):
        with pytest.raises(ValueError, match="argv must not be empty"):
            any_agent.start_process_soon([])
        with pytest.raises(TypeError, match="extra_fds"):
            any_agent.start_process_soon(["true"], extra_fds=["3"])  # type: ignore[list-item]
        with pytest.raises(OSError) as raised:
            any_agent.start_process_soon(["true", "x" * (any_agent.info.max_frame + 1)])
        assert raised.value.errno == errno.E2BIG
        assert not any_agent.processes
        async with any_agent.start_process_soon(["true"]) as process:
            assert process.id == 1
            assert await process.wait() == 0


async def test_start_process_soon_after_the_block_raises_agent_closed() -> None:
    with trio.fail_after(15):
        async with controller.open_agent(agent_args=GRACE_ARGS) as agent:
            pass
        with pytest.raises(controller.AgentClosed):
            agent.start_process_soon(["true"])



async def test_aclose_after_the_block_was_left_by_an_exception_does_nothing() -> None:
    # trio's rule for resources: closing one that is closed already is a no-op. The
    # block's exception closed the agent; a later aclose() (a cleanup that runs after
    # any exit) must not turn that into AgentLost.
    with trio.fail_after(15):
        with pytest.raises(KeyError):
            async with controller.open_agent(agent_args=GRACE_ARGS) as agent:
                raise KeyError("the caller's own error")
        await agent.aclose()
        with pytest.raises(controller.AgentClosed):
            agent.start_process_soon(["true"])

# ---------------------------------------------------------------- receive_buffered


async def test_receive_buffered_takes_the_output_before_the_exit_without_eof(
    any_agent: controller.Agent
) -> None:
    # A background process keeps stdout and stderr open: no EOF comes after the exit,
    # but everything written before it has arrived once wait() returns.
    script = "printf out; printf err >&2; sleep 30 & exit 3"
    with trio.fail_after(10):
        async with await any_agent.open_process(["sh", "-c", script]) as process:
            assert await process.wait() == 3
            assert process.stdout.receive_buffered() == b"out"
            assert process.stderr.receive_buffered() == b"err"
            assert process.stdout.receive_buffered() == b""  # taken: nothing more


async def test_receive_buffered_of_an_extra_fd(any_agent: controller.Agent) -> None:
    with trio.fail_after(10):
        async with await any_agent.open_process(
                ["sh", "-c", "printf three >&3; sleep 30 & exit 0"], extra_fds=[3]) as process:
            assert await process.wait() == 0
            assert process.fds[3].receive_buffered() == b"three"


async def test_receive_buffered_grants_credit() -> None:
    # 16 windows of output: the child finishes only if taking the buffered bytes gives
    # the agent credit to send more.
    window = 1 << 16
    size = 16 * window
    with trio.fail_after(20):
        async with controller.open_agent(window=window, agent_args=GRACE_ARGS) as agent:
            process = await agent.open_process(["head", "-c", str(size), "/dev/zero"])
            received = 0

            def all_received() -> bool:
                nonlocal received
                received += len(process.stdout.receive_buffered())
                return received >= size

            async with process:
                await wait_until(all_received, what=f"{size} bytes of output")
                assert received == size
                assert await process.wait() == 0
                assert await process.stdout.receive_some() == b""


async def test_receive_buffered_of_a_closed_or_busy_stream_raises(
    any_agent: controller.Agent
) -> None:
    with trio.fail_after(10):
        async with await any_agent.open_process(["cat"]) as process:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(process.stdout.receive_some)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    process.stdout.receive_buffered()
                nursery.cancel_scope.cancel()
            await process.stdout.aclose()
            with pytest.raises(trio.ClosedResourceError):
                process.stdout.receive_buffered()


# ---------------------------------------------------------------- collapse_group


def test_collapse_group_gives_the_only_exception_however_nested() -> None:
    only = ValueError("only")
    group = BaseExceptionGroup("outer", [ExceptionGroup("inner", [only])])
    assert controller.collapse_group(group) is only


def test_collapse_group_keeps_a_group_of_different_failures() -> None:
    group = ExceptionGroup("two", [controller.AgentLost("lost"), ValueError("bug")])
    assert controller.collapse_group(group) is group


async def test_collapse_group_turns_the_agents_loss_in_every_task_into_one() -> None:
    with trio.fail_after(15), pytest.raises(controller.AgentLost):
        async with controller.open_agent(agent_args=GRACE_ARGS) as agent:
            processes = [await agent.open_process(["cat"]) for _ in range(3)]
            with pytest.raises(BaseExceptionGroup) as raised:
                async with trio.open_nursery() as nursery:
                    for process in processes:
                        nursery.start_soon(process.stdout.receive_some)
                    await trio.testing.wait_all_tasks_blocked()
                    assert agent.agent_pid is not None
                    os.kill(agent.agent_pid, signal.SIGKILL)
            assert len(raised.value.exceptions) == 3
            single = controller.collapse_group(raised.value)
            assert isinstance(single, controller.AgentLost)
            assert single is raised.value.exceptions[0]


# ---------------------------------------------------------------- mproxy-exec


def _private_uses(tree: ast.AST) -> list[str]:
    """Every use of another module's or object's private name (``_x``; not ``self._x``,
    not dunders) in ``tree``: imports, attributes, getattr with a constant name."""
    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            names = [alias.name for alias in node.names]
            if any(map(private, parts)) or any(map(private, names)):
                found.append(f"line {node.lineno}: from {'.' * node.level}{node.module} "
                             f"import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {alias.name}" for alias in node.names
                      if any(map(private, alias.name.split(".")))]
        elif isinstance(node, ast.Attribute) and private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and private(node.args[1].value)):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_mproxy_exec_uses_only_the_public_api() -> None:
    tree = ast.parse((ROOT / "controller" / "_cli.py").read_text())
    assert _private_uses(tree) == []
