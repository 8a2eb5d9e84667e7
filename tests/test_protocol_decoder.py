"""FrameDecoder tests: arbitrary input, every split, bounded memory, precise errors."""

from __future__ import annotations

import dataclasses
import itertools
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    HEADER_SIZE,
    MAX_ID,
    MIN_MAX_FRAME,
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
    ZeroCopyFrameDecoder,
    encode,
    encode_data_header,
)
from protocol._frames import FRAME_TYPES

AnyDecoder = FrameDecoder | ZeroCopyFrameDecoder
NewDecoder = Callable[[int], AnyDecoder]

SETTINGS = settings(
    deadline=None, max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Event = Frame | tuple[Any, ...]


def wire(body: Any) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed


def framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.fixture(scope="module", params=["copying", "zero-copy"])
def new_decoder(request: pytest.FixtureRequest) -> NewDecoder:
    """Makes the decoder under test: every test that takes this runs against both. The
    zero-copy one gets 1 KiB slabs, so that the streams here change slab often."""
    if request.param == "copying":
        return FrameDecoder
    return lambda max_frame: ZeroCopyFrameDecoder(max_frame, slab_size=1024)


def drain(decoder: AnyDecoder) -> list[Event]:
    """Every event the decoder has now: frames, ("error", ...) and a final ("fatal", ...)."""
    out: list[Event] = []
    while True:
        try:
            frame = decoder.next_frame()
        except RemoteProtocolError as exc:
            if exc.fatal:
                out.append(("fatal", exc.kind))
                return out
            out.append(("error", exc.kind, exc.id, exc.ref))
            continue
        if frame is None:
            return out
        out.append(frame)


def fatal_error(
    new_decoder: NewDecoder, raw: bytes, max_frame: int = 1 << 20
) -> RemoteProtocolError:
    decoder = new_decoder(max_frame)
    decoder.feed(raw)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.fatal
    assert info.value.id is None
    return info.value


def frame_error(new_decoder: NewDecoder, body: Any) -> RemoteProtocolError:
    """The non-fatal error of a well-formed map; checks that decoding goes on after it."""
    decoder = new_decoder(1 << 22)
    decoder.feed(wire(body) + encode(Pong(n=1)))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert not info.value.fatal
    assert decoder.next_frame() == Pong(n=1)
    assert decoder.buffered == 0
    return info.value


# ----------------------------------------------------------------------------- a valid stream

BIG = bytes(range(256)) * 260  # 66,560 bytes: a bin32 payload
FRAMES: list[Frame] = [
    Hello(version=1, impl="mproxy", impl_version="0.1", max_frame=4 << 20, window=1 << 20,
          caps=("x",)),
    Config(env_keep=("HOME", "LC_*"), env_remove=("/^SECRET/",)),
    Exec(id=1, argv=(b"sh", b"-c", b"echo \xff"), env=(b"A=1",), cwd=b"/tmp", fds=(3, 9)),
    Started(id=1, pid=4242),
    Data(id=1, ch=0, data=b""),
    Data(id=1, ch=1, data=b"hello\n"),
    Data(id=1, ch=2, data=b"e" * 300),
    Data(id=1, ch=9, data=BIG),
    Window(id=1, ch=1, n=65536),
    Stop(id=1, ch=2),
    Signal(id=1, sig="TERM"),
    SignalAck(id=1, sig="TERM", errno=None),
    SignalAck(id=1, sig="USR1", errno="ESRCH"),
    Eof(id=1, ch=1, n=6),
    Exit(id=1, code=143, sig="TERM", core=False),
    Error(kind="spawn-failed", msg="no such file", id=2, errno="ENOENT", ref="exec"),
    Log(level="info", msg="started", attrs={"id": "1"}),
    Close(id=1),
    Closed(id=1),
    Ping(n=MAX_ID),
    Pong(n=0),
    Shutdown(),
    Goodbye(),
]
BAD_BODIES: list[tuple[dict[str, Any], Event]] = [
    ({"t": "frobnicate", "id": 3}, ("error", ErrorKind.UNKNOWN_TYPE, 3, "frobnicate")),
    ({"t": "exec", "id": 4, "argv": "notalist"}, ("error", ErrorKind.BAD_FRAME, 4, "exec")),
    ({"t": "window", "id": 5, "ch": 0, "n": 0}, ("error", ErrorKind.BAD_FRAME, 5, "window")),
]


def build_stream(frames: list[Frame]) -> tuple[bytes, list[Event], list[int]]:
    """The stream, the events it decodes to, and the offset where each event's frame ends."""
    parts: list[bytes] = []
    events: list[Event] = []
    for i, frame in enumerate(frames):
        parts.append(encode(frame))
        events.append(frame)
        if i % 7 == 3:
            body, event = BAD_BODIES[(i // 7) % len(BAD_BODIES)]
            parts.append(wire(body))
            events.append(event)
    ends = []
    offset = 0
    for part in parts:
        offset += len(part)
        ends.append(offset)
    return b"".join(parts), events, ends


STREAM, EVENTS, ENDS = build_stream(FRAMES)
SMALL_STREAM, SMALL_EVENTS, SMALL_ENDS = build_stream(
    [f for f in FRAMES if not (isinstance(f, Data) and len(f.data) > 1000)]
)


def test_stream_decodes_in_one_feed(new_decoder: NewDecoder) -> None:
    assert sum(isinstance(e, tuple) for e in EVENTS) >= 3
    assert {type(f).TYPE for f in FRAMES} == set(FRAME_TYPES)
    decoder = new_decoder(1 << 20)
    decoder.feed(STREAM)
    assert drain(decoder) == EVENTS
    assert decoder.buffered == 0


# Fewer frames around a bin32 payload, so that splitting it at each of its ~66,000 offsets
# stays fast; the mix of every frame type is split at every offset just below.
BIG_STREAM, BIG_EVENTS, _ = build_stream([
    Exec(id=1, argv=(b"cat",), fds=(3,)),
    Data(id=1, ch=1, data=b"x" * 255),
    Data(id=1, ch=2, data=b"y" * 256),
    Data(id=1, ch=3, data=BIG),
    Eof(id=1, ch=3, n=len(BIG)),
    Exit(id=1, code=0),
])


@pytest.mark.parametrize(
    ("stream", "events"), [(SMALL_STREAM, SMALL_EVENTS), (BIG_STREAM, BIG_EVENTS)],
    ids=["every-type", "bin32"],
)
def test_split_at_every_offset_into_two_feeds(
    new_decoder: NewDecoder, stream: bytes, events: list[Event]
) -> None:
    view = memoryview(stream)
    for cut in range(len(stream) + 1):
        decoder = new_decoder(1 << 20)
        decoder.feed(view[:cut])
        first = drain(decoder)
        decoder.feed(view[cut:])
        if first + drain(decoder) != events:
            pytest.fail(f"split at offset {cut} changed the decoded frames")


def test_truncation_at_every_offset(new_decoder: NewDecoder) -> None:
    for cut in range(len(SMALL_STREAM) + 1):
        decoder = new_decoder(1 << 20)
        decoder.feed(SMALL_STREAM[:cut])
        complete = sum(end <= cut for end in SMALL_ENDS)
        assert drain(decoder) == SMALL_EVENTS[:complete], cut
        assert decoder.next_frame() is None
        assert decoder.buffered == cut - (SMALL_ENDS[complete - 1] if complete else 0)


@SETTINGS
@given(cut=st.integers(0, len(STREAM)))
def test_truncation_of_the_big_stream(new_decoder: NewDecoder, cut: int) -> None:
    decoder = new_decoder(1 << 20)
    decoder.feed(STREAM[:cut])
    complete = sum(end <= cut for end in ENDS)
    assert drain(decoder) == EVENTS[:complete]
    assert decoder.next_frame() is None


@SETTINGS
@given(data=st.data())
def test_random_chunkings(new_decoder: NewDecoder, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(STREAM)), max_size=40)))
    decoder = new_decoder(1 << 20)
    events: list[Event] = []
    previous = 0
    for cut in [*cuts, len(STREAM)]:
        decoder.feed(STREAM[previous:cut])
        previous = cut
        events += drain(decoder)
    assert events == EVENTS


@SETTINGS
@given(data=st.data())
def test_feeding_from_one_reused_buffer(data: st.DataObject) -> None:
    # The copying decoder parses what it is fed in place, and keeps only a partial
    # frame: a reader may reuse one buffer, overwriting it once next_frame returned None.
    cuts = sorted(data.draw(st.lists(st.integers(0, len(STREAM)), max_size=40)))
    decoder = FrameDecoder(1 << 20)
    reused = bytearray(len(STREAM))
    events: list[Event] = []
    previous = 0
    for cut in [*cuts, len(STREAM)]:
        size = cut - previous
        reused[:size] = STREAM[previous:cut]
        previous = cut
        decoder.feed(memoryview(reused)[:size])
        events += drain(decoder)
        reused[:] = b"\xee" * len(reused)  # the next read
    assert events == EVENTS


def test_two_feeds_before_draining_keep_the_first_buffer_rest() -> None:
    decoder = FrameDecoder(1 << 20)
    first, second = bytearray(STREAM[:1000]), bytearray(STREAM[1000:])
    decoder.feed(first)
    decoder.feed(second)  # the first is copied here: its caller may reuse it now
    first[:] = b"\xee" * len(first)
    events = drain(decoder)
    second[:] = b"\xee" * len(second)
    assert events == EVENTS


def test_one_byte_at_a_time(new_decoder: NewDecoder) -> None:
    decoder = new_decoder(1 << 20)
    events: list[Event] = []
    for i in range(len(SMALL_STREAM)):
        decoder.feed(SMALL_STREAM[i : i + 1])
        events += drain(decoder)
    assert events == SMALL_EVENTS


# ----------------------------------------------------------------------------- arbitrary input

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), MAX_ID) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)
FIELD_NAMES = sorted({"t", "id", "ch", "d", "n", "sig", "argv", "fds", "env", "version",
                      "max_frame", "window", "impl", "impl_version", "kind", "msg", "attrs",
                      "code", "level", "errno", "env_keep", "env_remove", "path", "cwd"})
# maps shaped like frames: a known (or unknown) t and plausible keys with arbitrary values
frame_like_maps = st.builds(
    lambda t, rest: {"t": t, **rest},
    st.sampled_from([*FRAME_TYPES, "nope"]) | msgpack_values,
    st.dictionaries(st.sampled_from(FIELD_NAMES), msgpack_values, max_size=6),
)


def _pack_or_skip(value: Any) -> bytes:
    return framed(msgpack.packb(value, use_bin_type=True))


segments = st.one_of(
    st.binary(max_size=40),  # noise, usually a huge length
    st.binary(max_size=60).map(framed),  # a plausible length, random body
    msgpack_values.map(_pack_or_skip),  # one msgpack value, often not a map
    frame_like_maps.map(_pack_or_skip),  # a map: never fatal
    st.sampled_from(FRAMES[:7]).map(encode),  # valid frames
)


def check_arbitrary_input(
    new_decoder: NewDecoder, stream: bytes, cuts: list[int], max_frame: int
) -> None:
    decoder = new_decoder(max_frame)
    previous = 0
    for cut in [*sorted(cuts), len(stream)]:
        chunk = stream[previous:cut]
        previous = cut
        decoder.feed(chunk)
        assert decoder.buffered <= max_frame + HEADER_SIZE + len(chunk)
        while True:
            try:
                frame = decoder.next_frame()
            except RemoteProtocolError as exc:
                assert isinstance(exc.kind, ErrorKind)
                assert exc.message
                if exc.fatal:
                    return  # the decoder must not be used again
                continue
            # any other exception type fails the test by escaping
            if frame is None:
                break
            assert type(frame).TYPE in FRAME_TYPES
        # all that stays buffered is one incomplete frame
        assert decoder.buffered < max_frame + HEADER_SIZE


@SETTINGS
@given(data=st.data(), max_frame=st.sampled_from([1, 40, 200, MIN_MAX_FRAME]))
def test_arbitrary_bytes_only_raise_remote_protocol_error(
    new_decoder: NewDecoder,
    data: st.DataObject, max_frame: int
) -> None:
    stream = b"".join(data.draw(st.lists(segments, max_size=8)))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    check_arbitrary_input(new_decoder, stream, cuts, max_frame)


@SETTINGS
@given(stream=st.binary(max_size=500), cuts=st.lists(st.integers(0, 500), max_size=5))
def test_pure_noise(new_decoder: NewDecoder, stream: bytes, cuts: list[int]) -> None:
    check_arbitrary_input(new_decoder, stream, [min(c, len(stream)) for c in cuts], MIN_MAX_FRAME)


@SETTINGS
@given(body=frame_like_maps)
def test_well_formed_maps_are_never_fatal(new_decoder: NewDecoder, body: dict[str, Any]) -> None:
    decoder = new_decoder(1 << 20)
    decoder.feed(wire(body) + encode(Ping(n=3)))
    try:
        frame = decoder.next_frame()
    except RemoteProtocolError as exc:
        assert not exc.fatal
        assert exc.ref == (body["t"] if type(body["t"]) is str else None)
    else:
        assert frame is not None
        assert body["t"] == frame.TYPE
    assert decoder.next_frame() == Ping(n=3)


# ----------------------------------------------------------------------------- framing errors


def test_four_gib_header_is_rejected_after_four_bytes(new_decoder: NewDecoder) -> None:
    decoder = new_decoder(1 << 20)
    decoder.feed(b"\xff\xff\xff")
    assert decoder.next_frame() is None
    decoder.feed(b"\xff")
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.fatal
    assert info.value.kind is ErrorKind.FRAME_TOO_LARGE
    assert info.value.message == (
        f"frame header announces {2**32 - 1} bytes; the limit is {1 << 20}"
    )


def test_frame_limit_is_on_the_body_length(new_decoder: NewDecoder) -> None:
    limit = MIN_MAX_FRAME
    # a data frame whose body is exactly the limit
    fill = limit - (len(encode_data_header(1, 1, 60000)) - HEADER_SIZE)
    raw = encode(Data(id=1, ch=1, data=b"x" * fill))
    assert len(raw) - HEADER_SIZE == limit
    decoder = new_decoder(limit)
    decoder.feed(raw)
    assert decoder.next_frame() == Data(id=1, ch=1, data=b"x" * fill)
    too_big = encode(Data(id=1, ch=1, data=b"x" * (fill + 1)))
    exc = fatal_error(new_decoder, too_big[:HEADER_SIZE], limit)
    assert exc.kind is ErrorKind.FRAME_TOO_LARGE
    assert f"announces {limit + 1} bytes; the limit is {limit}" in exc.message


def test_zero_length_is_malformed(new_decoder: NewDecoder) -> None:
    exc = fatal_error(new_decoder, b"\x00\x00\x00\x00")
    assert exc.kind is ErrorKind.MALFORMED
    assert exc.message == "frame header announces an empty frame"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\xc1", "is not one msgpack value: it holds the byte 0xc1"),  # never-used type byte
        (b"\x82\xa1t", "is not one msgpack value: it ends inside a value"),  # truncated map
        (msgpack.packb({"t": "ping", "n": 1}) + b"\x00", "value: more bytes follow the first"),
        (msgpack.packb({"t": "ping", "n": 1}) * 2, "value: more bytes follow the first"),
        (b"\xdd\xff\xff\xff\xff", "value: it ends inside a value"),  # array32 of 2**32-1 items
        (b"\xdf\xff\xff\xff\xff", "value: it ends inside a value"),  # map32 of 2**32-1 entries
        (b"\xc6\xff\xff\xff\xff", "value: it ends inside a value"),  # bin32 of 4 GiB
        (msgpack.packb({1: "x"}), "is not one msgpack value with str or bin map keys: a "
         "map key is a msgpack integer"),
        (msgpack.packb({(1, 2): "x"}), "a map key is a msgpack array"),
        (msgpack.packb({1.5: "x"}), "a map key is a msgpack float"),
        (msgpack.packb([{"t": "ping", "n": 1}]), "is a msgpack array, not a map"),
        (msgpack.packb(5), "is a msgpack integer, not a map"),
        (msgpack.packb("ping"), "is a msgpack str, not a map"),
        (msgpack.packb(None), "is a msgpack nil, not a map"),
        (msgpack.packb(b"x"), "is a msgpack bin, not a map"),
        (b"\x91" * 5000 + b"\xc0", "value: arrays and maps nested more than 1024 deep"),
        (b"\x81\xa1a" * 5000 + b"\xc0", "nested more than 1024 deep"),
        (b"\x91" * 1024 + b"\x91\xc0", "nested more than 1024 deep"),
        (b"\xd4\xff\x01", "it holds an invalid timestamp"),
    ],
)
def test_bodies_that_are_not_one_map_are_fatal(
    new_decoder: NewDecoder, body: bytes, fragment: str
) -> None:
    exc = fatal_error(new_decoder, framed(body))
    assert exc.kind is ErrorKind.MALFORMED
    assert fragment in exc.message
    # The peer's terms, not msgpack's API or Python's types.
    for internal in ("strict_map_key", "ExtraData", "unpack(b)", "Unpack failed", "max_",
                     "Error", "NoneType", "list"):
        assert internal not in exc.message


def test_stack_error_message_is_not_empty(new_decoder: NewDecoder) -> None:
    # msgpack's StackError has no text of its own.
    exc = fatal_error(new_decoder, framed(b"\x91" * 5000 + b"\xc0"))
    assert exc.message == ("frame body (5001 bytes) is not one msgpack value: arrays and "
                           "maps nested more than 1024 deep")


def test_fatal_error_consumes_nothing_after_the_bad_frame(new_decoder: NewDecoder) -> None:
    decoder = new_decoder(1 << 20)
    decoder.feed(encode(Ping(n=1)) + framed(b"\xc1") + encode(Ping(n=2)))
    assert decoder.next_frame() == Ping(n=1)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert (info.value.kind, info.value.fatal) == (ErrorKind.MALFORMED, True)


# ----------------------------------------------------------------------------- content errors

# type -> [(key, field kind, required)], written independently of protocol._codec
SCHEMA: dict[str, list[tuple[str, str, bool]]] = {
    "hello": [("version", "uint", True), ("impl", "str", True), ("impl_version", "str", True),
              ("max_frame", "uint", True), ("window", "uint", True), ("caps", "strs", False),
              ("role", "role", False)],
    "exec": [("id", "uint", True), ("argv", "oss", True), ("path", "os", False),
             ("env", "oss", False), ("env_set", "oss", False), ("env_unset", "oss", False),
             ("cwd", "os", False), ("fds", "uints", False), ("drop_sudo", "bool", False)],
    "started": [("id", "uint", True), ("pid", "uint", True), ("uid", "uint", False),
                ("gid", "uint", False)],
    "data": [("id", "uint", True), ("ch", "uint", True), ("d", "bin", True)],
    "eof": [("id", "uint", True), ("ch", "uint", True), ("n", "uint", False)],
    "window": [("id", "uint", True), ("ch", "uint", True), ("n", "uint", True)],
    "stop": [("id", "uint", True), ("ch", "uint", True)],
    "signal": [("id", "uint", True), ("sig", "str", True)],
    "signal_ack": [("id", "uint", True), ("sig", "str", True), ("errno", "str", False)],
    "exit": [("id", "uint", True), ("code", "int", True), ("sig", "str", False),
             ("core", "bool", False)],
    "error": [("kind", "str", True), ("msg", "str", True), ("id", "uint", False),
              ("errno", "str", False), ("ref", "str", False), ("ch", "uint", False)],
    "log": [("level", "str", True), ("msg", "str", True), ("attrs", "strmap", False)],
    "close": [("id", "uint", True)],
    "closed": [("id", "uint", True)],
    "config": [("env_keep", "strs", False), ("env_remove", "strs", False)],
    "shutdown": [],
    "goodbye": [],
    "ping": [("n", "uint", True)],
    "pong": [("n", "uint", True)],
}
VALID_VALUE: dict[str, Any] = {
    "uint": 7, "int": -1, "str": "TERM", "bool": True, "bin": b"x", "os": b"/x",
    "oss": [b"a=b"], "uints": [3], "strs": ["x"], "strmap": {"k": "v"}, "role": "agent",
}
WRONG_VALUES: dict[str, list[Any]] = {
    "uint": ["7", -1, -(2**63), 1.0, True, b"\x07", [7], {"n": 7}],
    "int": ["7", 1.5, False, b"", []],
    "str": [7, b"TERM", True, ["TERM"], 1.5],
    "role": [7, b"agent", True, ["agent"], 1.5],
    "bool": [1, 0, "true", b"\x01", []],
    "bin": ["x", 7, [b"x"], True],
    "os": [7, True, [b"x"], 1.5, {"a": "b"}],
    "oss": [b"a=b", "a=b", 7, [7], [[b"a=b"]], [None], {"a": b"b"}],
    "uints": [3, [-1], ["3"], [True], [3.0], [[3]], b"\x03"],
    "strs": ["x", [7], [b"x"], [None], {"x": "y"}],
    "strmap": [[], {"k": 1}, {"k": b"v"}, {"k": None}, "k=v", [["k", "v"]]],
}


def valid_body(ftype: str) -> dict[str, Any]:
    body: dict[str, Any] = {"t": ftype}
    for key, kind, _ in SCHEMA[ftype]:
        body[key] = VALID_VALUE[kind]
    if ftype == "hello":
        body.update(version=1, max_frame=MIN_MAX_FRAME)
    if ftype == "exec":
        body.update(argv=[b"prog"], env_unset=[b"X"])
    return body


def test_schema_matches_the_frame_classes(new_decoder: NewDecoder) -> None:
    assert SCHEMA.keys() == FRAME_TYPES.keys()
    for ftype, cls in FRAME_TYPES.items():
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        keys = ["data" if k == "d" else k for k, _, _ in SCHEMA[ftype]]
        assert keys == names, ftype
    for ftype in SCHEMA:
        decoder = new_decoder(1 << 20)
        decoder.feed(wire(valid_body(ftype)))
        assert decoder.next_frame() is not None


BAD_FIELD_CASES = [
    (ftype, key, value)
    for ftype, fields in SCHEMA.items()
    for key, kind, _ in fields
    for value in WRONG_VALUES[kind]
]


#: What an error message calls a value of each unpacked type.
MSGPACK_NAMES: dict[type, str] = {int: "integer", str: "str", bytes: "bin", bool: "boolean",
                                  float: "float", list: "array", dict: "map"}


@pytest.mark.parametrize(("ftype", "key", "value"), BAD_FIELD_CASES)
def test_wrong_field_type(new_decoder: NewDecoder, ftype: str, key: str, value: Any) -> None:
    body = valid_body(ftype)
    body[key] = value
    exc = frame_error(new_decoder, body)
    assert exc.kind is ErrorKind.BAD_FRAME
    assert exc.ref == ftype
    assert exc.message.startswith(f"{ftype} frame: field {key!r} must be ")
    assert f", not {MSGPACK_NAMES[type(value)]} " in exc.message  # the peer's terms
    has_usable_id = "id" in body and key != "id"
    assert exc.id == (body["id"] if has_usable_id else None)


REQUIRED_CASES = [
    (ftype, key) for ftype, fields in SCHEMA.items() for key, _, required in fields if required
]


@pytest.mark.parametrize(("ftype", "key"), REQUIRED_CASES)
@pytest.mark.parametrize("how", ["absent", "nil"])
def test_missing_required_field(new_decoder: NewDecoder, ftype: str, key: str, how: str) -> None:
    body = valid_body(ftype)
    if how == "absent":
        del body[key]
    else:
        body[key] = None
    exc = frame_error(new_decoder, body)
    assert exc.kind is ErrorKind.BAD_FRAME
    assert exc.message == f"{ftype} frame: missing field {key!r}"
    assert exc.ref == ftype
    assert exc.id == (body.get("id") if key != "id" else None)


@pytest.mark.parametrize(
    ("body", "kind", "message", "id", "ref"),
    [
        ({"t": "launch", "id": 3}, ErrorKind.UNKNOWN_TYPE, "unknown frame type 'launch'", 3,
         "launch"),
        ({"t": "", "id": -3}, ErrorKind.UNKNOWN_TYPE, "unknown frame type ''", None, ""),
        ({"t": "Exec", "id": 1}, ErrorKind.UNKNOWN_TYPE, "unknown frame type 'Exec'", 1, "Exec"),
        ({"id": 1}, ErrorKind.BAD_FRAME, "frame has no string field 't' (its type)", 1, None),
        ({}, ErrorKind.BAD_FRAME, "frame has no string field 't' (its type)", None, None),
        ({"t": 3}, ErrorKind.BAD_FRAME, "frame has no string field 't' (its type)", None, None),
        ({"t": b"ping", "n": 1}, ErrorKind.BAD_FRAME, "frame has no string field 't' (its type)",
         None, None),
        ({"t": None}, ErrorKind.BAD_FRAME, "frame has no string field 't' (its type)", None, None),
    ],
)
def test_unknown_or_missing_type(  # noqa: PLR0917 (pytest passes the parameters)
    new_decoder: NewDecoder,
    body: dict[str, Any], kind: ErrorKind, message: str, id: int | None, ref: str | None
) -> None:
    exc = frame_error(new_decoder, body)
    assert (exc.kind, exc.message, exc.id, exc.ref) == (kind, message, id, ref)


# ----------------------------------------------------------------------------- nasty values


def test_id_edges(new_decoder: NewDecoder) -> None:
    decoder = new_decoder(1 << 20)
    decoder.feed(wire({"t": "close", "id": MAX_ID}))
    assert decoder.next_frame() == Close(id=MAX_ID)
    exc = frame_error(new_decoder, {"t": "close", "id": -1})
    assert exc.kind is ErrorKind.BAD_FRAME
    assert exc.id is None
    assert exc.message == (
        "close frame: field 'id' must be an unsigned integer below 2**64, not integer -1"
    )
    exc = frame_error(new_decoder, {"t": "started", "id": -(2**63), "pid": 1})
    assert exc.id is None
    # msgpack integers stop at 2**64 - 1: a larger id cannot even be put on the wire
    with pytest.raises(OverflowError):
        msgpack.packb(2**64)


def test_negative_exit_code_is_an_integer(new_decoder: NewDecoder) -> None:
    decoder = new_decoder(1 << 20)
    decoder.feed(wire({"t": "exit", "id": 1, "code": -(2**63)}))
    assert decoder.next_frame() == Exit(id=1, code=-(2**63))


def test_huge_argv_within_the_frame_limit(new_decoder: NewDecoder) -> None:
    argv = [b"a"] * 200_000
    raw = wire({"t": "exec", "id": 1, "argv": argv})
    decoder = new_decoder(len(raw))
    decoder.feed(raw)
    frame = decoder.next_frame()
    assert isinstance(frame, Exec)
    assert len(frame.argv) == 200_000


def test_huge_ignored_array(new_decoder: NewDecoder) -> None:
    decoder = new_decoder(4 << 20)
    decoder.feed(wire({"t": "ping", "n": 1, "junk": [None] * 1_000_000}))
    assert decoder.next_frame() == Ping(n=1)


@pytest.mark.parametrize("depth", [10, 500, 999, 1000, 1023])
@pytest.mark.parametrize("key", ["argv", "id", "fds", "caps_of_unknown", "attrs"])
def test_deep_nesting_within_msgpack_limits(new_decoder: NewDecoder, depth: int, key: str) -> None:
    # deep but unpackable: a bad field (never a RecursionError), or ignored when unknown
    nested = b"\x91" * depth + b"\xc0"
    body = (b"\x84" + msgpack.packb("t") + msgpack.packb("exec") + msgpack.packb("id")
            + b"\x01" + msgpack.packb("argv") + msgpack.packb([b"x"]))
    if key in ("argv", "id"):
        body = (b"\x83" + msgpack.packb("t") + msgpack.packb("exec")
                + (msgpack.packb("argv") + msgpack.packb([b"x"]) if key == "id"
                   else msgpack.packb("id") + b"\x01"))
    elif key == "attrs":
        body = b"\x84" + msgpack.packb("t") + msgpack.packb("log") + msgpack.packb(
            "level") + msgpack.packb("info") + msgpack.packb("msg") + msgpack.packb("m")
    body += msgpack.packb(key) + nested
    decoder = new_decoder(1 << 20)
    decoder.feed(framed(body) + encode(Ping(n=1)))
    events = drain(decoder)
    if key == "caps_of_unknown":
        assert events == [Exec(id=1, argv=(b"x",)), Ping(n=1)]
    else:
        assert events[1:] == [Ping(n=1)]
        assert isinstance(events[0], tuple)
        assert events[0][:2] == ("error", ErrorKind.BAD_FRAME)
    # error messages stay short
    try:
        decoder.feed(framed(body))
        decoder.next_frame()
    except RemoteProtocolError as exc:
        assert len(exc.message) < 200


def test_unicode_and_nul_in_str_fields(new_decoder: NewDecoder) -> None:
    decoder = new_decoder(1 << 20)
    decoder.feed(wire({"t": "log", "level": "info", "msg": "a\0b\u2603", "attrs": {"\0": ""}}))
    assert decoder.next_frame() == Log(level="info", msg="a\0b\u2603", attrs={"\0": ""})


def test_invalid_utf8_in_str_fields_is_surrogate_escaped(new_decoder: NewDecoder) -> None:
    body = (b"\x83\xa1t\xa3log\xa5level\xa4info\xa3msg\xa3a\xffb")
    decoder = new_decoder(1 << 20)
    decoder.feed(framed(body))
    assert decoder.next_frame() == Log(level="info", msg="a\udcffb")


def test_eof_and_window_value_edges(new_decoder: NewDecoder) -> None:
    decoder = new_decoder(1 << 20)
    decoder.feed(wire({"t": "eof", "id": 0, "ch": MAX_ID, "n": MAX_ID}))
    decoder.feed(wire({"t": "window", "id": 0, "ch": 0, "n": MAX_ID}))
    assert drain(decoder) == [Eof(id=0, ch=MAX_ID, n=MAX_ID), Window(id=0, ch=0, n=MAX_ID)]


def test_buffer_is_compacted() -> None:
    decoder = FrameDecoder(1 << 20)
    one = encode(Ping(n=1))
    for _ in range(20_000):
        decoder.feed(one + one[:5])
        assert drain(decoder) == [Ping(n=1)]
        decoder.feed(one[5:])
        assert drain(decoder) == [Ping(n=1)]
    assert decoder.buffered == 0
    assert len(decoder._buf) < (1 << 16) + 2 * len(one)


# ----------------------------------------------------------------------------- zero copy


def read_through(decoder: ZeroCopyFrameDecoder, stream: bytes, sizes: list[int]) -> list[Frame]:
    """Write ``stream`` into the decoder's own buffers, at most sizes[i] bytes per read
    (cycling), as a transport would; the frames it gives."""
    frames: list[Frame] = []
    done = 0
    for i in itertools.count():
        if done == len(stream):
            return frames
        with decoder.get_buffer() as space:
            size = min(len(space), sizes[i % len(sizes)], len(stream) - done)
            space[:size] = stream[done : done + size]
        decoder.buffer_updated(size)
        done += size
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    raise AssertionError("unreachable")


def test_zero_copy_payloads_are_views_of_the_buffer() -> None:
    decoder = ZeroCopyFrameDecoder(1 << 20)
    sent = [Data(id=7, ch=ch, data=b"p" * n) for ch, n in ((1, 0), (2, 1), (300, 70_000))]
    stream = b"".join(map(encode, sent)) + encode(Exit(id=7, code=0))
    frames = read_through(decoder, stream, [1 << 20])
    assert frames == [*sent, Exit(id=7, code=0)]
    for frame in frames[:3]:
        assert isinstance(frame, Data)
        assert isinstance(frame.data, memoryview) and frame.data.readonly
    # A data map laid out otherwise (keys in another order) is valid too, decoded by copy.
    decoder.feed(wire({"ch": 1, "d": b"abc", "id": 2, "t": "data"}))
    assert decoder.next_frame() == Data(id=2, ch=1, data=b"abc")


@SETTINGS
@given(
    ids=st.lists(st.integers(0, MAX_ID), min_size=1, max_size=5),
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=8),
    payload=st.integers(0, 300_000),
)
def test_zero_copy_reads_of_any_size(ids: list[int], sizes: list[int], payload: int) -> None:
    sent: list[Frame] = [Data(id=i, ch=i % 1000, data=bytes([i % 251]) * payload) for i in ids]
    sent.append(Pong(n=1))
    decoder = ZeroCopyFrameDecoder(1 << 20, slab_size=4096)
    assert read_through(decoder, b"".join(map(encode, sent)), sizes) == sent
    assert decoder.buffered == 0


def test_zero_copy_held_payload_survives_later_traffic() -> None:
    decoder = ZeroCopyFrameDecoder(1 << 20)
    held = read_through(decoder, encode(Data(id=1, ch=1, data=b"keep" * 1000)), [1 << 20])
    later = b"".join(encode(Data(id=2, ch=1, data=bytes([n]) * 500_000)) for n in range(40))
    for n, frame in enumerate(read_through(decoder, later, [300_000])):
        assert frame == Data(id=2, ch=1, data=bytes([n]) * 500_000)
    assert held == [Data(id=1, ch=1, data=b"keep" * 1000)]
    assert decoder.pinned_bytes > 0  # the held view keeps its slab


def test_zero_copy_reuses_its_slabs() -> None:
    decoder = ZeroCopyFrameDecoder(4 << 20)
    assert decoder.held_bytes == 64 << 10  # small until traffic needs more
    frame = encode(Data(id=1, ch=1, data=b"z" * 524_288))
    total = 0
    for _ in range(400):  # 200 MiB, payloads dropped as they come
        for got in read_through(decoder, frame, [1 << 20]):
            total += len(got.data)  # type: ignore[attr-defined]
            del got  # done with it, as a consumer would be
    assert total == 400 * 524_288
    assert decoder.slabs_allocated <= 3
    assert decoder.pinned_bytes == 0
    assert decoder.held_bytes <= 3 * (2 << 20)  # the current slab and two spares


def test_zero_copy_frame_larger_than_a_slab() -> None:
    decoder = ZeroCopyFrameDecoder(4 << 20)
    big = Data(id=1, ch=1, data=bytes(range(256)) * 12_000)  # 3 MiB, slabs are 2 MiB
    sent = [Pong(n=1), big, Pong(n=2)]
    assert read_through(decoder, b"".join(map(encode, sent)), [65536]) == sent


def test_zero_copy_oversized_header_gets_no_buffer_for_its_frame() -> None:
    # get_buffer sizes the space by the frame in progress: not by a length beyond the
    # limit, even when called again before next_frame has rejected it.
    decoder = ZeroCopyFrameDecoder(1 << 20)
    decoder.feed(b"\xff\xff\xff\xff" + b"x" * 100)
    with decoder.get_buffer():
        pass
    assert decoder.held_bytes < 1 << 20
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.kind is ErrorKind.FRAME_TOO_LARGE and info.value.fatal


def test_zero_copy_buffer_updated_beyond_the_buffer() -> None:
    decoder = ZeroCopyFrameDecoder(1 << 20, slab_size=4096)
    with decoder.get_buffer() as space:
        size = len(space)
    with pytest.raises(ValueError, match="beyond the buffer"):
        decoder.buffer_updated(size + 1)
    decoder.buffer_updated(0)
    assert decoder.next_frame() is None
