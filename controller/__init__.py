"""Controller library for mproxy agents: run processes through an agent as if local.

The API mirrors trio's subprocess API::

    async with controller.open_agent() as agent:            # or ["ssh", host, "mproxy-agent"]
        result = await agent.run_process(["uname", "-a"], capture_stdout=True)
        async with await agent.open_process(["cat"]) as proc:
            await proc.stdin.send_all(b"hello")
            await proc.stdin.aclose()
            print(await proc.stdout.receive_some())
            print(await proc.wait())

The ``mproxy-exec`` command line is in ``controller._cli``.
"""

from ._agent import Agent, connect, open_agent
from ._errors import (
    AgentClosed,
    AgentError,
    AgentLost,
    AgentStartError,
    NoPython,
    PayloadUploadFailed,
    PayloadVerificationFailed,
    PythonTooOld,
    RemoteError,
    SshFailed,
    collapse_group,
)
from ._process import RemoteProcess
from ._ssh import open_ssh_agent, ssh_argv
from ._streams import RemoteFdStream, RemoteReceiveStream, RemoteSendStream

__all__ = [
    "Agent",
    "AgentClosed",
    "AgentError",
    "AgentLost",
    "AgentStartError",
    "NoPython",
    "PayloadUploadFailed",
    "PayloadVerificationFailed",
    "PythonTooOld",
    "RemoteError",
    "RemoteFdStream",
    "RemoteProcess",
    "RemoteReceiveStream",
    "RemoteSendStream",
    "SshFailed",
    "collapse_group",
    "connect",
    "open_agent",
    "open_ssh_agent",
    "ssh_argv",
]
