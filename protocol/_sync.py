"""Finding the agent's hello in a byte stream that may start with something else."""

from __future__ import annotations

from typing import Final

from ._codec import HEADER_SIZE

__all__ = ["HELLO_SIGNATURE", "find_hello"]

#: The msgpack bytes of ``"t": "hello"``: an encoder that writes ``t`` first (the
#: reference encoder, which every hello of ours comes from) starts a hello body with a
#: fixmap byte and these.
HELLO_SIGNATURE: Final = b"\xa1t\xa5hello"


def find_hello(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The offset in ``data``, at or after ``start``, of the first hello frame (its
    length prefix), or -1 when there is none yet.

    For a controller whose agent runs behind a login shell that may print first
    (docs/protocol.md, section 2): what comes before that offset is not the protocol.
    A hello is recognised by :data:`HELLO_SIGNATURE` after a fixmap byte, itself after
    the 4 bytes of the length prefix. When -1 is returned, a hello may still begin in the
    last ``len(HELLO_SIGNATURE) + HEADER_SIZE + 1`` bytes: keep those for the next search."""
    view = bytes(data) if isinstance(data, memoryview) else data
    at = view.find(HELLO_SIGNATURE, start + HEADER_SIZE + 1)
    while at != -1:
        if 0x81 <= view[at - 1] <= 0x8F:
            return at - 1 - HEADER_SIZE
        at = view.find(HELLO_SIGNATURE, at + 1)
    return -1
