"""FdTransport against real pipes: what happens when it is closed while in use."""

from __future__ import annotations

import os

import trio
import trio.testing

from agent.transport import FdTransport


async def test_a_read_woken_just_before_aclose_sees_the_close() -> None:
    # The reader waits for its pipe; a byte arrives and, in the same scheduling batch,
    # another task closes the transport. trio runs the batch in random order: when the
    # close runs first, the reader's wait is already over (readiness ended it, so
    # notify_closing does not reach it) and it must not read the closed fd (EBADF, or
    # worse, a reused fd number). 200 rounds make that order near certain to come up.
    outcomes: dict[str, int] = {}
    with trio.fail_after(30):
        for _ in range(200):
            read_fd, feed_fd = os.pipe()
            other_r, other_w = os.pipe()
            transport = FdTransport(read_fd, other_w)

            async def reader(transport: FdTransport = transport) -> None:
                try:
                    await transport.receive_into(memoryview(bytearray(16)))
                    kind = "data"
                except trio.ClosedResourceError:
                    kind = "closed"
                outcomes[kind] = outcomes.get(kind, 0) + 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                os.write(feed_fd, b"x")
                await trio.lowlevel.checkpoint()  # the poll that wakes the reader ends this round
                await transport.aclose()
            os.close(feed_fd)
            os.close(other_r)
    assert sum(outcomes.values()) == 200, outcomes
