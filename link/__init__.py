"""The link: a protocol connection carried over a byte transport, under both ends.

``protocol`` knows frames and their rules but performs no I/O; the agent and the
controller each run one connection over a stream. What they share is here, so that
neither depends on the other:

- :class:`Transport` and its implementations :class:`FdTransport` (pipes, sockets,
  stdio) and :class:`StreamTransport` (trio streams, e.g. in-memory for tests);
- :class:`FrameWriter` (a connection's single writer) and :func:`receive_frames` (the
  frames a transport delivers);
- :class:`Link`, which owns a connection, its writer and whether it has ended, and
  runs both loops for the end it serves (a :class:`Receiver`);
- ``__version__``, the distribution's version, which both ends announce in their hello.
"""

from __future__ import annotations

from ._link import Link, Receiver
from ._transport import (
    Buffer,
    FdTransport,
    StreamTransport,
    Transport,
    enlarge_pipe,
    fill_standard_fds,
)
from ._version import __version__
from ._wire import FrameWriter, receive_frames

__all__ = [
    "Buffer",
    "FdTransport",
    "FrameWriter",
    "Link",
    "Receiver",
    "StreamTransport",
    "Transport",
    "__version__",
    "enlarge_pipe",
    "fill_standard_fds",
    "receive_frames",
]
