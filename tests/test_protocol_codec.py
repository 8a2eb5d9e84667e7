"""Codec tests: every frame type round-trips, the content rules hold, no I/O involved.

The strategies here generate only frames that satisfy ``check_frame``; frames that break
a rule are generated separately and must fail with the precise error.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import msgpack
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    DATA_FRAME_OVERHEAD,
    HEADER_SIZE,
    MAX_ID,
    MIN_MAX_FRAME,
    PROTOCOL_VERSION,
    SIGNAL_NAMES,
    Close,
    Closed,
    Config,
    Data,
    Eof,
    Error,
    ErrorKind,
    Exec,
    Exit,
    Frame,
    FrameDecoder,
    Goodbye,
    Hello,
    Log,
    Ping,
    Pong,
    RemoteProtocolError,
    Shutdown,
    Signal,
    SignalAck,
    Started,
    Stop,
    Window,
    encode,
    encode_data_header,
)
from protocol._frames import FRAME_TYPES

SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------- helpers


def wire(body: dict[str, Any], *, surrogates: bool = False) -> bytes:
    """A frame built by hand from a msgpack map (bytes → bin, str → str).

    With ``surrogates`` a str holding surrogate escapes is packed as the raw bytes they
    stand for, i.e. a msgpack str that is not valid UTF-8.
    """
    packed: bytes = msgpack.packb(
        body, use_bin_type=True,
        unicode_errors="surrogateescape" if surrogates else "strict",
    )
    return struct.pack(">I", len(packed)) + packed


def decode_one(raw: bytes, max_frame: int = 1 << 24) -> Frame:
    decoder = FrameDecoder(max_frame)
    decoder.feed(raw)
    frame = decoder.next_frame()
    assert frame is not None
    assert decoder.next_frame() is None
    assert decoder.buffered == 0
    return frame


def decode_error(raw: bytes) -> RemoteProtocolError:
    decoder = FrameDecoder(1 << 24)
    decoder.feed(raw + encode(Ping(n=7)))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert not info.value.fatal
    # the bad frame was consumed; the stream goes on
    assert decoder.next_frame() == Ping(n=7)
    return info.value


# ----------------------------------------------------------------------------- strategies

uints = st.one_of(st.integers(0, 300), st.integers(0, MAX_ID), st.just(MAX_ID))
ids = uints
# str fields: any Unicode text a msgpack str can carry (no lone surrogates)
texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=24)
# OS strings: any bytes but NUL, deliberately including invalid UTF-8
os_bytes = st.binary(max_size=24).map(lambda b: b.replace(b"\0", b"\xff"))
nonempty_os = os_bytes.map(lambda b: b or b"\x80")
env_names = st.binary(min_size=1, max_size=12).map(
    lambda b: b.replace(b"\0", b"\xfe").replace(b"=", b"_")
)
env_entries = st.builds(lambda k, v: k + b"=" + v, env_names, os_bytes)
extra_fds = st.lists(
    st.one_of(st.integers(3, 20), st.integers(3, 2**31 - 1)), unique=True, max_size=5
).map(tuple)
# around the bin16/bin32 boundary; built by repetition (drawing 64 KiB byte by byte is slow)
big_payloads = st.builds(
    lambda n, pattern: (pattern * n)[:n], st.integers(65530, 65540), st.binary(min_size=1)
)
signal_names = st.sampled_from(sorted(SIGNAL_NAMES))
patterns = st.lists(texts.filter(bool), max_size=5).map(tuple)


def tuples(elements: st.SearchStrategy[Any], min_size: int = 0) -> st.SearchStrategy[Any]:
    return st.lists(elements, min_size=min_size, max_size=6).map(tuple)


STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "hello": st.builds(
        Hello,
        version=st.just(PROTOCOL_VERSION),
        impl=texts,
        impl_version=texts,
        max_frame=st.integers(MIN_MAX_FRAME, MAX_ID),
        window=st.integers(1, MAX_ID),
        caps=tuples(texts),
        role=st.sampled_from([None, "agent", "controller"]),
    ),
    "exec": st.builds(
        Exec,
        id=ids,
        argv=tuples(os_bytes, min_size=1),
        path=st.none() | nonempty_os,
        env=st.none() | tuples(env_entries),
        env_set=tuples(env_entries),
        env_unset=tuples(env_names),
        cwd=st.none() | nonempty_os,
        fds=extra_fds,
        drop_sudo=st.booleans(),
    ),
    "started": st.builds(Started, id=ids, pid=uints, uid=st.none() | uints,
                         gid=st.none() | uints),
    "data": st.builds(
        Data, id=ids, ch=uints,
        data=st.one_of(st.binary(max_size=300), big_payloads),
    ),
    "eof": st.builds(Eof, id=ids, ch=uints, n=st.none() | uints),
    "window": st.builds(Window, id=ids, ch=uints, n=st.integers(1, MAX_ID)),
    "stop": st.builds(Stop, id=ids, ch=uints),
    "signal": st.builds(Signal, id=ids, sig=signal_names),
    "signal_ack": st.builds(SignalAck, id=ids, sig=texts, errno=st.none() | texts),
    "exit": st.builds(
        Exit, id=ids, code=st.integers(-(2**63), MAX_ID), sig=st.none() | texts,
        core=st.booleans(),
    ),
    "error": st.builds(
        Error, kind=texts, msg=texts, id=st.none() | ids, errno=st.none() | texts,
        ref=st.none() | texts,
    ),
    "log": st.builds(Log, level=texts, msg=texts, attrs=st.dictionaries(texts, texts, max_size=5)),
    "close": st.builds(Close, id=ids),
    "closed": st.builds(Closed, id=ids),
    "config": st.builds(Config, env_keep=st.none() | patterns, env_remove=st.none() | patterns),
    "shutdown": st.just(Shutdown()),
    "goodbye": st.just(Goodbye()),
    "ping": st.builds(Ping, n=uints),
    "pong": st.builds(Pong, n=uints),
}

any_frame: st.SearchStrategy[Frame] = st.one_of(*STRATEGIES.values())


def test_strategies_cover_every_frame_type() -> None:
    assert STRATEGIES.keys() == FRAME_TYPES.keys()
    assert len(FRAME_TYPES) == 19


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("ftype", sorted(FRAME_TYPES))
@SETTINGS
@given(data=st.data())
def test_round_trip_every_frame_type(ftype: str, data: st.DataObject) -> None:
    frame = data.draw(STRATEGIES[ftype])
    assert ftype == frame.TYPE
    raw = encode(frame)
    (length,) = struct.unpack(">I", raw[:HEADER_SIZE])
    assert length == len(raw) - HEADER_SIZE
    body = msgpack.unpackb(raw[HEADER_SIZE:], raw=False)
    assert type(body) is dict
    assert body["t"] == ftype
    # None fields are left out, never sent as nil
    assert None not in body.values()
    assert decode_one(raw) == frame


@SETTINGS
@given(frames=st.lists(any_frame, min_size=1, max_size=8))
def test_round_trip_back_to_back(frames: list[Frame]) -> None:
    decoder = FrameDecoder(1 << 24)
    decoder.feed(b"".join(encode(f) for f in frames))
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    assert out == frames


def test_wire_keys_are_the_field_names() -> None:
    frame = Exec(id=3, argv=(b"ls", b"-l"), path=b"/bin/ls", cwd=b"/tmp", fds=(3, 7))
    body = msgpack.unpackb(encode(frame)[HEADER_SIZE:], raw=False)
    assert body == {
        "t": "exec", "id": 3, "argv": [b"ls", b"-l"], "path": b"/bin/ls", "env_set": [],
        "env_unset": [], "cwd": b"/tmp", "fds": [3, 7], "drop_sudo": False,
    }
    # data payload travels under "d", as msgpack bin
    assert msgpack.unpackb(encode(Data(id=1, ch=0, data=b"x"))[HEADER_SIZE:], raw=False) == {
        "t": "data", "id": 1, "ch": 0, "d": b"x",
    }
    for cls in FRAME_TYPES.values():
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        assert "t" not in names


def test_os_strings_travel_as_bin() -> None:
    raw = encode(Exec(id=1, argv=(b"\xff\xfe", b"caf\xc3\xa9"), env=(b"A=\x80",), cwd=b"/\xe9"))
    # 0xc4 = bin8; a str would be 0xa0-0xbf / 0xd9
    assert b"\xc4\x02\xff\xfe" in raw
    assert b"\xc4\x05caf\xc3\xa9" in raw
    assert decode_one(raw) == Exec(
        id=1, argv=(b"\xff\xfe", b"caf\xc3\xa9"), env=(b"A=\x80",), cwd=b"/\xe9"
    )


@SETTINGS
@given(argv=tuples(os_bytes, min_size=1), path=nonempty_os, cwd=nonempty_os,
       env=tuples(env_entries), env_set=tuples(env_entries), env_unset=tuples(env_names))
def test_os_strings_accepted_as_str_with_surrogateescape(
    *,
    argv: tuple[bytes, ...], path: bytes, cwd: bytes, env: tuple[bytes, ...],
    env_set: tuple[bytes, ...], env_unset: tuple[bytes, ...],
) -> None:
    def as_str(b: bytes) -> str:
        return b.decode("utf-8", "surrogateescape")

    raw = wire(
        {
            "t": "exec", "id": 5, "argv": [as_str(a) for a in argv], "path": as_str(path),
            "cwd": as_str(cwd), "env": [as_str(e) for e in env],
            "env_set": [as_str(e) for e in env_set],
            "env_unset": [as_str(e) for e in env_unset],
        },
        surrogates=True,
    )
    # on the wire these are msgpack str (not bin) carrying the raw bytes
    body = msgpack.unpackb(raw[HEADER_SIZE:], raw=False, unicode_errors="surrogateescape")
    assert all(type(a) is str for a in body["argv"])
    assert type(body["path"]) is str
    assert decode_one(raw) == Exec(
        id=5, argv=argv, path=path, cwd=cwd, env=env, env_set=env_set, env_unset=env_unset
    )


def test_str_os_string_by_hand() -> None:
    # fixstr of 4 bytes, "ab\xffc": not UTF-8, mapped back byte for byte
    body = (
        b"\x84" + msgpack.packb("t") + msgpack.packb("exec") + msgpack.packb("id") + b"\x01"
        + msgpack.packb("argv") + b"\x92\xa4ab\xffc\xa2\xc3\xa9"
        + msgpack.packb("cwd") + b"\xa2/\xff"
    )
    frame = decode_one(struct.pack(">I", len(body)) + body)
    assert frame == Exec(id=1, argv=(b"ab\xffc", "é".encode()), cwd=b"/\xff")


@SETTINGS
@given(raw=st.binary(max_size=30))
def test_invalid_utf8_in_str_fields_round_trips(raw: bytes) -> None:
    # A str field holding invalid UTF-8 decodes with surrogateescape; encoding that str
    # gives back the same wire bytes, so a peer's string can always be echoed.
    text = raw.decode("utf-8", "surrogateescape")
    sent = wire({"t": "log", "level": "info", "msg": text, "attrs": {}}, surrogates=True)
    frame = decode_one(sent)
    assert frame == Log(level="info", msg=text)
    assert encode(frame) == sent


def test_unknown_keys_are_ignored() -> None:
    frame = decode_one(wire({"t": "ping", "n": 4, "future": [1, {"x": b"y"}], "zz": None}))
    assert frame == Ping(n=4)


def test_nil_optional_field_means_default() -> None:
    frame = decode_one(wire({
        "t": "exec", "id": 1, "argv": [b"x"], "path": None, "env": None, "env_set": None,
        "env_unset": None, "cwd": None, "fds": None, "drop_sudo": None,
    }))
    assert frame == Exec(id=1, argv=(b"x",))
    assert decode_one(wire({"t": "eof", "id": 1, "ch": 0})) == Eof(id=1, ch=0, n=None)
    assert decode_one(wire({"t": "hello", "version": 1, "impl": "x", "impl_version": "1",
                            "max_frame": MIN_MAX_FRAME, "window": 1})) == Hello(
        version=1, impl="x", impl_version="1", max_frame=MIN_MAX_FRAME, window=1, caps=())


def test_started_uid_and_gid_are_optional() -> None:
    # An older agent sends started without them; they are None then, and never sent as nil.
    assert decode_one(wire({"t": "started", "id": 1, "pid": 5})) == Started(id=1, pid=5)
    frame = decode_one(wire({"t": "started", "id": 1, "pid": 5, "uid": 65534, "gid": 0}))
    assert (frame.uid, frame.gid) == (65534, 0)  # type: ignore[attr-defined]
    assert msgpack.unpackb(encode(Started(id=1, pid=5))[HEADER_SIZE:]) == {
        "t": "started", "id": 1, "pid": 5}
    exc = decode_error(wire({"t": "started", "id": 1, "pid": 5, "uid": -1}))
    assert exc.kind == ErrorKind.BAD_FRAME
    assert "started frame: field 'uid' must be an unsigned integer" in exc.message


def test_exact_bytes_of_a_small_frame() -> None:
    assert encode(Ping(n=1)) == b"\x00\x00\x00\x0b\x82\xa1t\xa4ping\xa1n\x01"
    assert encode(Shutdown()) == b"\x00\x00\x00\x0c\x81\xa1t\xa8shutdown"


# ----------------------------------------------------------------------------- data header


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 1 << 20])
@pytest.mark.parametrize(("id", "ch"), [(0, 0), (127, 1), (128, 2), (2**32, 3), (MAX_ID, MAX_ID)])
def test_data_header_plus_payload_equals_encoded_data(id: int, ch: int, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"\x5a" * (size % 256)
    header = encode_data_header(id, ch, size)
    assert len(header) <= DATA_FRAME_OVERHEAD
    raw = header + payload
    assert raw == encode(Data(id=id, ch=ch, data=payload))
    # the right msgpack bin flavour sits right before the payload
    marker = header[-(1 + (1 if size < 256 else 2 if size < 65536 else 4))]
    assert marker == (0xC4 if size < 256 else 0xC5 if size < 65536 else 0xC6)
    assert decode_one(raw) == Data(id=id, ch=ch, data=payload)


def test_data_overhead_bound_is_tight_enough() -> None:
    # the largest possible header (uint64 id and ch, bin32) fits in DATA_FRAME_OVERHEAD
    assert len(encode_data_header(MAX_ID, MAX_ID, 2**32 - 100)) <= DATA_FRAME_OVERHEAD


@SETTINGS
@given(id=ids, ch=uints, payload=st.one_of(st.binary(max_size=300), big_payloads))
def test_data_header_property(id: int, ch: int, payload: bytes) -> None:
    raw = encode_data_header(id, ch, len(payload)) + payload
    assert decode_one(raw) == Data(id=id, ch=ch, data=payload)


# ----------------------------------------------------------------------------- content rules


def exec_body(**fields: Any) -> dict[str, Any]:
    return {"t": "exec", "id": 9, "argv": [b"prog"], **fields}


@pytest.mark.parametrize(
    ("fields", "kind", "fragment"),
    [
        ({"argv": []}, ErrorKind.BAD_FRAME, "exec frame: argv must not be empty"),
        ({"argv": [b"a", b"b\0c"]}, ErrorKind.BAD_FRAME, "exec frame: argv[1] contains a NUL"),
        ({"path": b"/bin/\0"}, ErrorKind.BAD_FRAME, "exec frame: path contains a NUL byte"),
        ({"cwd": b"\0"}, ErrorKind.BAD_FRAME, "exec frame: cwd contains a NUL byte"),
        ({"env": [b"A=1", b"B=\0"]}, ErrorKind.BAD_FRAME, "exec frame: env[1] contains a NUL"),
        ({"env_set": [b"\0=1"]}, ErrorKind.BAD_FRAME, "exec frame: env_set[0] contains a NUL"),
        ({"env_unset": [b"X\0"]}, ErrorKind.BAD_FRAME, "exec frame: env_unset[0] contains"),
        ({"path": b""}, ErrorKind.BAD_FRAME, "exec frame: path and cwd must not be empty"),
        ({"cwd": b""}, ErrorKind.BAD_FRAME, "exec frame: path and cwd must not be empty"),
        ({"env": [b"NOEQUALS"]}, ErrorKind.BAD_FRAME, "exec frame: env[0] b'NOEQUALS' is not of"),
        ({"env": [b"=1"]}, ErrorKind.BAD_FRAME, "exec frame: env[0] b'=1' is not of the form K=V"),
        ({"env_set": [b"A=1", b""]}, ErrorKind.BAD_FRAME, "exec frame: env_set[1] b'' is not"),
        ({"env_unset": [b""]}, ErrorKind.BAD_FRAME, "exec frame: env_unset[0] b'' is not a var"),
        ({"env_unset": [b"A=1"]}, ErrorKind.BAD_FRAME, "exec frame: env_unset[0] b'A=1' is not"),
        ({"fds": [0]}, ErrorKind.BAD_FD, "exec frame: fd 0 in fds is a standard stream"),
        ({"fds": [3, 1]}, ErrorKind.BAD_FD, "exec frame: fd 1 in fds is a standard stream"),
        ({"fds": [2]}, ErrorKind.BAD_FD, "exec frame: fd 2 in fds is a standard stream"),
        ({"fds": [3, 4, 3]}, ErrorKind.BAD_FD, "exec frame: fd 3 appears twice in fds"),
        ({"fds": [2**31]}, ErrorKind.BAD_FD, "exec frame: fd 2147483648 in fds is out of range"),
        ({"fds": [MAX_ID]}, ErrorKind.BAD_FD, "in fds is out of range"),
    ],
)
def test_exec_content_rules(fields: dict[str, Any], kind: ErrorKind, fragment: str) -> None:
    exc = decode_error(wire(exec_body(**fields)))
    assert exc.kind is kind
    assert fragment in exc.message
    assert exc.id == 9
    assert exc.ref == "exec"


def test_exec_edges_that_are_valid() -> None:
    frame = decode_one(wire(exec_body(
        id=MAX_ID, argv=[b""], env=[b"A=", b"B==", b"\xff=\xfe"], env_unset=[b"\xff"],
        fds=[3, 2**31 - 1],
    )))
    assert frame == Exec(
        id=MAX_ID, argv=(b"",), env=(b"A=", b"B==", b"\xff=\xfe"), env_unset=(b"\xff",),
        fds=(3, 2**31 - 1),
    )


loose_os = st.binary(max_size=6)
loose_exec = st.builds(
    Exec,
    id=st.integers(0, 50),
    argv=tuples(loose_os),
    path=st.none() | loose_os,
    env=st.none() | tuples(loose_os),
    env_set=tuples(loose_os),
    env_unset=tuples(loose_os),
    cwd=st.none() | loose_os,
    fds=tuples(st.one_of(st.integers(0, 6), st.integers(0, MAX_ID))),
)


def expected_exec_problem(f: Exec) -> tuple[ErrorKind, str] | None:
    """An independent statement of the exec rules, in the order they are checked."""
    if not f.argv:
        return ErrorKind.BAD_FRAME, "argv must not be empty"
    singles = (("path", f.path), ("cwd", f.cwd))
    for name, value in singles:
        if value is not None and b"\0" in value:
            return ErrorKind.BAD_FRAME, f"{name} contains a NUL byte"
    for name, values in (("argv", f.argv), ("env", f.env or ()), ("env_set", f.env_set),
                         ("env_unset", f.env_unset)):
        for i, v in enumerate(values):
            if b"\0" in v:
                return ErrorKind.BAD_FRAME, f"{name}[{i}] contains a NUL byte"
    if f.path == b"" or f.cwd == b"":
        return ErrorKind.BAD_FRAME, "path and cwd must not be empty"
    for name, values in (("env", f.env or ()), ("env_set", f.env_set)):
        for i, v in enumerate(values):
            if b"=" not in v or v.startswith(b"="):
                return ErrorKind.BAD_FRAME, f"{name}[{i}]"
    for i, v in enumerate(f.env_unset):
        if not v or b"=" in v:
            return ErrorKind.BAD_FRAME, f"env_unset[{i}]"
    seen: set[int] = set()
    for fd in f.fds:
        if fd < 3:
            return ErrorKind.BAD_FD, f"fd {fd} in fds is a standard stream"
        if fd > 2**31 - 1:
            return ErrorKind.BAD_FD, f"fd {fd} in fds is out of range"
        if fd in seen:
            return ErrorKind.BAD_FD, f"fd {fd} appears twice"
        seen.add(fd)
    return None


@settings(deadline=None, max_examples=300)
@given(frame=loose_exec)
def test_exec_rules_property(frame: Exec) -> None:
    decoder = FrameDecoder(1 << 20)
    decoder.feed(encode(frame))
    problem = expected_exec_problem(frame)
    if problem is None:
        assert decoder.next_frame() == frame
        return
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    kind, fragment = problem
    assert (info.value.kind, info.value.fatal) == (kind, False)
    assert info.value.message.startswith("exec frame: ")
    # NUL is reported for the first field in check order (path/cwd before lists)
    if "NUL" not in fragment:
        assert fragment in info.value.message
    else:
        assert "contains a NUL byte" in info.value.message
    assert (info.value.id, info.value.ref) == (frame.id, "exec")


@pytest.mark.parametrize("sig", sorted(SIGNAL_NAMES))
def test_every_signal_name_is_accepted(sig: str) -> None:
    assert decode_one(encode(Signal(id=1, sig=sig))) == Signal(id=1, sig=sig)


def test_signal_names_are_the_posix_set() -> None:
    assert "TERM" in SIGNAL_NAMES
    assert "KILL" in SIGNAL_NAMES
    assert not any(name.startswith("SIG") for name in SIGNAL_NAMES)


@pytest.mark.parametrize(
    ("sig", "fragment"),
    [
        ("SIGTERM", "unknown signal name 'SIGTERM' (names go without the SIG prefix)"),
        ("term", "unknown signal name 'term'"),
        ("", "unknown signal name ''"),
        ("15", "unknown signal name '15'"),
        ("RTMIN", "unknown signal name 'RTMIN'"),
    ],
)
def test_bad_signal_names(sig: str, fragment: str) -> None:
    exc = decode_error(wire({"t": "signal", "id": 4, "sig": sig}))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.BAD_SIGNAL, 4, "signal")
    assert exc.message == f"signal frame: {fragment}"
    if not sig.startswith("SIG"):
        assert "prefix" not in exc.message


@SETTINGS
@given(sig=st.text(max_size=10).filter(lambda s: s not in SIGNAL_NAMES))
def test_any_other_signal_name_is_bad(sig: str) -> None:
    exc = decode_error(wire({"t": "signal", "id": 4, "sig": sig}, surrogates=True))
    assert exc.kind is ErrorKind.BAD_SIGNAL


def test_long_peer_strings_are_not_echoed_whole() -> None:
    # errors go back to the peer in one frame: they must stay small
    exc = decode_error(wire({"t": "signal", "id": 4, "sig": "X" * 100_000}))
    assert exc.kind is ErrorKind.BAD_SIGNAL
    assert len(exc.message) < 200
    exc = decode_error(wire({"t": "y" * 100_000}))
    assert exc.kind is ErrorKind.UNKNOWN_TYPE
    assert len(exc.message) < 200
    assert exc.ref is not None
    assert len(exc.ref) <= 64
    exc = decode_error(wire({"t": "log", "level": "info", "msg": ["z" * 100_000] * 3}))
    assert len(exc.message) < 200


def test_window_zero() -> None:
    exc = decode_error(wire({"t": "window", "id": 2, "ch": 1, "n": 0}))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.BAD_FRAME, 2, "window")
    assert exc.message == "window frame: field 'n' must be > 0"


def hello_body(**fields: Any) -> dict[str, Any]:
    return {
        "t": "hello", "version": 1, "impl": "test", "impl_version": "1",
        "max_frame": MIN_MAX_FRAME, "window": 1024, **fields,
    }


@pytest.mark.parametrize(
    ("fields", "kind", "fragment"),
    [
        ({"max_frame": MIN_MAX_FRAME - 1}, ErrorKind.HANDSHAKE,
         f"hello frame: max_frame {MIN_MAX_FRAME - 1} is below the minimum {MIN_MAX_FRAME}"),
        ({"max_frame": 0}, ErrorKind.HANDSHAKE, "hello frame: max_frame 0 is below"),
        ({"window": 0}, ErrorKind.HANDSHAKE, "hello frame: window must be > 0"),
        ({"version": 2}, ErrorKind.VERSION_MISMATCH,
         "hello frame: peer speaks protocol version 2, this side speaks 1"),
        ({"version": 0}, ErrorKind.VERSION_MISMATCH, "protocol version 0"),
        # another version may shape its hello differently: still a version mismatch
        ({"version": 2, "window": None, "max_frame": "big"}, ErrorKind.VERSION_MISMATCH,
         "protocol version 2"),
        ({"version": "1"}, ErrorKind.BAD_FRAME,
         "hello frame: field 'version' must be an unsigned integer below 2**64, not str '1'"),
        ({"role": "server"}, ErrorKind.HANDSHAKE,
         "hello frame: role must be 'agent' or 'controller', not 'server'"),
        ({"role": ""}, ErrorKind.HANDSHAKE,
         "hello frame: role must be 'agent' or 'controller', not ''"),
        ({"role": 1}, ErrorKind.BAD_FRAME,
         "hello frame: field 'role' must be a string, not integer 1"),
    ],
)
def test_hello_content_rules(fields: dict[str, Any], kind: ErrorKind, fragment: str) -> None:
    exc = decode_error(wire(hello_body(**fields)))
    assert exc.kind is kind
    assert fragment in exc.message
    assert exc.ref == "hello"


@pytest.mark.parametrize("role", [None, "agent", "controller"])
def test_hello_role_is_optional(role: str | None) -> None:
    fields = {} if role is None else {"role": role}
    frame = decode_one(wire(hello_body(**fields)))
    assert isinstance(frame, Hello)
    assert frame.role == role


def test_stop_wire_form() -> None:
    raw = encode(Stop(id=3, ch=2))
    assert msgpack.unpackb(raw[4:]) == {"t": "stop", "id": 3, "ch": 2}
    assert decode_one(raw) == Stop(id=3, ch=2)
    exc = decode_error(wire({"t": "stop", "id": 3}))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.BAD_FRAME, 3, "stop")
    assert exc.message == "stop frame: missing field 'ch'"


def test_config_content_rules() -> None:
    exc = decode_error(wire({"t": "config", "env_keep": ["HOME", ""]}))
    assert (exc.kind, exc.ref, exc.id) == (ErrorKind.BAD_FRAME, "config", None)
    assert exc.message == "config frame: empty pattern in 'env_keep'"
    exc = decode_error(wire({"t": "config", "env_remove": [""]}))
    assert exc.message == "config frame: empty pattern in 'env_remove'"
    assert decode_one(wire({"t": "config", "env_keep": [], "env_remove": ["/^X$/"]})) == Config(
        env_keep=(), env_remove=("/^X$/",)
    )


def test_the_default_env_policy_is_the_specifications() -> None:
    spec = (ROOT / "docs" / "protocol.md").read_text()
    keep = " ".join(protocol.DEFAULT_ENV_KEEP)
    remove = " ".join(protocol.DEFAULT_ENV_REMOVE)
    assert f"Defaults: keep `{keep}`; remove `{remove}`." in " ".join(spec.split())
