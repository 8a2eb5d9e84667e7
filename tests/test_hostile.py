"""Hostile input: random frame sequences (hypothesis) and a corpus of nasty frames.

Every test keeps a witness child (``cat``, id 1) running alongside and checks that its
echoed bytes stay exact: a bad frame is refused on its own and nothing else changes.
After each frame the test pings the agent; the agent handles frames in order, so the
error answering a refused frame arrives before the pong (``Raw.sync``).

The corpus runs against a real ``python -m agent`` with stderr captured: the agent must
never print a traceback. Fatal input (undecodable streams) ends the connection with one
precise error frame, exit status 1, and every child killed.

Complements tests/test_agent_bad_input.py (the frame-level corpus in process, and the
fatal cases in process).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from agent_harness import Raw, Spawned, errors_in, inproc, spawned, wire
from conftest import proc_stat, rss_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    DEFAULT_MAX_FRAME,
    Close,
    Closed,
    Data,
    Eof,
    Error,
    Exec,
    Exit,
    Frame,
    Log,
    Started,
    encode,
)
from protocol._codec import FrameInvalid, decode_body

WITNESS = 1
#: Kinds that end the connection: never acceptable in answer to a well-formed map.
FATAL_KINDS = {"handshake", "version-mismatch", "malformed", "frame-too-large", "internal"}
AGENT_ONLY = {"started", "signal_ack", "exit", "log", "closed", "goodbye"}


def expected_kind(body: dict[Any, Any]) -> str | None:
    """The error kind the agent must answer ``body`` with whatever its state, or None
    when the answer depends on the state (or there is none)."""
    try:
        decode_body(body)
    except FrameInvalid as exc:
        return str(exc.kind)
    return "bad-frame" if body.get("t") in AGENT_ONLY else None


class Witness:
    """The cat child whose output must be exactly its input."""

    def __init__(self, peer: Raw) -> None:
        self.peer = peer
        self.sent = bytearray()

    def start(self) -> None:
        self.peer.send(Exec(WITNESS, (b"cat",)))

    def feed(self, label: str) -> None:
        chunk = f"<{label}>".encode()
        self.sent += chunk
        self.peer.send(Data(WITNESS, 0, chunk))

    async def check_echo(self) -> None:
        """Everything fed so far comes back (cat echoes as it reads)."""
        expected = bytes(self.sent)
        await self.peer.until_all(lambda _: len(self.peer.output(WITNESS, 1)) >= len(expected))
        assert self.peer.output(WITNESS, 1) == expected

    async def finish(self) -> None:
        """EOF to cat: it exits 0 and its output is exactly what it was fed."""
        self.peer.send(Eof(WITNESS, 0))
        await self.peer.until_all(lambda _: self.peer.has(Exit, WITNESS)
                                  and self.peer.has(Eof, WITNESS, ch=1))
        assert self.peer.output(WITNESS, 1) == bytes(self.sent)
        assert self.peer.has(Exit, WITNESS, code=0)


def assert_refused(frames: list[Frame], kind: str, ref: object, what: str) -> None:
    errors = errors_in(frames)
    assert any(e.kind == kind and (not isinstance(ref, str) or e.ref == ref[:64])
               for e in errors), f"{what}: expected a {kind} error, got {errors}"


def assert_healthy(peer: Raw) -> None:
    """No fatal or internal error frame, no error-level log record."""
    assert not [e for e in errors_in(peer.frames) if e.kind in FATAL_KINDS]
    assert not [f for f in peer.frames if isinstance(f, Log) and f.level == "error"]


# ---------------------------------------------------------------------------- hypothesis

POOL = st.integers(2, 5)  # ids of random children; never the witness
ARGVS = [[b"true"], [b"cat"], [b"sleep", b"5"], [b"sh", b"-c", b"exit 3"],
         [b"/nonexistent/x"], [b"echo", b"x"]]
SIGNALS = ["TERM", "KILL", "USR1", "STOP", "CONT", "SIGTERM", "", "BOGUS"]
WRONG = st.one_of(
    st.text(max_size=4), st.binary(max_size=4), st.integers(-(2**63), -1),
    st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(-3, 3), max_size=2),
    st.lists(st.none(), min_size=1, max_size=1),
    st.dictionaries(st.text(max_size=2), st.integers(0, 3), max_size=2),
)


def _body(t: str, **fields: Any) -> dict[str, Any]:
    return {"t": t, **fields}


WELL_TYPED = st.one_of(
    st.builds(lambda i, a, f: _body("exec", id=i, argv=a, fds=f), POOL, st.sampled_from(ARGVS),
              st.lists(st.integers(0, 2**31 + 1), max_size=2)),
    st.builds(lambda i, c, d: _body("data", id=i, ch=c, d=d), POOL,
              st.sampled_from([0, 1, 3, 9]), st.binary(max_size=64)),
    st.builds(lambda i, c: _body("eof", id=i, ch=c), POOL, st.sampled_from([0, 1, 3])),
    st.builds(lambda i, c, n: _body("window", id=i, ch=c, n=n), POOL,
              st.sampled_from([0, 1, 2, 3]), st.integers(0, 2**64 - 1)),
    st.builds(lambda i, s: _body("signal", id=i, sig=s), POOL, st.sampled_from(SIGNALS)),
    st.builds(lambda i: _body("close", id=i), POOL),
    st.builds(lambda k: _body("config", env_keep=k),
              st.lists(st.sampled_from(["PATH", "HOME", "*", "/[/", "/^X/", ""]), max_size=3)),
    st.builds(lambda n: _body("ping", n=n), st.integers(10**9, 2**64 - 1)),
    st.builds(lambda k, m: _body("error", kind=k, msg=m), st.text(max_size=8),
              st.text(max_size=8)),
    st.builds(lambda i: _body("started", id=i, pid=1), POOL),
    st.builds(lambda i: _body("exit", id=i, code=0), POOL),
    st.builds(lambda i: _body("closed", id=i), POOL),
    st.just(_body("goodbye")),
    st.builds(lambda t: _body(t, id=2), st.text(max_size=6).filter(
        lambda t: t not in {"exec", "data", "eof", "window", "signal", "close", "config",
                            "ping", "pong", "error", "shutdown", "hello", *AGENT_ONLY})),
)


def _spoil(body: dict[str, Any], draw: st.DrawFn) -> dict[str, Any]:
    """The body with one field (or an extra unknown key) replaced by junk."""
    keys = sorted(k for k in body if k != "t")
    key = draw(st.sampled_from([*keys, "zz-unknown"]))
    return {**body, key: draw(WRONG)}


@dataclass
class Op:
    body: dict[str, Any]
    kind: str | None  # the error kind the agent must answer with, if state-independent


@st.composite
def ops(draw: st.DrawFn) -> Op:
    body = draw(WELL_TYPED)
    if draw(st.booleans()):
        body = _spoil(body, draw)
    return Op(body, expected_kind(body))


async def _random_session(sequence: list[Op]) -> None:
    with trio.fail_after(30):
        async with inproc(validate=False, grace=0.5) as (peer, status):
            await _drive(peer, sequence)
    assert status == [0]
    assert_healthy(peer)
    for frame in peer.frames:  # every child was killed and reaped
        if isinstance(frame, Started):
            assert proc_stat(frame.pid) is None, frame


async def _drive(peer: Raw, sequence: list[Op]) -> None:
    witness = Witness(peer)
    witness.start()
    for index, op in enumerate(sequence):
        witness.feed(str(index))
        peer.send_body(op.body)
        answer = await peer.sync()
        if op.kind is not None:
            assert_refused(answer, op.kind, op.body.get("t"), repr(op.body))
    await witness.check_echo()
    await witness.finish()
    await peer.aclose_write()
    await peer.rest()  # until the agent's stream ends: serve() has returned


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(ops(), max_size=12))
def test_random_frame_sequences(sequence: list[Op]) -> None:
    trio.run(_random_session, sequence)


# ---------------------------------------------------------------------------- corpus

_BASES: dict[str, dict[str, Any]] = {
    "exec": _body("exec", id=40, argv=[b"true"], path=b"/bin/true", env=[b"A=1"],
                  env_set=[b"B=2"], env_unset=[b"C"], cwd=b"/", fds=[3], drop_sudo=False),
    "data": _body("data", id=WITNESS, ch=0, d=b"x"),
    "eof": _body("eof", id=WITNESS, ch=0, n=0),
    "window": _body("window", id=WITNESS, ch=1, n=1),
    "signal": _body("signal", id=WITNESS, sig="CONT"),
    "close": _body("close", id=WITNESS),
    "config": _body("config", env_keep=["PATH"], env_remove=["X"]),
    "ping": _body("ping", n=10**9),
    "pong": _body("pong", n=7),
    "error": _body("error", kind="x", msg="y", id=WITNESS, errno="EPERM", ref="data"),
}
_WRONG_VALUES: list[Any] = ["7", b"7", -1, -(2**63), 1.5, True, [1], [None], ["x", 1],
                            {"a": 1}, {}]


def wrong_type_cases() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every field of every frame the controller sends, with each value of a type the
    field does not take (values of the right type are left out: "7" is a fine type for
    a signal name, [1] for fds)."""
    for ftype, base in _BASES.items():
        for key in base:
            if key == "t":
                continue
            for value in _WRONG_VALUES:
                body = {**base, key: value}
                try:
                    decode_body(body)
                except FrameInvalid as exc:
                    if f"field {key!r} must be" in exc.message:
                        yield f"{ftype}.{key}={value!r}", body


def _raw_frame(*parts: bytes) -> bytes:
    """A frame whose body is the concatenation of hand-packed msgpack parts."""
    body = b"".join(parts)
    return struct.pack(">I", len(body)) + body


def _p(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


_BAD_UTF8 = b"\xa2\xff\xfe"  # a msgpack str of two bytes that are not UTF-8

# (name, frame bytes, kind, ref): refused at once with that error.
_REFUSED: list[tuple[str, bytes, str, str | None]] = [
    ("negative id", wire(_body("exec", id=-1, argv=[b"true"])), "bad-frame", "exec"),
    ("id below -2**63", wire(_body("close", id=-(2**63))), "bad-frame", "close"),
    ("data for id 2**64-1", wire(_body("data", id=2**64 - 1, ch=0, d=b"x")),
     "unknown-child", "data"),
    ("channel 2**64-1", wire(_body("data", id=WITNESS, ch=2**64 - 1, d=b"x")),
     "bad-channel", "data"),
    *[(f"fd {fd}", wire(_body("exec", id=41, argv=[b"true"], fds=[fd])), "bad-fd", "exec")
      for fd in (0, 1, 2, 2**31, 2**64 - 1)],
    *[(f"NUL in {field}", wire({**_body("exec", id=42, argv=[b"true"]), field: value}),
       "bad-frame", "exec")
      for field, value in [("argv", [b"tr\0ue"]), ("path", b"/bin/\0true"),
                           ("cwd", b"/\0"), ("env", [b"A=\0"]), ("env_set", [b"A\0=1"]),
                           ("env_unset", [b"A\0"])]],
    ("signal name not UTF-8",
     _raw_frame(b"\x83", _p("t"), _p("signal"), _p("id"), _p(WITNESS), _p("sig"), _BAD_UTF8),
     "bad-signal", "signal"),
    ("type not UTF-8", _raw_frame(b"\x81", _p("t"), _BAD_UTF8), "unknown-type", "\udcff\udcfe"),
    ("type as binary", wire({"t": b"exec", "id": 43, "argv": [b"true"]}), "bad-frame", None),
    ("type key as binary", wire({b"t": "ping", "n": 10**9}), "bad-frame", None),
    ("window beyond 2**62", wire(_body("window", id=WITNESS, ch=1, n=2**64 - 1)),
     "bad-frame", "window"),
    ("zero window", wire(_body("window", id=WITNESS, ch=1, n=0)), "bad-frame", "window"),
    ("signal with SIG prefix", wire(_body("signal", id=WITNESS, sig="SIGKILL")),
     "bad-signal", "signal"),
    ("empty signal name", wire(_body("signal", id=WITNESS, sig="")), "bad-signal", "signal"),
    ("empty config pattern", wire(_body("config", env_keep=[""])), "bad-frame", "config"),
]

# (name, exec body, errno): the exec is valid, the spawn fails: error + exit 126.
_NEAR_MAX = DEFAULT_MAX_FRAME - 1024
_SPAWN_FAILS: list[tuple[str, dict[str, Any], str]] = [
    ("fd 10**6, beyond RLIMIT_NOFILE", _body("exec", id=50, argv=[b"true"], fds=[10**6]),
     "EBADF"),
    ("fd 2**31-1", _body("exec", id=51, argv=[b"true"], fds=[2**31 - 1]), "EBADF"),
    ("one argument near the frame limit", _body("exec", id=52, argv=[b"echo", b"x" * _NEAR_MAX]),
     "E2BIG"),
    ("200,000 arguments", _body("exec", id=53, argv=[b"echo"] + [b"y" * 14] * 200_000),
     "E2BIG"),
    ("200,000 environment entries",
     _body("exec", id=54, argv=[b"true"], env=[b"V%d=xxxxxxxxxx" % i for i in range(200_000)]),
     "E2BIG"),
]


async def _corpus(process: Spawned) -> None:
    peer = process.raw
    witness = Witness(peer)
    witness.start()
    cases = [(n, wire(b), expected_kind(b), b["t"]) for n, b in wrong_type_cases()]
    assert len(cases) > 80
    assert {kind for _, _, kind, _ in cases} == {"bad-frame"}
    for name, frame, kind, ref in [*cases, *_REFUSED]:
        witness.feed(name)
        peer.send_raw(frame)
        assert kind is not None
        assert_refused(await peer.sync(), kind, ref, name)
        await witness.check_echo()

    for name, body, errno_name in _SPAWN_FAILS:
        witness.feed(name)
        peer.send_body(body)
        child = body["id"]
        await peer.until_all(lambda _: peer.has(Exit, child))  # noqa: B023 (awaited here)
        assert peer.has(Error, child, kind="spawn-failed", errno=errno_name, ref="exec"), name
        assert peer.has(Exit, child, code=126) and not peer.has(Started, child), name
        peer.send(Close(child))
        await peer.until_all(lambda _: peer.has(Closed, child))  # noqa: B023
        await witness.check_echo()

    # Accepted although odd: the largest id; argv as msgpack str holding invalid UTF-8
    # (the bytes reach the child unchanged); an unknown key holding 3 MiB.
    top = 2**64 - 1
    peer.send_body(_body("exec", id=top, argv=[b"cat"]))
    peer.send(Data(top, 0, b"max id"))
    peer.send(Eof(top, 0))
    peer.send_raw(_raw_frame(b"\x83", _p("t"), _p("exec"), _p("id"), _p(60), _p("argv"),
                                   b"\x92", _p("echo"), _BAD_UTF8))
    await peer.until_all(lambda _: peer.has(Exit, top) and peer.has(Exit, 60))
    await peer.until_all(lambda _: peer.has(Eof, top, ch=1) and peer.has(Eof, 60, ch=1))
    assert peer.output(top, 1) == b"max id" and peer.has(Exit, top, code=0)
    assert peer.output(60, 1) == b"\xff\xfe\n" and peer.has(Exit, 60, code=0)
    before = len(errors_in(peer.frames))
    peer.send_body({"t": "ping", "n": 10**9, "zz": b"z" * (3 << 20), b"yy": [1, 2]})
    peer.send_raw(_raw_frame(b"\x83", _p("t"), _p("error"), _p("kind"), _p("x"),
                                   _p("msg"), _BAD_UTF8))
    await peer.sync()
    assert len(errors_in(peer.frames)) == before

    await witness.finish()


async def test_corpus_of_nasty_frames(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with spawned("--grace", "1", validate=False,
                           stderr_to=tmp_path / "agent-stderr") as process:
            await _corpus(process)
            # Decoding frames near the 4 MiB limit and 200,000-entry argvs left no bloat.
            assert rss_bytes(process.pid) < 150 << 20
            process.raw.send_body(_body("shutdown"))
            await process.raw.rest()
            assert await process.process.wait() == 0
        assert_healthy(process.raw)
        stderr = process.stderr()
        assert "Traceback" not in stderr, stderr


# ---------------------------------------------------------------------------- fatal

_NESTED = _raw_frame(b"\x81", _p("t"), b"\x91" * 100_000, b"\x00")
_FATAL: list[tuple[str, bytes, str]] = [
    ("truncated frame, then EOF", encode(Exec(70, (b"true",)))[:9], "malformed"),
    ("header announcing 4 GiB", b"\xff\xff\xff\xff", "frame-too-large"),
    ("header one byte over the limit", struct.pack(">I", DEFAULT_MAX_FRAME + 1),
     "frame-too-large"),
    ("not msgpack", _raw_frame(b"\xc1\xc1"), "malformed"),
    ("nested 100,000 deep", _NESTED, "malformed"),
    ("two values in one frame", _raw_frame(_p({"t": "ping", "n": 5}), b"\x00"), "malformed"),
    # Integer keys are refused by the unpacker (strict_map_key: their hashes are not
    # randomised, so many colliding keys would make decoding quadratic).
    ("integer map key", wire({"t": "ping", "n": 5, 7: 1}), "malformed"),
]


@pytest.mark.parametrize(("garbage", "kind"), [(g, k) for _, g, k in _FATAL],
                         ids=[name for name, _, _ in _FATAL])
async def test_fatal_input_ends_the_agent_cleanly(tmp_path: Path, garbage: bytes, kind: str
                                                  ) -> None:
    with trio.fail_after(30):
        async with spawned("--grace", "1", validate=False,
                           stderr_to=tmp_path / "agent-stderr") as process:
            peer = process.raw
            witness = Witness(peer)
            witness.start()
            witness.feed("before")
            await witness.check_echo()
            started = next(f for f in peer.frames if isinstance(f, Started))
            peer.send_raw(garbage)
            await peer.aclose_write()  # a truncated frame is only known to be one at EOF
            await peer.rest()
            assert await process.process.wait() == 1
        errors = errors_in(peer.frames)
        assert [e.kind for e in errors] == [kind]
        assert proc_stat(started.pid) is None  # the witness was killed and reaped
        stderr = process.stderr()
        assert "Traceback" not in stderr, stderr
