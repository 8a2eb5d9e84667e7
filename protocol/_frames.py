"""The frame types: small immutable values, one class per ``t`` on the wire.

OS strings (path, argv, env entries, cwd) are ``bytes``: POSIX allows any byte but NUL in
them, and they travel as msgpack ``bin`` so nothing is lost in transcoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ._errors import ProtocolError

__all__ = [
    "DEFAULT_ENV_KEEP",
    "DEFAULT_ENV_REMOVE",
    "SIGNAL_NAMES",
    "Close",
    "Closed",
    "Config",
    "Data",
    "Eof",
    "Error",
    "Exec",
    "Exit",
    "Frame",
    "Goodbye",
    "Hello",
    "Log",
    "Ping",
    "Pong",
    "Shutdown",
    "Signal",
    "SignalAck",
    "Started",
    "Stop",
    "Window",
]

#: Signal names a ``signal`` frame may carry: POSIX names without the ``SIG`` prefix.
#: Numbers differ between systems (USR1 is 10 on Linux, 30 on macOS), names do not.
SIGNAL_NAMES: frozenset[str] = frozenset((
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
    "PIPE", "ALRM", "TERM", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG", "XCPU",
    "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
))


#: The agent's environment policy until a ``config`` frame replaces a list: the patterns
#: of inherited variables it keeps, and of those it removes (remove wins).
DEFAULT_ENV_KEEP: tuple[str, ...] = (
    "HOME", "PATH", "TERM", "LANG", "LC_*", "USER", "LOGNAME", "SHELL", "EDITOR", "VISUAL",
    "PAGER", "TZ", "DISPLAY", "SSH_AUTH_SOCK", "XDG_*",
)
DEFAULT_ENV_REMOVE: tuple[str, ...] = ("LD_PRELOAD", "LD_LIBRARY_PATH", "MPROXY_*")


class Frame:
    """Base class of all frames. ``TYPE`` is the frame's ``t`` on the wire."""

    __slots__ = ()
    TYPE: ClassVar[str]


@dataclass(frozen=True, slots=True)
class Hello(Frame):
    """First frame of each side: who we are and what we accept."""

    TYPE: ClassVar[str] = "hello"
    version: int
    impl: str
    impl_version: str
    max_frame: int
    window: int
    caps: tuple[str, ...] = ()
    #: "agent" or "controller"; None when the peer does not say (accepted).
    role: str | None = None


@dataclass(frozen=True, slots=True)
class Exec(Frame):
    """Controller → agent: start a child under the controller-chosen ``id``.

    The child's environment is ``env`` when given (used exactly), else the agent's own
    environment filtered by the ``config`` policy; then ``env_unset`` names are removed
    and ``env_set`` entries ("K=V") are applied, in that order.
    """

    TYPE: ClassVar[str] = "exec"
    id: int
    argv: tuple[bytes, ...]
    path: bytes | None = None
    env: tuple[bytes, ...] | None = None
    env_set: tuple[bytes, ...] = ()
    env_unset: tuple[bytes, ...] = ()
    cwd: bytes | None = None
    fds: tuple[int, ...] = ()
    drop_sudo: bool = False


@dataclass(frozen=True, slots=True)
class Started(Frame):
    """Agent → controller: the child is running with this pid (= its process group).

    ``uid`` and ``gid`` are the effective ids the child was started with (after any
    ``drop_sudo``; a set-user-ID program may then change its own); None when the agent
    does not say (they are optional on the wire)."""

    TYPE: ClassVar[str] = "started"
    id: int
    pid: int
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True, slots=True)
class Data(Frame):
    """Bytes on one channel of one child. May be empty; an empty frame is not EOF.

    ``data`` is bytes, except in frames from a :class:`ZeroCopyFrameDecoder` (or a
    connection made with ``zero_copy=True``): there it is a read-only memoryview of the
    decoder's buffer, which the receiver should drop once it has used it."""

    TYPE: ClassVar[str] = "data"
    id: int
    ch: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Eof(Frame):
    """The sender will send no more data on this channel.

    ``n`` is the total number of data bytes sent on the channel, so the receiver can
    tell a complete stream from a truncated one. :class:`~protocol.Connection` fills it in.
    """

    TYPE: ClassVar[str] = "eof"
    id: int
    ch: int
    n: int | None = None


@dataclass(frozen=True, slots=True)
class Window(Frame):
    """Flow-control credit: the receiver of this frame may send ``n`` more bytes."""

    TYPE: ClassVar[str] = "window"
    id: int
    ch: int
    n: int


@dataclass(frozen=True, slots=True)
class Stop(Frame):
    """Controller → agent: the controller reads no more of output channel ``ch``.

    The agent closes its read end (the child's writes fail with EPIPE), sends nothing
    more on the channel and ends it with its eof."""

    TYPE: ClassVar[str] = "stop"
    id: int
    ch: int


@dataclass(frozen=True, slots=True)
class Signal(Frame):
    """Controller → agent: deliver signal ``sig`` (a name like "TERM") to the child's group."""

    TYPE: ClassVar[str] = "signal"
    id: int
    sig: str


@dataclass(frozen=True, slots=True)
class SignalAck(Frame):
    """Agent → controller: outcome of one ``signal``; ``errno`` None means delivered."""

    TYPE: ClassVar[str] = "signal_ack"
    id: int
    sig: str
    errno: str | None = None


@dataclass(frozen=True, slots=True)
class Exit(Frame):
    """Agent → controller: the child ended; everything it wrote before has been sent.

    ``code`` is the exit status, or 128+N when killed by signal N (``sig`` names it).
    """

    TYPE: ClassVar[str] = "exit"
    id: int
    code: int
    sig: str | None = None
    core: bool = False


@dataclass(frozen=True, slots=True)
class Error(Frame):
    """Either direction: something failed; ``id`` names the child when there is one."""

    TYPE: ClassVar[str] = "error"
    kind: str
    msg: str
    id: int | None = None
    errno: str | None = None
    ref: str | None = None
    ch: int | None = None  # the channel concerned (write-failed)

    @classmethod
    def from_exception(cls, exc: ProtocolError) -> Error:
        """The frame that reports ``exc`` to the peer."""
        return cls(kind=str(exc.kind), msg=exc.message, id=exc.id, ref=exc.ref)


@dataclass(frozen=True, slots=True)
class Log(Frame):
    """Agent → controller: a diagnostic record."""

    TYPE: ClassVar[str] = "log"
    level: str
    msg: str
    attrs: dict[str, str] = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True, slots=True)
class Close(Frame):
    """Controller → agent: done with this child; release everything it owns."""

    TYPE: ClassVar[str] = "close"
    id: int


@dataclass(frozen=True, slots=True)
class Closed(Frame):
    """Agent → controller: last frame about this child; its id may be reused."""

    TYPE: ClassVar[str] = "closed"
    id: int


@dataclass(frozen=True, slots=True)
class Config(Frame):
    """Controller → agent: environment policy for inherited environments.

    A field left out (None) keeps the current list. Patterns are globs, or regular
    expressions written ``/re/``.
    """

    TYPE: ClassVar[str] = "config"
    env_keep: tuple[str, ...] | None = None
    env_remove: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Shutdown(Frame):
    """Controller → agent: start no more children, finish the running ones, say goodbye."""

    TYPE: ClassVar[str] = "shutdown"


@dataclass(frozen=True, slots=True)
class Goodbye(Frame):
    """Agent → controller: the last frame of the connection after ``shutdown``."""

    TYPE: ClassVar[str] = "goodbye"


@dataclass(frozen=True, slots=True)
class Ping(Frame):
    """Either direction: ask for a ``pong`` echoing ``n``."""

    TYPE: ClassVar[str] = "ping"
    n: int


@dataclass(frozen=True, slots=True)
class Pong(Frame):
    """Either direction: the answer to the ``ping`` with the same ``n``."""

    TYPE: ClassVar[str] = "pong"
    n: int


FRAME_TYPES: dict[str, type[Frame]] = {
    cls.TYPE: cls
    for cls in (
        Hello, Exec, Started, Data, Eof, Window, Signal, SignalAck, Exit, Error, Log,
        Close, Closed, Config, Shutdown, Goodbye, Ping, Pong, Stop,
    )
}
