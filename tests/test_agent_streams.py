"""The agent's data paths: many children at once, no head-of-line blocking, flow control
(credit and bounded memory), exact ordering of output and exit, eof byte counts."""

from __future__ import annotations

import array
import fcntl
import functools
import hashlib
import os
import sys
import termios
from pathlib import Path

import pytest
import trio
from agent_harness import Raw, RawChild, inproc, spawned
from conftest import gone, group_all, rss_bytes, stat_fields, wait_all_gone, wait_until

from protocol import DEFAULT_WINDOW, Stop

# ---------------------------------------------------------------------------- basics

async def test_eof_frames_carry_the_byte_counts_sent() -> None:
    async with inproc() as (raw, _):
        child = await raw.run(["sh", "-c", "printf abc; printf 12345 >&2"])
        assert child.output(1) == b"abc" and child.output(2) == b"12345"
        assert child.eof == {1: 3, 2: 5}
        assert child.exit is not None and child.exit.code == 0 and child.exit.sig is None

        big = await raw.run(["head", "-c", "3000000", "/dev/zero"])
        assert big.eof == {1: 3_000_000, 2: 0}
        assert big.count[1] == 3_000_000 and big.nonzero[1] == 0


async def test_stdin_of_a_child_that_stopped_reading() -> None:
    async with inproc() as (raw, _):
        child = raw.exec(["head", "-c", "5"])
        # More than the pipe holds: the writes fail with EPIPE once head is gone, and the
        # agent keeps granting credit so we are told rather than blocked.
        await raw.write(child.id, 0, b"12345" + b"x" * (4 << 20))
        error = await raw.error(child, "write-failed")
        assert (error.errno, error.ref, error.ch) == ("EPIPE", "data", 0)
        assert len(child.errors) == 1
        raw.eof(child.id)
        await raw.finished(child)
        assert child.output(1) == b"12345"
        assert child.exit is not None and child.exit.code == 0


async def test_stdin_reaches_the_child_and_eof_ends_it() -> None:
    async with inproc() as (raw, _):
        payload = os.urandom(3 << 20)  # several windows: needs credit from the agent
        child = await raw.run(["cat"], stdin=payload)
        assert child.output(1) == payload
        assert child.eof[1] == len(payload)


async def test_extra_fd_channels_carry_data_both_ways_with_half_close() -> None:
    async with inproc() as (raw, _):
        child = raw.exec(["sh", "-c", "echo out; cat <&3 >&4; echo done >&3"], fds=(3, 4))
        payload = os.urandom(3 << 20)
        await raw.write(child.id, 3, payload)
        raw.eof(child.id, 3)  # cat sees the end of fd 3 while fd 3 stays open for writing
        raw.eof(child.id, 4)
        raw.eof(child.id)
        await raw.finished(child, chans=(1, 2, 3, 4))
        assert child.output(4) == payload and child.output(3) == b"done\n"
        assert child.output(1) == b"out\n"
        assert child.eof == {1: 4, 2: 0, 3: 5, 4: len(payload)}
        assert child.exit is not None and child.exit.code == 0


# ---------------------------------------------------------------------------- stop

# A writer that ignores SIGPIPE, as every Python program does: it learns that its
# reader is gone only from EPIPE, and exits 3 then.
_WRITE_UNTIL_EPIPE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "try:\n"
    "    while True: os.write(fd, b'x' * 4096)\n"
    "except BrokenPipeError:\n"
    "    sys.exit(3)\n"
)


@pytest.mark.parametrize("ch", [1, 2, 3])
async def test_stop_makes_the_childs_writes_fail_with_epipe(ch: int) -> None:
    async with inproc() as (raw, _):
        child = raw.exec([sys.executable, "-c", _WRITE_UNTIL_EPIPE, str(ch)], fds=(3,))
        await raw.wait(lambda: child.count.get(ch, 0) > 0, what="some output")
        raw.send(Stop(child.id, ch))
        # the channel ends with its eof, which counts every byte sent (the frames that
        # were on their way when the stop arrived included)
        exit_ = await raw.finished(child, chans=(1, 2, 3))
        assert exit_.code == 3
        assert child.eof[ch] == child.count[ch]
        assert child.errors == []


async def test_stop_of_an_extra_fd_leaves_its_other_direction_working() -> None:
    # The agent's end of the socket is shut down for reading only.
    script = ("import os, sys\n"
              "try:\n"
              "    while True: os.write(3, b'x' * 4096)\n"
              "except BrokenPipeError:\n"
              "    pass\n"
              "sys.stdout.buffer.write(os.read(3, 100))\n")
    async with inproc() as (raw, _):
        child = raw.exec([sys.executable, "-c", script], fds=(3,))
        await raw.wait(lambda: child.count.get(3, 0) > 0, what="output on fd 3")
        raw.send(Stop(child.id, 3))
        await raw.write(child.id, 3, b"still heard")
        exit_ = await raw.finished(child, chans=(1, 2, 3))
        assert (exit_.code, child.output(1)) == (0, b"still heard")
        assert child.eof[3] == child.count[3]


async def test_a_stopped_channel_does_not_hold_the_exit_back() -> None:
    # No credit granted: the child's pipe is full and the exit would wait for output
    # nobody reads. The stop ends that: the writer gets EPIPE, and its exit comes. Over a
    # pipe, bulk output is spliced: a splice may be under way when the stop arrives.
    async with spawned("--grace", "2") as agent:
        raw = agent.raw
        child = raw.exec(["sh", "-c", "trap '' PIPE; cat /dev/zero; exit 9"], hold=True)
        await raw.wait(lambda: child.count.get(1, 0) >= DEFAULT_WINDOW, what="a full window")
        raw.send(Stop(child.id, 1))
        exit_ = await raw.finished(child)
        assert exit_.code == 9
        assert child.eof[1] == child.count[1] == DEFAULT_WINDOW
        assert b"Broken pipe" in child.output(2)


async def test_stop_after_the_exit_ends_a_background_writer() -> None:
    # The exit does not wait for a background process holding the pipe; a stop then
    # makes that one's writes fail too.
    async with inproc() as (raw, _):
        child = raw.exec([sys.executable, "-c",
                        "import subprocess, sys\n"
                        f"subprocess.Popen([sys.executable, '-c', {_WRITE_UNTIL_EPIPE!r}, '1'])"
                        ])
        exit_ = await raw.exited(child)
        assert exit_.code == 0
        await raw.wait(lambda: child.count.get(1, 0) > 0, what="the background output")
        raw.send(Stop(child.id, 1))
        await raw.wait(lambda: 1 in child.eof, what="the eof of stdout")
        assert child.eof[1] == child.count[1]
        raw.close(child.id)
        await raw.closed(child)


# ---------------------------------------------------------------------------- scale

@pytest.mark.slow
async def test_a_thousand_concurrent_children_each_echo_their_payload() -> None:
    count = 1000
    async with spawned("--grace", "2") as agent:
        raw = agent.raw
        children = [raw.exec(["cat"]) for _ in range(count)]
        await raw.wait(lambda: all(k.started for k in children), 60, "every child to start")
        # All 1000 are alive at once: each cat waits for its stdin.
        assert all(stat_fields(k.pid) is not None for k in children)
        payloads = {k.id: f"child {k.id} ".encode() * (k.id % 50 + 1) + os.urandom(64)
                    for k in children}
        for k in children:
            raw.write_now(k.id, 0, payloads[k.id])
            raw.eof(k.id)
        await raw.wait(lambda: all(k.exit is not None and len(k.eof) == 2 for k in children),
                       60, "every child to finish")
        for k in children:
            assert k.output(1) == payloads[k.id], k.id
            assert k.output(2) == b""
            assert k.eof == {1: len(payloads[k.id]), 2: 0}
            assert k.exit is not None and k.exit.code == 0
        for k in children:
            raw.close(k.id)
        await raw.wait(lambda: all(k.closed for k in children), 60, "every child to be closed")
        assert not raw.errors


def _output_is(child: RawChild, size: int) -> bool:
    return len(child.output(1)) == size


async def test_interactive_messages_map_no_new_memory() -> None:
    # Each small message through the agent (its stdin frame, the child's reply) must be
    # read into memory the agent already has. Reading into a fresh large buffer, as
    # os.read(fd, 256 KiB) does, maps it (glibc's mmap threshold) and faults at least
    # once per message: 2 faults per echo, which this test sees as ~1000.
    async with spawned("--grace", "2") as agent:
        raw = agent.raw
        child = raw.exec(["cat"])
        await raw.started(child)

        async def echoes(count: int) -> None:
            size = len(child.output(1))
            for _ in range(count):
                size += 64
                raw.write_now(child.id, 0, b"m" * 64)
                await raw.wait(functools.partial(_output_is, child, size), 10, "the echo")

        def minor_faults() -> int:
            fields = stat_fields(agent.pid)
            assert fields is not None
            return int(fields[7])

        await echoes(50)  # warm up: the agent's buffers are allocated once
        before = minor_faults()
        await echoes(500)
        assert minor_faults() - before < 100


# ---------------------------------------------------------------------------- head-of-line

async def test_a_child_not_reading_stdin_does_not_block_others() -> None:
    async with inproc() as (raw, _):
        stuck = raw.exec(["sleep", "60"])
        flowing = raw.exec(["cat"])
        await raw.started(stuck)
        await raw.started(flowing)
        # Fill the stuck child's whole credit: the agent must buffer it without stalling.
        credit = raw.conn.send_credit(stuck.id, 0)
        assert credit == DEFAULT_WINDOW
        raw.write_now(stuck.id, 0, b"x" * credit)
        assert raw.conn.send_credit(stuck.id, 0) == 0
        for i in range(20):
            await raw.echo(flowing, f"round trip {i}\n".encode() * 100)
        await raw.echo(flowing, os.urandom(1 << 20))
        with trio.fail_after(5):
            raw.signal(stuck.id, "TERM")
            ack = await raw.ack(stuck)
        assert ack.errno is None
        assert (await raw.exited(stuck)).sig == "TERM"
        await raw.echo(flowing, b"still flowing")
        assert not raw.errors


async def test_a_child_whose_output_is_not_consumed_does_not_block_others() -> None:
    async with inproc() as (raw, _):
        flood = raw.exec(["head", "-c", "100000000", "/dev/zero"], hold=True, keep=False)
        quiet = raw.exec(["sh", "-c", "while read line; do echo \"got $line\"; done"])
        await raw.started(flood)
        await raw.started(quiet)
        await raw.wait(lambda: flood.count.get(1, 0) == DEFAULT_WINDOW, 10,
                       "the flood to use its whole window")
        for i in range(20):
            expected = quiet.output(1) + f"got line {i}\n".encode()
            await raw.write(quiet.id, 0, f"line {i}\n".encode())
            await raw.output_is(quiet, expected)
        with trio.fail_after(5):
            raw.signal(flood.id, "KILL")
            ack = await raw.ack(flood)
        assert ack.errno is None
        # Never more than the credit: the connection would have raised otherwise.
        assert flood.count[1] == DEFAULT_WINDOW
        # The exit follows what the child wrote before it died, so it needs credit.
        assert flood.exit is None
        flood.hold = False
        raw.grant(flood.id, 1, DEFAULT_WINDOW)
        assert (await raw.finished(flood)).sig == "KILL"
        assert flood.at_exit == {1: flood.eof[1], 2: 0}
        assert not raw.errors


# ---------------------------------------------------------------------------- flow control

async def test_the_agent_sends_exactly_the_credit_granted() -> None:
    window = 1000
    async with inproc(window=window) as (raw, _):
        child = raw.exec(["head", "-c", "20000", "/dev/zero"], hold=True, keep=False)
        await raw.wait(lambda: child.count.get(1, 0) == window, 10, "the first window")
        granted = window
        for step in (1, 7, 992, 3000, 15000):
            granted += step
            raw.grant(child.id, 1, step)
            await raw.count_is(child, granted)
        # Now 20000 granted: everything, and then eof (whose n the connection checks).
        await raw.finished(child)
        assert child.eof[1] == 20000
        assert child.exit is not None and child.exit.code == 0


_F_GETPIPE_SZ = 1032  # Linux; not in Python 3.11's fcntl module


def _fionread(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return buf[0]


# 1 GiB of 1 MiB blocks, each starting with its number: cheap to generate, and any
# loss, duplication or reordering changes the digest.
_GENERATOR = (
    "import sys\n"
    "base = bytes(range(256)) * 4096\n"
    "for i in range(1024):\n"
    "    sys.stdout.buffer.write(i.to_bytes(8, 'big') + base[8:])\n"
)


def _expected_digest() -> str:
    base = bytes(range(256)) * 4096
    digest = hashlib.sha256()
    for i in range(1024):
        digest.update(i.to_bytes(8, "big") + base[8:])
    return digest.hexdigest()


@pytest.mark.slow
async def test_memory_stays_bounded_while_the_controller_reads_nothing() -> None:
    size = 1 << 30
    limit = 100 << 20
    async with spawned("--grace", "2") as agent:
        raw = agent.raw
        digest = hashlib.sha256()
        child = raw.exec(["python3", "-c", _GENERATOR], keep=False,
                       sink=lambda ch, data: digest.update(data))
        await raw.started(child)
        # Plenty of credit, so only the pipe to us can hold the agent back.
        extra = 64 << 20
        raw.hold_all = True
        raw.grant(child.id, 1, extra)
        await raw.flush()
        raw.pause_reading()

        # 1. We read nothing at all: the agent's writes fill the pipe to us, then stop.
        fd = raw.receive_stream.fileno()  # type: ignore[attr-defined]
        capacity = fcntl.fcntl(fd, _F_GETPIPE_SZ)
        # (A pipe never reports exactly its capacity: partly filled pages.)
        await wait_until(lambda: _fionread(fd) >= capacity // 2 and _blocked_writing(child.pid),
                         20, "the pipe to us to fill and the child to block")
        await _watch_rss(agent.pid, limit, 2.0)
        assert child.count[1] < DEFAULT_WINDOW + extra

        # 2. We read but grant no more credit: exactly the credit arrives, then nothing.
        raw.resume_reading()
        await raw.wait(lambda: child.count[1] == DEFAULT_WINDOW + extra, 20, "all credit")
        await wait_until(lambda: _blocked_writing(child.pid), 20, "the child to block")
        await _watch_rss(agent.pid, limit, 2.0)
        assert child.count[1] == DEFAULT_WINDOW + extra

        # 3. Read everything.
        raw.hold_all = False
        raw.grant(child.id, 1, DEFAULT_WINDOW)
        await raw.finished(child, timeout=100)
        assert child.eof[1] == size and child.count[1] == size
        assert digest.hexdigest() == _expected_digest()
        assert child.exit is not None and child.exit.code == 0
        assert rss_bytes(agent.pid) < limit


def _blocked_writing(pid: int) -> bool:
    fields = stat_fields(pid)
    if fields is None or fields[0] != "S":
        return False
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "pipe" in f.read()
    except OSError:
        return False


async def _watch_rss(pid: int, limit: int, seconds: float) -> None:
    """Sample the agent's RSS for a while: every sample must stay below ``limit``."""
    peak = 0
    with trio.move_on_after(seconds):
        while True:
            peak = max(peak, rss_bytes(pid))
            assert peak < limit, f"agent RSS {peak >> 20} MiB"
            await trio.sleep(0.05)


# ---------------------------------------------------------------------------- exit ordering

@pytest.mark.parametrize("window", [DEFAULT_WINDOW, 65536])
async def test_every_byte_arrives_before_exit(window: int) -> None:
    reps = 200 if window == DEFAULT_WINDOW else 50
    script = ("head -c 300000 /dev/zero; printf tail; "
              "head -c 300000 /dev/zero >&2; printf tail >&2")
    async with inproc(window=window) as (raw, _):
        done = 0
        async with trio.open_nursery() as nursery:
            limiter = trio.Semaphore(16)

            async def one() -> None:
                nonlocal done
                async with limiter:
                    child = raw.exec(["sh", "-c", script], keep=False)
                    raw.eof(child.id)
                    exit_frame = await raw.exited(child)
                    assert exit_frame.code == 0
                    assert child.at_exit == {1: 300004, 2: 300004}, (child.id, child.at_exit)
                    await raw.finished(child)
                    assert child.eof == {1: 300004, 2: 300004}
                    raw.close(child.id)
                    await raw.closed(child)
                    done += 1

            for _ in range(reps):
                nursery.start_soon(one)
        assert done == reps


async def test_the_tail_is_exact_before_exit() -> None:
    async with inproc() as (raw, _):
        for _ in range(20):
            child = raw.exec(["sh", "-c", "head -c 300000 /dev/zero; printf tail"])
            raw.eof(child.id)
            await raw.exited(child)
            assert child.at_exit is not None and child.at_exit.get(1) == 300004
            assert child.output(1)[-4:] == b"tail"
            assert child.nonzero[1] == 4
            raw.close(child.id)
            await raw.closed(child)


_LAGGING_WRITER = """
import os, sys, time
out = sys.stdout.buffer
out.write(b"a" * {first}); out.flush()
open({wrote!r}, "w").close()
deadline = time.monotonic() + 30
while not os.path.exists({go!r}):
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.005)
out.write(b"b" * {second}); out.flush()
"""


async def test_spliced_output_is_all_out_before_exit_while_the_controller_lags(
        tmp_path: Path) -> None:
    # The real agent splices bulk output into its stdout. With the controller reading
    # slowly, that pipe is full and a splice is under way, part of it moved, when the
    # child writes more and exits: all of it must still come before the exit frame.
    # (The drain before exit counted the whole splice as still in the child's pipe, so
    # it missed as many bytes behind it as the splice had moved.)
    first, second = (7 << 20) // 4, 128 << 10
    wrote, go = tmp_path / "wrote", tmp_path / "go"
    script = _LAGGING_WRITER.format(first=first, second=second, wrote=str(wrote), go=str(go))
    async with spawned("--grace", "2", window=16 << 20) as agent:  # pipes limit, not credit
        raw = agent.raw
        child = raw.exec([sys.executable, "-c", script], keep=False)
        raw.eof(child.id)
        await raw.started(child)
        raw.pause_reading()
        await wait_until(wrote.exists, what="the child's first part to be written")
        raw.allow_reading(256 << 10)  # room for part of a splice
        await raw.wait(lambda: raw.budget_read, 10, "256 KiB to be read")
        go.touch()

        def ended() -> bool:
            fields = stat_fields(child.pid)
            return fields is None or fields[0] == "Z"

        await wait_until(ended, what="the child to exit")
        raw.resume_reading()
        exit_frame = await raw.exited(child)
        assert exit_frame.code == 0
        assert child.at_exit == {1: first + second, 2: 0}


async def _holder(raw: Raw, script: str) -> RawChild:
    child = raw.exec(["sh", "-c", script])
    with trio.fail_after(10):
        await raw.exited(child)
    return child


async def test_background_holder_does_not_delay_exit() -> None:
    async with spawned("--grace", "2") as agent:
        raw = agent.raw
        child = await _holder(raw, "echo hi; sleep 100 &")
        assert child.at_exit == {1: 3, 2: 0} and child.output(1) == b"hi\n"
        assert child.exit is not None and child.exit.code == 0
        assert 1 not in child.eof  # sleep still holds stdout
        holders = [p for p in group_all(child.pid) if p != child.pid]
        assert len(holders) == 1
        raw.close(child.id)
        await raw.closed(child)
        await wait_all_gone([child.pid, *holders], [child.pid], 5, "the holder after close")


async def test_channels_of_a_background_holder_keep_streaming_after_exit() -> None:
    async with spawned("--grace", "2") as agent:
        raw = agent.raw
        # The background cat keeps the child's stdin and stdout; sh exits at once.
        child = await _holder(raw, "exec 3<&0; echo hi; cat <&3 3<&- &")
        assert child.at_exit == {1: 3, 2: 0}
        for i in range(5):
            await raw.echo(child, f"after exit {i}\n".encode())
        assert child.output(1) == b"hi\n" + b"".join(f"after exit {i}\n".encode()
                                                    for i in range(5))
        members = group_all(child.pid)
        assert len(members) == 2  # sh (a zombie until close) and cat
        raw.close(child.id)
        await raw.closed(child)
        await wait_all_gone(members, [child.pid], 5, "the holder after close")
        assert not raw.errors


async def test_background_holder_eof_follows_when_it_ends() -> None:
    async with spawned("--grace", "2") as agent:
        raw = agent.raw
        child = await _holder(raw, "exec 3<&0; echo hi; cat <&3 3<&- &")
        await raw.echo(child, b"last words\n")
        raw.eof(child.id)  # cat sees EOF, exits, and so the channels end
        await raw.finished(child)
        assert child.eof == {1: len(b"hi\nlast words\n"), 2: 0}
        raw.close(child.id)
        await raw.closed(child)


# ---------------------------------------------------------------------------- close

async def test_close_during_a_flood_sends_nothing_after_closed() -> None:
    async with inproc() as (raw, _):
        for _ in range(30):
            child = raw.exec(["head", "-c", "1000000000", "/dev/zero"], keep=False)
            await raw.wait(lambda: child.count[1] > (4 << 20), 10, "the flood")  # noqa: B023
            raw.close(child.id)
            # Anything about the child after closed would make our connection raise.
            await raw.closed(child)
            # The agent sends SIGKILL before any of the child's pipes can close.
            assert child.exit is not None and child.exit.sig == "KILL"
        echo = await raw.run(["echo", "after"])
        assert echo.output(1) == b"after\n"
        assert not raw.errors


async def test_close_while_the_writer_is_blocked_sends_nothing_after_closed() -> None:
    async with spawned() as agent:
        raw = agent.raw
        fd = raw.receive_stream.fileno()  # type: ignore[attr-defined]
        for _ in range(5):
            # Several floods: more data queued in the agent than one write takes.
            children = [raw.exec(["head", "-c", "1000000000", "/dev/zero"], keep=False)
                    for _ in range(4)]
            await raw.wait(lambda: all(k.count[1] > (4 << 20) for k in children),  # noqa: B023
                           10, "the floods")
            # Stop reading: the agent's writer blocks with the children's data queued.
            raw.pause_reading()
            await wait_until(lambda: _fionread(fd) > (512 << 10), 10, "the pipe to fill")
            for child in children:
                raw.close(child.id)
            await raw.flush()
            # The agent reaps a closed child just before it queues closed.
            await wait_until(lambda: all(gone(k.pid) for k in children), 10,  # noqa: B023
                             "the children to be reaped")
            raw.resume_reading()
            for child in children:
                await raw.closed(child)
                assert child.exit is not None and child.exit.sig == "KILL"
        assert not raw.errors
