"""Connection state machine tests: an agent and a controller wired by passing bytes.

A "rogue" peer is simulated by writing ``encode(frame)`` straight into a connection:
the sending Connection would refuse most of these frames locally.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocol import (
    CONNECTION_CLOSED,
    DATA_FRAME_OVERHEAD,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    MIN_MAX_FRAME,
    NEED_DATA,
    PROTOCOL_VERSION,
    Close,
    Closed,
    Config,
    Connection,
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
    LocalProtocolError,
    Log,
    Ping,
    Pong,
    RemoteProtocolError,
    Role,
    Shutdown,
    Signal,
    SignalAck,
    Started,
    Stop,
    Window,
    encode,
)
from protocol._state import STOPPED, STOPPED_EOF

AGENT_WINDOW = 1000
CONTROLLER_WINDOW = 3000


# ----------------------------------------------------------------------------- helpers


def hello(**fields: Any) -> Hello:
    values: dict[str, Any] = {
        "version": PROTOCOL_VERSION, "impl": "rogue", "impl_version": "1",
        "max_frame": DEFAULT_MAX_FRAME, "window": DEFAULT_WINDOW, **fields,
    }
    return Hello(**values)


def drain(conn: Connection) -> list[Frame]:
    out: list[Frame] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return out
        assert isinstance(event, Frame), event
        out.append(event)


def deliver(conn: Connection, data: bytes) -> list[Frame]:
    conn.receive_data(data)
    return drain(conn)


def pair(
    agent_window: int = AGENT_WINDOW, controller_window: int = CONTROLLER_WINDOW,
    agent_max_frame: int = DEFAULT_MAX_FRAME, controller_max_frame: int = DEFAULT_MAX_FRAME,
    agent_caps: tuple[str, ...] = (),
) -> tuple[Connection, Connection]:
    agent = Connection(Role.AGENT, window=agent_window, max_frame_size=agent_max_frame,
                       impl="agent", impl_version="a1", caps=agent_caps)
    ctrl = Connection(Role.CONTROLLER, window=controller_window,
                      max_frame_size=controller_max_frame, impl="ctrl", impl_version="c1")
    (a_hello,) = deliver(ctrl, agent.initiate())
    (c_hello,) = deliver(agent, ctrl.initiate())
    assert a_hello == agent.our_hello
    assert c_hello == ctrl.our_hello
    return agent, ctrl


def handshaken(role: Role) -> Connection:
    """A connection of ``role`` that has sent and received hello (peer is rogue)."""
    conn = Connection(role, window=AGENT_WINDOW if role is Role.AGENT else CONTROLLER_WINDOW)
    conn.initiate()
    assert deliver(conn, encode(hello(window=CONTROLLER_WINDOW if role is Role.AGENT
                                      else AGENT_WINDOW))) != []
    return conn


def spawn(agent: Connection, ctrl: Connection, id: int = 1, fds: tuple[int, ...] = ()) -> None:
    frame = Exec(id=id, argv=(b"prog",), fds=fds)
    assert deliver(agent, ctrl.send(frame)) == [frame]
    pid = 100 + id % 1000
    assert deliver(ctrl, agent.send(Started(id=id, pid=pid))) == [
        Started(id=id, pid=pid)
    ]


def remote_error(conn: Connection, data: bytes, *, fatal: bool = False) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.fatal is fatal
    return info.value


def assert_still_works(conn: Connection) -> None:
    """A non-fatal error left the connection usable."""
    assert deliver(conn, encode(Ping(n=77))) == [Ping(n=77)]


def data_frame(id: int, ch: int, size: int) -> bytes:
    return encode(Data(id=id, ch=ch, data=b"z" * size))


def decode(raw: bytes) -> Frame:
    decoder = FrameDecoder(1 << 30)
    decoder.feed(raw)
    frame = decoder.next_frame()
    assert frame is not None
    return frame


# ----------------------------------------------------------------------------- handshake


def test_handshake_controller_speaks_first() -> None:
    agent = Connection(Role.AGENT)
    ctrl = Connection(Role.CONTROLLER, window=5000, caps=("zstd",))
    assert agent.their_hello is None
    # the agent receives the controller's hello before sending its own
    assert deliver(agent, ctrl.initiate()) == [ctrl.our_hello]
    assert agent.their_hello == ctrl.our_hello
    assert agent.their_hello.caps == ("zstd",)
    assert deliver(ctrl, agent.initiate()) == [agent.our_hello]
    assert ctrl.their_hello == agent.our_hello
    assert ctrl.their_hello.version == PROTOCOL_VERSION == 1


def test_handshake_agent_speaks_first() -> None:
    agent = Connection(Role.AGENT, max_frame_size=MIN_MAX_FRAME)
    ctrl = Connection(Role.CONTROLLER)
    raw = agent.initiate()
    for i in range(len(raw) - 1):  # byte by byte
        assert deliver(ctrl, raw[i : i + 1]) == []
    assert deliver(ctrl, raw[-1:]) == [agent.our_hello]
    assert ctrl.max_data_payload == MIN_MAX_FRAME - DATA_FRAME_OVERHEAD
    assert deliver(agent, ctrl.initiate()) == [ctrl.our_hello]
    assert agent.max_data_payload == DEFAULT_MAX_FRAME - DATA_FRAME_OVERHEAD


def test_hello_defaults() -> None:
    conn = Connection(Role.AGENT)
    assert conn.our_hello == Hello(
        version=1, impl="mproxy", impl_version="0", max_frame=4 << 20, window=1 << 20,
        role="agent",
    )
    assert DEFAULT_MAX_FRAME == 4 << 20
    assert MIN_MAX_FRAME == 64 << 10


def test_windows_come_from_the_receivers_hello() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, fds=(3,))
    # what the controller may send is what the agent announced, and vice versa
    assert ctrl.send_credit(1, 0) == AGENT_WINDOW
    assert ctrl.send_credit(1, 3) == AGENT_WINDOW
    assert agent.send_credit(1, 1) == CONTROLLER_WINDOW
    assert agent.send_credit(1, 2) == CONTROLLER_WINDOW
    assert agent.send_credit(1, 3) == CONTROLLER_WINDOW
    # channels a side does not send on have no credit
    assert ctrl.send_credit(1, 1) == 0
    assert agent.send_credit(1, 0) == 0
    assert ctrl.send_credit(99, 0) == 0


@pytest.mark.parametrize(
    ("kwargs", "kind", "message"),
    [
        ({"max_frame_size": MIN_MAX_FRAME - 1}, ErrorKind.HANDSHAKE, "below the minimum 65536"),
        ({"window": 0}, ErrorKind.HANDSHAKE, "hello frame: window must be > 0"),
    ],
)
def test_bad_local_hello(kwargs: dict[str, Any], kind: ErrorKind, message: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        Connection(Role.AGENT, **kwargs)
    assert info.value.kind is kind
    assert message in info.value.message
    assert info.value.ref == "hello"


def test_initiate_twice() -> None:
    conn = Connection(Role.AGENT)
    conn.initiate()
    with pytest.raises(LocalProtocolError) as info:
        conn.initiate()
    assert (info.value.kind, info.value.message) == (ErrorKind.HANDSHAKE, "hello already sent")


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("version", [0, 2, 2**32])
def test_version_mismatch_is_fatal(role: Role, version: int) -> None:
    conn = Connection(role)
    conn.initiate()
    exc = remote_error(conn, encode(hello(version=version)) + encode(Ping(n=1)), fatal=True)
    assert exc.kind is ErrorKind.VERSION_MISMATCH
    assert exc.message == (
        f"hello frame: peer speaks protocol version {version}, this side speaks 1"
    )
    assert exc.ref == "hello"
    assert conn.their_hello is None
    # every later call raises the same error, whatever arrives
    for more in (b"", encode(hello())):
        conn.receive_data(more)
        with pytest.raises(RemoteProtocolError) as again:
            conn.next_event()
        assert again.value is exc


def test_version_mismatch_with_a_differently_shaped_hello() -> None:
    # a future version may change the hello's other fields: still version-mismatch
    conn = Connection(Role.CONTROLLER)
    body = msgpack.packb({"t": "hello", "version": 2, "features": {"x": 1}})
    exc = remote_error(conn, len(body).to_bytes(4, "big") + body, fatal=True)
    assert exc.kind is ErrorKind.VERSION_MISMATCH
    assert "protocol version 2" in exc.message


@pytest.mark.parametrize(
    "first",
    [Ping(n=1), Exec(id=1, argv=(b"x",)), Error(kind="internal", msg="x"), Shutdown(),
     Data(id=1, ch=0, data=b"x")],
)
def test_frames_before_hello_are_fatal(first: Frame) -> None:
    conn = Connection(Role.AGENT)
    conn.initiate()
    exc = remote_error(conn, encode(first), fatal=True)
    assert exc.kind is ErrorKind.HANDSHAKE
    assert exc.message == f"expected a hello frame first, got {first.TYPE}"
    assert exc.ref == first.TYPE
    with pytest.raises(RemoteProtocolError) as again:
        conn.next_event()
    assert again.value is exc


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"t": "launch"}, "bad first frame: unknown frame type 'launch'"),
        ({"t": "hello", "version": 1, "impl": "x", "impl_version": "1",
          "max_frame": 1000, "window": 1},
         "bad first frame: hello frame: max_frame 1000 is below the minimum 65536"),
        ({"t": "hello", "version": 1, "impl": "x", "impl_version": "1",
          "max_frame": MIN_MAX_FRAME},
         "bad first frame: hello frame: missing field 'window'"),
        ({"t": "hello", "version": "1"}, "bad first frame: hello frame: field 'version'"),
    ],
)
def test_bad_first_frame_is_a_fatal_handshake_error(body: dict[str, Any], fragment: str) -> None:
    conn = Connection(Role.CONTROLLER)
    packed = msgpack.packb(body)
    exc = remote_error(conn, len(packed).to_bytes(4, "big") + packed, fatal=True)
    assert exc.kind is ErrorKind.HANDSHAKE
    assert exc.message.startswith(fragment)
    assert exc.ref == body["t"]  # like every error about a frame that could be read
    assert exc.id is None


def test_undecodable_first_frame() -> None:
    conn = Connection(Role.AGENT)
    exc = remote_error(conn, b"\x00\x00\x00\x01\xc1", fatal=True)
    assert exc.kind is ErrorKind.MALFORMED
    conn = Connection(Role.AGENT)
    exc = remote_error(conn, b"\xff\xff\xff\xff", fatal=True)
    assert exc.kind is ErrorKind.FRAME_TOO_LARGE
    assert "limit is 4194304" in exc.message


def test_receivers_own_limit_applies_before_the_peer_hello() -> None:
    conn = Connection(Role.AGENT, max_frame_size=MIN_MAX_FRAME)
    big_hello = encode(hello(impl="x" * MIN_MAX_FRAME))
    exc = remote_error(conn, big_hello[:4], fatal=True)
    assert exc.kind is ErrorKind.FRAME_TOO_LARGE


@pytest.mark.parametrize("role", list(Role))
def test_hello_announces_the_role(role: Role) -> None:
    conn = Connection(role)
    assert conn.our_hello.role == role.value
    assert decode(conn.initiate()) == conn.our_hello


@pytest.mark.parametrize("role", list(Role))
def test_a_hello_of_our_own_role_is_fatal(role: Role) -> None:
    # what an echoing peer (`cat`) sends back: our own hello
    conn = Connection(role)
    raw = conn.initiate()
    exc = remote_error(conn, raw + encode(Ping(n=1)), fatal=True)
    peer = "controller" if role is Role.AGENT else "agent"
    assert (exc.kind, exc.ref) == (ErrorKind.HANDSHAKE, "hello")
    assert exc.message == (
        f"hello frame: the peer's hello says role '{role}', this side's own: the {peer} "
        f"command echoed our frames back (is it `cat`?)"
    )
    assert conn.their_hello is None
    with pytest.raises(RemoteProtocolError) as again:
        conn.next_event()
    assert again.value is exc


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("peer_role", [None, "peer"])
def test_a_hello_of_the_peers_role_or_none_is_accepted(role: Role, peer_role: str | None
                                                       ) -> None:
    conn = Connection(role)
    conn.initiate()
    their_role = None if peer_role is None else conn.peer_role.value
    (frame,) = deliver(conn, encode(hello(role=their_role)))
    assert conn.their_hello == frame
    assert frame.role == their_role


def test_an_unknown_role_is_a_bad_first_frame() -> None:
    conn = Connection(Role.CONTROLLER)
    exc = remote_error(conn, encode(hello(role="server")), fatal=True)
    assert exc.kind is ErrorKind.HANDSHAKE
    assert exc.message == (
        "bad first frame: hello frame: role must be 'agent' or 'controller', not 'server'"
    )


@pytest.mark.parametrize("role", list(Role))
def test_second_hello(role: Role) -> None:
    conn = handshaken(role)
    exc = remote_error(conn, encode(hello()))
    assert (exc.kind, exc.message, exc.ref) == (ErrorKind.HANDSHAKE, "second hello frame",
                                                "hello")
    assert_still_works(conn)
    exc = remote_error(conn, encode(hello(version=7)))
    assert exc.kind is ErrorKind.HANDSHAKE
    assert exc.message.startswith("second hello frame: ")
    assert_still_works(conn)


@pytest.mark.parametrize("role", list(Role))
def test_unknown_type_is_not_fatal(role: Role) -> None:
    conn = handshaken(role)
    body = msgpack.packb({"t": "resize", "id": 4, "rows": 24})
    exc = remote_error(conn, len(body).to_bytes(4, "big") + body)
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.UNKNOWN_TYPE, 4, "resize")
    assert exc.message == "unknown frame type 'resize'"
    assert_still_works(conn)


@pytest.mark.parametrize(
    ("frame", "id"),
    [(Started(id=1, pid=2), 1), (SignalAck(id=1, sig="TERM"), 1), (Exit(id=1, code=0), 1),
     (Log(level="info", msg="x"), None), (Closed(id=1), 1), (Goodbye(), None)],
)
def test_agent_frames_sent_by_the_controller(frame: Frame, id: int | None) -> None:
    agent = handshaken(Role.AGENT)
    exc = remote_error(agent, encode(frame))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.BAD_FRAME, id, frame.TYPE)
    assert exc.message == f"{frame.TYPE} frames are not sent by the controller"
    assert_still_works(agent)


@pytest.mark.parametrize(
    ("frame", "id"),
    [(Exec(id=1, argv=(b"x",)), 1), (Signal(id=1, sig="TERM"), 1), (Close(id=1), 1),
     (Config(env_keep=("A",)), None), (Shutdown(), None), (Stop(id=1, ch=1), 1)],
)
def test_controller_frames_sent_by_the_agent(frame: Frame, id: int | None) -> None:
    ctrl = handshaken(Role.CONTROLLER)
    exc = remote_error(ctrl, encode(frame))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.BAD_FRAME, id, frame.TYPE)
    assert exc.message == f"{frame.TYPE} frames are not sent by the agent"
    assert_still_works(ctrl)


@pytest.mark.parametrize(
    ("role", "body", "fragment", "id"),
    [
        (Role.AGENT, {"t": "exec", "id": "1", "argv": [b"x"]},
         "exec frame: field 'id' must be an unsigned integer below 2**64, not str '1'", None),
        (Role.AGENT, {"t": "exec", "id": 2, "argv": [b"x"], "fds": [3, "4"]},
         "exec frame: field 'fds' must be an array of an unsigned integer", 2),
        (Role.AGENT, {"t": "data", "id": 2, "ch": 0, "d": "text"},
         "data frame: field 'd' must be binary data (msgpack bin), not str 'text'", 2),
        (Role.CONTROLLER, {"t": "exit", "id": 2, "code": 0, "core": 1},
         "exit frame: field 'core' must be a boolean, not integer 1", 2),
        (Role.CONTROLLER, {"t": "log", "level": "info", "msg": "m", "attrs": {"a": 1}},
         "log frame: field 'attrs' must be a map of strings to strings", None),
        (Role.CONTROLLER, {"t": "started", "id": 2},
         "started frame: missing field 'pid'", 2),
    ],
)
def test_wrong_field_types(role: Role, body: dict[str, Any], fragment: str,
                           id: int | None) -> None:
    conn = handshaken(role)
    packed = msgpack.packb(body, use_bin_type=True)
    exc = remote_error(conn, len(packed).to_bytes(4, "big") + packed)
    assert exc.kind is ErrorKind.BAD_FRAME
    assert exc.message.startswith(fragment)
    assert (exc.id, exc.ref) == (id, body["t"])
    assert_still_works(conn)


# ----------------------------------------------------------------------------- children


@pytest.mark.parametrize(
    "frame",
    [Data(id=9, ch=0, data=b"x"), Eof(id=9, ch=0), Window(id=9, ch=1, n=5),
     Signal(id=9, sig="INT"), Close(id=9), Stop(id=9, ch=1)],
)
def test_unknown_child_at_the_agent(frame: Frame) -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, id=1)
    exc = remote_error(agent, encode(frame))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.UNKNOWN_CHILD, 9, frame.TYPE)
    assert exc.message == f"{frame.TYPE} frame: no child with id 9"
    assert_still_works(agent)


@pytest.mark.parametrize(
    "frame",
    [Started(id=9, pid=1), Data(id=9, ch=1, data=b"x"), Eof(id=9, ch=1), Window(id=9, ch=0, n=1),
     SignalAck(id=9, sig="INT"), Exit(id=9, code=1), Closed(id=9)],
)
def test_unknown_child_at_the_controller(frame: Frame) -> None:
    _agent, ctrl = pair()
    exc = remote_error(ctrl, encode(frame))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.UNKNOWN_CHILD, 9, frame.TYPE)
    assert exc.message == f"{frame.TYPE} frame: no child with id 9"
    assert_still_works(ctrl)


def test_duplicate_exec_id() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, id=5)
    exc = remote_error(agent, encode(Exec(id=5, argv=(b"again",))))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.DUPLICATE_ID, 5, "exec")
    assert exc.message == "exec frame: id 5 is already in use (not yet closed)"
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send(Exec(id=5, argv=(b"again",)))
    assert (info.value.kind, info.value.id) == (ErrorKind.DUPLICATE_ID, 5)
    assert "id 5" in info.value.message
    # the first child is untouched
    assert agent.children() == [5]
    assert deliver(agent, ctrl.send_data(5, 0, b"ok") + b"ok") == [Data(id=5, ch=0, data=b"ok")]


def test_exec_id_edges() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, id=0)
    spawn(agent, ctrl, id=2**64 - 1)
    assert sorted(agent.children()) == sorted(ctrl.children()) == [0, 2**64 - 1]
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send(Exec(id=-1, argv=(b"x",)))
    assert (info.value.kind, info.value.message) == (ErrorKind.BAD_FRAME, "id -1 is out of range")
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send(Exec(id=2**64, argv=(b"x",)))
    assert (info.value.kind, info.value.id, info.value.ref) == (ErrorKind.BAD_FRAME, 2**64, "exec")
    assert info.value.message.startswith("exec frame: a field cannot be encoded")
    assert sorted(ctrl.children()) == [0, 2**64 - 1]


def test_unencodable_fields_are_local_errors() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, id=1)
    for frame in (Started(id=1, pid=2**64), Log(level="info", msg="bad \ud800 text"),
                  Exit(id=1, code=-(2**63) - 1)):
        with pytest.raises(LocalProtocolError) as info:
            agent.send(frame)
        assert (info.value.kind, info.value.ref) == (ErrorKind.BAD_FRAME, frame.TYPE)
        assert info.value.message.startswith(f"{frame.TYPE} frame: a field cannot be encoded")
    # nothing was recorded: the child can still be reported started and exited
    deliver(ctrl, agent.send(Exit(id=1, code=0)))


def test_data_both_ways_and_byte_counts() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, fds=(5,))
    assert deliver(agent, ctrl.send_data(1, 0, b"in") + b"in") == [Data(id=1, ch=0, data=b"in")]
    assert deliver(agent, ctrl.send_data(1, 5, b"x5") + b"x5") == [Data(id=1, ch=5, data=b"x5")]
    out = agent.send_data(1, 1, b"out") + b"out" + agent.send_data(1, 2, b"err!") + b"err!"
    out += agent.send_data(1, 5, b"five5") + b"five5"
    assert deliver(ctrl, out) == [
        Data(id=1, ch=1, data=b"out"), Data(id=1, ch=2, data=b"err!"),
        Data(id=1, ch=5, data=b"five5"),
    ]
    assert (ctrl.bytes_sent(1, 0), agent.bytes_received(1, 0)) == (2, 2)
    assert (agent.bytes_sent(1, 1), ctrl.bytes_received(1, 1)) == (3, 3)
    assert (agent.bytes_sent(1, 5), ctrl.bytes_received(1, 5)) == (5, 5)
    assert (ctrl.bytes_sent(1, 5), agent.bytes_received(1, 5)) == (2, 2)
    assert ctrl.send_credit(1, 0) == AGENT_WINDOW - 2
    assert agent.send_credit(1, 1) == CONTROLLER_WINDOW - 3
    assert agent.send_credit(1, 2) == CONTROLLER_WINDOW - 4


def test_empty_data_frame_is_not_eof() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl)
    assert deliver(ctrl, agent.send_data(1, 1, b"")) == [Data(id=1, ch=1, data=b"")]
    assert agent.can_send(1, 1)
    assert deliver(ctrl, agent.send_data(1, 1, b"more") + b"more") == [
        Data(id=1, ch=1, data=b"more")
    ]


def test_data_after_eof_is_channel_closed() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, fds=(3,))
    deliver(agent, ctrl.send(Eof(id=1, ch=0)))
    exc = remote_error(agent, data_frame(1, 0, 1))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.CHANNEL_CLOSED, 1, "data")
    assert exc.message == "data frame: channel 0 of child 1 already had its eof"
    exc = remote_error(agent, encode(Eof(id=1, ch=0, n=0)))
    assert (exc.kind, exc.ref) == (ErrorKind.CHANNEL_CLOSED, "eof")
    assert exc.message == "eof frame: channel 0 of child 1 already had its eof"
    # the other direction of fd 3 is independent
    deliver(ctrl, agent.send(Eof(id=1, ch=3)))
    assert deliver(agent, ctrl.send_data(1, 3, b"s") + b"s") == [Data(id=1, ch=3, data=b"s")]
    exc = remote_error(ctrl, data_frame(1, 3, 1))
    assert (exc.kind, exc.message) == (
        ErrorKind.CHANNEL_CLOSED, "data frame: channel 3 of child 1 already had its eof"
    )
    # and locally
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send_data(1, 0, b"x")
    assert info.value.kind is ErrorKind.CHANNEL_CLOSED
    assert info.value.message == "channel 0 of child 1 already had its eof"
    with pytest.raises(LocalProtocolError) as info:
        agent.send(Eof(id=1, ch=3))
    assert info.value.kind is ErrorKind.CHANNEL_CLOSED
    assert not agent.can_send(1, 3)
    assert agent.can_send(1, 1)


@pytest.mark.parametrize(
    ("to", "frame", "message"),
    [
        (Role.AGENT, Data(id=1, ch=5, data=b"x"),
         "data frame: child 1 has no channel 5 in this direction"),
        (Role.AGENT, Data(id=1, ch=1, data=b"x"),
         "data frame: child 1 has no channel 1 in this direction"),
        (Role.AGENT, Eof(id=1, ch=2), "eof frame: child 1 has no channel 2 in this direction"),
        (Role.AGENT, Window(id=1, ch=0, n=1),
         "window frame: child 1 has no channel 0 in this direction"),
        (Role.AGENT, Window(id=1, ch=4, n=1),
         "window frame: child 1 has no channel 4 in this direction"),
        (Role.CONTROLLER, Data(id=1, ch=0, data=b"x"),
         "data frame: child 1 has no channel 0 in this direction"),
        (Role.CONTROLLER, Data(id=1, ch=4, data=b"x"),
         "data frame: child 1 has no channel 4 in this direction"),
        (Role.CONTROLLER, Window(id=1, ch=2, n=1),
         "window frame: child 1 has no channel 2 in this direction"),
    ],
)
def test_bad_channel(to: Role, frame: Frame, message: str) -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, fds=(3,))
    conn = agent if to is Role.AGENT else ctrl
    exc = remote_error(conn, encode(frame))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.BAD_CHANNEL, 1, frame.TYPE)
    assert exc.message == message
    assert_still_works(conn)


def test_bad_channel_locally() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, fds=(3,))
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: ctrl.send_data(1, 1, b"x"), "child 1 has no channel 1 to send on"),
        (lambda: ctrl.send_data(1, 5, b"x"), "child 1 has no channel 5 to send on"),
        (lambda: agent.send_data(1, 0, b"x"), "child 1 has no channel 0 to send on"),
        (lambda: ctrl.send(Eof(id=1, ch=2)), "child 1 has no channel 2 to send on"),
        (lambda: ctrl.send(Window(id=1, ch=0, n=5)), "child 1 has no channel 0 to receive on"),
        (lambda: agent.send(Window(id=1, ch=1, n=5)), "child 1 has no channel 1 to receive on"),
    ]
    for call, message in cases:
        with pytest.raises(LocalProtocolError) as info:
            call()
        assert (info.value.kind, info.value.message, info.value.id) == (
            ErrorKind.BAD_CHANNEL, message, 1)


# ----------------------------------------------------------------------------- flow control


def test_credit_exceeded_then_credit_still_works() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl)
    exc = remote_error(agent, data_frame(1, 0, AGENT_WINDOW + 1))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.CREDIT_EXCEEDED, 1, "data")
    assert exc.message == (
        f"data frame: {AGENT_WINDOW + 1} bytes on channel 0 of child 1 exceed the "
        f"{AGENT_WINDOW} bytes of credit granted"
    )
    assert agent.bytes_received(1, 0) == 0
    # the rejected frame consumed nothing: a conforming sender's full window still fits
    payload = b"p" * AGENT_WINDOW
    assert deliver(agent, ctrl.send_data(1, 0, payload) + payload) == [
        Data(id=1, ch=0, data=payload)
    ]
    assert ctrl.send_credit(1, 0) == 0
    exc = remote_error(agent, data_frame(1, 0, 1))
    assert exc.kind is ErrorKind.CREDIT_EXCEEDED
    assert "1 bytes on channel 0 of child 1 exceed the 0 bytes of credit" in exc.message
    # an empty data frame needs no credit
    assert deliver(agent, data_frame(1, 0, 0)) == [Data(id=1, ch=0, data=b"")]


def test_window_grants_more_credit() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl)
    payload = b"q" * AGENT_WINDOW
    deliver(agent, ctrl.send_data(1, 0, payload) + payload)
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send_data(1, 0, b"x")
    assert (info.value.kind, info.value.id, info.value.ref) == (
        ErrorKind.CREDIT_EXCEEDED, 1, "data")
    assert info.value.message == "1 bytes on channel 0 of child 1 exceed the credit of 0"
    assert ctrl.bytes_sent(1, 0) == AGENT_WINDOW  # the refused frame changed nothing
    # the agent consumed half a window and grants it back
    assert deliver(ctrl, agent.send(Window(id=1, ch=0, n=AGENT_WINDOW // 2))) == [
        Window(id=1, ch=0, n=AGENT_WINDOW // 2)
    ]
    assert ctrl.send_credit(1, 0) == AGENT_WINDOW // 2
    more = b"r" * (AGENT_WINDOW // 2)
    assert deliver(agent, ctrl.send_data(1, 0, more) + more) == [Data(id=1, ch=0, data=more)]
    # credit on one channel is not credit on another
    assert agent.send_credit(1, 1) == CONTROLLER_WINDOW
    deliver(agent, ctrl.send(Window(id=1, ch=2, n=10)))
    assert agent.send_credit(1, 2) == CONTROLLER_WINDOW + 10
    assert agent.send_credit(1, 1) == CONTROLLER_WINDOW


def test_window_overflow_and_zero() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl)
    exc = remote_error(ctrl, encode(Window(id=1, ch=0, n=2**62)))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.BAD_FRAME, 1, "window")
    assert "credit on channel 0 of child 1 would exceed 2**62 bytes" in exc.message
    assert ctrl.send_credit(1, 0) == AGENT_WINDOW
    with pytest.raises(LocalProtocolError) as info:
        agent.send(Window(id=1, ch=0, n=2**62))
    assert info.value.kind is ErrorKind.BAD_FRAME
    with pytest.raises(LocalProtocolError) as info:
        agent.send(Window(id=1, ch=0, n=0))
    assert (info.value.kind, info.value.message) == (
        ErrorKind.BAD_FRAME, "window frame: field 'n' must be > 0")


def test_window_after_eof_is_harmless() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl)
    deliver(agent, ctrl.send(Eof(id=1, ch=0)))
    # the agent's grant crossed our eof: dropped silently
    assert deliver(ctrl, encode(Window(id=1, ch=0, n=5))) == []
    # nor does anyone grant credit for a channel whose sender has finished
    assert agent.send(Window(id=1, ch=0, n=5)) == b""


# ----------------------------------------------------------------------------- stop


def stop_pair() -> tuple[Connection, Connection]:
    agent, ctrl = pair(agent_caps=("stop",))
    spawn(agent, ctrl, fds=(3,))
    return agent, ctrl


def local_error(conn: Connection, frame: Frame) -> LocalProtocolError:
    with pytest.raises(LocalProtocolError) as info:
        conn.send(frame)
    return info.value


def test_stop_ends_one_output_channel_with_its_eof() -> None:
    agent, ctrl = stop_pair()
    # sent by the agent before the stop arrives: in flight, accepted and counted
    in_flight = agent.send_data(1, 1, b"abc") + b"abc"
    assert deliver(agent, ctrl.send(Stop(id=1, ch=1))) == [Stop(id=1, ch=1)]
    assert deliver(ctrl, in_flight) == [Data(id=1, ch=1, data=b"abc")]
    # no data after the stop, only the eof, which counts every byte sent
    with pytest.raises(LocalProtocolError) as info:
        agent.send_data(1, 1, b"more")
    assert (info.value.kind, info.value.id, info.value.ref) == (
        ErrorKind.CHANNEL_CLOSED, 1, "data")
    assert info.value.message == (
        "channel 1 of child 1 was stopped by the controller: send its eof")
    assert agent.bytes_sent(1, 1) == 3
    assert deliver(ctrl, agent.send(Eof(id=1, ch=1))) == [Eof(id=1, ch=1, n=3)]
    # the other channels go on
    assert deliver(ctrl, agent.send_data(1, 2, b"err") + b"err") == [
        Data(id=1, ch=2, data=b"err")]
    assert deliver(agent, ctrl.send_data(1, 0, b"in") + b"in") == [
        Data(id=1, ch=0, data=b"in")]


def test_stop_of_an_extra_fd_leaves_the_other_direction_open() -> None:
    agent, ctrl = stop_pair()
    assert deliver(agent, ctrl.send(Stop(id=1, ch=3))) == [Stop(id=1, ch=3)]
    assert deliver(ctrl, agent.send(Eof(id=1, ch=3))) == [Eof(id=1, ch=3, n=0)]
    assert deliver(agent, ctrl.send_data(1, 3, b"to fd 3") + b"to fd 3") == [
        Data(id=1, ch=3, data=b"to fd 3")]
    assert deliver(ctrl, agent.send(Window(id=1, ch=3, n=7))) == [Window(id=1, ch=3, n=7)]
    assert ctrl.send_credit(1, 3) == AGENT_WINDOW


def test_no_credit_for_a_stopped_channel() -> None:
    agent, ctrl = stop_pair()
    deliver(ctrl, agent.send_data(1, 1, b"x" * 10) + b"x" * 10)
    deliver(agent, ctrl.send(Stop(id=1, ch=1)))
    # granting it is pointless: nothing but the eof comes
    assert ctrl.send(Window(id=1, ch=1, n=10)) == b""
    # a rogue controller's grant is dropped without a word
    assert deliver(agent, encode(Window(id=1, ch=1, n=10))) == []
    assert agent.send_credit(1, 1) == CONTROLLER_WINDOW - 10


def test_stop_after_the_eof_arrived_is_not_sent() -> None:
    agent, ctrl = stop_pair()
    deliver(ctrl, agent.send(Eof(id=1, ch=2)))
    assert ctrl.send(Stop(id=1, ch=2)) == b""
    exc = local_error(ctrl, Stop(id=1, ch=2))
    assert (exc.kind, exc.message) == (
        ErrorKind.BAD_FRAME, "stop frame: channel 2 of child 1 was already stopped")


def test_stop_crossing_the_agents_eof_is_dropped() -> None:
    agent, ctrl = stop_pair()
    eof = agent.send(Eof(id=1, ch=2))
    assert deliver(agent, ctrl.send(Stop(id=1, ch=2))) == []
    assert deliver(ctrl, eof) == [Eof(id=1, ch=2, n=0)]
    # and counts as the one stop of that channel
    exc = remote_error(agent, encode(Stop(id=1, ch=2)))
    assert exc.kind is ErrorKind.BAD_FRAME


@pytest.mark.parametrize(
    ("setup", "frame", "kind", "message"),
    [
        ("stopped", Stop(id=1, ch=1), ErrorKind.BAD_FRAME,
         "stop frame: channel 1 of child 1 was already stopped"),
        ("", Stop(id=1, ch=0), ErrorKind.BAD_CHANNEL,
         "stop frame: child 1 has no channel 0 to receive on"),
        ("", Stop(id=1, ch=4), ErrorKind.BAD_CHANNEL,
         "stop frame: child 1 has no channel 4 to receive on"),
        ("closed", Stop(id=1, ch=1), ErrorKind.CHANNEL_CLOSED, "stop frame: child 1 is closed"),
        ("", Stop(id=2, ch=1), ErrorKind.UNKNOWN_CHILD, "no child with id 2"),
    ],
)
def test_stop_rules_locally(setup: str, frame: Stop, kind: ErrorKind, message: str) -> None:
    _agent, ctrl = stop_pair()
    if setup == "stopped":
        ctrl.send(Stop(id=1, ch=1))
    if setup == "closed":
        ctrl.send(Close(id=1))
    exc = local_error(ctrl, frame)
    assert (exc.kind, exc.message, exc.id) == (kind, message, frame.id)
    # nothing changed: the channel takes a stop (or, closed, takes none)
    if not setup:
        assert ctrl.send(Stop(id=1, ch=1)) != b""


def test_stop_needs_the_agents_capability() -> None:
    agent, ctrl = pair()  # an agent that does not announce "stop"
    spawn(agent, ctrl)
    exc = local_error(ctrl, Stop(id=1, ch=1))
    assert (exc.kind, exc.message) == (
        ErrorKind.BAD_FRAME, "stop frame: the agent does not announce the 'stop' capability")
    assert ctrl.send(Window(id=1, ch=1, n=5)) != b""  # the channel was left as it was


@pytest.mark.parametrize(
    ("setup", "frame", "kind", "message"),
    [
        ("stopped", Stop(id=1, ch=1), ErrorKind.BAD_FRAME,
         "stop frame: channel 1 of child 1 was already stopped"),
        ("", Stop(id=1, ch=0), ErrorKind.BAD_CHANNEL,
         "stop frame: child 1 has no channel 0 in the agent's direction"),
        ("", Stop(id=1, ch=9), ErrorKind.BAD_CHANNEL,
         "stop frame: child 1 has no channel 9 in the agent's direction"),
        ("closed", Stop(id=1, ch=1), ErrorKind.CHANNEL_CLOSED, "stop frame: child 1 was closed"),
    ],
)
def test_stop_rules_at_the_agent(setup: str, frame: Stop, kind: ErrorKind, message: str
                                 ) -> None:
    agent, ctrl = stop_pair()
    if setup == "stopped":
        deliver(agent, ctrl.send(Stop(id=1, ch=1)))
    if setup == "closed":
        deliver(agent, ctrl.send(Close(id=1)))
    exc = remote_error(agent, encode(frame))
    assert (exc.kind, exc.message, exc.id, exc.ref) == (kind, message, 1, "stop")
    assert_still_works(agent)
    if not setup:  # a rejected stop left the channel open
        assert agent.send_data(1, 1, b"x") != b""


def test_data_larger_than_the_peers_frame_limit() -> None:
    agent, ctrl = pair(agent_window=8 << 20, agent_max_frame=MIN_MAX_FRAME)
    spawn(agent, ctrl)
    limit = ctrl.max_data_payload
    assert limit == MIN_MAX_FRAME - DATA_FRAME_OVERHEAD
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send_data(1, 0, bytes(limit + 1))
    assert (info.value.kind, info.value.id, info.value.ref) == (
        ErrorKind.FRAME_TOO_LARGE, 1, "data")
    assert info.value.message == (
        f"{limit + 1} bytes exceed the peer's data payload limit {limit}"
    )
    payload = bytes(limit)
    assert deliver(agent, ctrl.send_data(1, 0, payload) + payload) == [
        Data(id=1, ch=0, data=payload)
    ]


def test_eof_carries_the_byte_count() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl)
    deliver(ctrl, agent.send_data(1, 1, b"12345") + b"12345")
    raw = agent.send(Eof(id=1, ch=1, n=999))  # n is filled in by the connection
    assert decode(raw) == Eof(id=1, ch=1, n=5)
    assert deliver(ctrl, raw) == [Eof(id=1, ch=1, n=5)]
    raw = ctrl.send(Eof(id=1, ch=0))
    assert decode(raw) == Eof(id=1, ch=0, n=0)
    assert deliver(agent, raw) == [Eof(id=1, ch=0, n=0)]


def test_eof_count_mismatch_is_detected() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl)
    deliver(ctrl, agent.send_data(1, 2, b"abc") + b"abc")
    exc = remote_error(ctrl, encode(Eof(id=1, ch=2, n=5)))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.BAD_FRAME, 1, "eof")
    assert exc.message == "eof frame: channel 2 of child 1 announces 5 bytes sent but 3 arrived"
    # the channel stays open: the true eof still works; an eof without n is accepted too
    assert deliver(ctrl, encode(Eof(id=1, ch=2, n=3))) == [Eof(id=1, ch=2, n=3)]
    assert deliver(ctrl, encode(Eof(id=1, ch=1))) == [Eof(id=1, ch=1, n=None)]


# ----------------------------------------------------------------------------- signals


def test_signal_and_ack() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl)
    assert deliver(agent, ctrl.send(Signal(id=1, sig="USR1"))) == [Signal(id=1, sig="USR1")]
    ack = SignalAck(id=1, sig="USR1", errno="ESRCH")
    assert deliver(ctrl, agent.send(ack)) == [ack]


@pytest.mark.parametrize(
    ("sig", "hint"), [("SIGTERM", True), ("term", False), ("", False), ("9", False),
                      ("SIGKILL", True)],
)
def test_bad_signal_names(sig: str, hint: bool) -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl)
    exc = remote_error(agent, encode(Signal(id=1, sig=sig)))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.BAD_SIGNAL, 1, "signal")
    expected = f"signal frame: unknown signal name {sig!r}"
    if hint:
        expected += " (names go without the SIG prefix)"
    assert exc.message == expected
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send(Signal(id=1, sig=sig))
    assert (info.value.kind, info.value.message, info.value.id) == (
        ErrorKind.BAD_SIGNAL, expected, 1)
    assert_still_works(agent)


# ----------------------------------------------------------------------------- close / closed


def test_full_lifecycle_and_id_reuse() -> None:
    agent, ctrl = pair()
    for round_ in range(3):
        spawn(agent, ctrl, id=7)
        deliver(agent, ctrl.send_data(7, 0, b"in") + b"in")
        deliver(agent, ctrl.send(Eof(id=7, ch=0)))
        deliver(ctrl, agent.send_data(7, 1, b"out") + b"out")
        assert deliver(ctrl, agent.send(Eof(id=7, ch=1))) == [Eof(id=7, ch=1, n=3)]
        assert deliver(ctrl, agent.send(Eof(id=7, ch=2))) == [Eof(id=7, ch=2, n=0)]
        assert deliver(ctrl, agent.send(Exit(id=7, code=round_))) == [Exit(id=7, code=round_)]
        assert deliver(agent, ctrl.send(Close(id=7))) == [Close(id=7)]
        assert deliver(ctrl, agent.send(Closed(id=7))) == [Closed(id=7)]
        assert agent.children() == ctrl.children() == []
        assert not agent.has_child(7)
        assert not ctrl.has_child(7)


def test_exit_without_started_then_close() -> None:
    # spawn failure: error + exit 127, no started
    agent, ctrl = pair()
    deliver(agent, ctrl.send(Exec(id=3, argv=(b"/nonexistent",))))
    err = Error(kind="spawn-failed", msg="no such file", id=3, errno="ENOENT", ref="exec")
    assert deliver(ctrl, agent.send(err) + agent.send(Exit(id=3, code=127))) == [
        err, Exit(id=3, code=127)
    ]
    exc = remote_error(ctrl, encode(Started(id=3, pid=5)))
    assert (exc.kind, exc.message) == (
        ErrorKind.BAD_FRAME, "started frame: child 3 was already reported exited")
    deliver(agent, ctrl.send(Close(id=3)))
    deliver(ctrl, agent.send(Closed(id=3)))
    assert ctrl.children() == []


def test_closed_requires_close_received_and_exit_sent() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, id=2)
    with pytest.raises(LocalProtocolError) as info:
        agent.send(Closed(id=2))
    assert (info.value.kind, info.value.id) == (ErrorKind.BAD_FRAME, 2)
    assert info.value.message == "child 2 has not been closed"
    exc = remote_error(ctrl, encode(Closed(id=2)))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.BAD_FRAME, 2, "closed")
    assert exc.message == "closed frame: child 2 has not been closed"
    # close received, exit not yet sent
    deliver(agent, ctrl.send(Close(id=2)))
    with pytest.raises(LocalProtocolError):
        agent.send(Closed(id=2))
    exc = remote_error(ctrl, encode(Closed(id=2)))
    assert exc.message == "closed frame: child 2 has not been reported exited"
    deliver(ctrl, agent.send(Exit(id=2, code=137, sig="KILL")))
    assert deliver(ctrl, agent.send(Closed(id=2))) == [Closed(id=2)]


def test_repeated_lifecycle_frames() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, id=4)
    with pytest.raises(LocalProtocolError) as info:
        agent.send(Started(id=4, pid=1))
    assert (info.value.kind, info.value.message) == (
        ErrorKind.BAD_FRAME, "child 4 was already reported started")
    exc = remote_error(ctrl, encode(Started(id=4, pid=1)))
    assert exc.message == "started frame: child 4 was already reported started"
    deliver(ctrl, agent.send(Exit(id=4, code=0)))
    with pytest.raises(LocalProtocolError) as info:
        agent.send(Exit(id=4, code=0))
    assert info.value.message == "child 4 already exited"
    exc = remote_error(ctrl, encode(Exit(id=4, code=0)))
    assert (exc.kind, exc.message) == (ErrorKind.BAD_FRAME, "exit frame: child 4 already exited")
    deliver(agent, ctrl.send(Close(id=4)))
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send(Close(id=4))
    assert info.value.message == "child 4 is already being closed"
    exc = remote_error(agent, encode(Close(id=4)))
    assert (exc.kind, exc.message) == (
        ErrorKind.BAD_FRAME, "close frame: child 4 is already being closed")


def test_in_flight_frames_after_close_are_swallowed_by_the_controller() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, id=1, fds=(3,))
    spawn(agent, ctrl, id=2)
    # the agent sends output while the controller's close is in flight
    in_flight = (agent.send_data(1, 1, b"late") + b"late" + agent.send(Eof(id=1, ch=2))
                 + agent.send(Window(id=1, ch=0, n=10)) + agent.send_data(2, 1, b"b") + b"b")
    close = ctrl.send(Close(id=1))
    assert not ctrl.can_send(1, 0)
    assert ctrl.send_credit(1, 0) == 0
    # data, eof and window for child 1 vanish; child 2 is unaffected
    assert deliver(ctrl, in_flight) == [Data(id=2, ch=1, data=b"b")]
    # even frames that would otherwise be errors (channel, credit) are swallowed
    assert deliver(ctrl, data_frame(1, 9, 5) + data_frame(1, 1, 10**5)) == []
    # the controller may no longer send data, eof, window or signal for child 1
    calls: list[Callable[[], object]] = [
        lambda: ctrl.send_data(1, 0, b"x"), lambda: ctrl.send(Eof(id=1, ch=0)),
        lambda: ctrl.send(Window(id=1, ch=1, n=1)), lambda: ctrl.send(Signal(id=1, sig="TERM")),
    ]
    for call in calls:
        with pytest.raises(LocalProtocolError) as info:
            call()
        assert info.value.kind is ErrorKind.CHANNEL_CLOSED
        assert "child 1 is closed" in info.value.message
    # the agent learns of the close: its data, eof and window for the child become b""
    assert deliver(agent, close) == [Close(id=1)]
    assert not agent.can_send(1, 1)
    assert agent.send_data(1, 1, b"more") == b""
    assert agent.send_data(1, 3, b"more") == b""
    assert agent.send(Eof(id=1, ch=1)) == b""
    assert agent.send(Window(id=1, ch=0, n=5)) == b""
    # exit and closed still flow and end the child on both sides
    assert deliver(ctrl, agent.send(Exit(id=1, code=-9 + 9 + 137, sig="KILL"))) == [
        Exit(id=1, code=137, sig="KILL")
    ]
    deliver(ctrl, agent.send(Closed(id=1)))
    assert ctrl.children() == agent.children() == [2]
    # the id can be used again at once
    spawn(agent, ctrl, id=1)


# ----------------------------------------------------------------------------- shutdown, goodbye


def test_shutdown_forbids_exec() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, id=1)
    assert deliver(agent, ctrl.send(Shutdown())) == [Shutdown()]
    assert agent.shutdown_requested
    assert ctrl.shutdown_requested
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send(Exec(id=2, argv=(b"x",)))
    assert (info.value.kind, info.value.id, info.value.ref) == (
        ErrorKind.SHUTTING_DOWN, 2, "exec")
    exc = remote_error(agent, encode(Exec(id=2, argv=(b"x",))))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.SHUTTING_DOWN, 2, "exec")
    assert exc.message == "exec frame: id 2 arrived after shutdown"
    assert not agent.has_child(2)
    # running children go on
    deliver(ctrl, agent.send_data(1, 1, b"x") + b"x")
    deliver(ctrl, agent.send(Exit(id=1, code=0)))
    assert deliver(ctrl, agent.send(Goodbye())) == [Goodbye()]
    assert ctrl.goodbye
    assert agent.goodbye


def test_nothing_after_goodbye() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, id=1)
    deliver(agent, ctrl.send(Shutdown()))
    deliver(ctrl, agent.send(Goodbye()))
    calls: list[Callable[[], object]] = [
        lambda: agent.send(Exit(id=1, code=0)), lambda: agent.send(Ping(n=1)),
        lambda: agent.send_data(1, 1, b"x"), lambda: agent.send(Goodbye()),
    ]
    for call in calls:
        with pytest.raises(LocalProtocolError) as info:
            call()
        assert (info.value.kind, info.value.message) == (
            ErrorKind.BAD_FRAME, "nothing may follow goodbye")
    exc = remote_error(ctrl, encode(Exit(id=1, code=0)))
    assert (exc.kind, exc.id, exc.ref) == (ErrorKind.BAD_FRAME, 1, "exit")
    assert exc.message == "exit frame after goodbye (nothing may follow goodbye)"
    conn_closed = ctrl
    conn_closed.receive_data(b"")
    assert conn_closed.next_event() is CONNECTION_CLOSED


# ----------------------------------------------------------------------------- end of stream


def test_clean_end_of_stream() -> None:
    agent, _ctrl = pair()
    agent.receive_data(b"")
    assert agent.next_event() is CONNECTION_CLOSED
    assert agent.next_event() is CONNECTION_CLOSED
    fresh = Connection(Role.CONTROLLER)
    fresh.receive_data(b"")
    assert fresh.next_event() is CONNECTION_CLOSED


def test_end_of_stream_inside_a_frame_is_fatal() -> None:
    agent, _ctrl = pair()
    raw = encode(Ping(n=1))
    agent.receive_data(encode(Ping(n=0)) + raw[:6])
    agent.receive_data(b"")
    assert agent.next_event() == Ping(n=0)
    with pytest.raises(RemoteProtocolError) as info:
        agent.next_event()
    assert (info.value.kind, info.value.fatal) == (ErrorKind.MALFORMED, True)
    assert info.value.message == "stream ended inside a frame (6 bytes of it)"
    with pytest.raises(RemoteProtocolError) as again:
        agent.next_event()
    assert again.value is info.value
    # even a header cut short counts
    conn = handshaken(Role.AGENT)
    conn.receive_data(b"\x00\x00")
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.message == "stream ended inside a frame (2 bytes of it)"


def test_fatal_error_sticks() -> None:
    agent, _ctrl = pair()
    exc = remote_error(agent, b"\x00\x00\x00\x00", fatal=True)
    assert exc.kind is ErrorKind.MALFORMED
    agent.receive_data(encode(Ping(n=1)))
    for _ in range(3):
        with pytest.raises(RemoteProtocolError) as again:
            agent.next_event()
        assert again.value is exc


def test_error_frame_reports_a_remote_error_to_the_peer() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, id=3)
    exc = remote_error(agent, encode(Signal(id=3, sig="SIGINT")))
    reply = Error.from_exception(exc)
    assert deliver(ctrl, agent.send(reply)) == [Error(
        kind="bad-signal", id=3, ref="signal",
        msg="signal frame: unknown signal name 'SIGINT' (names go without the SIG prefix)",
    )]


def test_unknown_error_kinds_and_log_are_accepted() -> None:
    agent, ctrl = pair()
    frames = [Error(kind="from-the-future", msg="?"),
              Log(level="debug", msg="m", attrs={"k": "v"}), Pong(n=3)]
    assert deliver(ctrl, b"".join(encode(f) for f in frames)) == frames
    assert deliver(agent, encode(Config(env_keep=("HOME",), env_remove=None))) == [
        Config(env_keep=("HOME",))
    ]
    assert deliver(agent, ctrl.send(Ping(n=5))) == [Ping(n=5)]
    assert deliver(ctrl, agent.send(Pong(n=5))) == [Pong(n=5)]
    assert deliver(ctrl, agent.send(Ping(n=6))) == [Ping(n=6)]


# ----------------------------------------------------------------------------- local misuse


@pytest.mark.parametrize("role", list(Role))
def test_send_before_initiate(role: Role) -> None:
    conn = Connection(role)
    with pytest.raises(LocalProtocolError) as info:
        conn.send(Ping(n=1))
    assert (info.value.kind, info.value.message) == (
        ErrorKind.HANDSHAKE, "send our hello (initiate) first")
    with pytest.raises(LocalProtocolError) as info:
        conn.send_data(1, 0, b"x")
    assert info.value.kind is ErrorKind.HANDSHAKE


def test_exec_before_the_agents_hello() -> None:
    ctrl = Connection(Role.CONTROLLER)
    ctrl.initiate()
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send(Exec(id=1, argv=(b"x",)))
    assert (info.value.kind, info.value.ref, info.value.message) == (
        ErrorKind.HANDSHAKE, "exec", "wait for the agent's hello before exec")
    assert ctrl.children() == []
    with pytest.raises(LocalProtocolError):
        _ = ctrl.max_data_payload


@pytest.mark.parametrize(
    ("role", "frame"),
    [
        (Role.AGENT, Exec(id=1, argv=(b"x",))), (Role.AGENT, Signal(id=1, sig="TERM")),
        (Role.AGENT, Close(id=1)), (Role.AGENT, Config()), (Role.AGENT, Shutdown()),
        (Role.CONTROLLER, Started(id=1, pid=1)), (Role.CONTROLLER, Exit(id=1, code=0)),
        (Role.CONTROLLER, SignalAck(id=1, sig="TERM")), (Role.CONTROLLER, Closed(id=1)),
        (Role.CONTROLLER, Log(level="info", msg="x")), (Role.CONTROLLER, Goodbye()),
        (Role.AGENT, Stop(id=1, ch=1)),
    ],
)
def test_wrong_role_frames_locally(role: Role, frame: Frame) -> None:
    conn = handshaken(role)
    with pytest.raises(LocalProtocolError) as info:
        conn.send(frame)
    assert (info.value.kind, info.value.ref) == (ErrorKind.BAD_FRAME, frame.TYPE)
    assert info.value.message == f"{frame.TYPE} frames are not sent by the {role}"


def test_data_and_hello_through_send() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl)
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send(Data(id=1, ch=0, data=b"x"))
    assert (info.value.kind, info.value.message) == (
        ErrorKind.BAD_FRAME, "use send_data() for data frames")
    assert ctrl.bytes_sent(1, 0) == 0
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send(hello())
    assert (info.value.kind, info.value.message) == (
        ErrorKind.HANDSHAKE, "hello is sent by initiate()")


def test_local_unknown_child() -> None:
    agent, ctrl = pair()
    for call in (lambda: agent.send(Started(id=8, pid=1)), lambda: agent.send_data(8, 1, b""),
                 lambda: ctrl.send(Signal(id=8, sig="HUP")), lambda: ctrl.send(Close(id=8)),
                 lambda: ctrl.send(Eof(id=8, ch=0)), lambda: ctrl.bytes_sent(8, 0)):
        with pytest.raises(LocalProtocolError) as info:
            call()
        assert (info.value.kind, info.value.id) == (ErrorKind.UNKNOWN_CHILD, 8)
        assert info.value.message == "no child with id 8"


def test_local_content_rules() -> None:
    _agent, ctrl = pair()
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send(Exec(id=1, argv=()))
    assert (info.value.kind, info.value.id, info.value.ref) == (ErrorKind.BAD_FRAME, 1, "exec")
    assert info.value.message == "exec frame: argv must not be empty"
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send(Exec(id=1, argv=(b"x",), fds=(1,)))
    assert info.value.kind is ErrorKind.BAD_FD
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send(Config(env_keep=("",)))
    assert info.value.message == "config frame: empty pattern in 'env_keep'"
    assert ctrl.children() == []


def test_control_frames_larger_than_the_peers_limit_are_refused() -> None:
    agent, ctrl = pair(agent_max_frame=MIN_MAX_FRAME)
    big_env = tuple(b"V%d=%s" % (i, b"x" * 100) for i in range(1000))
    with pytest.raises(LocalProtocolError) as info:
        ctrl.send(Exec(id=1, argv=(b"x",), env=big_env))
    assert (info.value.kind, info.value.id, info.value.ref) == (
        ErrorKind.FRAME_TOO_LARGE, 1, "exec")
    assert "exceed the peer's frame limit of 65536" in info.value.message
    assert ctrl.children() == []  # state unchanged
    # the controller's own limit is larger: the agent may send a big log
    assert len(deliver(ctrl, agent.send(Log(level="info", msg="m" * 100_000)))) == 1
    # before the peer's hello only the minimum is known
    early = Connection(Role.CONTROLLER)
    early.initiate()
    with pytest.raises(LocalProtocolError) as info:
        early.send(Config(env_keep=tuple(f"P{i}" for i in range(20_000))))
    assert info.value.kind is ErrorKind.FRAME_TOO_LARGE
    assert early.send(Config(env_keep=("HOME",)))


# ----------------------------------------------------------------------------- random operation


OPS = ["exec", "started", "a_data", "c_data", "a_eof", "c_eof", "a_window", "c_window",
       "signal", "ack", "exit", "close", "closed", "ping", "to_ctrl", "to_agent", "to_ctrl",
       "to_agent", "a_data", "c_data", "exit", "close", "closed", "closed", "stop"]


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_conforming_operation(data: st.DataObject) -> None:
    """Whatever a conforming side sends, in any interleaving, the other side accepts."""
    agent, ctrl = pair(agent_window=64, controller_window=48, agent_caps=("stop",))
    to_agent: list[bytes] = []
    to_ctrl: list[bytes] = []
    # the agent's view (filled as frames arrive) and the controller's
    a_children: dict[int, dict[str, Any]] = {}
    c_closing: set[int] = set()
    next_id = 0

    def receive(conn: Connection, raw: bytes) -> None:
        frame = decode(raw)
        # a window crossing our own eof on that channel is dropped (harmless race)
        swallowed = (
            conn is ctrl and isinstance(frame, (Data, Eof, Window)) and frame.id in c_closing
        ) or (
            isinstance(frame, (Window, Stop)) and conn.has_child(frame.id)
            and not conn.can_send(frame.id, frame.ch)
        ) or (
            # credit for a channel the controller stopped: only its eof will follow
            conn is agent and isinstance(frame, Window) and frame.id in a_children
            and frame.ch in a_children[frame.id]["stopped"]
        )
        events = deliver(conn, raw)
        assert events == ([] if swallowed else [frame])
        event(f"{type(frame).__name__} {'swallowed' if swallowed else 'accepted'}")
        if conn is agent and isinstance(frame, Exec):
            a_children[frame.id] = {"started": False, "exited": False, "close": False,
                                "chans": sorted({1, 2, *frame.fds}), "stopped": set()}
        elif conn is agent and isinstance(frame, Stop):
            a_children[frame.id]["stopped"].add(frame.ch)
        elif conn is agent and isinstance(frame, Close):
            a_children[frame.id]["close"] = True
        elif conn is ctrl and isinstance(frame, Closed):
            c_closing.discard(frame.id)

    for _ in range(data.draw(st.integers(5, 80))):
        op = data.draw(st.sampled_from(OPS))
        c_ids = [i for i in ctrl.children() if i not in c_closing]
        a_ids = sorted(a_children)
        if op == "exec":
            fds = tuple(data.draw(st.lists(st.sampled_from([3, 4]), unique=True)))
            to_agent.append(ctrl.send(Exec(id=next_id, argv=(b"x",), fds=fds)))
            next_id += 1
        elif op in ("to_ctrl", "to_agent"):
            queue, conn = (to_ctrl, ctrl) if op == "to_ctrl" else (to_agent, agent)
            for _ in range(data.draw(st.integers(0, len(queue)))):
                receive(conn, queue.pop(0))
        elif op == "ping":
            to_agent.append(ctrl.send(Ping(n=1)))
        elif op in ("c_data", "c_eof", "c_window", "signal", "close", "stop") and c_ids:
            id = data.draw(st.sampled_from(c_ids))
            if op == "c_data":
                chans = [ch for ch in (0, 3, 4) if ctrl.can_send(id, ch)]
                if chans:
                    ch = data.draw(st.sampled_from(chans))
                    size = data.draw(st.integers(0, ctrl.send_credit(id, ch)))
                    to_agent.append(ctrl.send_data(id, ch, b"c" * size) + b"c" * size)
            elif op == "c_eof":
                chans = [ch for ch in (0, 3, 4) if ctrl.can_send(id, ch)]
                if chans:
                    to_agent.append(ctrl.send(Eof(id=id, ch=data.draw(st.sampled_from(chans)))))
            elif op == "c_window":
                ch = data.draw(st.sampled_from([1, 2]))
                out = ctrl.send(Window(id=id, ch=ch, n=data.draw(st.integers(1, 40))))
                if out:
                    to_agent.append(out)
            elif op == "signal":
                to_agent.append(ctrl.send(Signal(id=id, sig="TERM")))
            elif op == "stop":
                receiving = ctrl._children[id].receiving
                chans = [ch for ch in (1, 2, 3, 4) if ch in receiving
                         and receiving[ch].state not in (STOPPED, STOPPED_EOF)]
                if chans:
                    out = ctrl.send(Stop(id=id, ch=data.draw(st.sampled_from(chans))))
                    if out:
                        to_agent.append(out)
            else:
                to_agent.append(ctrl.send(Close(id=id)))
                c_closing.add(id)
        elif a_ids:
            id = data.draw(st.sampled_from(a_ids))
            child = a_children[id]
            out = b""
            if op == "started" and not child["started"] and not child["exited"]:
                out = agent.send(Started(id=id, pid=id + 1))
                child["started"] = True
            elif op == "exit" and not child["exited"]:
                out = agent.send(Exit(id=id, code=0))
                child["exited"] = True
            elif op == "ack":
                out = agent.send(SignalAck(id=id, sig="TERM"))
            elif op == "closed" and child["close"] and child["exited"]:
                out = agent.send(Closed(id=id))
                del a_children[id]
            elif op == "a_data":
                ch = data.draw(st.sampled_from(child["chans"]))
                if (agent.can_send(id, ch) and ch not in child["stopped"]) or child["close"]:
                    size = data.draw(st.integers(0, agent.send_credit(id, ch)))
                    header = agent.send_data(id, ch, b"a" * size)
                    out = header + b"a" * size if header else b""
                    assert header or child["close"]
            elif op == "a_eof":
                ch = data.draw(st.sampled_from(child["chans"]))
                if agent.can_send(id, ch) or child["close"]:
                    out = agent.send(Eof(id=id, ch=ch))
            elif op == "a_window":
                out = agent.send(Window(id=id, ch=0, n=data.draw(st.integers(1, 40))))
            if out:
                to_ctrl.append(out)
    # deliver everything; both sides agree on every byte count
    while to_agent or to_ctrl:
        if to_agent:
            receive(agent, to_agent.pop(0))
        if to_ctrl:
            receive(ctrl, to_ctrl.pop(0))
    for id in ctrl.children():
        if id in c_closing or not agent.has_child(id):
            continue
        for ch in (1, 2, 3, 4):
            if agent.has_child(id) and ch in agent._children[id].sending:
                assert agent.bytes_sent(id, ch) == ctrl.bytes_received(id, ch)
        for ch in (0, 3, 4):
            if ch in ctrl._children[id].sending:
                assert ctrl.bytes_sent(id, ch) == agent.bytes_received(id, ch)


# ----------------------------------------------------------------------------- no I/O

FORBIDDEN = {"os", "socket", "subprocess", "trio", "select", "selectors", "signal", "asyncio",
             "threading", "io", "sys", "time"}
PROTOCOL_DIR = Path(__file__).resolve().parent.parent / "protocol"


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def forbidden_imports(source: str) -> list[str]:
    tree = ast.parse(source)
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if _type_checking_block(node):
            for child in ast.walk(node):
                typing_only.add(id(child))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("__import__", "open", "exec", "eval")):
            found.append(f"line {node.lineno}: call to {node.func.id}()")
        for name in names:
            top = name.split(".")[0]
            if top == "importlib" or (top in FORBIDDEN and not (
                top == "io" and id(node) in typing_only
            )):
                found.append(f"line {getattr(node, 'lineno', '?')}: import {name}")
    return found


def test_protocol_does_no_io() -> None:
    files = sorted(PROTOCOL_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "_codec.py", "_connection.py",
                                       "_decoder.py", "_errors.py", "_frames.py"}
    problems = {f.name: forbidden_imports(f.read_text()) for f in files}
    assert {name: found for name, found in problems.items() if found} == {}


def test_the_no_io_check_catches_imports() -> None:
    assert forbidden_imports("import os") == ["line 1: import os"]
    assert forbidden_imports("import os.path as p") == ["line 1: import os.path"]
    assert forbidden_imports("from trio import open_process") == ["line 1: import trio"]
    assert forbidden_imports("def f():\n    import socket\n") == ["line 2: import socket"]
    assert forbidden_imports("import importlib") == ["line 1: import importlib"]
    assert forbidden_imports("x = __import__('os')") == ["line 1: call to __import__()"]
    assert forbidden_imports("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                             "    import io\n") == []
    assert forbidden_imports("if TYPE_CHECKING:\n    import sys\n") == ["line 2: import sys"]
    assert forbidden_imports("from . import _codec\nimport struct, dataclasses") == []


def test_controller_data_after_its_close_is_rejected_by_the_agent() -> None:
    agent, ctrl = pair()
    spawn(agent, ctrl, id=4)
    assert deliver(agent, ctrl.send(Close(id=4))) == [Close(id=4)]
    for frame in (Data(id=4, ch=0, data=b"late"), Eof(id=4, ch=0, n=0)):
        exc = remote_error(agent, encode(frame))
        assert (exc.kind, exc.id, exc.ref) == (ErrorKind.CHANNEL_CLOSED, 4, frame.TYPE)
        assert exc.message == f"{frame.TYPE} frame: child 4 was closed"
        assert_still_works(agent)


# ---------------------------------------------------------------------------- zero copy


def test_zero_copy_connection_reads_into_its_own_buffer() -> None:
    agent = Connection(Role.AGENT, window=AGENT_WINDOW)
    ctrl = Connection(Role.CONTROLLER, window=CONTROLLER_WINDOW, zero_copy=True)
    assert deliver(agent, ctrl.initiate()) == [ctrl.our_hello]
    assert deliver(ctrl, agent.initiate()) == [agent.our_hello]  # copied in
    assert deliver(agent, ctrl.send(Exec(id=1, argv=(b"prog",)))) == [Exec(id=1, argv=(b"prog",))]
    stream = agent.send(Started(id=1, pid=5))
    stream += agent.send_data(1, 1, b"out" * 1000) + b"out" * 1000
    stream += agent.send(Exit(id=1, code=0))
    frames: list[Frame] = []
    for start in range(0, len(stream), 700):  # reads of 700 bytes, as a transport would
        with ctrl.get_buffer() as space:
            chunk = stream[start : start + 700]
            space[: len(chunk)] = chunk
        ctrl.buffer_updated(len(chunk))
        frames += drain(ctrl)
    assert frames == [Started(id=1, pid=5), Data(id=1, ch=1, data=b"out" * 1000),
                      Exit(id=1, code=0)]
    payload = frames[1].data  # type: ignore[attr-defined]
    assert isinstance(payload, memoryview)
    assert ctrl.bytes_received(1, 1) == 3000
    ctrl.buffer_updated(0)  # end of stream
    assert ctrl.next_event() is CONNECTION_CLOSED


def test_get_buffer_needs_a_zero_copy_connection() -> None:
    conn = Connection(Role.CONTROLLER)
    with pytest.raises(TypeError, match="zero_copy=True"):
        conn.get_buffer()
    assert conn.pinned_bytes == 0
