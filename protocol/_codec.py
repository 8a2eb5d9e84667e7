"""Frames ↔ bytes.

Wire format: each frame is a 4-byte big-endian length ``L`` followed by ``L`` bytes holding
exactly one msgpack map. The map's ``t`` names the frame type; the other keys are the
frame's fields (see docs/protocol.md). Keys a receiver does not know are ignored.

The length prefix lets a receiver reject an oversized frame from its first four bytes,
before buffering any of its body, and lets data frames be written as a small header plus
the untouched payload (``encode_data_header``), with no copy of the payload.
"""

from __future__ import annotations

import dataclasses
import reprlib
import struct
from collections.abc import Callable, Mapping
from typing import Any, Final

import msgpack

from ._errors import ErrorKind
from ._frames import (
    FRAME_TYPES,
    SIGNAL_NAMES,
    Config,
    Data,
    Error,
    Exec,
    Frame,
    Hello,
    Log,
    Signal,
    Window,
)

__all__ = [
    "DATA_MAP_START",
    "HEADER_SIZE",
    "MAX_ID",
    "PROTOCOL_VERSION",
    "FrameInvalid",
    "check_frame",
    "decode_body",
    "encode",
    "encode_data_header",
]

#: The protocol version this implementation speaks. Peers must announce the same.
PROTOCOL_VERSION: Final = 1
#: Size of the length prefix in front of every frame body.
HEADER_SIZE: Final = 4
#: Child ids, pids, byte counts and credits are msgpack unsigned integers below 2**64.
MAX_ID: Final = 2**64 - 1

_LENGTH = struct.Struct(">I")


class FrameInvalid(Exception):
    """A frame's content breaks a rule. The caller turns it into a Local or Remote error."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# ---------------------------------------------------------------------------- encoding

def _wire_value(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    return value


_FIELD_NAMES: Final[dict[type[Frame], tuple[str, ...]]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    for cls in FRAME_TYPES.values()
}


def encode(frame: Frame) -> bytes:
    """The complete bytes of ``frame``: length prefix and msgpack body.

    Fields equal to None are left out (the receiver applies the default). Does not check
    the frame's content: :class:`~protocol.Connection` does that before encoding.
    """
    if isinstance(frame, Data):
        return encode_data_header(frame.id, frame.ch, len(frame.data)) + frame.data
    body: dict[str, object] = {"t": frame.TYPE}
    for name in _FIELD_NAMES[type(frame)]:
        value = getattr(frame, name)
        if value is not None:
            body[name] = _wire_value(value)
    # surrogateescape mirrors the decoder: a str that arrived with invalid UTF-8 (and so
    # holds escaped bytes) can be sent back as it came instead of failing to encode.
    packed: bytes = msgpack.packb(body, use_bin_type=True, unicode_errors="surrogateescape")
    return _LENGTH.pack(len(packed)) + packed


#: How every data frame this module encodes begins (decoders recognise it to borrow
#: the payload instead of copying it).
DATA_MAP_START: Final = b"\x84" + msgpack.packb("t") + msgpack.packb("data")
_KEY_ID: Final = msgpack.packb("id")
_KEY_CH: Final = msgpack.packb("ch")
_KEY_D: Final = msgpack.packb("d")


def encode_data_header(id: int, ch: int, length: int) -> bytes:
    """Everything of a ``data`` frame except its ``length`` payload bytes.

    Write the result and then the payload (e.g. with ``os.writev``): the payload is
    never copied into the frame.
    """
    if length < 256:
        bin_header = b"\xc4" + length.to_bytes(1, "big")
    elif length < 65536:
        bin_header = b"\xc5" + length.to_bytes(2, "big")
    else:
        bin_header = b"\xc6" + length.to_bytes(4, "big")
    prefix = b"".join(
        (DATA_MAP_START, _KEY_ID, msgpack.packb(id), _KEY_CH, msgpack.packb(ch), _KEY_D,
         bin_header)
    )
    return _LENGTH.pack(len(prefix) + length) + prefix


def unpack_length(buffer: bytes | bytearray | memoryview, offset: int = 0) -> int:
    """The body length announced by the 4-byte frame header at ``offset``."""
    (length,) = _LENGTH.unpack_from(buffer, offset)
    return int(length)


# ---------------------------------------------------------------------------- decoding
# Each field converter takes the raw msgpack value and returns the frame's value, or
# raises _BadField with the expected type.

class _BadField(Exception):
    pass


def _uint(value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise _BadField("an unsigned integer below 2**64")
    return value


def _int(value: object) -> int:
    if type(value) is not int:
        raise _BadField("an integer")
    return value


def _str(value: object) -> str:
    if type(value) is not str:
        raise _BadField("a string")
    return value


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise _BadField("a boolean")
    return value


def _bin(value: object) -> bytes:
    if type(value) is not bytes:
        raise _BadField("binary data (msgpack bin)")
    return value


def _os_string(value: object) -> bytes:
    # Sent as bin; a str is accepted too (its UTF-8 bytes, with any undecodable bytes
    # the unpacker escaped restored by surrogateescape).
    if type(value) is bytes:
        return value
    if type(value) is str:
        return value.encode("utf-8", "surrogateescape")
    raise _BadField("binary data (msgpack bin) or a string")


def _list_of(item: Callable[[object], Any]) -> Callable[[object], tuple[Any, ...]]:
    def convert(value: object) -> tuple[Any, ...]:
        if type(value) is not list:
            raise _BadField("an array")
        try:
            return tuple(item(v) for v in value)
        except _BadField as exc:
            raise _BadField(f"an array of {exc}") from None
    return convert


def _str_map(value: object) -> dict[str, str]:
    if type(value) is not dict or not all(
        type(k) is str and type(v) is str for k, v in value.items()
    ):
        raise _BadField("a map of strings to strings")
    return value


_R: Final = True  # required
_O: Final = False  # optional: absent or nil means the dataclass default

# type -> (wire key, attribute, converter, required)
_FIELDS: Final[dict[str, tuple[tuple[str, str, Callable[[object], Any], bool], ...]]] = {
    "hello": (
        ("version", "version", _uint, _R),
        ("impl", "impl", _str, _R),
        ("impl_version", "impl_version", _str, _R),
        ("max_frame", "max_frame", _uint, _R),
        ("window", "window", _uint, _R),
        ("caps", "caps", _list_of(_str), _O),
        ("role", "role", _str, _O),
    ),
    "exec": (
        ("id", "id", _uint, _R),
        ("argv", "argv", _list_of(_os_string), _R),
        ("path", "path", _os_string, _O),
        ("env", "env", _list_of(_os_string), _O),
        ("env_set", "env_set", _list_of(_os_string), _O),
        ("env_unset", "env_unset", _list_of(_os_string), _O),
        ("cwd", "cwd", _os_string, _O),
        ("fds", "fds", _list_of(_uint), _O),
        ("drop_sudo", "drop_sudo", _bool, _O),
    ),
    "started": (
        ("id", "id", _uint, _R),
        ("pid", "pid", _uint, _R),
        ("uid", "uid", _uint, _O),
        ("gid", "gid", _uint, _O),
    ),
    "data": (
        ("id", "id", _uint, _R),
        ("ch", "ch", _uint, _R),
        ("d", "data", _bin, _R),
    ),
    "eof": (
        ("id", "id", _uint, _R),
        ("ch", "ch", _uint, _R),
        ("n", "n", _uint, _O),
    ),
    "window": (
        ("id", "id", _uint, _R),
        ("ch", "ch", _uint, _R),
        ("n", "n", _uint, _R),
    ),
    "stop": (("id", "id", _uint, _R), ("ch", "ch", _uint, _R)),
    "signal": (("id", "id", _uint, _R), ("sig", "sig", _str, _R)),
    "signal_ack": (
        ("id", "id", _uint, _R),
        ("sig", "sig", _str, _R),
        ("errno", "errno", _str, _O),
    ),
    "exit": (
        ("id", "id", _uint, _R),
        ("code", "code", _int, _R),
        ("sig", "sig", _str, _O),
        ("core", "core", _bool, _O),
    ),
    "error": (
        ("kind", "kind", _str, _R),
        ("msg", "msg", _str, _R),
        ("id", "id", _uint, _O),
        ("errno", "errno", _str, _O),
        ("ref", "ref", _str, _O),
        ("ch", "ch", _uint, _O),
    ),
    "log": (
        ("level", "level", _str, _R),
        ("msg", "msg", _str, _R),
        ("attrs", "attrs", _str_map, _O),
    ),
    "close": (("id", "id", _uint, _R),),
    "closed": (("id", "id", _uint, _R),),
    "config": (
        ("env_keep", "env_keep", _list_of(_str), _O),
        ("env_remove", "env_remove", _list_of(_str), _O),
    ),
    "shutdown": (),
    "goodbye": (),
    "ping": (("n", "n", _uint, _R),),
    "pong": (("n", "n", _uint, _R),),
}
assert _FIELDS.keys() == FRAME_TYPES.keys()


def decode_body(body: Mapping[str, object]) -> Frame:
    """Build the frame described by an unpacked msgpack map.

    Raises :class:`FrameInvalid` (kind ``unknown-type``, ``bad-frame``, ``bad-fd``,
    ``bad-signal``) naming the frame type and the field at fault.
    """
    ftype = body.get("t")
    if type(ftype) is not str:
        raise FrameInvalid(ErrorKind.BAD_FRAME, "frame has no string field 't' (its type)")
    fields = _FIELDS.get(ftype)
    if fields is None:
        raise FrameInvalid(ErrorKind.UNKNOWN_TYPE, f"unknown frame type {_clip(ftype)}")
    if ftype == "hello":
        # Checked before the other fields: another version may shape its hello differently.
        version = body.get("version")
        if type(version) is int and 0 <= version != PROTOCOL_VERSION:
            raise FrameInvalid(
                ErrorKind.VERSION_MISMATCH,
                f"hello frame: peer speaks protocol version {version}, "
                f"this side speaks {PROTOCOL_VERSION}",
            )
    kwargs: dict[str, object] = {}
    for key, attr, convert, required in fields:
        value = body.get(key)
        if value is None:
            if required:
                raise FrameInvalid(
                    ErrorKind.BAD_FRAME, f"{ftype} frame: missing field {key!r}"
                )
            continue  # the dataclass default applies
        try:
            kwargs[attr] = convert(value)
        except _BadField as exc:
            raise FrameInvalid(
                ErrorKind.BAD_FRAME,
                f"{ftype} frame: field {key!r} must be {exc}, not {_describe(value)}",
            ) from None
    frame = FRAME_TYPES[ftype](**kwargs)
    check_frame(frame)
    return frame


# Bounded in depth and length: a plain repr() of a deeply nested msgpack value raises
# RecursionError, and error messages travel back to the peer inside one frame.
_REPR: Final = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = 40


_MSGPACK_TYPES: Final = {int: "integer", str: "str", bytes: "bin", type(None): "nil",
                         bool: "boolean", float: "float", list: "array", dict: "map",
                         msgpack.ExtType: "ext", msgpack.Timestamp: "timestamp"}


def msgpack_type(value: object) -> str:
    """The msgpack name of an unpacked value's type: the peer's terms, not Python's."""
    return _MSGPACK_TYPES.get(type(value), "value")


def _describe(value: object) -> str:
    """A peer's value in an error message: its msgpack type and a short rendering."""
    if isinstance(value, msgpack.ExtType):
        return f"ext of type {value.code}"
    if isinstance(value, msgpack.Timestamp):
        return "timestamp"
    text = _REPR.repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{msgpack_type(value)} {text}"


def _clip(text: str) -> str:
    """``repr(text)``, shortened when long (peer-chosen strings echoed in messages)."""
    return _REPR.repr(text)


# ---------------------------------------------------------------------------- content rules

#: The smallest ``max_frame`` a hello may announce: room for any control frame.
MIN_MAX_FRAME: Final = 65536
#: The ``role`` values a hello may carry.
ROLES: Final = ("agent", "controller")


def check_frame(frame: Frame) -> None:
    """Rules on a frame's content beyond field types (shared by both directions)."""
    if isinstance(frame, Exec):
        _check_exec(frame)
    elif isinstance(frame, Signal):
        if frame.sig not in SIGNAL_NAMES:
            hint = " (names go without the SIG prefix)" if frame.sig.startswith("SIG") else ""
            raise FrameInvalid(
                ErrorKind.BAD_SIGNAL,
                f"signal frame: unknown signal name {_clip(frame.sig)}{hint}",
            )
    elif isinstance(frame, Window):
        if frame.n == 0:
            raise FrameInvalid(ErrorKind.BAD_FRAME, "window frame: field 'n' must be > 0")
    elif isinstance(frame, Hello):
        if frame.max_frame < MIN_MAX_FRAME:
            raise FrameInvalid(
                ErrorKind.HANDSHAKE,
                f"hello frame: max_frame {frame.max_frame} is below the minimum {MIN_MAX_FRAME}",
            )
        if frame.window == 0:
            raise FrameInvalid(ErrorKind.HANDSHAKE, "hello frame: window must be > 0")
        if frame.role is not None and frame.role not in ROLES:
            raise FrameInvalid(
                ErrorKind.HANDSHAKE,
                f"hello frame: role must be 'agent' or 'controller', not {_clip(frame.role)}",
            )
    elif isinstance(frame, Config):
        for name, patterns in (("env_keep", frame.env_keep), ("env_remove", frame.env_remove)):
            for pattern in patterns or ():
                if not pattern:
                    raise FrameInvalid(
                        ErrorKind.BAD_FRAME, f"config frame: empty pattern in {name!r}"
                    )
    elif isinstance(frame, (Log, Error)):
        pass


def _check_exec(frame: Exec) -> None:
    if not frame.argv:
        raise FrameInvalid(ErrorKind.BAD_FRAME, "exec frame: argv must not be empty")
    for name, values in (
        ("path", () if frame.path is None else (frame.path,)),
        ("cwd", () if frame.cwd is None else (frame.cwd,)),
        ("argv", frame.argv),
        ("env", frame.env or ()),
        ("env_set", frame.env_set),
        ("env_unset", frame.env_unset),
    ):
        for index, value in enumerate(values):
            if b"\0" in value:
                raise FrameInvalid(
                    ErrorKind.BAD_FRAME,
                    f"exec frame: {name}[{index}] contains a NUL byte"
                    if name not in ("path", "cwd")
                    else f"exec frame: {name} contains a NUL byte",
                )
    if frame.path == b"" or frame.cwd == b"":
        raise FrameInvalid(ErrorKind.BAD_FRAME, "exec frame: path and cwd must not be empty")
    for name, entries in (("env", frame.env or ()), ("env_set", frame.env_set)):
        for index, entry in enumerate(entries):
            if entry.find(b"=") <= 0:
                raise FrameInvalid(
                    ErrorKind.BAD_FRAME,
                    f"exec frame: {name}[{index}] {entry[:40]!r} is not of the form K=V",
                )
    for index, entry in enumerate(frame.env_unset):
        if not entry or b"=" in entry:
            raise FrameInvalid(
                ErrorKind.BAD_FRAME,
                f"exec frame: env_unset[{index}] {entry[:40]!r} is not a variable name",
            )
    seen: set[int] = set()
    for fd in frame.fds:
        if fd < 3:
            raise FrameInvalid(
                ErrorKind.BAD_FD,
                f"exec frame: fd {fd} in fds is a standard stream; extra fds must be >= 3",
            )
        if fd > 2**31 - 1:
            raise FrameInvalid(ErrorKind.BAD_FD, f"exec frame: fd {fd} in fds is out of range")
        if fd in seen:
            raise FrameInvalid(ErrorKind.BAD_FD, f"exec frame: fd {fd} appears twice in fds")
        seen.add(fd)
