"""Signals: by name to the child's whole process group, acknowledged; refusals for bad
names, unknown and exited children; a signal sent before the child started."""

from __future__ import annotations

import trio
from agent_harness import inproc, spawned
from conftest import group_all, wait_all_gone

from protocol import Eof, Signal, encode


async def test_term_reaches_every_member_of_the_group() -> None:
    async with spawned("--grace", "2") as agent:
        raw = agent.raw
        child = raw.exec(["sh", "-c", "sleep 100 & sleep 100 & echo ready; wait"])
        await raw.wait(lambda: child.output(1) == b"ready\n", 10, "the sleeps to start")
        members = group_all(child.pid)
        assert len(members) == 3  # sh and two sleeps
        raw.signal(child.id, "TERM")
        ack = await raw.ack(child)
        assert (ack.sig, ack.errno) == ("TERM", None)
        exit_frame = await raw.exited(child)
        assert (exit_frame.code, exit_frame.sig, exit_frame.core) == (143, "TERM", False)
        # The grandchildren died too: only the (unreaped) leader is left until close.
        await wait_all_gone([m for m in members if m != child.pid], [], 5, "the sleeps")
        raw.close(child.id)
        await raw.closed(child)
        await wait_all_gone(members, [child.pid], 5, "the group after close")
        assert not raw.errors


_TRAPS = """
import os, signal
def say(signum, frame):
    os.write(1, signal.Signals(signum).name[3:].lower().encode() + b"\\n")
signal.signal(signal.SIGUSR1, say)
signal.signal(signal.SIGHUP, say)
os.write(1, b"ready\\n")
while True:
    signal.pause()
"""


async def test_signals_by_name_are_acknowledged_and_delivered() -> None:
    async with inproc() as (raw, _):
        # No grandchild: in this process nobody would reap it once orphaned.
        child = raw.exec(["python3", "-c", _TRAPS])
        await raw.wait(lambda: child.output(1) == b"ready\n", 10, "the traps")
        for sig, line in (("USR1", b"usr1\n"), ("HUP", b"hup\n"), ("USR1", b"usr1\n")):
            expected = child.output(1) + line
            raw.signal(child.id, sig)
            ack = await raw.ack(child)
            assert (ack.sig, ack.errno) == (sig, None)
            await raw.output_is(child, expected)
        raw.signal(child.id, "KILL")
        assert (await raw.ack(child)).errno is None
        assert (await raw.exited(child)).sig == "KILL"


async def test_unknown_signal_name_is_refused_for_that_child_only() -> None:
    async with inproc() as (raw, _):
        child = raw.exec(["cat"])
        other = raw.exec(["cat"])
        await raw.started(child)
        await raw.started(other)
        for name in ("FOO", "SIGTERM", "term", ""):
            raw.send_raw(encode(Signal(child.id, name)))  # the connection would refuse it
            error = await raw.error(child, "bad-signal")
            assert error.id == child.id and error.ref == "signal"
            child.errors.clear()
        assert not other.errors and not child.acks
        # Both children are untouched and still work.
        await raw.echo(child, b"alive\n")
        await raw.echo(other, b"also alive\n")
        raw.signal(child.id, "TERM")
        assert (await raw.ack(child)).errno is None
        assert (await raw.exited(child)).sig == "TERM"
        assert other.exit is None


async def test_signal_to_an_unknown_child_is_refused() -> None:
    async with inproc() as (raw, _):
        raw.send_raw(encode(Signal(4242, "TERM")))
        await raw.wait(lambda: bool(raw.errors), 10, "an error")
        error = raw.errors[0]
        assert (error.kind, error.id, error.ref) == ("unknown-child", 4242, "signal")
        child = await raw.run(["echo", "fine"])
        assert child.output(1) == b"fine\n"


async def test_signal_to_an_exited_child_is_refused() -> None:
    async with inproc() as (raw, _):
        child = raw.exec(["true"])
        raw.eof(child.id)
        assert (await raw.finished(child)).code == 0
        raw.signal(child.id, "TERM")
        error = await raw.error(child, "child-exited")
        assert (error.id, error.ref) == (child.id, "signal")
        assert not child.acks
        raw.close(child.id)
        await raw.closed(child)


async def test_signal_sent_before_started_is_delivered_after_the_spawn() -> None:
    async with inproc() as (raw, _):
        for sig, code in (("TERM", 143), ("KILL", 137), ("INT", 130)) * 4:
            # exec and signal in one write: the agent reads the signal while it spawns.
            id = raw.new_id()
            child = raw.exec(["sleep", "100"], id=id, more=[Signal(id, sig)])
            with trio.fail_after(10):
                ack = await raw.ack(child)
            assert child.started is not None  # started came before the ack
            assert (ack.sig, ack.errno) == (sig, None)
            exit_frame = await raw.exited(child)
            assert (exit_frame.code, exit_frame.sig) == (code, sig)
            kinds = [type(f).__name__ for f in raw.frames
                     if getattr(f, "id", None) == id and not isinstance(f, Eof)]
            assert kinds == ["Started", "SignalAck", "Exit"]
            raw.close(child.id)
            await raw.closed(child)
