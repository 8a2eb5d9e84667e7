"""Bulk output is spliced from the child's pipe to the controller (Linux), byte-exact and
in order with the copied frames around it."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Sequence

import pytest
import trio

import agent
import controller
from link import Buffer

pytestmark = pytest.mark.skipif(not hasattr(os, "splice"), reason="splice is Linux-only")


class _CountingTransport(agent.FdTransport):
    """The real fd transport, counting what it splices."""

    spliced = 0

    async def send_spliced(self, buffers: Sequence[Buffer], pipe_fd: int, size: int,
                           on_moved: Callable[[int], None]) -> None:
        await super().send_spliced(buffers, pipe_fd, size, on_moved)
        _CountingTransport.spliced += size


async def test_bulk_output_is_spliced_byte_exact() -> None:
    to_agent_r, to_agent_w = os.pipe()
    from_agent_r, from_agent_w = os.pipe()
    transport = _CountingTransport(to_agent_r, from_agent_w)
    # Small writes (copied) and large ones (spliced) interleaved, with a known digest.
    script = (
        "import sys, hashlib\n"
        "h = hashlib.sha256()\n"
        "for i in range(64):\n"
        "    block = bytes([i]) * (7 if i % 2 else 300_000)\n"
        "    h.update(block); sys.stdout.buffer.write(block); sys.stdout.flush()\n"
        "sys.stderr.write(h.hexdigest())\n"
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.serve, transport)
            async with controller.connect(agent.FdTransport(from_agent_r, to_agent_w)) as ctl:
                done = await ctl.run_process([sys.executable, "-c", script],
                                             capture_stdout=True, capture_stderr=True)
        await transport.aclose()
    assert hashlib.sha256(done.stdout).hexdigest() == done.stderr.decode()
    assert len(done.stdout) == 32 * 300_000 + 32 * 7
    assert _CountingTransport.spliced > 0
