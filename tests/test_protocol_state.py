"""The protocol's state table, walked cell by cell, without I/O.

Two kinds of check: the table agrees with itself (every cell is defined; whatever a
sender may send, the receiver accepts, also when the receiver's own frames are still in
flight), and the Connection does what the table says, on both sides of every cell.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from protocol import (
    CAP_STOP,
    NEED_DATA,
    Close,
    Closed,
    Connection,
    Data,
    Eof,
    ErrorKind,
    Exec,
    Exit,
    Frame,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    Signal,
    SignalAck,
    Started,
    Stop,
    Window,
    encode,
)
from protocol._state import (
    ACTIVE,
    CHANNEL_RULES,
    CHILD_RULES,
    CLOSED,
    CLOSING,
    EOF,
    EXITED,
    OPEN,
    RUNNING,
    SENT_BY,
    SPAWNING,
    STOPPED,
    STOPPED_EOF,
    Allow,
    Refuse,
    Rule,
    State,
)

AGENT_STATES = (SPAWNING, RUNNING, EXITED)
CONTROLLER_STATES = (ACTIVE, CLOSING)
#: Channel states per direction, by the role that sends the channel's data.
CHANNEL_STATES: dict[Role, tuple[State | None, ...]] = {
    Role.AGENT: (None, OPEN, STOPPED, EOF, STOPPED_EOF),
    Role.CONTROLLER: (None, OPEN, EOF),
}
#: A channel of each direction (an extra fd is both) and one that is in neither.
CHANNEL = {Role.AGENT: 1, Role.CONTROLLER: 0}
NO_CHANNEL = 9
ID = 1


def other(role: Role) -> Role:
    return Role.AGENT if role is Role.CONTROLLER else Role.CONTROLLER


def data_direction(sender: Role, ftype: type[Frame]) -> Role:
    """Whose data the channel a frame is about carries: data and eof are about the
    sender's direction, window and stop about the receiver's."""
    return sender if ftype in (Data, Eof) else other(sender)


def channel_cells() -> Iterator[tuple[Role, type[Frame], State, State | None, Rule]]:
    for sender, by_type in CHANNEL_RULES.items():
        for ftype, by_child in by_type.items():
            for child_state, by_channel in by_child.items():
                for channel_state, rule in by_channel.items():
                    yield sender, ftype, child_state, channel_state, rule


def child_cells() -> Iterator[tuple[Role, type[Frame], tuple[State, State], Rule]]:
    for sender, by_type in CHILD_RULES.items():
        for ftype, by_state in by_type.items():
            for states, rule in by_state.items():
                yield sender, ftype, states, rule


# ----------------------------------------------------------------------------- the table


def test_every_frame_about_a_child_has_a_row_for_its_sender_only() -> None:
    about_a_child = {Data, Eof, Window, Stop, Started, Exit, SignalAck, Closed, Signal, Close}
    for role in Role:
        in_tables = set(CHILD_RULES[role]) | set(CHANNEL_RULES[role])
        assert set(CHILD_RULES[role]).isdisjoint(CHANNEL_RULES[role])
        assert in_tables == about_a_child & set(SENT_BY[role]), role


def test_every_state_has_a_cell() -> None:
    for sender, by_type in CHILD_RULES.items():
        for ftype, by_state in by_type.items():
            assert set(by_state) == set(itertools.product(AGENT_STATES, CONTROLLER_STATES)), (
                sender, ftype)
    for sender, by_kind in CHANNEL_RULES.items():
        for ftype, by_child in by_kind.items():
            assert set(by_child) == set(CONTROLLER_STATES), (sender, ftype)
            states = set(CHANNEL_STATES[data_direction(sender, ftype)])
            for child_state, by_channel in by_child.items():
                assert set(by_channel) == states, (sender, ftype, child_state)


def _receiver_channel_states(
    sender: Role, ftype: type[Frame], start: tuple[State, State | None]
) -> set[tuple[State, State | None]]:
    """The states the receiver may be in for a frame sent in ``start``: the sender's
    state, moved on by the receiver's own frames that the sender has not seen yet (its
    close, and its frames about the same channel)."""
    receiver = other(sender)
    direction = data_direction(sender, ftype)
    moves = [
        (child_state, channel_state, rule.send)
        for ft, by_child in CHANNEL_RULES[receiver].items()
        if data_direction(receiver, ft) is direction
        for child_state, by_channel in by_child.items()
        for channel_state, rule in by_channel.items()
    ]
    close = CHILD_RULES[Role.CONTROLLER][Close] if receiver is Role.CONTROLLER else {}
    seen = {start}
    todo = [start]
    while todo:
        child_state, channel_state = todo.pop()
        found: list[tuple[State, State | None]] = [
            (child_state, outcome.next)
            for c, s, outcome in moves
            if (c, s) == (child_state, channel_state) and isinstance(outcome, Allow)
            and isinstance(outcome.next, State)
        ]
        found += [
            (outcome.next[1], channel_state)
            for (_, controller), rule in close.items()
            if controller is child_state
            and isinstance(outcome := rule.send, Allow) and isinstance(outcome.next, tuple)
        ]
        for state in found:
            if state not in seen:
                seen.add(state)
                todo.append(state)
    return seen


def _receiver_child_states(
    sender: Role, start: tuple[State, State]
) -> set[tuple[State, State]]:
    moves = [
        (states, rule.send)
        for by_state in CHILD_RULES[other(sender)].values()
        for states, rule in by_state.items()
    ]
    seen = {start}
    todo = [start]
    while todo:
        current = todo.pop()
        for states, outcome in moves:
            if (states == current and isinstance(outcome, Allow)
                    and isinstance(outcome.next, tuple) and outcome.next[0] is not CLOSED
                    and outcome.next not in seen):
                seen.add(outcome.next)
                todo.append(outcome.next)
    return seen


@pytest.mark.parametrize(
    ("sender", "ftype", "child_state", "channel_state", "rule"),
    [pytest.param(*cell, id=f"{cell[0]}-{cell[1].TYPE}-{cell[2]}-{cell[3]}")
     for cell in channel_cells()],
)
def test_what_a_sender_may_send_on_a_channel_the_receiver_accepts(
    sender: Role, ftype: type[Frame], child_state: State, channel_state: State | None,
    rule: Rule,
) -> None:
    if not (isinstance(rule.send, Allow) and rule.send.passes):
        return
    # With nothing in flight both sides take the same step.
    assert rule.receive == rule.send
    for later in _receiver_channel_states(sender, ftype, (child_state, channel_state)):
        outcome = CHANNEL_RULES[sender][ftype][later[0]][later[1]].receive
        assert isinstance(outcome, Allow), (later, outcome)


@pytest.mark.parametrize(
    ("sender", "ftype", "states", "rule"),
    [pytest.param(*cell, id=f"{cell[0]}-{cell[1].TYPE}-{cell[2][0]}-{cell[2][1]}")
     for cell in child_cells()],
)
def test_what_a_sender_may_send_about_a_child_the_receiver_accepts(
    sender: Role, ftype: type[Frame], states: tuple[State, State], rule: Rule,
) -> None:
    if not (isinstance(rule.send, Allow) and rule.send.passes):
        return
    assert rule.receive == rule.send
    for later in _receiver_child_states(sender, states):
        outcome = CHILD_RULES[sender][ftype][later].receive
        assert isinstance(outcome, Allow), (later, outcome)


def test_the_receiver_is_stricter_nowhere() -> None:
    """Where the sender's side refuses, the receiver may tolerate (a peer that is not
    this implementation); where the sender passes or drops, the receiver never refuses
    in the same state."""
    cells = [(s, f, rule) for s, f, _, _, rule in channel_cells()]
    cells += [(s, f, rule) for s, f, _, rule in child_cells()]
    for sender, ftype, rule in cells:
        if isinstance(rule.send, Allow):
            assert isinstance(rule.receive, Allow) or not rule.send.passes, (
                sender, ftype, rule)


# ----------------------------------------------------------------------------- the Connection


def _deliver(conn: Connection, data: bytes) -> list[Frame]:
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, Frame)
        events.append(event)
    return events


def _pair() -> tuple[Connection, Connection]:
    """A controller and an agent that have shaken hands and have child 1 (fd 3 extra)."""
    ctrl = Connection(Role.CONTROLLER)
    agent = Connection(Role.AGENT, caps=(CAP_STOP,))
    _deliver(agent, ctrl.initiate())
    _deliver(ctrl, agent.initiate())
    _deliver(agent, ctrl.send(Exec(id=ID, argv=(b"x",), fds=(3,))))
    return ctrl, agent


def _conns(role: Role, ctrl: Connection, agent: Connection) -> tuple[Connection, Connection]:
    """(``role``'s connection, the other one)."""
    return (agent, ctrl) if role is Role.AGENT else (ctrl, agent)


def _pair_in_channel_state(
    direction: Role, child_state: State, channel_state: State | None
) -> tuple[Connection, Connection, int]:
    ctrl, agent = _pair()
    if channel_state is None:
        ch = NO_CHANNEL
    else:
        ch = CHANNEL[direction]
        writer, reader = _conns(direction, ctrl, agent)
        if channel_state in (STOPPED, STOPPED_EOF):
            _deliver(agent, ctrl.send(Stop(ID, ch)))
        if channel_state in (EOF, STOPPED_EOF):
            _deliver(reader, writer.send(Eof(ID, ch)))
    if child_state is CLOSING:
        _deliver(agent, ctrl.send(Close(ID)))
    return ctrl, agent, ch


def _channel_state(conn: Connection, direction: Role, ch: int) -> State | None:
    child = conn._children[ID]
    channels = child.sending if direction is conn.role else child.receiving
    return channels[ch].state if ch in channels else None


def _channel_frame(ftype: type[Frame], ch: int) -> Frame:
    if ftype is Data:
        return Data(id=ID, ch=ch, data=b"x")
    if ftype is Eof:
        return Eof(id=ID, ch=ch)
    if ftype is Window:
        return Window(id=ID, ch=ch, n=1)
    assert ftype is Stop
    return Stop(id=ID, ch=ch)


def _expect_refusal(exc: LocalProtocolError | RemoteProtocolError, outcome: Refuse,
                    frame: Frame, ch: int = -1) -> None:
    assert (exc.kind, exc.message, exc.id, exc.ref) == (
        outcome.kind, outcome.message.format(t=frame.TYPE, id=ID, ch=ch), ID, frame.TYPE)


@pytest.mark.parametrize(
    ("sender", "ftype", "child_state", "channel_state", "rule"),
    [pytest.param(*cell, id=f"{cell[0]}-{cell[1].TYPE}-{cell[2]}-{cell[3]}")
     for cell in channel_cells()],
)
def test_the_connection_follows_each_channel_cell(
    sender: Role, ftype: type[Frame], child_state: State, channel_state: State | None,
    rule: Rule,
) -> None:
    direction = data_direction(sender, ftype)
    frame = _channel_frame(ftype, 0)
    for side, outcome in (("send", rule.send), ("receive", rule.receive)):
        ctrl, agent, ch = _pair_in_channel_state(direction, child_state, channel_state)
        frame = _channel_frame(ftype, ch)
        ours, theirs = _conns(sender, ctrl, agent)
        conn = ours if side == "send" else theirs
        before = _channel_state(conn, direction, ch)
        try:
            if side == "send":
                if isinstance(frame, Data):
                    passed = bool(conn.send_data(ID, ch, frame.data))
                else:
                    passed = bool(conn.send(frame))
            else:
                passed = bool(_deliver(conn, encode(frame)))
        except (LocalProtocolError, RemoteProtocolError) as exc:
            assert isinstance(outcome, Refuse), (side, exc)
            assert isinstance(exc, LocalProtocolError if side == "send" else
                              RemoteProtocolError)
            _expect_refusal(exc, outcome, frame, ch)
            assert _channel_state(conn, direction, ch) is before
            continue
        assert isinstance(outcome, Allow), side
        assert passed is outcome.passes, side
        expected = before if outcome.next is None else outcome.next
        assert _channel_state(conn, direction, ch) is expected, side


def _pair_in_child_state(states: tuple[State, State]) -> tuple[Connection, Connection]:
    ctrl, agent = _pair()
    agent_state, controller_state = states
    if agent_state is RUNNING:
        _deliver(ctrl, agent.send(Started(ID, pid=5)))
    elif agent_state is EXITED:
        _deliver(ctrl, agent.send(Exit(ID, code=0)))
    if controller_state is CLOSING:
        _deliver(agent, ctrl.send(Close(ID)))
    return ctrl, agent


_CHILD_FRAMES: dict[type[Frame], Frame] = {
    Started: Started(ID, pid=5), Exit: Exit(ID, code=0), SignalAck: SignalAck(ID, sig="TERM"),
    Closed: Closed(ID), Signal: Signal(ID, sig="TERM"), Close: Close(ID),
}


def _child_state(conn: Connection) -> tuple[State, State]:
    if not conn.has_child(ID):
        return CLOSED, CLOSING
    child = conn._children[ID]
    return child.agent, child.controller


@pytest.mark.parametrize(
    ("sender", "ftype", "states", "rule"),
    [pytest.param(*cell, id=f"{cell[0]}-{cell[1].TYPE}-{cell[2][0]}-{cell[2][1]}")
     for cell in child_cells()],
)
def test_the_connection_follows_each_child_cell(
    sender: Role, ftype: type[Frame], states: tuple[State, State], rule: Rule,
) -> None:
    frame = _CHILD_FRAMES[ftype]
    for side, outcome in (("send", rule.send), ("receive", rule.receive)):
        ours, theirs = _conns(sender, *_pair_in_child_state(states))
        conn = ours if side == "send" else theirs
        try:
            passed = bool(conn.send(frame) if side == "send" else _deliver(conn, encode(frame)))
        except (LocalProtocolError, RemoteProtocolError) as exc:
            assert isinstance(outcome, Refuse), (side, exc)
            assert isinstance(exc, LocalProtocolError if side == "send" else
                              RemoteProtocolError)
            _expect_refusal(exc, outcome, frame)
            assert _child_state(conn) == states
            continue
        assert isinstance(outcome, Allow) and outcome.passes and passed, side
        assert _child_state(conn) == (states if outcome.next is None else outcome.next), side


# ----------------------------------------------------------------------------- credit


W = 1000


def _credit_pair() -> tuple[Connection, Connection]:
    ctrl = Connection(Role.CONTROLLER, window=W)
    agent = Connection(Role.AGENT, window=W, caps=(CAP_STOP,))
    _deliver(agent, ctrl.initiate())
    _deliver(ctrl, agent.initiate())
    _deliver(agent, ctrl.send(Exec(id=ID, argv=(b"x",))))
    return ctrl, agent


@pytest.mark.parametrize("role", list(Role))
def test_consumed_credit_goes_back_at_half_the_window(role: Role) -> None:
    ctrl, agent = _credit_pair()
    receiver, sender = _conns(role, ctrl, agent)
    ch = 0 if role is Role.AGENT else 1
    header = sender.send_data(ID, ch, b"x" * W)
    _deliver(receiver, header + b"x" * W)
    assert sender.send_credit(ID, ch) == 0
    assert receiver.consumed(ID, ch, W // 2 - 1) == b""
    window = receiver.consumed(ID, ch, 1)
    assert _deliver(sender, window) == [Window(ID, ch, W // 2)]
    assert sender.send_credit(ID, ch) == W // 2
    # Below half a window nothing goes, unless asked for at once.
    assert receiver.consumed(ID, ch, 10) == b""
    assert _deliver(sender, receiver.consumed(ID, ch, 5, now=True)) == [Window(ID, ch, 15)]
    assert receiver.consumed(ID, ch, 0, now=True) == b""


def test_consumed_credit_is_not_returned_when_nobody_wants_it() -> None:
    ctrl, agent = _credit_pair()
    # The agent's eof: the controller's credit for that channel is pointless.
    _deliver(ctrl, agent.send(Eof(ID, 2)))
    assert ctrl.consumed(ID, 2, W) == b""
    # Stopped: the agent sends nothing but the eof.
    _deliver(agent, ctrl.send(Stop(ID, 1)))
    assert ctrl.consumed(ID, 1, W) == b""
    # Closing: neither side wants more of the child's data.
    _deliver(agent, ctrl.send(Close(ID)))
    assert ctrl.consumed(ID, 1, W) == b""
    assert agent.consumed(ID, 0, W) == b""
    # Gone.
    _deliver(ctrl, agent.send(Exit(ID, code=0)))
    _deliver(ctrl, agent.send(Closed(ID)))
    assert ctrl.consumed(ID, 1, W) == b""


def test_consumed_on_a_channel_we_do_not_receive_on() -> None:
    ctrl, _ = _credit_pair()
    with pytest.raises(LocalProtocolError) as info:
        ctrl.consumed(ID, 0, 1)
    assert (info.value.kind, info.value.message) == (
        ErrorKind.BAD_CHANNEL, "child 1 has no channel 0 to receive on")
