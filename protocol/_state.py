"""The protocol's rules as tables: which frame is allowed in which state.

Modelled on h11's ``_state.py``. Each child has two small state machines, one per role,
each driven by that role's frames: the agent reports the child ``SPAWNING`` → ``RUNNING``
(``started``) → ``EXITED`` (``exit``) → ``CLOSED`` (``closed``: forgotten); the
controller moves it ``ACTIVE`` → ``CLOSING`` (``close``). Each channel has a state per
direction: ``OPEN`` → ``EOF``, and for the agent's direction also ``STOPPED`` (the
controller sent ``stop``: only the eof may follow) and ``STOPPED_EOF``.

:data:`CHILD_RULES` and :data:`CHANNEL_RULES` say, for every frame type a role sends and
every state it can be about, what the sender's connection does with it
(:attr:`Rule.send`) and what the receiver's does (:attr:`Rule.receive`): pass it on and
move to a state (:class:`Allow`), drop it silently (a race the protocol tolerates, e.g.
the agent's output crossing the controller's close) or refuse it (:class:`Refuse`). Both
sides of a :class:`~protocol.Connection` consult the same cell. The two columns differ
only where the receiver tolerates what a conforming sender never sends in that state
(what it might have sent before it saw the receiver's own frames).

Also here: which role sends which frame type (:data:`SENT_BY`) and the per-child and
per-channel bookkeeping, credit included (:class:`_ChildState`, :class:`_Channel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from ._errors import ErrorKind, LocalProtocolError, RemoteProtocolError
from ._frames import (
    Close,
    Closed,
    Config,
    Data,
    Eof,
    Error,
    Exec,
    Exit,
    Frame,
    Goodbye,
    Hello,
    Log,
    Ping,
    Pong,
    Shutdown,
    Signal,
    SignalAck,
    Started,
    Stop,
    Window,
)

__all__ = [
    "ACCEPT",
    "ACTIVE",
    "CHANNEL_RULES",
    "CHILD_RULES",
    "CLOSED",
    "CLOSING",
    "DROP",
    "EOF",
    "EXITED",
    "OPEN",
    "RUNNING",
    "SENT_BY",
    "SPAWNING",
    "STOPPED",
    "STOPPED_EOF",
    "Allow",
    "Refuse",
    "Role",
    "Rule",
    "State",
]


class Role(StrEnum):
    AGENT = "agent"
    CONTROLLER = "controller"


class State:
    """A state of a child or a channel. Compared by identity, hashed by identity: the
    data path looks states up on every frame (an Enum's hash is Python code)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# The child as the agent reports it (started, exit, closed).
SPAWNING: Final = State("SPAWNING")  # exec seen; neither started nor exit yet
RUNNING: Final = State("RUNNING")  # started seen
EXITED: Final = State("EXITED")  # exit seen (with or without started: a failed spawn)
CLOSED: Final = State("CLOSED")  # closed seen: the id is free again
# The child as the controller holds it (close).
ACTIVE: Final = State("ACTIVE")
CLOSING: Final = State("CLOSING")  # close seen: nothing more is wanted either way
# One channel in one direction.
OPEN: Final = State("OPEN")
STOPPED: Final = State("STOPPED")  # agent → controller only: stop seen, eof to follow
EOF: Final = State("EOF")
STOPPED_EOF: Final = State("STOPPED_EOF")  # stopped and its eof seen, in either order


@dataclass(frozen=True, slots=True)
class Allow:
    """The frame is legal here: move to ``next`` (None: stay), and pass it on unless
    ``passes`` is false (then :meth:`~protocol.Connection.send` returns ``b""`` and
    :meth:`~protocol.Connection.next_event` skips it)."""

    next: State | tuple[State, State] | None = None
    passes: bool = True


@dataclass(frozen=True, slots=True)
class Refuse:
    """The frame breaks a rule here: raise ``kind`` with ``message`` (a template over
    ``t``, ``id`` and ``ch``: the frame's type, child and channel)."""

    kind: ErrorKind
    message: str

    def local(self, t: str, id: int, ch: int = -1) -> LocalProtocolError:
        return LocalProtocolError(
            self.kind, self.message.format(t=t, id=id, ch=ch), id=id, ref=t
        )

    def remote(self, t: str, id: int, ch: int = -1) -> RemoteProtocolError:
        return RemoteProtocolError(
            self.kind, self.message.format(t=t, id=id, ch=ch), id=id, ref=t
        )


Outcome = Allow | Refuse


@dataclass(frozen=True, slots=True)
class Rule:
    """One cell: what the sender's connection does, what the receiver's does."""

    send: Outcome
    receive: Outcome


ACCEPT: Final = Allow()
DROP: Final = Allow(passes=False)

_A: Final = Role.AGENT
_C: Final = Role.CONTROLLER

_BOTH: Final = (Hello, Data, Eof, Window, Error, Ping, Pong)
#: The frame types each role sends.
SENT_BY: Final[dict[Role, tuple[type[Frame], ...]]] = {
    _C: (*_BOTH, Exec, Signal, Stop, Close, Config, Shutdown),
    _A: (*_BOTH, Started, SignalAck, Exit, Log, Closed, Goodbye),
}


def _same(outcome: Outcome) -> Rule:
    return Rule(outcome, outcome)


def _refused(kind: ErrorKind, local: str, remote: str) -> Rule:
    return Rule(Refuse(kind, local), Refuse(kind, remote))


def _lifecycle(kind: ErrorKind, problem: str) -> Rule:
    return _refused(kind, problem, "{t} frame: " + problem)


# ---------------------------------------------------------------------- child frames

_ALREADY_STARTED: Final = _lifecycle(ErrorKind.BAD_FRAME,
                                     "child {id} was already reported started")
_STARTED_EXITED: Final = _lifecycle(ErrorKind.BAD_FRAME,
                                    "child {id} was already reported exited")
_ALREADY_EXITED: Final = _lifecycle(ErrorKind.BAD_FRAME, "child {id} already exited")
_NOT_CLOSING: Final = _lifecycle(ErrorKind.BAD_FRAME, "child {id} has not been closed")
_NOT_EXITED: Final = _lifecycle(ErrorKind.BAD_FRAME,
                                "child {id} has not been reported exited")
_ALREADY_CLOSING: Final = _lifecycle(ErrorKind.BAD_FRAME,
                                     "child {id} is already being closed")

#: sender → frame type → (agent's state, controller's state) of the child → rule. An
#: allowed frame's ``next`` is the new pair; ``CLOSED`` forgets the child.
CHILD_RULES: Final[dict[Role, dict[type[Frame], dict[tuple[State, State], Rule]]]] = {
    _A: {
        Started: {
            (SPAWNING, ACTIVE): _same(Allow((RUNNING, ACTIVE))),
            (SPAWNING, CLOSING): _same(Allow((RUNNING, CLOSING))),
            (RUNNING, ACTIVE): _ALREADY_STARTED,
            (RUNNING, CLOSING): _ALREADY_STARTED,
            (EXITED, ACTIVE): _STARTED_EXITED,
            (EXITED, CLOSING): _STARTED_EXITED,
        },
        Exit: {
            (SPAWNING, ACTIVE): _same(Allow((EXITED, ACTIVE))),
            (SPAWNING, CLOSING): _same(Allow((EXITED, CLOSING))),
            (RUNNING, ACTIVE): _same(Allow((EXITED, ACTIVE))),
            (RUNNING, CLOSING): _same(Allow((EXITED, CLOSING))),
            (EXITED, ACTIVE): _ALREADY_EXITED,
            (EXITED, CLOSING): _ALREADY_EXITED,
        },
        SignalAck: {
            (SPAWNING, ACTIVE): _same(ACCEPT),
            (SPAWNING, CLOSING): _same(ACCEPT),
            (RUNNING, ACTIVE): _same(ACCEPT),
            (RUNNING, CLOSING): _same(ACCEPT),
            (EXITED, ACTIVE): _same(ACCEPT),
            (EXITED, CLOSING): _same(ACCEPT),
        },
        Closed: {
            (SPAWNING, ACTIVE): _NOT_CLOSING,
            (SPAWNING, CLOSING): _NOT_EXITED,
            (RUNNING, ACTIVE): _NOT_CLOSING,
            (RUNNING, CLOSING): _NOT_EXITED,
            (EXITED, ACTIVE): _NOT_CLOSING,
            (EXITED, CLOSING): _same(Allow((CLOSED, CLOSING))),
        },
    },
    _C: {
        Signal: {
            # The agent answers a signal for a closing child (with its signal-ack).
            (SPAWNING, ACTIVE): _same(ACCEPT),
            (SPAWNING, CLOSING): Rule(Refuse(ErrorKind.CHANNEL_CLOSED, "child {id} is closed"),
                                      ACCEPT),
            (RUNNING, ACTIVE): _same(ACCEPT),
            (RUNNING, CLOSING): Rule(Refuse(ErrorKind.CHANNEL_CLOSED, "child {id} is closed"),
                                     ACCEPT),
            (EXITED, ACTIVE): _same(ACCEPT),
            (EXITED, CLOSING): Rule(Refuse(ErrorKind.CHANNEL_CLOSED, "child {id} is closed"),
                                    ACCEPT),
        },
        Close: {
            (SPAWNING, ACTIVE): _same(Allow((SPAWNING, CLOSING))),
            (SPAWNING, CLOSING): _ALREADY_CLOSING,
            (RUNNING, ACTIVE): _same(Allow((RUNNING, CLOSING))),
            (RUNNING, CLOSING): _ALREADY_CLOSING,
            (EXITED, ACTIVE): _same(Allow((EXITED, CLOSING))),
            (EXITED, CLOSING): _ALREADY_CLOSING,
        },
    },
}

# ---------------------------------------------------------------------- channel frames

_NO_CHANNEL: Final = _refused(ErrorKind.BAD_CHANNEL, "child {id} has no channel {ch} to send on",
                              "{t} frame: child {id} has no channel {ch} in this direction")
_HAD_EOF: Final = _refused(ErrorKind.CHANNEL_CLOSED,
                           "channel {ch} of child {id} already had its eof",
                           "{t} frame: channel {ch} of child {id} already had its eof")
# The controller's data and eof after its own close.
_CLOSED_DATA: Final = _refused(ErrorKind.CHANNEL_CLOSED, "child {id} is closed",
                               "{t} frame: child {id} was closed")
_CLOSED_EOF: Final = _refused(ErrorKind.CHANNEL_CLOSED, "{t} frame: child {id} is closed",
                              "{t} frame: child {id} was closed")
_NO_RECEIVE_CHANNEL: Final = Refuse(ErrorKind.BAD_CHANNEL,
                                    "child {id} has no channel {ch} to receive on")
_NO_CHANNEL_HERE: Final = Refuse(ErrorKind.BAD_CHANNEL,
                                 "{t} frame: child {id} has no channel {ch} in this direction")
_WINDOW_CLOSED: Final = Refuse(ErrorKind.CHANNEL_CLOSED, "{t} frame: child {id} is closed")
_STOP_NO_CHANNEL: Final = _refused(
    ErrorKind.BAD_CHANNEL, "stop frame: child {id} has no channel {ch} to receive on",
    "stop frame: child {id} has no channel {ch} in the agent's direction")
_ALREADY_STOPPED: Final = _same(Refuse(
    ErrorKind.BAD_FRAME, "stop frame: channel {ch} of child {id} was already stopped"))
_STOP_CLOSED: Final = _refused(ErrorKind.CHANNEL_CLOSED, "stop frame: child {id} is closed",
                               "stop frame: child {id} was closed")

#: sender → frame type → controller's state of the child → state of the channel the
#: frame is about (None: the child has no such channel in that direction) → rule. Data
#: and eof are about the sender's direction, window and stop about the receiver's.
CHANNEL_RULES: Final[dict[Role, dict[type[Frame], dict[State, dict[State | None, Rule]]]]] = {
    _A: {
        Data: {
            ACTIVE: {
                None: _NO_CHANNEL,
                OPEN: _same(ACCEPT),
                # Data the agent sent before the controller's stop reached it.
                STOPPED: Rule(Refuse(ErrorKind.CHANNEL_CLOSED,
                                     "channel {ch} of child {id} was stopped by the "
                                     "controller: send its eof"), ACCEPT),
                EOF: _HAD_EOF,
                STOPPED_EOF: _HAD_EOF,
            },
            # Output in flight when the controller's close crossed it: nobody wants it.
            CLOSING: {None: _same(DROP), OPEN: _same(DROP), STOPPED: _same(DROP),
                      EOF: _same(DROP), STOPPED_EOF: _same(DROP)},
        },
        Eof: {
            ACTIVE: {
                None: _NO_CHANNEL,
                OPEN: _same(Allow(EOF)),
                STOPPED: _same(Allow(STOPPED_EOF)),
                EOF: _HAD_EOF,
                STOPPED_EOF: _HAD_EOF,
            },
            CLOSING: {None: _same(DROP), OPEN: _same(DROP), STOPPED: _same(DROP),
                      EOF: _same(DROP), STOPPED_EOF: _same(DROP)},
        },
        Window: {
            ACTIVE: {
                None: Rule(_NO_RECEIVE_CHANNEL, _NO_CHANNEL_HERE),
                OPEN: _same(ACCEPT),
                # Credit for a channel the controller has finished: a harmless race.
                EOF: _same(DROP),
            },
            CLOSING: {None: Rule(DROP, _NO_CHANNEL_HERE), OPEN: _same(DROP),
                      EOF: _same(DROP)},
        },
    },
    _C: {
        Data: {
            ACTIVE: {None: _NO_CHANNEL, OPEN: _same(ACCEPT), EOF: _HAD_EOF},
            CLOSING: {None: _CLOSED_DATA, OPEN: _CLOSED_DATA, EOF: _CLOSED_DATA},
        },
        Eof: {
            ACTIVE: {None: _NO_CHANNEL, OPEN: _same(Allow(EOF)), EOF: _HAD_EOF},
            CLOSING: {None: _CLOSED_EOF, OPEN: _CLOSED_EOF, EOF: _CLOSED_EOF},
        },
        Window: {
            ACTIVE: {
                None: Rule(_NO_RECEIVE_CHANNEL, _NO_CHANNEL_HERE),
                OPEN: _same(ACCEPT),
                # Credit for a channel that carries nothing more but its eof, or nothing.
                STOPPED: _same(DROP),
                EOF: _same(DROP),
                STOPPED_EOF: _same(DROP),
            },
            CLOSING: {
                None: Rule(_WINDOW_CLOSED, _NO_CHANNEL_HERE),
                # The agent drops what a controller sends after its close.
                OPEN: Rule(_WINDOW_CLOSED, DROP),
                STOPPED: Rule(_WINDOW_CLOSED, DROP),
                EOF: Rule(_WINDOW_CLOSED, DROP),
                STOPPED_EOF: Rule(_WINDOW_CLOSED, DROP),
            },
        },
        Stop: {
            ACTIVE: {
                None: _STOP_NO_CHANNEL,
                OPEN: _same(Allow(STOPPED)),
                STOPPED: _ALREADY_STOPPED,
                # The agent's eof crossed the stop: the channel is over already.
                EOF: _same(Allow(STOPPED_EOF, passes=False)),
                STOPPED_EOF: _ALREADY_STOPPED,
            },
            CLOSING: {None: _STOP_CLOSED, OPEN: _STOP_CLOSED, STOPPED: _STOP_CLOSED,
                      EOF: _STOP_CLOSED, STOPPED_EOF: _STOP_CLOSED},
        },
    },
}


# ---------------------------------------------------------------------- bookkeeping

class _Channel:
    """One channel in one direction: its state, credit and byte count."""

    __slots__ = ("count", "credit", "state", "unreturned")

    def __init__(self, credit: int) -> None:
        self.state = OPEN
        #: Bytes the sender may still send (the receiver's grants minus what was sent).
        self.credit = credit
        #: Bytes sent so far (eof carries it; the receiver checks it).
        self.count = 0
        #: Receiving side: bytes consumed whose credit has not been returned yet.
        self.unreturned = 0


class _ChildState:
    """One child's state as this end of the connection sees it: the agent's and the
    controller's state of it, and its channels in each direction."""

    __slots__ = ("agent", "controller", "receiving", "sending")

    def __init__(
        self, send_channels: set[int], recv_channels: set[int], send_window: int,
        recv_window: int,
    ) -> None:
        self.agent = SPAWNING
        self.controller = ACTIVE
        self.sending = {ch: _Channel(send_window) for ch in send_channels}
        self.receiving = {ch: _Channel(recv_window) for ch in recv_channels}
