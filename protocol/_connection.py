"""The sans-I/O connection: bytes in → frames out, frames in → bytes out.

Both ends use the same class with a different :class:`Role`. It validates every frame in
both directions against the protocol state (handshake, known children, open channels,
flow-control credit) and keeps the bookkeeping, so the agent and the controller only
decide *when* to send what. What is allowed in which state of a child or channel is one
table (``_state.py``), read for sending and for receiving alike; the credit, and when
consumed bytes are returned as credit (:meth:`Connection.consumed`), is kept here.
"""

from __future__ import annotations

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
from ._state import (
    ACCEPT,
    CHANNEL_RULES,
    CHILD_RULES,
    CLOSED,
    CLOSING,
    OPEN,
    SENT_BY,
    STOPPED,
    Allow,
    Refuse,
    Role,
    State,
    _ChildState,
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


class Connection:
    """Protocol state of one end of an mproxy connection.

    Typical use: ``out = conn.initiate()`` and write it; then for every chunk read from
    the transport ``conn.receive_data(chunk)`` and call :meth:`next_event` until it
    returns :data:`NEED_DATA`; write whatever :meth:`send` / :meth:`send_data` return.
    Report received data as it is consumed with :meth:`consumed`, and write the window
    frames it returns: the connection decides when credit goes back.

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
        self._children: dict[int, _ChildState] = {}
        # This role's and the peer's cells of the tables (the data path reads them on
        # every frame).
        self._sent_by_us = SENT_BY[role]
        self._sent_by_peer = SENT_BY[self.peer_role]
        self._our_child_rules = CHILD_RULES[role]
        self._peer_child_rules = CHILD_RULES[self.peer_role]
        self._our_channel_rules = CHANNEL_RULES[role]
        self._peer_channel_rules = CHANNEL_RULES[self.peer_role]
        self._our_data_rules = self._our_channel_rules[Data]
        self._peer_data_rules = self._peer_channel_rules[Data]
        # Consumed bytes are returned as credit once they reach half our window.
        self._return_at = window // 2
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
        # Called before every data frame: the checks are can_send()'s, inlined.
        child = self._children.get(id)
        if child is None or child.controller is CLOSING:
            return 0
        chan = child.sending.get(ch)
        if chan is None or (chan.state is not OPEN and chan.state is not STOPPED):
            return 0
        return chan.credit

    def can_send(self, id: int, ch: int) -> bool:
        """Whether channel ``ch`` of child ``id`` is open for us to send on (a stopped
        channel is: its eof is still to be sent)."""
        child = self._children.get(id)
        if child is None or child.controller is CLOSING:
            return False
        chan = child.sending.get(ch)
        return chan is not None and (chan.state is OPEN or chan.state is STOPPED)

    def bytes_sent(self, id: int, ch: int) -> int:
        return self._child(id).sending[ch].count

    def bytes_received(self, id: int, ch: int) -> int:
        return self._child(id).receiving[ch].count

    def _child(self, id: int) -> _ChildState:
        child = self._children.get(id)
        if child is None:
            raise LocalProtocolError(ErrorKind.UNKNOWN_CHILD, f"no child with id {id}", id=id)
        return child

    # ------------------------------------------------------------------ credit

    def consumed(self, id: int, ch: int, n: int, *, now: bool = False) -> bytes:
        """Report ``n`` bytes received on channel ``ch`` of child ``id`` as consumed
        (written to the child, read by the user, or discarded) and return the window
        frame that gives their credit back to the peer when one is due, else ``b""``.

        Credit is returned once the consumed bytes reach half our window, so that the
        peer never waits for it while a window frame per data frame is avoided; with
        ``now``, whatever is consumed is returned at once (the bytes are being
        discarded: nothing is gained by waiting). Returns ``b""`` as well when the
        credit is no longer wanted: the child is gone or being closed, the channel had
        its eof or was stopped, or the connection is ending (goodbye)."""
        child = self._children.get(id)
        if child is None or self.goodbye:
            return b""
        chan = child.receiving.get(ch)
        if chan is None:
            raise LocalProtocolError(
                ErrorKind.BAD_CHANNEL, f"child {id} has no channel {ch} to receive on",
                id=id, ref="window",
            )
        due = chan.unreturned + n
        if not due or (due < self._return_at and not now):
            chan.unreturned = due
            return b""
        chan.unreturned = 0
        # Where the table refuses a window (our own close), nobody wants the credit.
        if not isinstance(self._our_channel_rules[Window][child.controller][chan.state].send,
                          Allow):
            return b""
        return self.send(Window(id, ch, due))

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
            return self._accept_hello(frame)
        if self.goodbye and self.role is Role.CONTROLLER:
            raise RemoteProtocolError(
                ErrorKind.BAD_FRAME,
                f"{frame.TYPE} frame after goodbye (nothing may follow goodbye)",
                id=getattr(frame, "id", None),
                ref=frame.TYPE,
            )
        if not isinstance(frame, self._sent_by_peer):
            raise RemoteProtocolError(
                ErrorKind.BAD_FRAME,
                f"{frame.TYPE} frames are not sent by the {self.peer_role}",
                id=getattr(frame, "id", None),
                ref=frame.TYPE,
            )
        if isinstance(frame, Data):
            return self._accept_data(frame)
        if isinstance(frame, (Eof, Window, Stop)):
            return self._accept_channel_control(frame)
        if isinstance(frame, (Signal, SignalAck, Started, Exit, Close, Closed)):
            child = self._remote_child(frame, frame.id)
            outcome = self._peer_child_rules[type(frame)][
                child.agent, child.controller].receive
            if isinstance(outcome, Refuse):
                raise outcome.remote(frame.TYPE, frame.id)
            self._move(child, frame.id, outcome)
        elif isinstance(frame, Exec):
            self._accept_exec(frame)
        elif isinstance(frame, Hello):
            raise RemoteProtocolError(ErrorKind.HANDSHAKE, "second hello frame", ref="hello")
        elif isinstance(frame, Shutdown):
            self.shutdown_requested = True
        elif isinstance(frame, Goodbye):
            self.goodbye = True
        else:
            assert isinstance(frame, (Error, Log, Config, Ping, Pong)), frame
        return True

    def _accept_hello(self, frame: Frame) -> bool:
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

    def _remote_child(self, frame: Frame, id: int) -> _ChildState:
        child = self._children.get(id)
        if child is None:
            raise RemoteProtocolError(
                ErrorKind.UNKNOWN_CHILD,
                f"{frame.TYPE} frame: no child with id {id}",
                id=id,
                ref=frame.TYPE,
            )
        return child

    def _move(self, child: _ChildState, id: int, outcome: Allow) -> None:
        """Apply an allowed child frame's transition."""
        if outcome.next is not None:
            assert isinstance(outcome.next, tuple)
            child.agent, child.controller = outcome.next
            if child.agent is CLOSED:
                del self._children[id]

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
        self._children[frame.id] = _ChildState(
            send_channels={1, 2} | extra,
            recv_channels={0} | extra,
            send_window=self.their_hello.window,
            recv_window=self.our_hello.window,
        )

    def _accept_data(self, frame: Data) -> bool:
        child = self._remote_child(frame, frame.id)
        chan = child.receiving.get(frame.ch)
        outcome = self._peer_data_rules[child.controller][
            None if chan is None else chan.state].receive
        if outcome is not ACCEPT:
            if isinstance(outcome, Refuse):
                raise outcome.remote("data", frame.id, frame.ch)
            return False
        assert chan is not None
        size = len(frame.data)
        if size > chan.credit:
            raise RemoteProtocolError(
                ErrorKind.CREDIT_EXCEEDED,
                f"data frame: {size} bytes on channel {frame.ch} of child {frame.id} "
                f"exceed the {chan.credit} bytes of credit granted",
                id=frame.id,
                ref="data",
            )
        chan.credit -= size
        chan.count += size
        return True

    def _accept_channel_control(self, frame: Eof | Window | Stop) -> bool:
        child = self._remote_child(frame, frame.id)
        # Eof is about the peer's direction, window and stop about ours.
        channels = child.receiving if isinstance(frame, Eof) else child.sending
        chan = channels.get(frame.ch)
        outcome = self._peer_channel_rules[type(frame)][child.controller][
            None if chan is None else chan.state].receive
        if isinstance(outcome, Refuse):
            raise outcome.remote(frame.TYPE, frame.id, frame.ch)
        if chan is None:
            assert not outcome.passes
            return False
        if outcome.passes and isinstance(frame, Eof):
            if frame.n is not None and frame.n != chan.count:
                raise RemoteProtocolError(
                    ErrorKind.BAD_FRAME,
                    f"eof frame: channel {frame.ch} of child {frame.id} announces {frame.n} "
                    f"bytes sent but {chan.count} arrived",
                    id=frame.id,
                    ref="eof",
                )
        elif outcome.passes and isinstance(frame, Window):
            credit = chan.credit + frame.n
            if credit > _MAX_CREDIT:
                raise RemoteProtocolError(
                    ErrorKind.BAD_FRAME,
                    f"window frame: credit on channel {frame.ch} of child {frame.id} would "
                    f"exceed 2**62 bytes",
                    id=frame.id,
                    ref="window",
                )
            chan.credit = credit
        if outcome.next is not None:
            assert isinstance(outcome.next, State)
            chan.state = outcome.next
        return outcome.passes

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
        if isinstance(frame, (Eof, Window, Stop)):
            return self._send_channel_control(frame, out)
        if isinstance(frame, (Signal, SignalAck, Started, Exit, Close, Closed)):
            child = self._child(frame.id)
            outcome = self._our_child_rules[type(frame)][child.agent, child.controller].send
            if isinstance(outcome, Refuse):
                raise outcome.local(frame.TYPE, frame.id)
            self._move(child, frame.id, outcome)
        elif isinstance(frame, Exec):
            self._send_exec(frame)
        elif isinstance(frame, Shutdown):
            self.shutdown_requested = True
        elif isinstance(frame, Goodbye):
            self.goodbye = True
        elif isinstance(frame, Hello):
            raise LocalProtocolError(
                ErrorKind.HANDSHAKE, "hello is sent by initiate()", ref="hello"
            )
        return out

    def _send_channel_control(self, frame: Eof | Window | Stop, out: bytes) -> bytes:
        child = self._child(frame.id)
        if isinstance(frame, Stop):
            assert self.their_hello is not None  # there are children
            if CAP_STOP not in self.their_hello.caps:
                raise LocalProtocolError(
                    ErrorKind.BAD_FRAME,
                    f"stop frame: the agent does not announce the {CAP_STOP!r} capability",
                    id=frame.id, ref="stop",
                )
        # Eof is about our direction, window and stop about the peer's.
        channels = child.sending if isinstance(frame, Eof) else child.receiving
        chan = channels.get(frame.ch)
        outcome = self._our_channel_rules[type(frame)][child.controller][
            None if chan is None else chan.state].send
        if isinstance(outcome, Refuse):
            raise outcome.local(frame.TYPE, frame.id, frame.ch)
        if chan is None:
            assert not outcome.passes
            return b""
        if outcome.passes and isinstance(frame, Window):
            if chan.credit + frame.n > _MAX_CREDIT:
                raise LocalProtocolError(
                    ErrorKind.BAD_FRAME, "window would exceed 2**62 bytes", id=frame.id,
                    ref="window",
                )
            chan.credit += frame.n
        if outcome.next is not None:
            assert isinstance(outcome.next, State)
            chan.state = outcome.next
        if not outcome.passes:
            return b""
        if isinstance(frame, Eof):
            return encode(Eof(id=frame.id, ch=frame.ch, n=chan.count))
        return out

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
        chan = child.sending.get(ch)
        outcome = self._our_data_rules[child.controller][
            None if chan is None else chan.state].send
        if outcome is not ACCEPT:
            if isinstance(outcome, Refuse):
                raise outcome.local("data", id, ch)
            return b""
        assert chan is not None
        if size > chan.credit:
            raise LocalProtocolError(
                ErrorKind.CREDIT_EXCEEDED,
                f"{size} bytes on channel {ch} of child {id} exceed the credit of "
                f"{chan.credit}",
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
        chan.credit -= size
        chan.count += size
        return encode_data_header(id, ch, size)

    def _check_can_send(self, frame: Frame | type[Frame]) -> None:
        if not self._initiated:
            raise LocalProtocolError(ErrorKind.HANDSHAKE, "send our hello (initiate) first")
        if not issubclass(frame if isinstance(frame, type) else type(frame),
                          self._sent_by_us):
            raise LocalProtocolError(
                ErrorKind.BAD_FRAME,
                f"{frame.TYPE} frames are not sent by the {self.role}",
                ref=frame.TYPE,
            )
        if self.goodbye and self.role is Role.AGENT:
            raise LocalProtocolError(
                ErrorKind.BAD_FRAME, "nothing may follow goodbye", ref=frame.TYPE
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
        self._children[frame.id] = _ChildState(
            send_channels={0} | extra,
            recv_channels={1, 2} | extra,
            send_window=self.their_hello.window,
            recv_window=self.our_hello.window,
        )
