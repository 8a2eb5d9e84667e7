"""Exceptions raised by the controller library."""

from __future__ import annotations

import trio

__all__ = ["AgentClosed", "AgentError", "AgentLost", "RemoteError"]


class AgentError(Exception):
    """Base class: something went wrong with the agent rather than with a child."""


class AgentLost(AgentError, trio.BrokenResourceError):
    """The agent went away (its process died, the ssh link dropped, it broke the
    protocol) before answering. Raised from every pending and later call: a lost exit
    status is never reported as a number."""


class AgentClosed(AgentError, trio.ClosedResourceError):
    """The agent was closed: its block has ended (or ``aclose()`` was called), so it takes
    no new requests. Raised at once by every later call (``open_process``,
    ``run_process``, ``ping``, ``configure_env``); a new block opens a new agent."""


class RemoteError(AgentError):
    """The agent answered with an error frame; ``kind`` and ``errno`` are its fields."""

    def __init__(self, kind: str, message: str, errno: str | None = None) -> None:
        super().__init__(f"{kind}: {message}" + (f" ({errno})" if errno else ""))
        self.kind = kind
        self.message = message
        self.errno = errno
