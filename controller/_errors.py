"""Exceptions raised by the controller library."""

from __future__ import annotations

import trio

from link import Link

__all__ = ["AgentClosed", "AgentError", "AgentLost", "AgentStartError", "NoPython",
           "PayloadUploadFailed", "PayloadVerificationFailed", "PythonTooOld", "RemoteError",
           "SshFailed", "collapse_group", "raise_if_lost"]


class AgentError(Exception):
    """Base class: something went wrong with the agent rather than with a child."""


class AgentLost(AgentError, trio.BrokenResourceError):
    """The agent went away (its process died, the ssh link dropped, it broke the
    protocol) before answering. Raised from every pending and later call: a lost exit
    status is never reported as a number."""


class AgentStartError(AgentLost):
    """The agent could not be started: raised from ``open_agent`` or ``open_ssh_agent``
    before its block runs. The message names the host and says what was found there
    (and, where ssh failed, ssh's own message). The subclasses tell the causes apart."""


class SshFailed(AgentStartError):
    """ssh itself failed (exit status 255 before the agent started): the host is unknown
    or unreachable, authentication failed, the host key did not match."""


class NoPython(AgentStartError):
    """The host has no Python interpreter by the name asked for (``python3``) in its
    login's PATH, so the agent cannot be started there without installing anything."""


class PythonTooOld(AgentStartError):
    """The host's Python is older than the agent needs; the message says both versions."""


class PayloadUploadFailed(AgentStartError):
    """The connection ended while the agent's code was being sent to the host."""


class PayloadVerificationFailed(AgentStartError):
    """The agent's code arrived on the host with the wrong sha256, twice: it was not run."""


def raise_if_lost(link: Link) -> None:
    """Raise :class:`AgentLost`, saying why, once the link to the agent has ended (a
    controller's link ends only when its agent is lost)."""
    if link.ended is not None:
        raise AgentLost(link.ended)


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


def collapse_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What a nursery's ExceptionGroup means when its tasks all used one agent: the
    group's only exception when it holds one (however deeply nested), the first
    :class:`AgentLost` when every exception in it is one (the agent's loss, hit by
    several tasks at once); otherwise ``group`` itself, unchanged. Never raises."""
    leaves = _leaves(group)
    if len(leaves) == 1 or all(isinstance(leaf, AgentLost) for leaf in leaves):
        return leaves[0]
    return group


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
