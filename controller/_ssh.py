"""Agents over ssh: the ssh command line for a destination and its options."""

from __future__ import annotations

import os
import shlex
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from protocol import DEFAULT_MAX_FRAME

from ._agent import RECEIVE_WINDOW, Agent, open_agent


def ssh_argv(
    destination: str,
    remote_command: Sequence[str],
    *,
    ssh_options: Sequence[str] = (),
    ssh_config: str | os.PathLike[str] | None = None,
    ssh: Sequence[str] = ("ssh",),
) -> list[str]:
    """The argv that runs ``remote_command`` on ``destination``: ``ssh [-F config]
    [-o option]... -- destination 'command'...``. ``ssh_options`` are ssh's ``-o``
    options (``"Port=2222"``, ``"IdentityFile=~/.ssh/id"``, ``"ProxyJump=bastion"``).
    ssh hands the remote login shell one string; each word of ``remote_command`` is
    quoted in it, so it arrives as the same words. A destination that is empty or
    starts with ``-`` (which ssh would take for an option) raises ValueError."""
    if not destination or destination.startswith("-"):
        raise ValueError(f"ssh destination {destination!r}: empty or starts with '-'")
    argv = list(ssh)
    if ssh_config is not None:
        argv += ["-F", os.fspath(ssh_config)]
    for option in ssh_options:
        argv += ["-o", option]
    return [*argv, "--", destination, shlex.join(remote_command)]


@asynccontextmanager
async def open_ssh_agent(
    destination: str,
    *,
    ssh_options: Sequence[str] = (),
    ssh_config: str | os.PathLike[str] | None = None,
    ssh: Sequence[str] = ("ssh",),
    agent_command: Sequence[str] = ("mproxy-agent",),
    window: int = RECEIVE_WINDOW,
    max_frame: int = DEFAULT_MAX_FRAME,
    agent_args: Sequence[str] = (),
    stderr: int | None = None,
    shutdown_timeout: float = 30.0,
    handshake_timeout: float = 30.0,
) -> AsyncIterator[Agent]:
    """Open an agent on ``destination`` over ssh (see :func:`ssh_argv` for
    ``ssh_options``, ``ssh_config`` and ``ssh``), running ``agent_command`` there; the
    other arguments and the guarantees are :func:`open_agent`'s. ssh is the transport:
    its configuration, keys, agent forwarding, ProxyJump and ControlMaster all apply."""
    argv = ssh_argv(destination, [*agent_command, *agent_args], ssh_options=ssh_options,
                    ssh_config=ssh_config, ssh=ssh)
    async with open_agent(
        argv, window=window, max_frame=max_frame, stderr=stderr,
        shutdown_timeout=shutdown_timeout, handshake_timeout=handshake_timeout,
    ) as agent:
        yield agent
