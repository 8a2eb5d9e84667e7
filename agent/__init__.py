"""mproxy-agent: runs many children for one controller over one byte stream.

Public API:

- :func:`serve` — run the agent over a :class:`~link.Transport` until the
  connection ends; every child is killed and reaped before it returns.
- :func:`start_guardian` — fork the process that ends the children's groups if the
  agent is killed outright (SIGKILL, the OOM killer); pass it to :func:`serve`.
- :class:`FdTransport` (pipes, sockets, stdio) and :class:`StreamTransport` (trio
  streams, e.g. in-memory for tests), from :mod:`link`.

The command line (``mproxy-agent``, ``python -m agent``) is in ``agent._cli``.
"""

from __future__ import annotations

from link import FdTransport, StreamTransport, Transport, __version__
from protocol import DEFAULT_MAX_FRAME, DEFAULT_WINDOW

from ._agent import Agent
from ._guardian import Guardian, start_guardian

__all__ = [
    "FdTransport",
    "Guardian",
    "StreamTransport",
    "Transport",
    "__version__",
    "serve",
    "start_guardian",
]

async def serve(
    transport: Transport,
    *,
    grace: float = 5.0,
    max_children: int = 10_000,
    log_level: str = "info",
    reap_orphans: bool = False,
    guardian: Guardian | None = None,
    contained: bool = False,
    window: int = DEFAULT_WINDOW,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> int:
    """Serve one controller over ``transport``; return the exit status (0 clean, 1 after
    a protocol failure or an internal error).

    Ends when the controller closes the stream, stops reading (EPIPE), breaks the
    protocol fatally, or completes a ``shutdown``; or when cancelled. After a
    ``shutdown``, the stream's end is a half-close: the shutdown goes on until the
    children finish, unless the transport reports the peer gone
    (:meth:`Transport.wait_peer_gone`). In every case each
    child's process group gets SIGHUP and SIGTERM, SIGKILL after ``grace`` seconds, and
    every child is reaped before this returns. ``reap_orphans`` (for a process that made
    itself a child subreaper) also reaps and kills descendants re-parented to it.
    ``guardian`` (from :func:`start_guardian`, in the agent's own process) is told of
    every child's process group, so that it ends them if this process is killed
    outright. ``contained`` says that this process moved into a cgroup of its own
    (``mproxy-agent`` does, where it may), announced in the hello's ``caps``. The
    transport is not closed.
    """
    agent = Agent(
        transport,
        grace=grace,
        max_children=max_children,
        log_level=log_level,
        reap_orphans=reap_orphans,
        guardian=guardian,
        contained=contained,
        window=window,
        max_frame=max_frame,
        version=__version__,
    )
    return await agent.run()
