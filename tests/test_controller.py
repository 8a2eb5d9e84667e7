"""The controller library against a real local agent (`python -m agent` over pipes) and
an in-process one (memory streams): processes, streams, extra fds, signals, cancellation,
spawn failures, environments, agent loss and the ways of leaving ``open_agent``."""

from __future__ import annotations

import array
import contextlib
import errno
import hashlib
import logging
import os
import random
import shlex
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trio.testing
from conftest import GRACE_ARGS, dead, group_members, proc_stat, read_all, wait_until

import agent
import controller
from protocol import (
    NEED_DATA,
    Connection,
    Eof,
    Exec,
    Exit,
    Frame,
    Ping,
    Pong,
    Role,
    Signal,
    SignalAck,
    Started,
    Window,
)

FrameT = TypeVar("FrameT", bound=Frame)


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    out = bytearray()
    while marker not in out:
        chunk = await stream.receive_some()
        assert chunk, f"EOF before {marker!r}; got {bytes(out)!r}"
        out += chunk
    return bytes(out)


def kill_group_quietly(pgid: int | None) -> None:
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


# ---------------------------------------------------------------- processes and streams


async def test_many_concurrent_processes(any_agent: controller.Agent) -> None:
    count = 40
    results: dict[int, tuple[bytes, int, int]] = {}

    async def echo_through_cat(i: int) -> None:
        payload = f"process {i}\n".encode() * (500 + i)
        async with await any_agent.open_process(["cat"]) as proc:
            assert proc.pid is not None
            async with trio.open_nursery() as nursery:

                async def feed() -> None:
                    await proc.stdin.send_all(payload)
                    await proc.stdin.aclose()

                nursery.start_soon(feed)
                out = await read_all(proc.stdout)
            results[i] = (out, await proc.wait(), proc.pid)
            assert out == payload

    async def run_one(i: int) -> None:
        done = await any_agent.run_process(
            ["sh", "-c", 'echo "run $0"; echo "err $0" >&2; exit $(($0 % 3))', str(i)],
            capture_stdout=True, capture_stderr=True, check=False,
        )
        assert (done.returncode, done.stdout, done.stderr) == (
            i % 3, f"run {i}\n".encode(), f"err {i}\n".encode())

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(echo_through_cat, i)
                nursery.start_soon(run_one, i)
    assert sorted(results) == list(range(count))
    assert all(code == 0 for _, code, _ in results.values())
    assert len({pid for _, _, pid in results.values()}) == count


async def test_large_stream_through_cat_is_byte_exact(any_agent: controller.Agent) -> None:
    size = 24 << 20  # many windows' worth: credit must keep flowing both ways
    rng = random.Random(1)
    sent, received = hashlib.sha256(), hashlib.sha256()
    total = 0
    with trio.fail_after(90):
        async with await any_agent.open_process(["cat"]) as proc:

            async def feed() -> None:
                for _ in range(size // (1 << 20)):
                    block = rng.randbytes(1 << 20)
                    sent.update(block)
                    await proc.stdin.send_all(block)
                await proc.stdin.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                while chunk := await proc.stdout.receive_some():
                    # bytes, like trio's streams, and at most 128 KiB: larger fresh
                    # blocks would cost page faults (see DEFAULT_RECEIVE_SIZE)
                    assert type(chunk) is bytes and len(chunk) <= 128 << 10
                    received.update(chunk)
                    total += len(chunk)
            assert await proc.wait() == 0
    assert total == size
    assert received.hexdigest() == sent.hexdigest()


class _ScriptedAgent:
    """The agent's side of the protocol played by the test, frame by frame: for what a
    real agent does only by chance (several data frames waiting unread)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.conn = Connection(Role.AGENT)
        self._stream = stream

    async def send(self, frame: Frame) -> None:
        await self._stream.send_all(self.conn.send(frame))

    async def receive(self, kind: type[FrameT]) -> FrameT:
        """The next frame of ``kind``; frames of other kinds are skipped."""
        while True:
            event = self.conn.next_event()
            if isinstance(event, kind):
                return event
            if event is NEED_DATA:
                self.conn.receive_data(await self._stream.receive_some())


async def test_receive_some_joins_buffered_payloads_up_to_max_bytes() -> None:
    # Every read is a checkpoint: a stream whose payloads wait in pieces must not cost a
    # read per piece. Three data frames arrive before the first read.
    agent_side, controller_side = trio.testing.memory_stream_pair()
    peer = _ScriptedAgent(agent_side)
    data_taken_in = trio.Event()

    async def play() -> None:
        exec_ = await peer.receive(Exec)
        await peer.send(Started(exec_.id, pid=4242))
        for part in (b"one", b"two", b"three"):
            await agent_side.send_all(peer.conn.send_data(exec_.id, 1, part) + part)
        await peer.send(Ping(7))
        await peer.receive(Pong)  # answered after the data frames were taken in
        data_taken_in.set()

    with trio.fail_after(10):
        await agent_side.send_all(peer.conn.initiate())  # connect() waits for it
        async with trio.open_nursery() as nursery, controller.connect(controller_side) as ag:
            nursery.start_soon(play)
            proc = await ag.open_process(["anything"])
            await data_taken_in.wait()
            assert await proc.stdout.receive_some(5) == b"onetw"
            assert await proc.stdout.receive_some(1) == b"o"
            assert await proc.stdout.receive_some() == b"three"
            nursery.cancel_scope.cancel()


async def test_receive_into_fills_the_buffer_across_payloads_and_grants_credit() -> None:
    # Pieces read into caller-owned buffers: bytes land across payload boundaries, what
    # is read is credited (a window frame once half the 128 KiB window is read), and
    # EOF reads 0.
    agent_side, controller_side = trio.testing.memory_stream_pair()
    peer = _ScriptedAgent(agent_side)
    data_taken_in = trio.Event()
    pieces = (b"one", b"two", b"three", bytes(range(256)) * 256)  # 64 KiB + 11 bytes

    async def play() -> None:
        exec_ = await peer.receive(Exec)
        await peer.send(Started(exec_.id, pid=4242))
        for part in pieces:
            await agent_side.send_all(peer.conn.send_data(exec_.id, 1, part) + part)
        await peer.send(Ping(7))
        await peer.receive(Pong)  # answered after the data frames were taken in
        data_taken_in.set()
        window = await peer.receive(Window)
        assert (window.id, window.ch) == (exec_.id, 1)
        window_granted.append(window.n)
        await peer.send(Eof(exec_.id, 1))

    window_granted: list[int] = []
    with trio.fail_after(10):
        await agent_side.send_all(peer.conn.initiate())  # connect() waits for it
        async with trio.open_nursery() as nursery, controller.connect(
                controller_side, window=1 << 17) as ag:
            nursery.start_soon(play)
            proc = await ag.open_process(["anything"])
            await data_taken_in.wait()
            buffer = bytearray(5)
            assert await proc.stdout.receive_into(buffer) == 5
            assert buffer == b"onetw"
            assert await proc.stdout.receive_into(memoryview(buffer)[2:3]) == 1
            assert buffer == b"onotw"
            words = array.array("I", bytes(8))  # any writable buffer, counted in bytes
            assert await proc.stdout.receive_into(words) == 8
            assert words.tobytes() == b"three" + bytes(range(3))
            rest = bytearray(1 << 20)
            assert await proc.stdout.receive_into(rest) == (1 << 16) - 3
            assert rest[: (1 << 16) - 3] == (bytes(range(256)) * 256)[3:]
            assert await proc.stdout.receive_into(rest) == 0  # waits for the eof
            assert await proc.stdout.receive_into(rest) == 0
            assert window_granted == [sum(map(len, pieces))]
            nursery.cancel_scope.cancel()


async def test_receive_into_refuses_buffers_it_cannot_fill(any_agent: controller.Agent) -> None:
    with trio.fail_after(10):
        async with await any_agent.open_process(["echo", "hi"]) as proc:
            with pytest.raises(TypeError, match="writable"):
                await proc.stdout.receive_into(b"read-only")
            with pytest.raises(ValueError, match="at least one byte"):
                await proc.stdout.receive_into(bytearray())
            buffer = bytearray(16)
            count = await proc.stdout.receive_into(buffer)  # nothing was lost
            assert buffer[:count] == b"hi\n"
            assert await proc.wait() == 0


async def test_unread_small_outputs_do_not_pin_receive_buffers(
    any_agent: controller.Agent,
) -> None:
    # Output waits, unread, as views of the connection's 2 MiB receive buffers. Twelve
    # children whose few bytes sit in twelve different buffers (bulk output read in
    # between moves the reading on) would pin 24 MiB; the controller copies such output
    # out once more than 8 MiB beyond twice what is buffered is pinned (checked every
    # MiB of output received, so one more buffer may be pinned meanwhile).
    with trio.fail_after(60):
        async with contextlib.AsyncExitStack() as stack:
            quiet = []
            for i in range(12):
                # The first also leaves 300 kB, read back below in 128 KiB pieces after
                # being copied out of the buffers.
                more = "head -c 300000 /dev/zero;" if i == 0 else ""
                proc = await stack.enter_async_context(await any_agent.open_process(
                    ["sh", "-c", f"echo small{i}; {more} exec sleep 60"]))
                child = proc.id
                await wait_until(lambda: any_agent.conn.bytes_received(child, 1) > 0,  # noqa: B023
                                 what=f"the output of child {i}")
                quiet.append(proc)
                bulk = await any_agent.run_process(["head", "-c", str(3 << 20), "/dev/zero"],
                                                   capture_stdout=True)
                assert bulk.stdout == bytes(3 << 20)
                assert any_agent.conn.pinned_bytes <= (8 << 20) + (3 << 20)
            for i, proc in enumerate(quiet):
                expected = f"small{i}\n".encode() + (bytes(300_000) if i == 0 else b"")
                got = b""
                while len(got) < len(expected):
                    chunk = await proc.stdout.receive_some()
                    assert type(chunk) is bytes and 0 < len(chunk) <= 128 << 10
                    got += chunk
                assert got == expected


async def test_run_process_pipes_stdin_and_captures(any_agent: controller.Agent) -> None:
    done = await any_agent.run_process(["tr", "a-z", "A-Z"], stdin=b"hello, agent\n",
                                       capture_stdout=True)
    assert done.returncode == 0
    assert done.stdout == b"HELLO, AGENT\n"
    assert done.stderr is None
    assert done.args == ["tr", "a-z", "A-Z"]


# Prints "killed" when the process whose pid is argv[1] is gone, a zombie, exiting, or has
# a SIGKILL pending: each is a state it can only be in once SIGKILL was sent.
_KILLED_CHECK = """
import sys
pid = sys.argv[1]
try:
    stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    status = open(f"/proc/{pid}/status").read()
except FileNotFoundError:
    print("killed"); sys.exit()
pending = 0
for line in status.splitlines():
    if line.startswith(("SigPnd:", "ShdPnd:")):
        pending |= int(line.split()[1], 16)
exiting = int(stat[6]) & 0x4  # PF_EXITING
killed = stat[0] in "ZX" or exiting or pending & (1 << 8)
print("killed" if killed else "alive " + stat[0])
"""


async def test_run_process_leftovers_are_killed_before_the_next_request(
    any_agent: controller.Agent,
) -> None:
    # run_process returns at the exit without waiting for the agent's closed; the close it
    # sent is handled first, so what the child left in its group is killed before the
    # next command starts.
    with trio.fail_after(20):
        done = await any_agent.run_process(
            ["sh", "-c", "sleep 100 >/dev/null 2>&1 & echo $!"], capture_stdout=True
        )
        leftover = int(done.stdout)
        try:
            check = await any_agent.run_process(
                [sys.executable, "-c", _KILLED_CHECK, str(leftover)], capture_stdout=True
            )
            assert check.stdout == b"killed\n"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)


async def test_stdin_of_a_child_that_closed_it_is_broken(any_agent: controller.Agent) -> None:
    with trio.fail_after(20):
        async with await any_agent.open_process(
            ["sh", "-c", "exec 0<&-; echo closed; exec sleep 100"]
        ) as proc:
            await read_until(proc.stdout, b"closed\n")
            with pytest.raises(trio.BrokenResourceError) as info:
                while True:  # the agent learns of EPIPE on its first write to the pipe
                    await proc.stdin.send_all(b"x" * 65536)
            assert not isinstance(info.value, controller.AgentLost)
            assert proc.returncode is None  # the child itself is fine
        assert proc.returncode == -signal.SIGKILL


# ---------------------------------------------------------------- extra fds


async def test_extra_fds_both_directions_with_half_close(any_agent: controller.Agent) -> None:
    # The child reads fd 3 to EOF, answers on fd 7 and half-closes it; then reads fd 7 to
    # EOF and answers on fd 3. Each answer needs the other side's EOF to have arrived
    # while the reverse direction stays open.
    script = (
        "import socket\n"
        "s3, s7 = socket.socket(fileno=3), socket.socket(fileno=7)\n"
        "def drain(s):\n"
        "    out = b''\n"
        "    while chunk := s.recv(65536):\n"
        "        out += chunk\n"
        "    return out\n"
        "s7.sendall(drain(s3).upper()); s7.shutdown(socket.SHUT_WR)\n"
        "s3.sendall(drain(s7)[::-1]); s3.shutdown(socket.SHUT_WR)\n"
    )
    with trio.fail_after(20):
        async with await any_agent.open_process([sys.executable, "-c", script],
                                                extra_fds=[3, 7]) as proc:
            assert sorted(proc.fds) == [3, 7]
            await proc.fds[3].send_all(b"hello fd three")
            await proc.fds[3].send_eof()
            assert await read_all(proc.fds[7]) == b"HELLO FD THREE"
            await proc.fds[7].send_all(b"seven")
            await proc.fds[7].send_eof()
            assert await read_all(proc.fds[3]) == b"neves"
            assert await proc.wait() == 0


async def test_a_channel_the_child_closed_leaves_its_other_input_working(
        any_agent: controller.Agent) -> None:
    # EPIPE on fd 3 breaks fd 3 only: the agent names the channel in write-failed.
    child = "import os, sys; os.close(3); sys.stdout.write(sys.stdin.read())"
    with trio.fail_after(30):
        async with await any_agent.open_process([sys.executable, "-c", child],
                                                extra_fds=[3]) as proc:
            with pytest.raises(trio.BrokenResourceError, match="channel 3 of child"):
                while True:
                    await proc.fds[3].send_all(b"y" * 65536)
            await proc.stdin.send_all(b"still read")
            await proc.stdin.aclose()
            assert await read_all(proc.stdout) == b"still read"
            assert await proc.wait() == 0


async def test_extra_fd_large_echo_through_shell(any_agent: controller.Agent) -> None:
    data = random.Random(3).randbytes(6 << 20)
    with trio.fail_after(60):
        async with await any_agent.open_process(["sh", "-c", "cat <&3 >&3"],
                                                extra_fds=[3]) as proc:

            async def feed() -> None:
                await proc.fds[3].send_all(data)
                await proc.fds[3].send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                echoed = await read_all(proc.fds[3])
            assert await proc.wait() == 0
    assert len(echoed) == len(data)
    assert echoed == data


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, "TERM", "SIGTERM", 15, "term"],
                         ids=["Signals", "TERM", "SIGTERM", "15", "term"])
async def test_send_signal_forms(any_agent: controller.Agent, sig: signal.Signals | str | int,
                                 ) -> None:
    with trio.fail_after(20):
        async with await any_agent.open_process(["sleep", "100"]) as proc:
            await proc.send_signal(sig)
            assert await proc.wait() == -15
            assert (proc.exit_code, proc.signal, proc.core_dumped) == (143, "TERM", False)


async def test_signal_is_handled_by_the_child(any_agent: controller.Agent) -> None:
    # One process in the group, so nothing else can hold stdout open or race the trap.
    script = (
        "import os, signal\n"
        "def on_usr1(*_):\n"
        "    os.write(1, b'got-usr1\\n')\n"
        "    os._exit(5)\n"
        "signal.signal(signal.SIGUSR1, on_usr1)\n"
        "os.write(1, b'ready\\n')  # not print(): the handler may run inside it\n"
        "while True:\n"
        "    signal.pause()\n"
    )
    with trio.fail_after(20):
        async with await any_agent.open_process([sys.executable, "-c", script]) as proc:
            assert await read_until(proc.stdout, b"ready\n") == b"ready\n"
            await proc.send_signal(signal.SIGUSR1)
            assert await read_all(proc.stdout) == b"got-usr1\n"
            assert await proc.wait() == 5
            assert (proc.exit_code, proc.signal) == (5, None)


async def test_terminate_kill_and_default_actions(any_agent: controller.Agent) -> None:
    # Plain methods, as in trio: the frame is queued by the call, nothing to await.
    with trio.fail_after(20):
        for action, number in [("terminate", 15), ("kill", 9), ("USR1", 10)]:
            async with await any_agent.open_process(["sleep", "100"]) as proc:
                if action == "terminate":
                    proc.terminate()
                elif action == "kill":
                    proc.kill()
                else:
                    proc.send_signal(action)
                assert await proc.wait() == -number
                assert proc.exit_code == 128 + number
                assert proc.signal == signal.Signals(number).name.removeprefix("SIG")


async def test_signal_reaches_the_whole_group(any_agent: controller.Agent) -> None:
    with trio.fail_after(20):
        async with await any_agent.open_process(
            ["sh", "-c", "sleep 100 & echo $!; wait"]
        ) as proc:
            background = int(await read_until(proc.stdout, b"\n"))
            try:
                assert proc_stat(background) is not None
                await proc.terminate()
                assert await proc.wait() == -15
                await wait_until(lambda: dead(background), what="the background sleep to die")
            finally:
                kill_group_quietly(proc.pid)


async def test_signal_to_an_exited_process_is_a_no_op(any_agent: controller.Agent) -> None:
    with trio.fail_after(20):
        async with await any_agent.open_process(["sh", "-c", "exit 3"]) as proc:
            assert proc.pid is not None
            pid = proc.pid
            # Exited (the agent keeps the zombie) but maybe not yet known here: the agent
            # answers for a child it knows has ended.
            await wait_until(lambda: (proc_stat(pid) or ("?",))[0] == "Z", what="zombie")
            await proc.send_signal("TERM")
            assert await proc.wait() == 3
            await proc.send_signal(signal.SIGTERM)
            await proc.terminate()
            await proc.kill()
            assert (proc.returncode, proc.exit_code, proc.signal) == (3, 3, None)
        await proc.kill()  # after release too
        assert proc.returncode == 3


async def test_signal_0_checks_nothing_and_sends_nothing(any_agent: controller.Agent) -> None:
    # trio allows it (an existence check): nothing to deliver, the child runs on.
    with trio.fail_after(10):
        async with await any_agent.open_process(["sleep", "100"]) as proc:
            proc.send_signal(0)
            await proc.send_signal(0)
            assert not proc._signal_waiters
            assert proc.returncode is None
            proc.kill()
            assert await proc.wait() == -signal.SIGKILL


async def test_signal_that_is_not_a_number_or_name_raises_typeerror(
    any_agent: controller.Agent,
) -> None:
    with trio.fail_after(10):
        async with await any_agent.open_process(["sleep", "100"]) as proc:
            for bad in (9.0, True, 0.0, None):
                with pytest.raises(TypeError, match=r"a signal is a signal\.Signals, an int"):
                    proc.send_signal(bad)  # type: ignore[arg-type]
            assert proc.returncode is None and not proc._signal_waiters
            proc.kill()
            assert await proc.wait() == -signal.SIGKILL


async def refusing_agent(peer: _ScriptedAgent) -> None:
    """An agent that starts nothing and refuses every signal with EPERM; the child
    "exits" 7 when the test pings."""
    exec_ = await peer.receive(Exec)
    await peer.send(Started(exec_.id, pid=4242))
    while True:
        frame = await peer.receive(Frame)
        if isinstance(frame, Signal):
            await peer.send(SignalAck(frame.id, frame.sig, errno="EPERM"))
        elif isinstance(frame, Ping):
            await peer.send(Exit(exec_.id, code=7))
            await peer.send(Pong(frame.n))


async def test_a_refused_signal_nobody_awaits_is_raised_by_wait() -> None:
    # trio code as written: kill(), then wait(). The refusal must not leave the wait
    # waiting for an exit that will not come.
    agent_side, controller_side = trio.testing.memory_stream_pair()
    peer = _ScriptedAgent(agent_side)
    with trio.fail_after(10):
        await agent_side.send_all(peer.conn.initiate())  # connect() waits for it
        async with trio.open_nursery() as nursery, controller.connect(controller_side) as ag:
            nursery.start_soon(refusing_agent, peer)
            proc = await ag.open_process(["anything"])
            proc.terminate()
            with pytest.raises(PermissionError, match="signal TERM to process 4242: EPERM"):
                await proc.wait()
            # Awaited, a refusal is the awaiter's: wait() does not raise it again.
            with pytest.raises(PermissionError, match="signal KILL"):
                await proc.kill()
            delivery = proc.send_signal("USR1")
            with pytest.raises(PermissionError, match="signal USR1"):
                await delivery
            await ag.ping()  # the child exits
            assert await proc.wait() == 7
            nursery.cancel_scope.cancel()


async def test_signal_the_protocol_cannot_carry_raises_valueerror(
    any_agent: controller.Agent,
) -> None:
    with trio.fail_after(10):
        async with await any_agent.open_process(["sleep", "100"]) as proc:
            for bad in ("NOSUCHSIGNAL", "SIG", 999, signal.SIGRTMIN):
                with pytest.raises(ValueError, match=r"(?i)signal"):
                    await proc.send_signal(bad)
            assert proc.returncode is None
            # Nothing was left half-sent: the next signal is acknowledged as usual.
            await proc.terminate()
            assert await proc.wait() == -signal.SIGTERM


# ---------------------------------------------------------------- cancellation, check, spawn


async def test_cancelled_run_process_kills_the_group_and_reaps(
    any_agent: controller.Agent, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    script = f"echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; sleep 100 & sleep 100"
    leader: int | None = None
    try:
        with trio.fail_after(30):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(any_agent.run_process, ["sh", "-c", script])
                    await wait_until(pid_file.exists, what="the pid file")
                    leader = int(pid_file.read_text())
                    await wait_until(lambda: len(group_members(leader or 0)) == 3,
                                     what="sh and its two sleeps")
                    scope.cancel()
            assert scope.cancelled_caught
            # run_process killed the group (SIGKILL to -pgid) before returning; the
            # members' deaths and the reaping (on close) follow right after.
            await wait_until(lambda: group_members(leader or 0) == [],
                             what="no live member of the group")
            await wait_until(lambda: proc_stat(leader or 0) is None, what="the leader reaped")
            assert await any_agent.ping() >= 0  # the agent carries on
    finally:
        kill_group_quietly(leader)


async def test_check_raises_called_process_error(any_agent: controller.Agent) -> None:
    argv = ["sh", "-c", "echo out; echo err >&2; exit 3"]
    with pytest.raises(subprocess.CalledProcessError) as info:
        await any_agent.run_process(argv, capture_stdout=True, capture_stderr=True)
    assert info.value.returncode == 3
    assert info.value.cmd == argv
    assert (info.value.stdout, info.value.stderr) == (b"out\n", b"err\n")

    with pytest.raises(subprocess.CalledProcessError) as info:
        await any_agent.run_process(["sh", "-c", "kill -USR1 $$"])
    assert info.value.returncode == -signal.SIGUSR1
    assert (info.value.stdout, info.value.stderr) == (None, None)

    done = await any_agent.run_process(argv, capture_stdout=True, check=False)
    assert (done.returncode, done.stdout) == (3, b"out\n")
    assert done.stderr is None


async def test_spawn_failures_raise_oserror(any_agent: controller.Agent, tmp_path: Path) -> None:
    not_executable = tmp_path / "data.sh"
    not_executable.write_text("#!/bin/sh\necho never\n")
    not_executable.chmod(0o644)
    with pytest.raises(FileNotFoundError):
        await any_agent.open_process(["/nonexistent/program"])
    with pytest.raises(FileNotFoundError):
        await any_agent.open_process(["no-such-program-mproxy"])
    with pytest.raises(PermissionError):
        await any_agent.open_process([str(not_executable)])
    with pytest.raises(FileNotFoundError):
        await any_agent.open_process(["true"], cwd=tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        await any_agent.run_process(["no-such-program-mproxy"])
    with pytest.raises(PermissionError):
        await any_agent.run_process([str(not_executable)], capture_stdout=True)
    # The agent is unharmed and nothing is left registered.
    done = await any_agent.run_process(["echo", "still here"], capture_stdout=True)
    assert done.stdout == b"still here\n"
    await wait_until(lambda: not any_agent.processes, what="every process released")


async def test_a_spawn_error_names_the_program_and_its_errno_once(
    any_agent: controller.Agent, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError) as info:
        await any_agent.open_process(["no-such-program-mproxy", "arg"])
    assert (info.value.errno, info.value.filename) == (errno.ENOENT, "no-such-program-mproxy")
    assert str(info.value) == (
        "[Errno 2] No such file or directory (searched $PATH): 'no-such-program-mproxy'"
    )
    with pytest.raises(FileNotFoundError) as info:  # path= is the program, as executable=
        await any_agent.run_process(["argv0"], path=tmp_path / "missing")
    assert info.value.filename == str(tmp_path / "missing")
    assert str(info.value) == f"[Errno 2] No such file or directory: {str(tmp_path / 'missing')!r}"
    with pytest.raises(FileNotFoundError) as info:  # the filename as given: bytes decoded
        await any_agent.run_process([b"./missing"], cwd=tmp_path)
    assert info.value.filename == "./missing"


async def test_a_missing_interpreter_is_named(any_agent: controller.Agent, tmp_path: Path) -> None:
    # The script exists: the kernel's ENOENT is about the interpreter its #! line names.
    script = tmp_path / "s.sh"
    script.write_text("#!/no/such/sh\necho never\n")
    script.chmod(0o755)
    with pytest.raises(FileNotFoundError) as info:
        await any_agent.run_process(["./s.sh"], cwd=tmp_path)
    assert (info.value.errno, info.value.filename) == (errno.ENOENT, "./s.sh")
    assert str(info.value) == "[Errno 2] interpreter '/no/such/sh' (from #!) not found: './s.sh'"


async def test_a_script_without_shebang_runs_with_sh(
    any_agent: controller.Agent, tmp_path: Path
) -> None:
    script = tmp_path / "nosb.sh"
    script.write_text('echo "$0|$#|$*"; exit 3\n')
    script.chmod(0o755)
    done = await any_agent.run_process(["./nosb.sh", "a b", "c"], cwd=tmp_path,
                                       capture_stdout=True, check=False)
    assert (done.stdout, done.returncode) == (b"./nosb.sh|2|a b c\n", 3)  # as bash


@pytest.mark.skipif(os.geteuid() != 0, reason="the credential drop needs root")
@pytest.mark.parametrize("sudo", [True, False], ids=["SUDO_UID set", "SUDO_UID unset"])
async def test_uid_and_gid_say_whether_drop_sudo_took_effect(
    monkeypatch: pytest.MonkeyPatch, sudo: bool
) -> None:
    if sudo:
        monkeypatch.setenv("SUDO_UID", "65534")
        monkeypatch.setenv("SUDO_GID", "65533")
    else:  # the seed's rule: no variables, no drop; the child runs as root
        monkeypatch.delenv("SUDO_UID", raising=False)
        monkeypatch.delenv("SUDO_GID", raising=False)
    with trio.fail_after(20):
        async with controller.open_agent() as connected:  # started with that environment
            for drop, ids in ((True, (65534, 65533) if sudo else (0, 0)), (False, (0, 0))):
                async with await connected.open_process(
                    ["sh", "-c", "id -u; id -g"], drop_sudo_credentials=drop
                ) as proc:
                    assert (proc.uid, proc.gid) == ids
                    assert await read_all(proc.stdout) == b"%d\n%d\n" % ids
                    assert await proc.wait() == 0


# ---------------------------------------------------------------- environment and cwd


async def test_exact_environment(any_agent: controller.Agent) -> None:
    done = await any_agent.run_process(["/usr/bin/env"], env={"A": "1", b"B": b"x=y"},
                                       capture_stdout=True)
    assert sorted(done.stdout.splitlines()) == [b"A=1", b"B=x=y"]
    done = await any_agent.run_process(["/usr/bin/env"], env={}, capture_stdout=True)
    assert done.stdout == b""


async def test_inherited_environment_with_overrides_and_removals(
    any_agent: controller.Agent,
) -> None:
    done = await any_agent.run_process(
        ["/usr/bin/env"], env_overrides={"MPX_TEST_SET": "set value", "PATH": "/bin"},
        env_remove=["HOME", "NOT_THERE"], capture_stdout=True,
    )
    env = dict(line.split(b"=", 1) for line in done.stdout.splitlines())
    assert env[b"MPX_TEST_SET"] == b"set value"
    assert env[b"PATH"] == b"/bin"
    assert b"HOME" not in env
    done = await any_agent.run_process(["/usr/bin/env"], capture_stdout=True)
    env = dict(line.split(b"=", 1) for line in done.stdout.splitlines())
    assert env[b"PATH"] == os.environb[b"PATH"]  # inherited from the agent (from us)


async def test_cwd(any_agent: controller.Agent, tmp_path: Path) -> None:
    (tmp_path / "marker").write_text("here")
    done = await any_agent.run_process(["sh", "-c", "pwd -P; cat marker"], cwd=tmp_path,
                                       capture_stdout=True)
    assert done.stdout == os.fsencode(tmp_path.resolve()) + b"\nhere"


# ---------------------------------------------------------------- releasing processes


async def test_async_with_kills_and_reaps(any_agent: controller.Agent) -> None:
    with trio.fail_after(20):
        async with await any_agent.open_process(
            ["sh", "-c", "sleep 100 & exec sleep 100"]
        ) as proc:
            assert proc.pid is not None
            pid = proc.pid
            await wait_until(lambda: len(group_members(pid)) == 2, what="both sleeps")
        # Leaving the block waited for the agent's closed: already reaped, group empty.
        assert proc.returncode == -signal.SIGKILL
        assert proc.closed
        assert proc.id not in any_agent.processes
        assert group_members(pid) == []
        assert proc_stat(pid) is None
        with pytest.raises(trio.ClosedResourceError):
            await proc.stdin.send_all(b"late")


async def test_closed_waits_for_a_group_member_that_is_slow_to_die(
    any_agent: controller.Agent
) -> None:
    # SIGKILL is delivered, not done, when killpg returns: a process with 1 GiB of touched
    # memory takes tens of milliseconds to release it and die. closed must wait for it.
    hog = ("import os, select\n"
           "b = bytearray(1 << 30)\n"
           "for i in range(0, len(b), 4096): b[i] = 1\n"
           "os.write(1, b'ready\\n')\n"
           "os.close(1)\n"
           "select.select([], [], [])\n")
    with trio.fail_after(30):
        async with await any_agent.open_process(
            ["sh", "-c", f'{shlex.quote(sys.executable)} -c "$0" & exec sleep 100',
             hog]
        ) as proc:
            pid = proc.pid
            assert await read_until(proc.stdout, b"ready\n") == b"ready\n"
        assert group_members(pid) == []


async def test_no_hello_within_the_handshake_timeout_is_agent_lost() -> None:
    with trio.fail_after(20), pytest.raises(controller.AgentLost, match="no hello within"):
        async with controller.open_agent(
            ["sleep", "60"], handshake_timeout=0.5, shutdown_timeout=1
        ):
            pass


async def test_a_command_that_never_says_hello_is_not_waited_for_after_the_timeout() -> None:
    # `sleep` ignores the end of its input: waited for shutdown_timeout (30 s here) it
    # held the handshake timeout's AgentLost up by that much more. (That wait runs
    # shielded, beyond a fail_after's reach: the bound is checked afterwards.)
    start = trio.current_time()
    with pytest.raises(controller.AgentLost, match="no hello within"):
        async with controller.open_agent(["sleep", "60"], handshake_timeout=0.5):
            pass
    assert trio.current_time() - start < 10


async def test_cancelled_while_waiting_for_a_hello_returns_at_once() -> None:
    # The wait for the command runs shielded, so a fail_after could not end it: the
    # bound is checked afterwards (it took the 30 s of shutdown_timeout).
    start = trio.current_time()
    with trio.move_on_after(0.5) as waiting:
        async with controller.open_agent(["sleep", "60"]):
            raise AssertionError("sleep said hello")
    assert waiting.cancelled_caught
    assert trio.current_time() - start < 10


async def test_an_agent_command_that_echoes_is_agent_lost_at_once() -> None:
    # `cat` sends our own hello back: refused as a hello of the wrong role, not taken for
    # an agent whose first request fails after a timeout.
    with trio.fail_after(5), pytest.raises(
        controller.AgentLost, match=r"says role 'controller'.*\(is it `cat`\?\)"
    ):
        async with controller.open_agent(["cat"], shutdown_timeout=5):
            raise AssertionError("connected to cat")


async def test_connect_to_something_not_a_stream_is_a_type_error() -> None:
    with trio.fail_after(10), pytest.raises(TypeError, match="got bytes and NoneType"):
        async with controller.connect(b"not a stream"):  # type: ignore[arg-type]
            pass


async def test_cancelled_wait_leaves_the_child_running(any_agent: controller.Agent) -> None:
    with trio.fail_after(20):
        async with await any_agent.open_process(["cat"]) as proc:
            with trio.move_on_after(0.05):
                await proc.wait()
            assert proc.returncode is None
            await proc.stdin.send_all(b"alive\n")
            assert await read_until(proc.stdout, b"\n") == b"alive\n"
            await proc.stdin.aclose()
            assert await proc.wait() == 0


async def test_leaving_a_process_with_unread_output_beyond_its_window_is_prompt(
        any_agent: controller.Agent) -> None:
    # The exit follows the output written before it. A child killed with more unread
    # output than its window holds back its own exit until that output is taken: leaving
    # the block must discard it first, not wait out the kill timeout (10 s).
    with trio.fail_after(30):
        async with await any_agent.open_process(["sh", "-c", "yes >&2 & exec yes"]) as proc:
            assert await proc.stdout.receive_some(2) == b"y\n"
            unread = proc.stderr._in  # white box: the stream's buffered output
            window = any_agent.conn.our_hello.window
            await wait_until(lambda: sum(map(len, unread._chunks)) >= window,
                             what="stderr's window to fill")
            await proc.kill()
            with trio.fail_after(5):
                await proc.aclose()
        assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("argv", [
    ["sleep", "30"],  # running, never reading its stdin
    # Exited; its group's sleep holds the stdin (sh gives a plain "&" job /dev/null).
    ["sh", "-c", "exec 3<&0; sleep 30 <&3 & exit 0"],
], ids=["running", "exited"])
async def test_leaving_a_process_fails_the_sends_waiting_for_credit(
        any_agent: controller.Agent, argv: list[str]) -> None:
    # A send blocked on credit that will never come (nobody reads the child's stdin)
    # must end when the process is closed, not wait for ever.
    with trio.fail_after(30):
        proc = await any_agent.open_process(argv)
        failed: list[type[BaseException]] = []

        async def feed() -> None:
            with pytest.raises((trio.ClosedResourceError, trio.BrokenResourceError)) as raised:
                await proc.stdin.send_all(b"x" * (8 << 20))  # > the window and the pipe
            failed.append(raised.type)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            await wait_until(lambda: proc.credit_lot.statistics().tasks_waiting == 1,
                             what="the send to wait for credit")
            await proc.aclose()
            with trio.fail_after(5):
                await wait_until(lambda: bool(failed), what="the send to fail")


async def _read_once(stream: controller.RemoteReceiveStream | controller.RemoteFdStream,
                     how: str) -> bytes:
    if how == "receive_some":
        return await stream.receive_some()
    buffer = bytearray(64)
    return bytes(buffer[: await stream.receive_into(buffer)])


def _readers_waiting(proc: controller.RemoteProcess, ch: int) -> int:
    return proc._outputs[ch]._lot.statistics().tasks_waiting


@pytest.mark.parametrize("how", ["receive_some", "receive_into"])
@pytest.mark.parametrize("ch", [1, 2, 3])
async def test_closing_a_stream_wakes_its_reader_with_closed_resource_error(
        any_agent: controller.Agent, how: str, ch: int) -> None:
    # As with trio's own streams: aclose() in one task ends the read blocked in another
    # at once, and every later read raises too (it used to return b"", like an EOF).
    with trio.fail_after(10):
        async with await any_agent.open_process(["sleep", "30"], extra_fds=[3]) as proc:
            stream: controller.RemoteReceiveStream | controller.RemoteFdStream = (
                proc.fds[3] if ch == 3 else proc.stdout if ch == 1 else proc.stderr)
            woken: list[bool] = []

            async def read() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await _read_once(stream, how)
                woken.append(True)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await wait_until(lambda: _readers_waiting(proc, ch) == 1,
                                 what="the read to block")
                await stream.aclose()
                with trio.fail_after(2):
                    await wait_until(lambda: bool(woken), what="the reader to wake")
            for _ in range(2):
                with pytest.raises(trio.ClosedResourceError):
                    await _read_once(stream, how)
            assert proc.returncode is None  # the child goes on


async def test_eof_from_the_child_is_still_empty_bytes_then_close_raises(
        any_agent: controller.Agent) -> None:
    with trio.fail_after(10):
        async with await any_agent.open_process(["echo", "hi"]) as proc:
            assert await read_all(proc.stdout) == b"hi\n"
            assert await proc.stdout.receive_some() == b""  # EOF again, not an error
            assert await proc.wait() == 0
        with pytest.raises(trio.ClosedResourceError):
            await proc.stdout.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            await proc.stderr.receive_into(bytearray(8))


async def test_closing_stdin_fails_a_send_waiting_for_credit(
        any_agent: controller.Agent) -> None:
    with trio.fail_after(20):
        async with await any_agent.open_process(["sleep", "30"]) as proc:
            failed: list[bool] = []

            async def feed() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await proc.stdin.send_all(b"x" * (8 << 20))  # > the window and the pipe
                failed.append(True)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                await wait_until(lambda: proc.credit_lot.statistics().tasks_waiting == 1,
                                 what="the send to wait for credit")
                await proc.stdin.aclose()
                with trio.fail_after(2):
                    await wait_until(lambda: bool(failed), what="the send to fail")
            with pytest.raises(trio.ClosedResourceError):
                await proc.stdin.send_all(b"late")
            assert proc.returncode is None


async def _close_with_a_reader_outside(agent_: controller.Agent, how: str
                                       ) -> list[bytes | type[BaseException]]:
    """What a read blocked in an outer nursery gets when its process is closed."""
    outcome: list[bytes | type[BaseException]] = []

    async def read(stream: controller.RemoteReceiveStream) -> None:
        try:
            outcome.append(await stream.receive_some())
        except trio.ClosedResourceError:
            outcome.append(trio.ClosedResourceError)

    async with trio.open_nursery() as nursery:
        proc = await agent_.open_process(["sh", "-c", "echo started; sleep 1000"])
        async with contextlib.AsyncExitStack() as stack:
            if how == "async-with":
                await stack.enter_async_context(proc)
            assert await read_until(proc.stdout, b"\n") == b"started\n"
            nursery.start_soon(read, proc.stdout)
            await wait_until(lambda: _readers_waiting(proc, 1) == 1, what="the read to block")
            if how == "aclose":
                await proc.aclose()
        with trio.fail_after(2):
            await wait_until(lambda: bool(outcome), what="the reader to wake")
    with pytest.raises(trio.ClosedResourceError):
        await proc.stdout.receive_some()
    return outcome


@pytest.mark.parametrize("how", ["aclose", "async-with"])
async def test_closing_a_process_wakes_a_reader_in_an_outer_nursery(
        any_agent: controller.Agent, how: str) -> None:
    # The reader used to hang whenever the close overtook the stdout eof (8 runs in 20):
    # the agent drops what follows a close. Now it ends, with the EOF when that came
    # first, else ClosedResourceError.
    for _ in range(10):
        with trio.fail_after(10):
            outcome = await _close_with_a_reader_outside(any_agent, how)
        assert outcome in ([b""], [trio.ClosedResourceError])


# A writer that ignores SIGPIPE, as every Python program does: it learns that its
# reader is gone only from the write error, and exits 3 then. (An extra fd is a socket:
# closed both ways, as aclose() does, it may answer ECONNRESET rather than EPIPE.)
_WRITE_UNTIL_EPIPE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "try:\n"
    "    while True: os.write(fd, b'x' * 4096)\n"
    "except (BrokenPipeError, ConnectionResetError):\n"
    "    sys.exit(3)\n"
)


@pytest.mark.parametrize("ch", [1, 2, 3])
async def test_closing_an_output_stream_makes_the_childs_writes_fail_with_epipe(
        any_agent: controller.Agent, ch: int) -> None:
    # As with a local pipe whose reader is gone (it used to run for ever: the output
    # was read and discarded).
    with trio.fail_after(10):
        async with await any_agent.open_process(
                [sys.executable, "-c", _WRITE_UNTIL_EPIPE, str(ch)], extra_fds=[3]) as proc:
            stream = proc.fds[3] if ch == 3 else proc.stdout if ch == 1 else proc.stderr
            assert await stream.receive_some(1)
            await stream.aclose()
            assert await proc.wait() == 3


async def test_closing_an_output_stream_of_an_agent_without_stop_discards_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # An agent that predates the stop frame does not announce it: nothing is sent that
    # it would refuse; what the child writes is discarded, as before, until it ends.
    monkeypatch.setattr("agent._agent.CAP_STOP", "not-stop")
    agent_side, controller_side = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.serve, agent.StreamTransport(agent_side, agent_side))
            async with controller.connect(controller_side) as remote:
                assert "stop" not in remote.info.caps
                async with await remote.open_process(
                        ["sh", "-c", "head -c 3000000 /dev/zero; echo done >&2"]) as proc:
                    assert await proc.stdout.receive_some(1)
                    await proc.stdout.aclose()
                    assert await read_all(proc.stderr) == b"done\n"
                    assert await proc.wait() == 0
                assert proc.errors == []


async def test_closing_a_process_drops_its_queued_input(
        caplog: pytest.LogCaptureFixture) -> None:
    # Input still queued here (the agent reads slower) when its process is closed used to
    # follow the close, a control frame that overtakes data: the agent refused it, one
    # error per frame. A relay we can stop stands for the slow agent.
    to_relay_r, to_relay_w = os.pipe()
    to_agent_r, to_agent_w = os.pipe()
    from_agent_r, from_agent_w = os.pipe()
    agent_process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "agent"], stdin=to_agent_r, stdout=from_agent_w)
    os.close(to_agent_r)
    os.close(from_agent_w)
    relaying = trio.Event()
    relaying.set()

    async def relay() -> None:
        async with trio.lowlevel.FdStream(to_relay_r) as src, \
                trio.lowlevel.FdStream(to_agent_w) as dst:
            while True:
                await relaying.wait()
                if not (data := await src.receive_some(1 << 16)):
                    return
                await dst.send_all(data)

    with trio.fail_after(30), caplog.at_level(logging.ERROR, logger="mproxy.agent"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay)
            transport = agent.FdTransport(from_agent_r, to_relay_w)
            async with controller.connect(transport) as remote:
                proc = await remote.open_process(["sleep", "30"], extra_fds=[3, 4])
                relaying = trio.Event()  # stopped: what we send now waits here
                credit = remote.conn.send_credit(proc.id, 0)  # each channel's
                for stream in (proc.stdin, proc.fds[3], proc.fds[4]):
                    await stream.send_all(b"x" * credit)  # returns once it is queued
                assert proc.pid is not None
                os.kill(proc.pid, signal.SIGKILL)  # its exit comes back unhindered
                assert await proc.wait() == -signal.SIGKILL
                closing = trio.Event()

                async def close() -> None:
                    await proc.aclose()
                    closing.set()

                nursery.start_soon(close)
                await wait_until(lambda: proc.closed, what="the close to be queued")
                relaying.set()
                await closing.wait()
                await remote.ping()  # the agent has read everything we sent
                assert proc.errors == []
        await agent_process.wait()
    assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.parametrize("how", ["receive_some", "receive_into"])
async def test_cancelled_reads_take_nothing(any_agent: controller.Agent, how: str) -> None:
    # Cancelled while waiting, or before it began with data waiting: what arrives or
    # waits is all there for the next read.
    async def read(stream: controller.RemoteReceiveStream) -> bytes:
        if how == "receive_some":
            return await stream.receive_some()
        buffer = bytearray(64)
        return bytes(buffer[: await stream.receive_into(buffer)])

    async def read_line(stream: controller.RemoteReceiveStream) -> bytes:
        line = b""
        while not line.endswith(b"\n"):
            line += await read(stream)
        return line

    with trio.fail_after(20):
        async with await any_agent.open_process(["cat"]) as proc:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, proc.stdout)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
            await proc.stdin.send_all(b"one\n")
            assert await read_line(proc.stdout) == b"one\n"
            await proc.stdin.send_all(b"two\n")
            assert await proc.stdout.receive_some(1) == b"t"  # the rest waits or comes
            with trio.CancelScope() as scope:
                scope.cancel()
                await read(proc.stdout)
            assert scope.cancelled_caught
            assert await read_line(proc.stdout) == b"wo\n"
            await proc.stdin.aclose()
            assert await proc.wait() == 0


# ---------------------------------------------------------------- agent loss


async def test_agent_death_fails_pending_and_later_calls() -> None:
    pids: list[int] = []
    try:
        with trio.fail_after(30), pytest.raises(controller.AgentLost) as lost_info:
            async with controller.open_agent(agent_args=GRACE_ARGS,
                                              stderr=subprocess.DEVNULL) as conn:
                talker = await conn.open_process(["sh", "-c", "echo ready; exec sleep 100"])
                stuck = await conn.open_process(["sleep", "100"])  # never reads its stdin
                assert talker.pid is not None and stuck.pid is not None
                pids += [talker.pid, stuck.pid]
                stat = proc_stat(talker.pid)
                assert stat is not None
                agent_pid = stat[1]
                assert await read_until(talker.stdout, b"ready\n") == b"ready\n"

                outcomes: dict[str, object] = {}

                async def record(name: str, call: Callable[[], Awaitable[object]]) -> None:
                    try:
                        outcomes[name] = await call()
                    except Exception as exc:
                        outcomes[name] = exc

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(record, "wait", talker.wait)
                    nursery.start_soon(record, "receive_some", talker.stdout.receive_some)
                    nursery.start_soon(record, "send_all",
                                       lambda: stuck.stdin.send_all(b"x" * (8 << 20)))
                    nursery.start_soon(record, "run_process",
                                       lambda: conn.run_process(["sleep", "100"]))
                    await wait_until(lambda: conn.conn.send_credit(stuck.id, 0) == 0,
                                     what="stdin blocked on credit")
                    # _pid: run_process's process is not started at first (pid is an
                    # int once it is, and a user gets a process only then).
                    await wait_until(lambda: len(conn.processes) == 3 and all(
                        p._pid for p in conn.processes.values()), what="run_process started")
                    await trio.testing.wait_all_tasks_blocked()
                    assert outcomes == {}
                    os.kill(agent_pid, signal.SIGKILL)
                assert set(outcomes) == {"wait", "receive_some", "send_all", "run_process"}
                for name, outcome in outcomes.items():
                    assert isinstance(outcome, controller.AgentLost), (name, outcome)
                    assert isinstance(outcome, trio.BrokenResourceError)
                run_pid = next(p.pid for p in conn.processes.values()
                               if p not in (talker, stuck))
                assert run_pid is not None
                pids.append(run_pid)

                # Later calls fail the same way; no exit status is ever made up.
                assert talker.returncode is None and talker.exit_code is None
                for call in (talker.wait, talker.stdout.receive_some, talker.terminate,
                             lambda: stuck.stdin.send_all(b"x"),
                             lambda: conn.open_process(["true"]),
                             lambda: conn.run_process(["true"]),
                             lambda: conn.configure_env(keep=["PATH"])):
                    with pytest.raises(controller.AgentLost):
                        await call()
                await talker.aclose()  # releasing is still fine
                await conn.ping()  # leaves the block with AgentLost
        assert "agent exit status -9" in str(lost_info.value)
        # The agent's guardian ends what it left behind (sleep ignores nothing: no grace).
        await wait_until(lambda: all((proc_stat(p) or ("Z",))[0] == "Z" for p in pids),
                         timeout=10, what="the guardian to end the agent's children")
    finally:
        for pid in pids:  # should the guardian have failed
            kill_group_quietly(pid)


async def test_agent_lost_while_leaving_is_one_agent_lost_not_a_group() -> None:
    # Leaving closes each child's stdin; these children then kill the agent (their
    # parent), so each process's finish meets the loss: one AgentLost comes out.
    kill_parent = "cat >/dev/null; kill -KILL $PPID; exec sleep 30"
    with trio.fail_after(30), pytest.raises(controller.AgentLost, match="exit status -9"):
        async with controller.open_agent(agent_args=GRACE_ARGS,
                                          stderr=subprocess.DEVNULL) as conn:
            for _ in range(2):
                await conn.open_process(["sh", "-c", kill_parent])


async def test_leaving_after_the_agent_was_lost_raises_agent_lost() -> None:
    # However the block is left: the children's ends are unknown.
    with trio.fail_after(30), pytest.raises(controller.AgentLost, match="exit status -9"):
        async with controller.open_agent(agent_args=GRACE_ARGS,
                                          stderr=subprocess.DEVNULL) as conn:
            await conn.open_process(["sleep", "30"])
            assert conn.agent_pid is not None
            os.kill(conn.agent_pid, signal.SIGKILL)
            await wait_until(lambda: conn.lost is not None, what="the loss to be seen")


async def test_closing_the_agent_twice_is_fine() -> None:
    with trio.fail_after(30):
        async with controller.open_agent() as conn:
            await conn.run_process(["true"])
            await conn.aclose()
        await conn.aclose()


async def test_agent_that_exits_before_hello_is_lost() -> None:
    with trio.fail_after(20), pytest.raises(controller.AgentLost) as info:
        async with controller.open_agent(["sh", "-c", "exit 0"]):
            raise AssertionError("never connected")
    assert "agent exit status 0" in str(info.value)


# ---------------------------------------------------------------- leaving open_agent


def recording_agent(status_file: Path) -> list[str]:
    """An agent command that writes the agent's exit status to ``status_file``."""
    return ["sh", "-c", f'"$0" -m agent "$@"; echo $? > {status_file}', sys.executable]


async def test_leaving_normally_finishes_processes_and_agent_exits_0(tmp_path: Path) -> None:
    status_file, out_file = tmp_path / "status", tmp_path / "out"
    with trio.fail_after(30):
        async with controller.open_agent(recording_agent(status_file),
                                         agent_args=GRACE_ARGS) as conn:
            writer = await conn.open_process(["sh", "-c", f"cat > {out_file}; echo end >> "
                                              f"{out_file}; exit 4"])
            await writer.stdin.send_all(b"data\n")  # no eof: leaving sends it
            chatty = await conn.open_process(["sh", "-c", "seq 1 100000; exit 6"])
            slow = await conn.open_process(["sh", "-c", "read x; exit 5"])
    assert out_file.read_text() == "data\nend\n"
    assert (writer.returncode, chatty.returncode, slow.returncode) == (4, 6, 5)
    assert status_file.read_text() == "0\n"


class Boom(Exception):
    pass


@pytest.mark.parametrize("how", ["exception", "cancellation"])
async def test_leaving_abnormally_kills_children(how: str, tmp_path: Path) -> None:
    status_file = tmp_path / "status"
    leader: int | None = None
    try:
        expected = pytest.raises(Boom) if how == "exception" else contextlib.nullcontext()
        with trio.fail_after(30), trio.CancelScope() as scope, expected:
            async with controller.open_agent(recording_agent(status_file),
                                             agent_args=GRACE_ARGS) as conn:
                proc = await conn.open_process(["sh", "-c", "sleep 100 & exec sleep 100"])
                leader = proc.pid
                await wait_until(lambda: len(group_members(leader or 0)) == 2,
                                 what="both sleeps")
                if how == "exception":
                    raise Boom
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught == (how == "cancellation")
        # open_agent waited for the agent, which killed and reaped its child first.
        assert leader is not None
        assert group_members(leader) == []
        assert proc_stat(leader) is None
        assert status_file.read_text() == "0\n"
    finally:
        kill_group_quietly(leader)


# ---------------------------------------------------------------- logging


async def test_agent_log_frames_go_to_the_mproxy_agent_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mproxy.agent")
    with trio.fail_after(20):
        async with controller.open_agent(agent_args=["--log-level", "debug"],
                                         stderr=subprocess.DEVNULL) as conn:
            proc = await conn.open_process(["true"])
            assert await proc.wait() == 0
            await proc.aclose()
            with pytest.raises(FileNotFoundError):
                await conn.open_process(["/nonexistent/program"])
            await conn.ping()  # frames are ordered: every log frame sent so far is in
    records = [r for r in caplog.records if r.name == "mproxy.agent"]
    messages = [r.getMessage() for r in records]
    assert f"started id={proc.id} pid={proc.pid}" in messages
    started = records[messages.index(f"started id={proc.id} pid={proc.pid}")]
    assert started.levelno == logging.DEBUG
    assert started.attrs == {"id": str(proc.id), "pid": str(proc.pid)}  # type: ignore[attr-defined]
    assert any(m.startswith("spawn failed id=2 detail=") for m in messages), messages
    assert any(m.startswith("controller connected impl=mproxy-controller") for m in messages)
