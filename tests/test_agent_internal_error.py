"""A bug inside the agent (not bad input) is reported with its traceback, as a log frame and
on stderr, and the agent still ends cleanly: every child killed and reaped, exit status 1.
The bug is injected by replacing one of the agent's own methods."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from conftest import proc_stat

import agent
import agent._agent
import controller
from protocol import Config


def _boom(self: agent._agent.Agent, frame: Config) -> None:
    raise RuntimeError("boom in config handling")


async def test_internal_error_is_reported_and_everything_is_cleaned_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(agent._agent.Agent, "_on_config", _boom)
    agent_side, controller_side = trio.testing.memory_stream_pair()
    statuses: list[int] = []
    pids: list[int] = []

    async def run_agent() -> None:
        statuses.append(await agent.serve(agent.StreamTransport(agent_side, agent_side),
                                          grace=1))
        await agent_side.aclose()

    with trio.fail_after(30), caplog.at_level(logging.ERROR, logger="mproxy.agent"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_agent)
            with pytest.raises(controller.AgentLost):
                async with controller.connect(controller_side) as ctl:
                    proc = await ctl.open_process(["sh", "-c", "sleep 100 & exec sleep 100"])
                    assert proc.pid is not None
                    pids.append(proc.pid)
                    await ctl.configure_env(keep=["PATH"])
    assert statuses == [1]
    assert proc_stat(pids[0]) is None  # killed and reaped
    # The controller logged the agent's log frame, traceback attached.
    frames = [r for r in caplog.records if "boom in config handling" in
              str(getattr(r, "attrs", {}).get("traceback", ""))]
    assert frames, [r.getMessage() for r in caplog.records]
    # And the agent wrote it to its own logger (stderr in the real process).
    assert any("internal error" in r.getMessage() and "RuntimeError" in r.getMessage()
               for r in caplog.records if not hasattr(r, "attrs"))
