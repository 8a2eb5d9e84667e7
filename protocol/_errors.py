"""Protocol errors: what went wrong, on which side, and about which child."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErrorKind", "LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ErrorKind(StrEnum):
    """Machine-readable ``kind`` values of ``error`` frames.

    Receivers must accept kinds they do not know (a newer peer may send them) and treat
    them as a generic failure of the frame or child named by the error.
    """

    # Stream-level: the connection cannot continue after these.
    HANDSHAKE = "handshake"
    VERSION_MISMATCH = "version-mismatch"
    MALFORMED = "malformed"
    FRAME_TOO_LARGE = "frame-too-large"
    # Frame-level: the frame is rejected; everything else keeps running.
    BAD_FRAME = "bad-frame"
    UNKNOWN_TYPE = "unknown-type"
    UNKNOWN_CHILD = "unknown-child"
    DUPLICATE_ID = "duplicate-id"
    BAD_FD = "bad-fd"
    BAD_CHANNEL = "bad-channel"
    CHANNEL_CLOSED = "channel-closed"
    CREDIT_EXCEEDED = "credit-exceeded"
    BAD_SIGNAL = "bad-signal"
    # Child-level, sent by the agent.
    SPAWN_FAILED = "spawn-failed"
    WRITE_FAILED = "write-failed"
    CHILD_EXITED = "child-exited"
    TOO_MANY_CHILDREN = "too-many-children"
    SHUTTING_DOWN = "shutting-down"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """Base class of every protocol violation.

    Attributes:
        kind: an :class:`ErrorKind` value.
        message: a human-readable sentence naming the frame and field at fault.
        id: the child id the offending frame was about, when it had a usable one.
        ref: the ``t`` (type) of the offending frame, when known.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        id: int | None = None,
        ref: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.id = id
        self.ref = ref


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids (a bug in the caller).

    Nothing was encoded and the connection state is unchanged.
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids.

    When ``fatal`` is false only the offending frame was rejected: reply with
    ``Error.from_exception(exc)`` and keep reading. When ``fatal`` is true the byte stream
    itself is unusable (undecodable, oversized, bad handshake): send that error, then close.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        id: int | None = None,
        ref: str | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(kind, message, id=id, ref=ref)
        self.fatal = fatal
