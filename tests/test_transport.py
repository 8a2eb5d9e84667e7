"""The link's FdTransport against real pipes and sockets: closed while in use; telling
when the peer is gone without writing. Filling a process's closed standard fds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing

from link import FdTransport


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


async def _still_waiting(transport: FdTransport, prove_alive: Callable[[], object]) -> bool:
    """Whether ``wait_peer_gone`` is still waiting after ``prove_alive`` ran and the
    event loop went idle: its epoll set was polled and reported nothing."""
    done = trio.Event()

    async def watch() -> None:
        await transport.wait_peer_gone()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.testing.wait_all_tasks_blocked()
        prove_alive()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return not done.is_set()


async def test_wait_peer_gone_returns_when_the_reader_of_our_pipe_is_gone() -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    transport = FdTransport(in_r, out_w)
    try:
        with trio.fail_after(10):
            # A reader that is there, and room or not, is no reason to return.
            assert await _still_waiting(transport, lambda: os.write(out_w, b"x" * 100))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transport.wait_peer_gone)
                await trio.testing.wait_all_tasks_blocked()
                os.close(out_r)
    finally:
        await transport.aclose()
        os.close(in_w)


async def test_wait_peer_gone_tells_a_hang_up_from_a_half_close() -> None:
    ours, theirs = socket.socketpair()
    fd = ours.detach()
    transport = FdTransport(fd, os.dup(fd))
    try:
        with trio.fail_after(10):
            # The peer's half-close (it will send no more) leaves it able to receive.
            assert await _still_waiting(transport, lambda: theirs.shutdown(socket.SHUT_WR))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transport.wait_peer_gone)
                await trio.testing.wait_all_tasks_blocked()
                theirs.close()
    finally:
        await transport.aclose()
        theirs.close()


async def test_wait_peer_gone_waits_for_ever_on_a_regular_file(tmp_path: Path) -> None:
    # A file cannot be polled, nor can it go away: the wait ends only by cancellation.
    with (tmp_path / "out").open("wb") as out:
        in_r, in_w = os.pipe()
        transport = FdTransport(in_r, os.dup(out.fileno()))
        try:
            with trio.fail_after(10):
                assert await _still_waiting(transport, lambda: None)
        finally:
            await transport.aclose()
            os.close(in_w)


def test_fill_standard_fds_opens_dev_null_on_closed_ones() -> None:
    script = (
        "import os, link\n"
        "print(link.fill_standard_fds(), os.path.samestat(os.fstat(0), os.stat(os.devnull)),"
        " os.path.samestat(os.fstat(2), os.stat(os.devnull)), flush=True)\n"
    )
    # The shell closes stdin and stderr, then runs python in its place.
    done = subprocess.run(
        ["sh", "-c", 'exec 0<&- 2>&- "$@"', "sh", sys.executable, "-c", script],
        stdout=subprocess.PIPE, timeout=30, check=True,
    )
    assert done.stdout == b"[0, 2] True True\n"
