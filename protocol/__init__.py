"""The mproxy wire protocol, sans-I/O.

Frames are small immutable values (:class:`Exec`, :class:`Data`, ...). A
:class:`Connection` turns received bytes into validated frames and frames to send into
bytes, keeping the handshake, per-child and flow-control state. Nothing here performs
I/O: the agent and the controller own the sockets, pipes and tasks.

The normative specification is docs/protocol.md.
"""

from ._codec import HEADER_SIZE, MAX_ID, MIN_MAX_FRAME, encode, encode_data_header
from ._connection import (
    CAP_STOP,
    CONNECTION_CLOSED,
    DATA_FRAME_OVERHEAD,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    NeedData,
    Role,
)
from ._decoder import FrameDecoder, ZeroCopyFrameDecoder
from ._errors import ErrorKind, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._frames import (
    DEFAULT_ENV_KEEP,
    DEFAULT_ENV_REMOVE,
    SIGNAL_NAMES,
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
from ._sync import HELLO_SIGNATURE, find_hello

__all__ = [
    "CAP_STOP",
    "CONNECTION_CLOSED",
    "DATA_FRAME_OVERHEAD",
    "DEFAULT_ENV_KEEP",
    "DEFAULT_ENV_REMOVE",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_WINDOW",
    "HEADER_SIZE",
    "HELLO_SIGNATURE",
    "MAX_ID",
    "MIN_MAX_FRAME",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "SIGNAL_NAMES",
    "Close",
    "Closed",
    "Config",
    "Connection",
    "ConnectionClosed",
    "Data",
    "Eof",
    "Error",
    "ErrorKind",
    "Exec",
    "Exit",
    "Frame",
    "FrameDecoder",
    "Goodbye",
    "Hello",
    "LocalProtocolError",
    "Log",
    "NeedData",
    "Ping",
    "Pong",
    "ProtocolError",
    "RemoteProtocolError",
    "Role",
    "Shutdown",
    "Signal",
    "SignalAck",
    "Started",
    "Stop",
    "Window",
    "find_hello",
    "ZeroCopyFrameDecoder",
    "encode",
    "encode_data_header",
]
