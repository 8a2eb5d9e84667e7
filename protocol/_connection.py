"""The sans-I/O connection: bytes in → frames out, frames in → bytes out.

Both ends use the same class with a different :class:`Role`. It validates every frame in
both directions against the protocol state (handshake, known children, open channels,
flow-control credit) and keeps the bookkeeping, so the agent and the controller only
decide *when* to send what.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from ._codec import (
    HEADER_SIZE,
    MAX_ID,
    MIN_MAX_FRAME,
    PROTOCOL_VERSION,
    FrameInvalid,
    check_frame,
    encode,
    encode_data_header,
)
from ._decoder import FrameDecoder, ZeroCopyFrameDecoder
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
    "CAP_STOP",
    "CONNECTION_CLOSED",
    "DATA_FRAME_OVERHEAD",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_WINDOW",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Connection",
    "ConnectionClosed",
    "NeedData",
    "Role",
]

#: Default largest frame body (the length in the 4-byte prefix) each side accepts.
DEFAULT_MAX_FRAME: Final = 4 << 20
#: Default initial credit, in bytes, per channel and direction.
DEFAULT_WINDOW: Final = 1 << 20
#: Upper bound of a data frame's bytes beyond its payload (prefix, map, keys, ids).
DATA_FRAME_OVERHEAD: Final = 64
#: The hello capability of an agent that understands ``stop`` frames.
CAP_STOP: Final = "stop"
# Credit beyond this is a peer bug (and would overflow the peer's counters).
_MAX_CREDIT: Final = 2**62


class Role(StrEnum):
    AGENT = "agent"
    CONTROLLER = "controller"


class NeedData:
    """Sentinel type: feed more bytes with :meth:`Connection.receive_data`."""

    def __repr__(self) -> str:
        return "NEED_DATA"


class ConnectionClosed:
    """Sentinel type: the peer's byte stream ended cleanly at a frame boundary."""

    def __repr__(self) -> str:
        return "CONNECTION_CLOSED"


NEED_DATA: Final = NeedData()
CONNECTION_CLOSED: Final = ConnectionClosed()

_CONTROL_BOTH: Final = (Hello, Data, Eof, Window, Error, Ping, Pong)
_SENT_BY: Final[dict[Role, tuple[type[Frame], ...]]] = {
    Role.CONTROLLER: (*_CONTROL_BOTH, Exec, Signal, Stop, Close, Config, Shutdown),
    Role.AGENT: (*_CONTROL_BOTH, Started, SignalAck, Exit, Log, Closed, Goodbye),
}


class _Child:
    """One child's state, as seen by this end of the connection."""

    __slots__ = (
        "closing",
        "exited",
        "received",
        "recv_credit",
        "recv_open",
        "send_credit",
        "send_open",
        "sent",
        "started",
        "stopped",
    )

    def __init__(
        self, send_channels: set[int], recv_channels: set[int], send_window: int,
        recv_window: int,
    ) -> None:
        self.send_open = send_channels
        self.recv_open = recv_channels
        self.send_credit = dict.fromkeys(send_channels, send_window)
        self.recv_credit = dict.fromkeys(recv_channels, recv_window)
        self.sent = dict.fromkeys(send_channels, 0)
        self.received = dict.fromkeys(recv_channels, 0)
        self.started = False
        self.exited = False
        # Agent → controller channels the controller has sent stop for (section 5 of the
        # spec): the agent sends no more data on them, only their eof.
        self.stopped: set[int] = set()
        # Controller: we sent close. Agent: we received close. Either way the child's data,
        # eof and window frames are no longer wanted in either direction.
        self.closing = False


class Connection:
    """Protocol state of one end of an mproxy connection.

    Typical use: ``out = conn.initiate()`` and write it; then for every chunk read from
    the transport ``conn.receive_data(chunk)`` and call :meth:`next_event` until it
    returns :data:`NEED_DATA`; write whatever :meth:`send` / :meth:`send_data` return.

    Errors: :class:`LocalProtocolError` when our side breaks a rule (nothing is
    encoded, state unchanged); :class:`RemoteProtocolError` from :meth:`next_event` when
    the peer did (see its ``fatal`` attribute).
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME,
        window: int = DEFAULT_WINDOW,
        impl: str = "mproxy",
        impl_version: str = "0",
        caps: tuple[str, ...] = (),
        zero_copy: bool = False,
    ) -> None:
        self.role = role
        self.our_hello = Hello(
            version=PROTOCOL_VERSION,
            impl=impl,
            impl_version=impl_version,
            max_frame=max_frame_size,
            window=window,
            caps=caps,
            role=role.value,
        )
        try:
            check_frame(self.our_hello)
        except FrameInvalid as exc:
            raise LocalProtocolError(exc.kind, exc.message, ref="hello") from None
        self.their_hello: Hello | None = None
        #: Data payloads are views of the receive buffer (see ZeroCopyFrameDecoder).
        self.zero_copy = zero_copy
        self._decoder: FrameDecoder | ZeroCopyFrameDecoder
        if zero_copy:
            self._decoder = ZeroCopyFrameDecoder(max_frame_size)
        else:
            self._decoder = FrameDecoder(max_frame_size)
        self._initiated = False
        self._eof = False
        self._fatal: RemoteProtocolError | None = None
        self._children: dict[int, _Child] = {}
        self.shutdown_requested = False  # controller sent / agent received shutdown
        self.goodbye = False  # agent sent / controller received goodbye

    # ------------------------------------------------------------------ introspection

    @property
    def peer_role(self) -> Role:
        return Role.AGENT if self.role is Role.CONTROLLER else Role.CONTROLLER

    @property
    def max_data_payload(self) -> int:
        """Largest payload a data frame we send may carry (the peer's frame limit)."""
        if self.their_hello is None:
            raise LocalProtocolError(ErrorKind.HANDSHAKE, "the peer's hello has not arrived")
        return self.their_hello.max_frame - DATA_FRAME_OVERHEAD

    def children(self) -> list[int]:
        """Ids of the children this connection currently tracks."""
        return list(self._children)

    def has_child(self, id: int) -> bool:
        return id in self._children

    def send_credit(self, id: int, ch: int) -> int:
        """Bytes we may send now on channel ``ch`` of child ``id`` (0 when not open)."""
        child = self._children.get(id)
        if child is None or child.closing or ch not in child.send_open:
            return 0
        return child.send_credit[ch]

    def can_send(self, id: int, ch: int) -> bool:
        """Whether channel ``ch`` of child ``id`` is open for us to send on."""
        child = self._children.get(id)
        return child is not None and not child.closing and ch in child.send_open

    def bytes_sent(self, id: int, ch: int) -> int:
        return self._child(id).sent[ch]

    def bytes_received(self, id: int, ch: int) -> int:
        return self._child(id).received[ch]

    def _child(self, id: int) -> _Child:
        child = self._children.get(id)
        if child is None:
            raise LocalProtocolError(ErrorKind.UNKNOWN_CHILD, f"no child with id {id}", id=id)
        return child

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Give the connection bytes read from the peer; ``b""`` means end of stream.

        They may be parsed in place: a caller that reads into one reused buffer overwrites
        it only once :meth:`next_event` has returned ``NEED_DATA``."""
        if not data:
            self._eof = True
        else:
            self._decoder.feed(data)

    def get_buffer(self) -> memoryview:
        """Zero-copy connections only: space to read the peer's next bytes into. Release
        the view, then report the bytes written with :meth:`buffer_updated` (0 for end of
        stream). See :class:`ZeroCopyFrameDecoder`."""
        return self._zero_copy_decoder().get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if nbytes == 0:
            self._eof = True
        else:
            self._zero_copy_decoder().buffer_updated(nbytes)

    @property
    def pinned_bytes(self) -> int:
        """Zero-copy connections: bytes of earlier receive buffers that payload views
        still hold; 0 for others. A receiver that holds payloads for long should copy
        them out when this grows well beyond what it holds."""
        if isinstance(self._decoder, ZeroCopyFrameDecoder):
            return self._decoder.pinned_bytes
        return 0

    def _zero_copy_decoder(self) -> ZeroCopyFrameDecoder:
        if not isinstance(self._decoder, ZeroCopyFrameDecoder):
            raise TypeError("get_buffer/buffer_updated need a Connection(zero_copy=True)")
        return self._decoder

    def next_event(self) -> Frame | NeedData | ConnectionClosed:
        """The next valid frame from the peer, or a sentinel.

        Raises :class:`RemoteProtocolError`. After a fatal one, every later call raises it
        again. Data, eof and window frames about a child in ``closing`` state are
        consumed silently: they were in flight when close was sent.
        """
        if self._fatal is not None:
            raise self._fatal
        while True:
            try:
                frame = self._decoder.next_frame()
            except RemoteProtocolError as exc:
                if exc.fatal:
                    self._fatal = exc
                elif self.their_hello is None:
                    if exc.kind is ErrorKind.VERSION_MISMATCH:
                        exc = RemoteProtocolError(
                            exc.kind, exc.message, ref=exc.ref, fatal=True
                        )
                    else:
                        exc = RemoteProtocolError(
                            ErrorKind.HANDSHAKE, f"bad first frame: {exc.message}",
                            ref=exc.ref, fatal=True,
                        )
                    self._fatal = exc
                elif exc.kind is ErrorKind.VERSION_MISMATCH:
                    exc = RemoteProtocolError(
                        ErrorKind.HANDSHAKE, f"second hello frame: {exc.message}", ref="hello"
                    )
                raise exc from None
            if frame is None:
                if not self._eof:
                    return NEED_DATA
                if self._decoder.buffered:
                    self._fatal = RemoteProtocolError(
                        ErrorKind.MALFORMED,
                        f"stream ended inside a frame ({self._decoder.buffered} bytes of it)",
                        fatal=True,
                    )
                    raise self._fatal
                return CONNECTION_CLOSED
            try:
                if self._accept(frame):
                    return frame
            except RemoteProtocolError as exc:
                if exc.fatal:
                    self._fatal = exc
                raise

    def _accept(self, frame: Frame) -> bool:
        """Validate a received frame and update state; False means drop it silently."""
        if self.their_hello is None:
            if not isinstance(frame, Hello):
                raise RemoteProtocolError(
                    ErrorKind.HANDSHAKE,
                    f"expected a hello frame first, got {frame.TYPE}",
                    ref=frame.TYPE,
                    fatal=True,
                )
            if frame.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    ErrorKind.VERSION_MISMATCH,
                    f"peer speaks protocol version {frame.version}, "
                    f"this side speaks {PROTOCOL_VERSION}",
                    ref="hello",
                    fatal=True,
                )
            if frame.role is not None and frame.role != self.peer_role:
                # Our own role: nothing but an echo of our hello says that.
                raise RemoteProtocolError(
                    ErrorKind.HANDSHAKE,
                    f"hello frame: the peer's hello says role {frame.role!r}, this side's "
                    f"own: the {self.peer_role} command echoed our frames back (is it "
                    f"`cat`?)",
                    ref="hello",
                    fatal=True,
                )
            self.their_hello = frame
            return True
        if self.goodbye and self.role is Role.CONTROLLER:
            raise RemoteProtocolError(
                ErrorKind.BAD_FRAME,
                f"{frame.TYPE} frame after goodbye (nothing may follow goodbye)",
                id=getattr(frame, "id", None),
                ref=frame.TYPE,
            )
        if not isinstance(frame, _SENT_BY[self.peer_role]):
            raise RemoteProtocolError(
                ErrorKind.BAD_FRAME,
                f"{frame.TYPE} frames are not sent by the {self.peer_role}",
                id=getattr(frame, "id", None),
                ref=frame.TYPE,
            )
        if isinstance(frame, Data):
            return self._accept_data(frame)
        if isinstance(frame, Eof):
            return self._accept_eof(frame)
        if isinstance(frame, Window):
            return self._accept_window(frame)
        if isinstance(frame, Stop):
            return self._accept_stop(frame)
        if isinstance(frame, Exec):
            self._accept_exec(frame)
        elif isinstance(frame, (Signal, SignalAck, Started, Exit, Close, Closed)):
            self._accept_child_control(frame)
        elif isinstance(frame, Hello):
            raise RemoteProtocolError(ErrorKind.HANDSHAKE, "second hello frame", ref="hello")
        elif isinstance(frame, Shutdown):
            self.shutdown_requested = True
        elif isinstance(frame, Goodbye):
            self.goodbye = True
        else:
            assert isinstance(frame, (Error, Log, Config, Ping, Pong)), frame
        return True

    def _remote_child(self, frame: Frame, id: int) -> _Child:
        child = self._children.get(id)
        if child is None:
            raise RemoteProtocolError(
                ErrorKind.UNKNOWN_CHILD,
                f"{frame.TYPE} frame: no child with id {id}",
                id=id,
                ref=frame.TYPE,
            )
        return child

    def _accept_exec(self, frame: Exec) -> None:
        if self.shutdown_requested:
            raise RemoteProtocolError(
                ErrorKind.SHUTTING_DOWN,
                f"exec frame: id {frame.id} arrived after shutdown",
                id=frame.id,
                ref="exec",
            )
        if frame.id in self._children:
            raise RemoteProtocolError(
                ErrorKind.DUPLICATE_ID,
                f"exec frame: id {frame.id} is already in use (not yet closed)",
                id=frame.id,
                ref="exec",
            )
        assert self.their_hello is not None
        extra = set(frame.fds)
        self._children[frame.id] = _Child(
            send_channels={1, 2} | extra,
            recv_channels={0} | extra,
            send_window=self.their_hello.window,
            recv_window=self.our_hello.window,
        )

    def _accept_data(self, frame: Data) -> bool:
        child = self._remote_child(frame, frame.id)
        if child.closing:
            return self._after_close(frame)
        self._check_recv_channel(child, frame, frame.ch)
        size = len(frame.data)
        if size > child.recv_credit[frame.ch]:
            raise RemoteProtocolError(
                ErrorKind.CREDIT_EXCEEDED,
                f"data frame: {size} bytes on channel {frame.ch} of child {frame.id} "
                f"exceed the {child.recv_credit[frame.ch]} bytes of credit granted",
                id=frame.id,
                ref="data",
            )
        child.recv_credit[frame.ch] -= size
        child.received[frame.ch] += size
        return True

    def _accept_eof(self, frame: Eof) -> bool:
        child = self._remote_child(frame, frame.id)
        if child.closing:
            return self._after_close(frame)
        self._check_recv_channel(child, frame, frame.ch)
        received = child.received[frame.ch]
        if frame.n is not None and frame.n != received:
            raise RemoteProtocolError(
                ErrorKind.BAD_FRAME,
                f"eof frame: channel {frame.ch} of child {frame.id} announces {frame.n} "
                f"bytes sent but {received} arrived",
                id=frame.id,
                ref="eof",
            )
        child.recv_open.discard(frame.ch)
        return True

    def _after_close(self, frame: Data | Eof) -> bool:
        # Controller: the agent sent it before our close arrived; drop it. Agent: a
        # conforming controller sends nothing on a channel after close.
        if self.role is Role.CONTROLLER:
            return False
        raise RemoteProtocolError(
            ErrorKind.CHANNEL_CLOSED,
            f"{frame.TYPE} frame: child {frame.id} was closed",
            id=frame.id,
            ref=frame.TYPE,
        )

    def _check_recv_channel(self, child: _Child, frame: Data | Eof, ch: int) -> None:
        if ch in child.recv_open:
            return
        if ch in child.received:
            raise RemoteProtocolError(
                ErrorKind.CHANNEL_CLOSED,
                f"{frame.TYPE} frame: channel {ch} of child {frame.id} already had its eof",
                id=frame.id,
                ref=frame.TYPE,
            )
        raise RemoteProtocolError(
            ErrorKind.BAD_CHANNEL,
            f"{frame.TYPE} frame: child {frame.id} has no channel {ch} in this direction",
            id=frame.id,
            ref=frame.TYPE,
        )

    def _accept_window(self, frame: Window) -> bool:
        child = self._remote_child(frame, frame.id)
        if frame.ch not in child.send_credit:
            raise RemoteProtocolError(
                ErrorKind.BAD_CHANNEL,
                f"window frame: child {frame.id} has no channel {frame.ch} in this direction",
                id=frame.id,
                ref="window",
            )
        if child.closing or frame.ch not in child.send_open:
            return False  # credit for a channel we already finished: harmless race
        if self.role is Role.AGENT and frame.ch in child.stopped:
            return False  # and for one that will carry nothing but its eof
        credit = child.send_credit[frame.ch] + frame.n
        if credit > _MAX_CREDIT:
            raise RemoteProtocolError(
                ErrorKind.BAD_FRAME,
                f"window frame: credit on channel {frame.ch} of child {frame.id} would "
                f"exceed 2**62 bytes",
                id=frame.id,
                ref="window",
            )
        child.send_credit[frame.ch] = credit
        return True

    def _accept_stop(self, frame: Stop) -> bool:
        child = self._remote_child(frame, frame.id)
        if child.closing:
            raise RemoteProtocolError(
                ErrorKind.CHANNEL_CLOSED,
                f"stop frame: child {frame.id} was closed",
                id=frame.id,
                ref="stop",
            )
        if frame.ch not in child.sent:
            raise RemoteProtocolError(
                ErrorKind.BAD_CHANNEL,
                f"stop frame: child {frame.id} has no channel {frame.ch} in the agent's "
                f"direction",
                id=frame.id,
                ref="stop",
            )
        if frame.ch in child.stopped:
            raise RemoteProtocolError(
                ErrorKind.BAD_FRAME,
                f"stop frame: channel {frame.ch} of child {frame.id} was already stopped",
                id=frame.id,
                ref="stop",
            )
        child.stopped.add(frame.ch)
        # After our eof the two crossed: the channel is over already.
        return frame.ch in child.send_open

    def _accept_child_control(
        self, frame: Signal | SignalAck | Started | Exit | Close | Closed
    ) -> None:
        problem = self._advance(self._remote_child(frame, frame.id), frame)
        if problem is not None:
            raise RemoteProtocolError(
                ErrorKind.BAD_FRAME, f"{frame.TYPE} frame: {problem}", id=frame.id,
                ref=frame.TYPE,
            )

    def _advance(
        self, child: _Child, frame: Signal | SignalAck | Started | Exit | Close | Closed
    ) -> str | None:
        """Apply a lifecycle frame to ``child`` (either direction), or say what is wrong
        with it (the state is then unchanged)."""
        if isinstance(frame, Started):
            if child.started or child.exited:
                return (f"child {frame.id} was already reported "
                        f"{'started' if child.started else 'exited'}")
            child.started = True
        elif isinstance(frame, Exit):
            if child.exited:
                return f"child {frame.id} already exited"
            child.exited = True
        elif isinstance(frame, Close):
            if child.closing:
                return f"child {frame.id} is already being closed"
            child.closing = True
        elif isinstance(frame, Closed):
            if not (child.closing and child.exited):
                return (f"child {frame.id} has not been "
                        f"{'closed' if not child.closing else 'reported exited'}")
            del self._children[frame.id]
        return None

    # ------------------------------------------------------------------ sending

    def initiate(self) -> bytes:
        """Our hello frame: the first bytes to write."""
        if self._initiated:
            raise LocalProtocolError(ErrorKind.HANDSHAKE, "hello already sent", ref="hello")
        self._initiated = True
        return encode(self.our_hello)

    def send(self, frame: Frame) -> bytes:
        """Validate ``frame`` against the state, update it, and return its bytes.

        Returns ``b""`` for data-less frames that are no longer wanted: eof and window
        frames about a child the peer has closed. Data frames go through
        :meth:`send_data`.
        """
        self._check_can_send(frame)
        if isinstance(frame, Data):
            raise LocalProtocolError(
                ErrorKind.BAD_FRAME, "use send_data() for data frames", ref="data"
            )
        try:
            check_frame(frame)
        except FrameInvalid as exc:
            raise LocalProtocolError(
                exc.kind, exc.message, id=getattr(frame, "id", None), ref=frame.TYPE
            ) from None
        # Encoded before any state changes, so an oversized frame leaves the state alone.
        # Eof is encoded at the end: its n is filled in below.
        out = b"" if isinstance(frame, Eof) else self._encode_within_limit(frame)
        if isinstance(frame, Eof):
            child = self._child(frame.id)
            if self._dropped(child, frame):
                return b""
            self._check_send_channel(child, frame.id, frame.ch, "eof")
            frame = Eof(id=frame.id, ch=frame.ch, n=child.sent[frame.ch])
            child.send_open.discard(frame.ch)
        elif isinstance(frame, Window):
            child = self._child(frame.id)
            if self._dropped(child, frame):
                return b""
            if frame.ch not in child.recv_credit:
                raise LocalProtocolError(
                    ErrorKind.BAD_CHANNEL,
                    f"child {frame.id} has no channel {frame.ch} to receive on",
                    id=frame.id,
                    ref="window",
                )
            if frame.ch not in child.recv_open:
                return b""  # the peer has sent its eof; credit is pointless
            if self.role is Role.CONTROLLER and frame.ch in child.stopped:
                return b""  # the agent sends nothing more on it but its eof
            if child.recv_credit[frame.ch] + frame.n > _MAX_CREDIT:
                raise LocalProtocolError(
                    ErrorKind.BAD_FRAME, "window would exceed 2**62 bytes", id=frame.id,
                    ref="window",
                )
            child.recv_credit[frame.ch] += frame.n
        elif isinstance(frame, Stop):
            if not self._send_stop(frame):
                return b""
        elif isinstance(frame, Exec):
            self._send_exec(frame)
        elif isinstance(frame, (Signal, SignalAck, Started, Exit, Close, Closed)):
            self._send_child_control(frame)
        elif isinstance(frame, Shutdown):
            self.shutdown_requested = True
        elif isinstance(frame, Goodbye):
            self.goodbye = True
        elif isinstance(frame, Hello):
            raise LocalProtocolError(
                ErrorKind.HANDSHAKE, "hello is sent by initiate()", ref="hello"
            )
        return encode(frame) if isinstance(frame, Eof) else out

    def _encode_within_limit(self, frame: Frame) -> bytes:
        # The peer rejects a frame over its limit as fatal (frame-too-large): refuse it here.
        # Before the peer's hello only the minimum every peer must accept is known.
        try:
            out = encode(frame)
        except (OverflowError, UnicodeEncodeError) as exc:  # int beyond msgpack, \ud800
            raise LocalProtocolError(
                ErrorKind.BAD_FRAME,
                f"{frame.TYPE} frame: a field cannot be encoded ({exc})",
                id=getattr(frame, "id", None),
                ref=frame.TYPE,
            ) from None
        limit = MIN_MAX_FRAME if self.their_hello is None else self.their_hello.max_frame
        if len(out) - HEADER_SIZE > limit:
            raise LocalProtocolError(
                ErrorKind.FRAME_TOO_LARGE,
                f"{frame.TYPE} frame: {len(out) - HEADER_SIZE} bytes exceed the peer's "
                f"frame limit of {limit}",
                id=getattr(frame, "id", None),
                ref=frame.TYPE,
            )
        return out

    def send_data(self, id: int, ch: int, payload: bytes | bytearray | memoryview) -> bytes:
        """Account for a data frame and return its header; write the payload after it.

        Returns ``b""`` when the frame must not be written at all (the peer closed the
        child). Raises :class:`LocalProtocolError` when the channel is not open for
        sending, or the payload exceeds the credit or the peer's frame limit.
        """
        return self.send_data_header(id, ch, len(payload))

    def send_data_header(self, id: int, ch: int, size: int) -> bytes:
        """:meth:`send_data` for a payload of ``size`` bytes that the caller moves itself
        (e.g. with ``splice`` from a pipe): the same checks, accounting and header."""
        self._check_can_send(Data)
        child = self._child(id)
        if child.closing and self.role is Role.AGENT:
            return b""
        if child.closing:
            raise LocalProtocolError(
                ErrorKind.CHANNEL_CLOSED, f"child {id} is closed", id=id, ref="data"
            )
        self._check_send_channel(child, id, ch, "data")
        if self.role is Role.AGENT and ch in child.stopped:
            raise LocalProtocolError(
                ErrorKind.CHANNEL_CLOSED,
                f"channel {ch} of child {id} was stopped by the controller: send its eof",
                id=id,
                ref="data",
            )
        if size > child.send_credit[ch]:
            raise LocalProtocolError(
                ErrorKind.CREDIT_EXCEEDED,
                f"{size} bytes on channel {ch} of child {id} exceed the credit of "
                f"{child.send_credit[ch]}",
                id=id,
                ref="data",
            )
        if size > self.max_data_payload:
            raise LocalProtocolError(
                ErrorKind.FRAME_TOO_LARGE,
                f"{size} bytes exceed the peer's data payload limit {self.max_data_payload}",
                id=id,
                ref="data",
            )
        child.send_credit[ch] -= size
        child.sent[ch] += size
        return encode_data_header(id, ch, size)

    def _check_can_send(self, frame: Frame | type[Frame]) -> None:
        if not self._initiated:
            raise LocalProtocolError(ErrorKind.HANDSHAKE, "send our hello (initiate) first")
        if not issubclass(frame if isinstance(frame, type) else type(frame),
                          _SENT_BY[self.role]):
            raise LocalProtocolError(
                ErrorKind.BAD_FRAME,
                f"{frame.TYPE} frames are not sent by the {self.role}",
                ref=frame.TYPE,
            )
        if self.goodbye and self.role is Role.AGENT:
            raise LocalProtocolError(
                ErrorKind.BAD_FRAME, "nothing may follow goodbye", ref=frame.TYPE
            )

    def _dropped(self, child: _Child, frame: Frame) -> bool:
        if not child.closing:
            return False
        if self.role is Role.AGENT:
            return True
        raise LocalProtocolError(
            ErrorKind.CHANNEL_CLOSED,
            f"{frame.TYPE} frame: child {getattr(frame, 'id', '?')} is closed",
            ref=frame.TYPE,
        )

    def _check_send_channel(self, child: _Child, id: int, ch: int, ftype: str) -> None:
        if ch in child.send_open:
            return
        if ch in child.sent:
            raise LocalProtocolError(
                ErrorKind.CHANNEL_CLOSED,
                f"channel {ch} of child {id} already had its eof",
                id=id,
                ref=ftype,
            )
        raise LocalProtocolError(
            ErrorKind.BAD_CHANNEL,
            f"child {id} has no channel {ch} to send on",
            id=id,
            ref=ftype,
        )

    def _send_exec(self, frame: Exec) -> None:
        if self.their_hello is None:
            raise LocalProtocolError(
                ErrorKind.HANDSHAKE, "wait for the agent's hello before exec", ref="exec"
            )
        if self.shutdown_requested:
            raise LocalProtocolError(
                ErrorKind.SHUTTING_DOWN, "exec after shutdown", id=frame.id, ref="exec"
            )
        if frame.id in self._children:
            raise LocalProtocolError(
                ErrorKind.DUPLICATE_ID, f"id {frame.id} is in use", id=frame.id, ref="exec"
            )
        if not 0 <= frame.id <= MAX_ID:
            raise LocalProtocolError(
                ErrorKind.BAD_FRAME, f"id {frame.id} is out of range", id=frame.id,
                ref="exec",
            )
        extra = set(frame.fds)
        self._children[frame.id] = _Child(
            send_channels={0} | extra,
            recv_channels={1, 2} | extra,
            send_window=self.their_hello.window,
            recv_window=self.our_hello.window,
        )

    def _send_stop(self, frame: Stop) -> bool:
        """Record a stop we send; False when it is pointless (the eof has arrived)."""
        child = self._child(frame.id)
        if child.closing:
            raise LocalProtocolError(
                ErrorKind.CHANNEL_CLOSED, f"stop frame: child {frame.id} is closed",
                id=frame.id, ref="stop",
            )
        assert self.their_hello is not None  # there are children
        if CAP_STOP not in self.their_hello.caps:
            raise LocalProtocolError(
                ErrorKind.BAD_FRAME,
                f"stop frame: the agent does not announce the {CAP_STOP!r} capability",
                id=frame.id, ref="stop",
            )
        if frame.ch not in child.received:
            raise LocalProtocolError(
                ErrorKind.BAD_CHANNEL,
                f"stop frame: child {frame.id} has no channel {frame.ch} to receive on",
                id=frame.id, ref="stop",
            )
        if frame.ch in child.stopped:
            raise LocalProtocolError(
                ErrorKind.BAD_FRAME,
                f"stop frame: channel {frame.ch} of child {frame.id} was already stopped",
                id=frame.id, ref="stop",
            )
        child.stopped.add(frame.ch)
        return frame.ch in child.recv_open

    def _send_child_control(
        self, frame: Signal | SignalAck | Started | Exit | Close | Closed
    ) -> None:
        child = self._child(frame.id)
        if isinstance(frame, Signal) and child.closing:
            raise LocalProtocolError(
                ErrorKind.CHANNEL_CLOSED, f"child {frame.id} is closed", id=frame.id,
                ref="signal",
            )
        problem = self._advance(child, frame)
        if problem is not None:
            raise LocalProtocolError(ErrorKind.BAD_FRAME, problem, id=frame.id, ref=frame.TYPE)
