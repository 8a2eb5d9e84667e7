"""Agents over ssh: the ssh command line for a destination and its options."""

from __future__ import annotations

import os
import shlex
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from protocol import DEFAULT_MAX_FRAME

from ._agent import RECEIVE_WINDOW, Agent, open_command_agent
from ._payload import payload
from ._stage import stage_command


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
    return [*_ssh_prefix(destination, ssh_options=ssh_options, ssh_config=ssh_config, ssh=ssh),
            shlex.join(remote_command)]


def _ssh_prefix(
    destination: str, *, ssh_options: Sequence[str],
    ssh_config: str | os.PathLike[str] | None, ssh: Sequence[str],
) -> list[str]:
    if not destination or destination.startswith("-"):
        raise ValueError(f"ssh destination {destination!r}: empty or starts with '-'")
    argv = list(ssh)
    if ssh_config is not None:
        argv += ["-F", os.fspath(ssh_config)]
    for option in ssh_options:
        argv += ["-o", option]
    return [*argv, "--", destination]


@asynccontextmanager
async def open_ssh_agent(
    destination: str,
    *,
    ssh_options: Sequence[str] = (),
    ssh_config: str | os.PathLike[str] | None = None,
    ssh: Sequence[str] = ("ssh",),
    agent_command: Sequence[str] | None = None,
    python: str = "python3",
    window: int = RECEIVE_WINDOW,
    max_frame: int = DEFAULT_MAX_FRAME,
    agent_args: Sequence[str] = (),
    stderr: int | None = None,
    shutdown_timeout: float = 30.0,
    handshake_timeout: float = 30.0,
) -> AsyncIterator[Agent]:
    """Open an agent on ``destination`` over ssh (see :func:`ssh_argv` for
    ``ssh_options``, ``ssh_config`` and ``ssh``); the other arguments and the guarantees
    are :func:`open_agent`'s. ssh is the transport: its configuration, keys, agent
    forwarding, ProxyJump and ControlMaster all apply.

    By default nothing needs to be installed on the host but ``python`` (3.11 or later):
    the agent's code, as installed here, is sent over the same connection the first time
    and kept in the remote user's cache (``~/.cache/mproxy-agent``, 0700), checked by
    its sha256 on every start. Then a start costs no round trip more than an installed
    agent; the first one costs one more, and about 420 KB. ``agent_command`` instead runs
    an installed agent, exactly as given (``["mproxy-agent"]``).

    Whatever the login's shell start-up files print first is skipped (and logged at
    debug level on the ``mproxy.controller`` logger). A start that fails raises an
    :class:`AgentStartError` that names the host: :class:`SshFailed` (with ssh's own
    message), :class:`NoPython`, :class:`PythonTooOld`, :class:`PayloadUploadFailed`,
    :class:`PayloadVerificationFailed`; every wait is bounded by ``handshake_timeout``.
    """
    if agent_command is None:
        code = payload()
        remote = stage_command(python, code, agent_args)
    else:
        code = None
        remote = shlex.join([*agent_command, *agent_args])
    argv = _ssh_prefix(destination, ssh_options=ssh_options, ssh_config=ssh_config, ssh=ssh)
    async with open_command_agent(
        [*argv, remote], where=destination, payload=code, python=python, window=window,
        max_frame=max_frame, stderr=stderr, shutdown_timeout=shutdown_timeout,
        handshake_timeout=handshake_timeout,
    ) as agent:
        yield agent
