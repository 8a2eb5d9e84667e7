"""docs/protocol.md against the agent: a controller written from the document alone
(tests/spec_controller.py, no project imports) drives a real ``python -m agent``.

Each test names the section it checks. A failure here means the document and the agent
disagree: fix whichever is wrong, and keep this controller independent of ``protocol/``.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from spec_controller import (
    DATA_FRAME_OVERHEAD,
    MIN_MAX_FRAME,
    STREAM_LEVEL,
    Frame,
    SpecAgent,
    hello,
    pack,
)

ROOT = Path(__file__).resolve().parent.parent
NewAgent = Callable[..., SpecAgent]


@pytest.fixture
def new_agent(tmp_path: Path) -> Iterator[NewAgent]:
    agents: list[SpecAgent] = []

    def start(*args: str, **kwargs: Any) -> SpecAgent:
        spec = SpecAgent(tmp_path / f"agent{len(agents)}.stderr", args, **kwargs)
        agents.append(spec)
        return spec

    yield start
    for spec in agents:
        spec.kill()


@pytest.fixture
def spec(new_agent: NewAgent) -> SpecAgent:
    return new_agent()


def assert_no_python_internals(msg: str) -> None:
    """Section 3: msg is a sentence for people, not an exception's text."""
    for leak in ("strict_map_key", "ExtraData", "unpack(b)", "Unpack failed", "max_map_len",
                 "max_array_len", "StackError", "FormatError", "ValueError", "Traceback",
                 "NoneType"):
        assert leak not in msg, msg


# ---------------------------------------------------------------------------- 2 handshake


def test_agent_hello_has_the_fields_of_section_4_1(spec: SpecAgent) -> None:
    h = spec.agent_hello
    assert next(iter(h)) == "t"  # section 1: the reference encoder writes t first
    assert h["version"] == 1
    assert type(h["impl"]) is str and type(h["impl_version"]) is str
    assert type(h["max_frame"]) is int and h["max_frame"] >= MIN_MAX_FRAME
    assert type(h["window"]) is int and h["window"] > 0
    assert h["role"] == "agent"
    assert all(type(c) is str for c in h["caps"])
    assert {"signal-ack", "half-close", "env-policy", "stop"} <= set(h["caps"])
    spec.round_trip()


def test_frames_before_the_agents_hello_is_read(new_agent: NewAgent) -> None:
    # Section 2: the controller may send config and ping before it has the agent's hello.
    spec = new_agent(send_hello=False)
    spec.send_raw(pack(hello()) + pack({"t": "ping", "n": 3}))
    spec.expect("pong", n=3)


def test_second_hello_is_a_frame_level_handshake_error(spec: SpecAgent) -> None:
    spec.send(hello())
    error = spec.expect_error("handshake", ref="hello")
    assert error["msg"].startswith("second hello frame")
    assert "id" not in error
    spec.round_trip()


# ---------------------------------------------------------------------------- 3 stream-level


def _fatal(new_agent: NewAgent, raw: bytes, *, hello_first: bool = True,
           close: bool = False) -> tuple[Frame, SpecAgent]:
    """Section 3: the error is the agent's last frame, its output ends, status 1."""
    spec = new_agent(send_hello=hello_first)
    if hello_first:
        spec.round_trip()
    spec.send_raw(raw)
    if close:
        spec.close_input()
    assert spec.wait() == 1
    assert spec.received[-1]["t"] == "error", spec.received[-3:]
    error = spec.received[-1]
    assert error["kind"] in STREAM_LEVEL
    assert "id" not in error
    assert_no_python_internals(error["msg"])
    return error, spec


@pytest.mark.parametrize(("name", "raw", "kind", "ref"), [
    ("first frame not a hello", pack({"t": "ping", "n": 1}), "handshake", "ping"),
    ("hello without impl", pack({"t": "hello", "version": 1}), "handshake", "hello"),
    ("hello with a small max_frame", pack({**hello(), "max_frame": 1000}), "handshake",
     "hello"),
    ("hello of our own role", pack({**hello(), "role": "agent"}), "handshake", "hello"),
    ("another version", pack({"t": "hello", "version": 2}), "version-mismatch", "hello"),
])
def test_bad_first_frame(new_agent: NewAgent, name: str, raw: bytes, kind: str,
                         ref: str) -> None:
    # Section 3: ref is "the t of the frame at fault", on every error whose frame is known.
    error, _ = _fatal(new_agent, raw, hello_first=False)
    assert (error["kind"], error.get("ref")) == (kind, ref), error


def _body(raw: bytes) -> bytes:
    return len(raw).to_bytes(4, "big") + raw


@pytest.mark.parametrize(("name", "raw", "kind", "words"), [
    ("empty frame", b"\0\0\0\0", "malformed", "empty frame"),
    ("oversized", (4 << 20 | 1).to_bytes(4, "big"), "frame-too-large", "limit"),
    ("reserved byte", _body(b"\xc1"), "malformed", "0xc1"),
    ("truncated value", _body(b"\x82\xa1t"), "malformed", "ends inside"),
    ("trailing bytes", _body(b"\x81\xa1t\xa4ping\xc0"), "malformed", "more bytes follow"),
    ("array body", _body(b"\x91\x01"), "malformed", "array, not a map"),
    ("nil body", _body(b"\xc0"), "malformed", "nil, not a map"),
    ("integer key", _body(b"\x82\xa1t\xa4ping\x07\x01"), "malformed", "integer"),
    ("nested too deep", _body(b"\x81\xa1x" + b"\x91" * 5000 + b"\xc0"), "malformed", "deep"),
])
def test_stream_level_errors(new_agent: NewAgent, name: str, raw: bytes, kind: str,
                             words: str) -> None:
    error, _ = _fatal(new_agent, raw)
    assert error["kind"] == kind
    assert words in error["msg"], error
    assert "ref" not in error  # no frame could be named


def test_stream_ending_inside_a_frame_is_reported(new_agent: NewAgent) -> None:
    # Sections 1 and 3: the agent still tells the controller, which may only have closed
    # its own direction.
    error, _ = _fatal(new_agent, pack({"t": "ping", "n": 1})[:6], close=True)
    assert error["kind"] == "malformed"
    assert "inside a frame" in error["msg"]


def test_nothing_is_written_after_a_fatal_error(new_agent: NewAgent) -> None:
    # Sections 3 and 4.10: not even a log frame.
    _, spec = _fatal(new_agent, b"\0\0\0\0")
    assert [f["t"] for f in spec.received[-2:]] == ["pong", "error"]
    assert "protocol error" in spec.stderr()


# ---------------------------------------------------------------------------- 11.3 exit status


def test_exit_status_when_the_controller_is_lost(new_agent: NewAgent) -> None:
    # Section 11.3's table (a fatal protocol error: test_stream_level_errors).
    eof = new_agent()
    eof.round_trip()
    eof.close_input()
    assert eof.wait() == 0

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signalled = new_agent()
        signalled.round_trip()
        signalled.proc.send_signal(signum)
        assert signalled.wait() == 0, signum

    epipe = new_agent()
    epipe.round_trip()
    assert epipe.proc.stdout is not None
    epipe.proc.stdout.close()
    epipe.eof = True
    epipe.send({"t": "ping", "n": 1})  # the pong meets EPIPE
    assert epipe.proc.wait(15) == 0

    assert _fatal(new_agent, pack({"t": "ping", "n": 1})[:6], close=True)[1].wait() == 1


# ---------------------------------------------------------------------------- 4 frame-level


def _argv(*words: str) -> list[bytes]:
    return [w.encode() for w in words]


@pytest.mark.parametrize(("frame", "kind", "words"), [
    ({"n": 1}, "bad-frame", "'t'"),
    ({"t": "nope", "id": 3}, "unknown-type", "nope"),
    ({"t": "exec", "id": 1}, "bad-frame", "argv"),
    ({"t": "exec", "id": 1, "argv": []}, "bad-frame", "argv"),
    ({"t": "exec", "id": 1, "argv": "true"}, "bad-frame", "argv"),
    ({"t": "exec", "id": 1, "argv": [b"tr\0ue"]}, "bad-frame", "NUL"),
    ({"t": "exec", "id": 1, "argv": [b"true"], "path": b""}, "bad-frame", "path"),
    ({"t": "exec", "id": 1, "argv": [b"true"], "cwd": b""}, "bad-frame", "cwd"),
    ({"t": "exec", "id": 1, "argv": [b"true"], "env": [b"NOEQUALS"]}, "bad-frame", "K=V"),
    ({"t": "exec", "id": 1, "argv": [b"true"], "env": [b"=v"]}, "bad-frame", "K=V"),
    ({"t": "exec", "id": 1, "argv": [b"true"], "env_unset": [b"A=B"]}, "bad-frame",
     "env_unset"),
    ({"t": "exec", "id": 1, "argv": [b"true"], "env_unset": [b""]}, "bad-frame", "env_unset"),
    ({"t": "exec", "id": 1, "argv": [b"true"], "fds": [2]}, "bad-fd", "3"),
    ({"t": "exec", "id": 1, "argv": [b"true"], "fds": [2**31]}, "bad-fd", "range"),
    ({"t": "exec", "id": 1, "argv": [b"true"], "fds": [4, 4]}, "bad-fd", "twice"),
    ({"t": "exec", "id": True, "argv": [b"true"]}, "bad-frame", "'id'"),
    # Section 3: values are named by their msgpack types.
    ({"t": "exec", "id": 1, "argv": [b"true"], "fds": ["3"]}, "bad-frame", "not array ['3']"),
    ({"t": "ping", "n": -1}, "bad-frame", "not integer -1"),
    ({"t": "ping", "n": [None]}, "bad-frame", "not array [None]"),
    ({"t": "started", "id": 1, "pid": 5}, "bad-frame", "not sent by the controller"),
    ({"t": "goodbye"}, "bad-frame", "not sent by the controller"),
    ({"t": "config", "env_keep": [""]}, "bad-frame", "empty pattern"),
    ({"t": "config", "env_keep": ["/[/"]}, "bad-frame", "config frame"),
    ({"t": "signal", "id": 99, "sig": "TERM"}, "unknown-child", "99"),
    ({"t": "close", "id": 99}, "unknown-child", "99"),
    ({"t": "data", "id": 99, "ch": 0, "d": b"x"}, "unknown-child", "99"),
    ({"t": "window", "id": 99, "ch": 1, "n": 1}, "unknown-child", "99"),
])
def test_frame_level_errors(spec: SpecAgent, frame: dict[Any, Any], kind: str,
                            words: str) -> None:
    spec.send_raw(pack(frame))
    error = spec.expect("error")
    assert error["kind"] == kind, error
    assert words in error["msg"], error
    assert_no_python_internals(error["msg"])
    t, id = frame.get("t"), frame.get("id")
    assert error.get("ref") == (t if type(t) is str else None)
    assert error.get("id") == (id if type(id) is int and type(id) is not bool else None)
    spec.round_trip()  # section 3: the connection goes on
    # ... and the frame had no effect: id 1 is still free.
    exit_frame, _, _ = spec.run(1, _argv("true"))
    assert exit_frame["code"] == 0


def test_unknown_type_ref_is_truncated(spec: SpecAgent) -> None:
    spec.send({"t": "x" * 200})
    error = spec.expect_error("unknown-type")
    assert error["ref"] == "x" * 64


def test_unknown_keys_are_ignored(spec: SpecAgent) -> None:
    spec.send_raw(pack({"t": "ping", "n": 4, "future": [1, {"x": None}], b"binkey": 1}))
    spec.expect("pong", n=4)


def test_errors_about_a_live_child(spec: SpecAgent) -> None:
    # Section 3's table, the kinds that need a child: each leaves it as it was.
    window = spec.agent_hello["window"]
    spec.send({"t": "exec", "id": 1, "argv": _argv("cat"), "fds": [3]})
    spec.expect("started", id=1)
    cases: list[tuple[Frame, str]] = [
        ({"t": "exec", "id": 1, "argv": _argv("true")}, "duplicate-id"),
        ({"t": "data", "id": 1, "ch": 1, "d": b"x"}, "bad-channel"),
        ({"t": "data", "id": 1, "ch": 5, "d": b"x"}, "bad-channel"),
        ({"t": "window", "id": 1, "ch": 0, "n": 10}, "bad-channel"),
        ({"t": "stop", "id": 1, "ch": 0}, "bad-channel"),
        ({"t": "window", "id": 1, "ch": 1, "n": 0}, "bad-frame"),
        ({"t": "window", "id": 1, "ch": 1, "n": 2**62}, "bad-frame"),
        ({"t": "eof", "id": 1, "ch": 0, "n": 5}, "bad-frame"),
        ({"t": "signal", "id": 1, "sig": "SIGTERM"}, "bad-signal"),
        ({"t": "signal", "id": 1, "sig": "RTMIN"}, "bad-signal"),
        ({"t": "signal", "id": 1, "sig": "term"}, "bad-signal"),
    ]
    for frame, kind in cases:
        spec.send_raw(pack(frame))
        error = spec.expect("error")
        assert (error["kind"], error.get("id"), error.get("ref")) == (kind, 1, frame["t"]), (
            frame, error)
        assert_no_python_internals(error["msg"])
    # credit-exceeded: one byte beyond the agent's window, in one frame.
    assert window + 1 <= spec.agent_hello["max_frame"] - DATA_FRAME_OVERHEAD
    spec.send_raw(pack({"t": "data", "id": 1, "ch": 0, "d": b"y" * (window + 1)}))
    error = spec.expect_error("credit-exceeded", id=1, ref="data")
    # Nothing of it was delivered nor deducted: a full window still goes through.
    spec.write(1, 0, b"z" * window)
    spec.send({"t": "eof", "id": 1, "ch": 0, "n": window})
    assert spec.output(1) == b"z" * window
    spec.send({"t": "data", "id": 1, "ch": 0, "d": b"late"})
    spec.expect_error("channel-closed", id=1, ref="data")
    spec.expect("exit", id=1, code=0)
    spec.send({"t": "signal", "id": 1, "sig": "TERM"})
    exited = spec.expect_error("child-exited", id=1, ref="signal")
    assert exited["errno"] == "ESRCH"
    # In one write, so that they all arrive before the agent can answer with closed:
    # after closed the id names no child (unknown-child).
    spec.send_raw(pack({"t": "close", "id": 1}) + pack({"t": "close", "id": 1})
                  + pack({"t": "data", "id": 1, "ch": 3, "d": b"after close"}))
    spec.expect_error("bad-frame", id=1, ref="close")
    spec.expect_error("channel-closed", id=1, ref="data")
    spec.expect("closed", id=1)
    spec.send({"t": "close", "id": 1})
    spec.expect_error("unknown-child", id=1, ref="close")


def test_signal_hint_for_a_sig_prefix(spec: SpecAgent) -> None:
    spec.send({"t": "exec", "id": 1, "argv": _argv("sleep", "30")})
    spec.expect("started", id=1)
    spec.send({"t": "signal", "id": 1, "sig": "SIGTERM"})
    assert "SIG prefix" in spec.expect_error("bad-signal", id=1)["msg"]
    spec.close(1)


def test_write_failed_when_the_child_closed_its_stdin(spec: SpecAgent) -> None:
    spec.send({"t": "exec", "id": 1, "argv": _argv("sh", "-c", "exec 0<&-; echo ready; "
                                                  "exec sleep 30")})
    spec.expect("started", id=1)
    assert spec.expect("data", id=1, ch=1)["d"] == b"ready\n"
    spec.send({"t": "data", "id": 1, "ch": 0, "d": b"nobody reads this"})
    error = spec.expect_error("write-failed", id=1, ref="data")
    assert error["ch"] == 0 and error["errno"] in ("EPIPE", "ECONNRESET")
    # Section 3: later data is discarded too, and its credit still granted back.
    spec.write(1, 0, b"x" * spec.agent_hello["window"])
    spec.round_trip()
    assert not [f for f in spec.pending if f["t"] == "error"]
    spec.close(1)


# ---------------------------------------------------------------------------- 6 lifecycle


def _section_12() -> tuple[bytes, bytes, bytes]:
    """The exec, data and eof frames of the worked example, as the document spells them."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text[text.index("## 12. Worked example"):]
    blocks = re.findall(r"```\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 2, blocks

    def dump(block: str) -> bytes:
        hex_bytes = []
        for line in block.splitlines():
            for token in line.split():
                if not re.fullmatch(r"[0-9a-f]{2}", token):
                    break
                hex_bytes.append(token)
        return bytes.fromhex("".join(hex_bytes))

    (eof,) = re.findall(r"is\n?`((?:[0-9a-f]{2}[ \n])+[0-9a-f]{2})`", section)
    return dump(blocks[0]), dump(blocks[1]), bytes.fromhex(eof.replace("\n", " "))


def test_the_worked_example_of_section_12(spec: SpecAgent) -> None:
    exec_frame, data_frame, eof_frame = _section_12()
    assert len(exec_frame) == 68 and len(data_frame) == 27
    spec.send_raw(exec_frame)
    spec.expect("started", id=1)
    data = spec.expect("data", id=1, ch=1, d=b"hi\n")
    eof = spec.expect("eof", id=1, ch=1, n=3)
    assert spec.received_raw[spec.received.index(data)] == data_frame
    assert spec.received_raw[spec.received.index(eof)] == eof_frame
    assert spec.expect("exit", id=1)["code"] == 0
    spec.close(1)


def test_exec_started_exit(spec: SpecAgent) -> None:
    spec.send({"t": "exec", "id": 1, "argv": _argv("sh", "-c", "echo out; echo err >&2; "
                                                  "exit 7")})
    started = spec.expect("started", id=1)
    assert type(started["pid"]) is int and started["pid"] > 0
    assert started.get("uid") == os.geteuid() and started.get("gid") == os.getegid()
    assert spec.output(1, 1) == b"out\n"
    assert spec.output(1, 2) == b"err\n"
    exit_frame = spec.expect("exit", id=1)
    assert (exit_frame["code"], exit_frame.get("sig"), exit_frame.get("core", False)) == (
        7, None, False)
    spec.close(1)
    # Section 6.6: the id may be reused.
    assert spec.run(1, _argv("true"))[0]["code"] == 0


def _spawn_failure(spec: SpecAgent, **fields: Any) -> tuple[Frame, Frame]:
    before = len(spec.received)
    spec.send({"t": "exec", "id": 1, **fields})
    error = spec.expect_error("spawn-failed", id=1, ref="exec")
    exit_frame = spec.expect("exit", id=1)
    assert not [f for f in spec.received[before:] if f["t"] == "started"]
    spec.close(1)
    return error, exit_frame


def test_missing_program_is_127(spec: SpecAgent) -> None:
    error, exit_frame = _spawn_failure(spec, argv=_argv("no-such-program-here"))
    assert (error["errno"], exit_frame["code"]) == ("ENOENT", 127)
    assert "searched $PATH" in error["msg"]
    error, exit_frame = _spawn_failure(spec, argv=_argv("/no/such/program"))
    assert (error["errno"], exit_frame["code"]) == ("ENOENT", 127)


def test_missing_interpreter_is_127(spec: SpecAgent, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/no/such/sh\n")
    script.chmod(0o755)
    error, exit_frame = _spawn_failure(spec, argv=[os.fsencode(script)])
    assert (error["errno"], exit_frame["code"]) == ("ENOENT", 127)
    assert "/no/such/sh" in error["msg"]


def test_missing_cwd_is_enoent_with_126(spec: SpecAgent) -> None:
    # Section 6.1: only a program not found is 127.
    error, exit_frame = _spawn_failure(spec, argv=_argv("true"), cwd=b"/no/such/dir")
    assert (error["errno"], exit_frame["code"]) == ("ENOENT", 126)
    assert "/no/such/dir" in error["msg"]


def test_program_not_executable_is_126(spec: SpecAgent, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    script.chmod(stat.S_IRUSR)  # no x bit at all: EACCES even for root
    error, exit_frame = _spawn_failure(spec, argv=[os.fsencode(script)])
    assert (error["errno"], exit_frame["code"]) == ("EACCES", 126)


def test_program_search_without_path(spec: SpecAgent, tmp_path: Path) -> None:
    # Section 4.2: without PATH in the child's environment, /bin and /usr/bin.
    exit_frame, out, _ = spec.run(1, _argv("env"), env=[])  # /usr/bin/env
    assert (exit_frame["code"], out) == (0, b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "only-here").write_text("#!/bin/sh\necho found\n")
    (bin_dir / "only-here").chmod(0o755)
    exit_frame, out, _ = spec.run(2, _argv("only-here"), env=[b"PATH=" + os.fsencode(bin_dir)])
    assert out == b"found\n"
    _, exit_frame = _spawn_failure(spec, argv=_argv("only-here"), env=[b"X=1"])
    assert exit_frame["code"] == 127


def test_too_many_children_must_still_be_closed(new_agent: NewAgent) -> None:
    # Section 6.1: a refused exec exists (exit 126, id in use) until its close.
    spec = new_agent("--max-children", "1")
    spec.send({"t": "exec", "id": 1, "argv": _argv("sleep", "30")})
    spec.expect("started", id=1)
    spec.send({"t": "exec", "id": 2, "argv": _argv("true")})
    spec.expect_error("too-many-children", id=2, ref="exec")
    assert spec.expect("exit", id=2)["code"] == 126
    spec.send({"t": "exec", "id": 2, "argv": _argv("true")})
    spec.expect_error("duplicate-id", id=2, ref="exec")
    spec.close(2)
    spec.close(1)
    assert spec.expect("exit", id=1)["code"] == 137
    assert spec.run(2, _argv("true"))[0]["code"] == 0


# ---------------------------------------------------------------------------- 9 signals


def test_signal_is_acked_and_kills(spec: SpecAgent) -> None:
    spec.send({"t": "exec", "id": 1, "argv": _argv("sleep", "30")})
    spec.expect("started", id=1)
    spec.send({"t": "signal", "id": 1, "sig": "TERM"})
    ack = spec.expect("signal_ack", id=1, sig="TERM")
    assert ack.get("errno") is None
    exit_frame = spec.expect("exit", id=1)
    assert (exit_frame["code"], exit_frame["sig"]) == (128 + signal.SIGTERM, "TERM")
    spec.close(1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux signal numbers")
@pytest.mark.parametrize(("number", "name"), [(16, "STKFLT"), (34, "RTMIN"), (35, "35")])
def test_exit_signal_names_outside_section_9(spec: SpecAgent, number: int,
                                             name: str) -> None:
    # Section 4.9: the agent's OS's name (outside section 9's list), or the number.
    code = f"import os; os.kill(os.getpid(), {number})"
    exit_frame, _, _ = spec.run(1, [sys.executable.encode(), b"-c", code.encode()])
    assert (exit_frame["code"], exit_frame["sig"]) == (128 + number, name)


def test_close_kills_a_running_child(spec: SpecAgent) -> None:
    spec.send({"t": "exec", "id": 1, "argv": _argv("sleep", "30")})
    spec.expect("started", id=1)
    spec.send({"t": "close", "id": 1})
    exit_frame = spec.expect("exit", id=1)
    assert (exit_frame["code"], exit_frame["sig"]) == (137, "KILL")
    spec.expect("closed", id=1)
    assert spec.received.index(exit_frame) < len(spec.received) - 1


# ---------------------------------------------------------------------------- 7 credit


def test_credit_agent_to_controller(new_agent: NewAgent) -> None:
    # Our window is small: the agent must stop at it and go on with each grant.
    spec = new_agent(window=1000)
    size = 100_000
    exit_frame, out, _ = spec.run(1, _argv("head", "-c", str(size), "/dev/zero"))
    assert (exit_frame["code"], out) == (0, bytes(size))  # credit checked on each frame


def test_credit_agent_to_controller_waits_for_a_window(new_agent: NewAgent) -> None:
    spec = new_agent(window=1000, auto_grant=False)
    spec.send({"t": "exec", "id": 1, "argv": _argv("head", "-c", "5000", "/dev/zero")})
    got = 0
    while got < 1000:
        got += len(spec.expect("data", id=1, ch=1)["d"])
    spec.round_trip()
    assert spec.got[(1, 1)] == 1000  # not a byte beyond the credit
    # Section 8: exit waits for what the child wrote before it, so for our credit.
    assert not [f for f in spec.pending if f["t"] == "exit"]
    spec.grant(1, 1, 4000)
    while spec.got[(1, 1)] < 5000:
        spec.expect("data", id=1, ch=1)
    spec.expect("eof", id=1, ch=1, n=5000)
    spec.expect("exit", id=1, code=0)
    spec.close(1)


def test_credit_controller_to_agent_is_returned_at_half_a_window(spec: SpecAgent) -> None:
    window = spec.agent_hello["window"]
    size = 3 * window + 12345
    spec.send({"t": "exec", "id": 1, "argv": _argv("cat")})
    spec.expect("started", id=1)
    spec.write(1, 0, b"a" * size)  # waits for the agent's window frames
    spec.send({"t": "eof", "id": 1, "ch": 0, "n": size})
    assert spec.output(1) == b"a" * size
    grants = [w["n"] for w in spec.agent_windows if w["id"] == 1 and w["ch"] == 0]
    assert sum(grants) >= size - window
    assert all(n >= window // 2 for n in grants), grants
    spec.expect("exit", id=1)
    spec.close(1)


def test_data_for_a_child_that_never_started_is_granted_back(spec: SpecAgent) -> None:
    spec.send({"t": "exec", "id": 1, "argv": _argv("no-such-program-here")})
    spec.send({"t": "data", "id": 1, "ch": 0, "d": b"x" * 100})
    spec.expect_error("spawn-failed", id=1)
    assert spec.expect("window", id=1, ch=0)["n"] == 100
    spec.close(1)


# ---------------------------------------------------------------------------- 5 channels


def test_extra_fd_half_close(spec: SpecAgent) -> None:
    # Section 5: our eof on channel 3 is shutdown(SHUT_WR); the child still writes back.
    spec.send({"t": "exec", "id": 1, "argv": _argv("sh", "-c", "cat <&3 >&3"), "fds": [3]})
    spec.expect("started", id=1)
    spec.send({"t": "data", "id": 1, "ch": 3, "d": b"through fd 3"})
    spec.send({"t": "eof", "id": 1, "ch": 3, "n": 12})
    assert spec.output(1, 3) == b"through fd 3"
    spec.send({"t": "eof", "id": 1, "ch": 0, "n": 0})
    assert spec.expect("exit", id=1)["code"] == 0
    spec.close(1)


def test_stop_ends_a_channel_with_its_eof(spec: SpecAgent) -> None:
    # Section 4.16: the child's writes fail; the eof counts every byte sent.
    spec.send({"t": "exec", "id": 1, "argv": _argv("yes")})
    spec.expect("started", id=1)
    spec.expect("data", id=1, ch=1)
    spec.stopped.add((1, 1))
    spec.send({"t": "stop", "id": 1, "ch": 1})
    eof = spec.expect("eof", id=1, ch=1)
    assert eof["n"] == spec.got[(1, 1)]
    exit_frame = spec.expect("exit", id=1)
    assert (exit_frame["code"], exit_frame["sig"]) == (128 + signal.SIGPIPE, "PIPE")
    spec.round_trip()
    assert not [f for f in spec.pending if f["t"] == "data" and f["ch"] == 1
                and spec.received.index(f) > spec.received.index(eof)]
    spec.close(1)
    spec.send({"t": "stop", "id": 1, "ch": 2})
    spec.expect_error("unknown-child", id=1, ref="stop")


def test_stop_twice_and_windows_after_eof(spec: SpecAgent) -> None:
    spec.send({"t": "exec", "id": 1, "argv": _argv("sleep", "30")})
    spec.expect("started", id=1)
    spec.stopped.add((1, 2))
    # In one write, so that both arrive before the agent's eof can cross the second.
    spec.send_raw(pack({"t": "stop", "id": 1, "ch": 2}) + pack({"t": "stop", "id": 1, "ch": 2}))
    error = spec.expect_error("bad-frame", id=1, ref="stop")
    assert "already stopped" in error["msg"]
    spec.expect("eof", id=1, ch=2, n=0)
    # Section 4.6: a window that crosses the channel's eof is dropped silently.
    spec.send({"t": "window", "id": 1, "ch": 2, "n": 100})
    spec.round_trip()
    assert not [f for f in spec.pending if f["t"] == "error"]
    spec.close(1)


def test_ten_interleaved_children(spec: SpecAgent) -> None:
    for id in range(1, 11):
        spec.send({"t": "exec", "id": id, "argv": _argv("cat")})
    for id in range(1, 11):
        spec.expect("started", id=id)
    for round_ in range(3):
        for id in range(1, 11):
            spec.send({"t": "data", "id": id, "ch": 0, "d": f"{id}:{round_};".encode()})
    for id in range(10, 0, -1):
        spec.send({"t": "eof", "id": id, "ch": 0})
    for id in range(1, 11):
        assert spec.output(id) == f"{id}:0;{id}:1;{id}:2;".encode()
        assert spec.expect("exit", id=id)["code"] == 0
    for id in range(1, 11):
        spec.close(id)


# ---------------------------------------------------------------------------- 10 environment


def test_env_policy_and_exec_env_fields(new_agent: NewAgent) -> None:
    env = {"PATH": os.environ.get("PATH", os.defpath), "KEEP_A": "1", "KEEP_B": "2",
           "LOSE": "3", "MPROXY_SECRET": "4", "LC_X": "5"}
    spec = new_agent(env=env)

    def names(id: int, **fields: Any) -> set[str]:
        _, out, _ = spec.run(id, _argv("/usr/bin/env"), **fields)
        return {line.split("=", 1)[0] for line in out.decode().splitlines()}

    # Section 10's defaults: PATH and LC_* kept, MPROXY_* removed, the rest dropped.
    assert {"PATH", "LC_X"} <= names(1) and not names(1) & {"KEEP_A", "LOSE", "MPROXY_SECRET"}
    spec.send({"t": "config", "env_keep": ["KEEP_*", "/^MPROXY_/"], "env_remove": ["KEEP_B"]})
    assert names(2) == {"KEEP_A", "MPROXY_SECRET"}  # remove wins, then keep
    spec.send({"t": "config", "env_keep": ["/[/"]})
    spec.expect_error("bad-frame", ref="config")
    assert names(3) == {"KEEP_A", "MPROXY_SECRET"}  # the whole bad frame had no effect
    spec.send({"t": "config", "env_remove": []})  # env_keep stays as it was
    assert names(4) == {"KEEP_A", "KEEP_B", "MPROXY_SECRET"}
    _, out, _ = spec.run(5, _argv("/usr/bin/env"), env=[b"A=1", b"B=2", b"A=3"],
                         env_unset=[b"B"], env_set=[b"C=4"])
    assert sorted(out.split()) == [b"A=3", b"C=4"]


# ---------------------------------------------------------------------------- 11 endings


def test_ping_pong(spec: SpecAgent) -> None:
    for n in (0, 2**64 - 1):
        spec.round_trip(n)


def test_shutdown_goodbye(spec: SpecAgent) -> None:
    spec.send({"t": "exec", "id": 1, "argv": _argv("cat")})
    spec.expect("started", id=1)
    spec.send({"t": "shutdown"})
    spec.send({"t": "exec", "id": 2, "argv": _argv("true")})
    spec.expect_error("shutting-down", id=2, ref="exec")
    # Section 6.1: a shutting-down exec never existed.
    spec.send({"t": "close", "id": 2})
    spec.expect_error("unknown-child", id=2, ref="close")
    spec.round_trip()  # the running child still works
    spec.send({"t": "data", "id": 1, "ch": 0, "d": b"last words"})
    spec.send({"t": "eof", "id": 1, "ch": 0, "n": 10})
    assert spec.output(1) == b"last words"
    assert spec.expect("exit", id=1)["code"] == 0
    assert spec.wait() == 0
    assert spec.received[-1] == {"t": "goodbye"}


def test_shutdown_then_eof_is_a_half_close(spec: SpecAgent) -> None:
    spec.send({"t": "exec", "id": 1, "argv": _argv("sh", "-c", "echo bye")})
    spec.send({"t": "shutdown"})
    spec.close_input()
    assert spec.wait() == 0
    assert spec.received[-1] == {"t": "goodbye"}
    assert [f["d"] for f in spec.received if f["t"] == "data"] == [b"bye\n"]
