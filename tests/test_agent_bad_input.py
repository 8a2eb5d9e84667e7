"""Bad input from the controller, sent as hand-made bytes.

An undecodable stream is fatal: an error frame, then an orderly shutdown (exit status 1,
every child killed). A well-formed frame with bad content is refused with an error frame
naming the child, and nothing else changes: a child already running keeps its data
exact, and the next exec works.
"""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import pytest
import trio
from agent_harness import Raw, RawChild, inproc, spawned
from conftest import gone, group_all, wait_all_gone

from protocol import (
    DEFAULT_WINDOW,
    Close,
    Data,
    Eof,
    Exec,
    Exit,
    Hello,
    Ping,
    Started,
    Window,
    encode,
)


def _frame(body: dict[str, object]) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return len(packed).to_bytes(4, "big") + packed


# ---------------------------------------------------------------------------- fatal

async def test_undecodable_stream_ends_the_agent_with_status_1() -> None:
    async with spawned("--grace", "1") as agent:
        raw = agent.raw
        children = [raw.exec(["cat"]), raw.exec(["sh", "-c", "sleep 100 & wait"])]
        for child in children:
            await raw.started(child)
        await wait_until_members(children[1], 2)
        pids = [p for k in children for p in group_all(k.pid)]
        raw.send_raw(b"\x00\x00\x00\x02\xc1\xc1")  # 0xc1 is never valid msgpack
        await raw.wait(raw.ended.is_set, 10, "the agent to end the stream")
        assert [(e.kind, e.id) for e in raw.errors] == [("malformed", None)]
        assert raw.end_reason == "EOF"
        with trio.fail_after(10):
            assert await agent.process.wait() == 1
        await wait_all_gone(pids, [k.pid for k in children], 2, "after a fatal error")


async def wait_until_members(child: RawChild, count: int) -> None:
    with trio.fail_after(10):
        while len(group_all(child.pid)) < count:
            await trio.sleep(0.01)


@pytest.mark.parametrize(("garbage", "kind"), [
    (b"\xff\xff\xff\xff", "frame-too-large"),
    (b"\x00\x00\x00\x00", "malformed"),  # an empty frame
    (b"\x00\x00\x00\x04\x93\x01\x02\x03", "malformed"),  # an array, not a map
    (b"\x00\x00\x00\x01\x07", "malformed"),  # an int
    (b"\x00\x00\x00\x03\x82\xa1t", "malformed"),  # a map cut short
])
async def test_fatal_garbage_kills_the_children(garbage: bytes, kind: str) -> None:
    async with inproc(grace=1.0) as (raw, status):
        child = raw.exec(["cat"])
        await raw.started(child)
        raw.send_raw(garbage)
        await raw.wait(raw.ended.is_set, 10, "the agent to end the stream")
        assert [e.kind for e in raw.errors] == [kind]
        assert status == [1]
        assert gone(child.pid)


@pytest.mark.parametrize("first", [
    encode(Ping(1)),
    encode(Hello(2, "future", "9", 1 << 20, 1 << 20)),
    _frame({"t": "hello", "version": 1}),  # fields missing
])
async def test_bad_first_frame_is_a_fatal_handshake_error(first: bytes) -> None:
    async with inproc(grace=1.0, hello=first) as (raw, status):
        await raw.wait(raw.ended.is_set, 10, "the agent to end the stream")
        assert len(raw.errors) == 1
        assert raw.errors[0].kind in ("handshake", "version-mismatch")
        assert status == [1]


# ---------------------------------------------------------------------------- frame-level

class Witness:
    """A cat child whose echoed bytes must stay exactly what we sent, and a check that
    a new exec works."""

    def __init__(self, raw: Raw, child: RawChild) -> None:
        self.raw = raw
        self.child = child
        self.sent = bytearray()
        self.round = 0

    async def check(self) -> None:
        self.round += 1
        chunk = f"round {self.round}|".encode() * 100
        self.sent += chunk
        await self.raw.write(self.child.id, 0, chunk)
        await self.raw.wait(lambda: len(self.child.output(1)) >= len(self.sent), 10,
                            "the witness's echo")
        assert self.child.output(1) == bytes(self.sent)
        fresh = await self.raw.run(["echo", "ok"])
        assert fresh.output(1) == b"ok\n" and not fresh.errors


Case = tuple[str, Callable[[RawChild], bytes], str, Callable[[RawChild], int | None]]

_CASES: list[Case] = [
    ("data for an unknown child", lambda w: encode(Data(777, 0, b"x")),
     "unknown-child", lambda w: 777),
    ("eof for an unknown child", lambda w: encode(Eof(778, 0)),
     "unknown-child", lambda w: 778),
    ("window for an unknown child", lambda w: encode(Window(779, 1, 10)),
     "unknown-child", lambda w: 779),
    ("close for an unknown child", lambda w: encode(Close(780)),
     "unknown-child", lambda w: 780),
    ("duplicate exec id", lambda w: encode(Exec(id=w.id, argv=(b"true",))),
     "duplicate-id", lambda w: w.id),
    ("argv not a list", lambda w: _frame({"t": "exec", "id": 55, "argv": "true"}),
     "bad-frame", lambda w: 55),
    ("id not an integer", lambda w: _frame({"t": "exec", "id": "56", "argv": [b"true"]}),
     "bad-frame", lambda w: None),
    ("negative id", lambda w: _frame({"t": "exec", "id": -1, "argv": [b"true"]}),
     "bad-frame", lambda w: None),
    ("missing argv", lambda w: _frame({"t": "exec", "id": 57}), "bad-frame", lambda w: 57),
    ("empty argv", lambda w: encode(Exec(id=58, argv=())), "bad-frame", lambda w: 58),
    ("data payload not binary",
     lambda w: _frame({"t": "data", "id": w.id, "ch": 0, "d": "text"}),
     "bad-frame", lambda w: w.id),
    ("signal name not a string",
     lambda w: _frame({"t": "signal", "id": w.id, "sig": 15}), "bad-frame", lambda w: w.id),
    ("fd 2 as an extra fd", lambda w: encode(Exec(id=59, argv=(b"true",), fds=(2,))),
     "bad-fd", lambda w: 59),
    ("fd 0 as an extra fd", lambda w: encode(Exec(id=60, argv=(b"true",), fds=(5, 0))),
     "bad-fd", lambda w: 60),
    ("the same extra fd twice", lambda w: encode(Exec(id=61, argv=(b"true",), fds=(4, 4))),
     "bad-fd", lambda w: 61),
    ("data on an output channel", lambda w: encode(Data(w.id, 1, b"x")),
     "bad-channel", lambda w: w.id),
    ("data on a channel that does not exist", lambda w: encode(Data(w.id, 9, b"x")),
     "bad-channel", lambda w: w.id),
    ("window for an input channel", lambda w: encode(Window(w.id, 0, 10)),
     "bad-channel", lambda w: w.id),
    ("zero window", lambda w: encode(Window(w.id, 1, 0)), "bad-frame", lambda w: w.id),
    ("data beyond the credit", lambda w: encode(Data(w.id, 0, b"y" * (DEFAULT_WINDOW + 1))),
     "credit-exceeded", lambda w: w.id),
    ("unknown frame type", lambda w: _frame({"t": "frobnicate", "id": 3}),
     "unknown-type", lambda w: 3),
    ("frame without a type", lambda w: _frame({"id": 3}), "bad-frame", lambda w: 3),
    ("a frame only the agent sends", lambda w: encode(Started(w.id, 1)),
     "bad-frame", lambda w: w.id),
    ("exit from the controller", lambda w: encode(Exit(w.id, 0)),
     "bad-frame", lambda w: w.id),
    ("a second hello", lambda w: encode(Hello(1, "x", "0", 1 << 20, 1 << 20)),
     "handshake", lambda w: None),
    ("exec with a NUL in argv", lambda w: encode(Exec(id=62, argv=(b"tr\0ue",))),
     "bad-frame", lambda w: 62),
    ("env entry without =", lambda w: encode(Exec(id=63, argv=(b"true",), env=(b"X",))),
     "bad-frame", lambda w: 63),
]


async def test_each_bad_frame_is_refused_and_nothing_else_changes() -> None:
    async with inproc() as (raw, status):
        witness = Witness(raw, raw.exec(["cat"]))
        await raw.started(witness.child)
        await witness.check()
        for name, make, kind, expected_id in _CASES:
            count = len(raw.errors)
            raw.send_raw(make(witness.child))
            await raw.errors_are(count + 1)
            error = raw.errors[count]
            assert (error.kind, error.id) == (kind, expected_id(witness.child)), name
            assert len(raw.errors) == count + 1, name
            await witness.check()
        # Data after eof: on a child of its own.
        late = raw.exec(["cat"])
        await raw.write(late.id, 0, b"before eof")
        raw.eof(late.id)
        raw.send_raw(encode(Data(late.id, 0, b"after eof")))
        error = await raw.error(late, "channel-closed")
        assert error.id == late.id
        await raw.finished(late)
        assert late.output(1) == b"before eof"
        # A close sent twice.
        raw.close(late.id)
        raw.send_raw(encode(Close(late.id)))
        await raw.closed(late)
        await raw.wait(lambda: len(late.errors) == 2, 10, "the second close's error")
        assert late.errors[1].kind == "bad-frame"
        await witness.check()
        raw.eof(witness.child.id)
        await raw.finished(witness.child)
        assert witness.child.eof[1] == len(witness.sent)
    assert status == [0]
