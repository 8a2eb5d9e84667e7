"""The agent behind a real OpenSSH server (tests/sshd.py): the library and mproxy-exec over
ssh, and what happens to the remote children when the ssh link dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import all_procs, group_all, group_members, proc_stat, read_all, wait_until
from sshd import SshServer, sshd

import controller

__all__ = ["sshd"]  # the fixture, re-exported for pytest

pytestmark = pytest.mark.ssh

GRACE = 1.0
MPROXY_EXEC = str(Path(sys.executable).parent / "mproxy-exec")


async def echo_through(send: trio.abc.SendStream, receive: trio.abc.ReceiveStream,
                       payload: bytes, *, half_close: bool = False) -> bytes:
    """Send ``payload`` (then EOF) while reading everything that comes back."""
    received = b""

    async def reader() -> None:
        nonlocal received
        received = await read_all(receive)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for start in range(0, len(payload), 50_000):  # several frames, several windows
            await send.send_all(payload[start:start + 50_000])
        if half_close:
            assert isinstance(send, trio.abc.HalfCloseableStream)
            await send.send_eof()
        else:
            await send.aclose()
    return received


def ssh_clients_of_this_process() -> list[int]:
    """Our ssh child processes (the transport open_agent started)."""
    me = os.getpid()
    found = []
    for pid, (_, ppid, _) in all_procs().items():
        if ppid != me:
            continue
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if os.path.basename(argv0) == b"ssh":
            found.append(pid)
    return found


def pid_of(process: controller.RemoteProcess) -> int:
    assert process.pid is not None
    return process.pid


def parent_of(pid: int) -> int:
    stat = proc_stat(pid)
    assert stat is not None, f"process {pid} is gone"
    return stat[1]


# ---------------------------------------------------------------------------- library


async def test_streams_both_ways_over_ssh(sshd: SshServer) -> None:
    payload = os.urandom(3 << 20)  # 3 windows' worth, every byte value
    with trio.fail_after(60):
        async with controller.open_agent(sshd.agent_command("--grace", str(GRACE))) as agent:
            assert agent.info.impl == "mproxy-agent"
            async with await agent.open_process(["cat"]) as cat:
                assert await echo_through(cat.stdin, cat.stdout, payload) == payload
                assert await cat.wait() == 0
            # stderr is its own stream; the exit code comes through unchanged
            async with await agent.open_process(
                ["sh", "-c", "cat >&2; printf out; exit 42"]
            ) as proc:
                async with trio.open_nursery() as nursery:
                    out: list[bytes] = []

                    async def stdout() -> None:
                        out.append(await read_all(proc.stdout))

                    nursery.start_soon(stdout)
                    assert await echo_through(proc.stdin, proc.stderr, payload) == payload
                assert out == [b"out"]
                assert await proc.wait() == 42
                assert proc.exit_code == 42


async def test_extra_fd_over_ssh(sshd: SshServer) -> None:
    payload = os.urandom(1 << 20)
    with trio.fail_after(60):
        async with (
            controller.open_agent(sshd.agent_command("--grace", str(GRACE))) as agent,
            # cat reads fd 3 and writes it back to fd 3 (a socket: both directions).
            await agent.open_process(["sh", "-c", "cat <&3 >&3"], extra_fds=[3]) as proc,
        ):
            fd3 = proc.fds[3]
            assert await echo_through(fd3, fd3, payload, half_close=True) == payload
            assert await proc.wait() == 0


async def test_a_closed_output_stream_gives_the_remote_writer_epipe(sshd: SshServer) -> None:
    # A Python writer (it ignores SIGPIPE) exits 3 on BrokenPipeError.
    script = ("import os, sys\n"
              "try:\n"
              "    while True: os.write(1, b'line\\n')\n"
              "except BrokenPipeError:\n"
              "    sys.exit(3)\n")
    with trio.fail_after(60):
        async with (
            controller.open_agent(sshd.agent_command("--grace", str(GRACE))) as agent,
            await agent.open_process(["python3", "-c", script]) as proc,
        ):
            assert await proc.stdout.receive_some(5) == b"line\n"
            await proc.stdout.aclose()
            with trio.fail_after(10):
                assert await proc.wait() == 3


async def test_signals_and_exit_statuses_over_ssh(sshd: SshServer) -> None:
    handler = (
        "import os, signal\n"
        "signal.signal(signal.SIGUSR1, lambda *_: (os.write(1, b'usr1\\n'), os._exit(3)))\n"
        "os.write(1, b'ready\\n')\n"
        "signal.pause()\n"
    )
    with trio.fail_after(60):
        async with controller.open_agent(sshd.agent_command("--grace", str(GRACE))) as agent:
            async with await agent.open_process(["python3", "-c", handler]) as proc:
                assert await proc.stdout.receive_some() == b"ready\n"
                await proc.send_signal(signal.SIGUSR1)
                assert await read_all(proc.stdout) == b"usr1\n"
                assert await proc.wait() == 3
            async with await agent.open_process(["sleep", "1000"]) as sleeper:
                await sleeper.terminate()
                assert await sleeper.wait() == -signal.SIGTERM
                assert (sleeper.exit_code, sleeper.signal) == (143, "TERM")
            with pytest.raises(FileNotFoundError):
                await agent.open_process(["/nonexistent/program"])
            result = await agent.run_process(["sh", "-c", "exit 7"], check=False)
            assert result.returncode == 7


async def test_arguments_are_never_interpreted_by_a_shell(
    sshd: SshServer, tmp_path: Path
) -> None:
    """The agent command goes through the remote login shell; the children's argv never
    does: shell syntax in an argument arrives literally."""
    target = tmp_path / "pwned"
    args = [f"$(touch {target})", f"`touch {target}`", f"; touch {target}", "'\"*?\\"]
    with trio.fail_after(60):
        async with controller.open_agent(sshd.agent_command()) as agent:
            result = await agent.run_process(["echo", *args], capture_stdout=True)
    assert result.stdout == " ".join(args).encode() + b"\n"
    assert not target.exists()


# ---------------------------------------------------------------------------- mproxy-exec


async def mproxy_exec(sshd: SshServer, *argv: str, stdin: bytes = b""
                      ) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [MPROXY_EXEC, "--agent", sshd.agent_command_line("--grace", str(GRACE)), "--", *argv],
        stdin=stdin, capture_stdout=True, capture_stderr=True, check=False,
    )


async def test_mproxy_exec_over_ssh(sshd: SshServer) -> None:
    payload = os.urandom(700_000) + bytes(range(256))
    with trio.fail_after(90):
        done = await mproxy_exec(sshd, "sh", "-c", "cat; printf tail >&2; exit 3",
                                 stdin=payload)
        assert (done.returncode, done.stdout, done.stderr) == (3, payload, b"tail")
        killed = await mproxy_exec(sshd, "sh", "-c", "kill -TERM $$")
        assert (killed.returncode, killed.stdout) == (143, b"")
        missing = await mproxy_exec(sshd, "/nonexistent/program")
        assert missing.returncode == 127
        assert b"/nonexistent/program" in missing.stderr


# ---------------------------------------------------------------------------- link loss


async def test_killing_the_ssh_client_kills_every_remote_child(sshd: SshServer) -> None:
    """SIGKILL the local ssh: sshd closes the agent's stdin, and the agent kills every
    child's whole process group (a TERM-ignoring one after the grace period), reaps them
    all and exits."""
    # Leaving the block raises AgentLost too, with ssh's exit status.
    with trio.fail_after(60), pytest.raises(controller.AgentLost, match="exit status -9"):
        async with controller.open_agent(sshd.agent_command("--grace", str(GRACE))) as agent:
            (ssh_pid,) = ssh_clients_of_this_process()
            procs = [
                await agent.open_process(["sh", "-c", "sleep 1000 & sleep 1000 & wait"]),
                await agent.open_process(  # ignores TERM and HUP, and so do its children
                    ["sh", "-c", "trap '' TERM HUP; sleep 1000 & sleep 1000 & echo up; wait"]),
                await agent.open_process(["cat"]),  # stdin open, blocked reading
            ]
            assert await procs[1].stdout.receive_some() == b"up\n"
            groups = [pid_of(p) for p in procs]
            agent_pid = parent_of(groups[0])
            await wait_until(lambda: all(len(group_members(g)) >= 3 for g in groups[:2]),
                             what="the grandchildren to start")
            os.kill(ssh_pid, signal.SIGKILL)

            def all_gone() -> bool:
                # The agent has exited once it is a zombie: sshd's session process is
                # gone too, so init reaps it, which here took up to 2 s more (1 failure
                # in 5 runs with the agent required to be reaped within GRACE + 2).
                agent = proc_stat(agent_pid)
                return (agent is None or agent[0] == "Z") and not any(
                    group_all(g) for g in groups)

            await wait_until(all_gone, timeout=GRACE + 2,
                             what="the remote agent and every child group to be gone")
            with pytest.raises(controller.AgentLost):
                await procs[2].wait()
    leftovers = [pid for pid, (_, ppid, _) in all_procs().items() if ppid == agent_pid]
    assert leftovers == []


async def test_open_ssh_agent_passes_the_ssh_options_and_agent_arguments(
    sshd: SshServer,
) -> None:
    options = [f"Port={sshd.port}", f"IdentityFile={sshd.key}", "StrictHostKeyChecking=no",
               "UserKnownHostsFile=/dev/null", "BatchMode=yes", "LogLevel=ERROR"]
    with trio.fail_after(60):
        async with controller.open_ssh_agent(
            f"{sshd.user}@{sshd.host}", ssh_options=options,
            agent_command=[sshd.agent_path], agent_args=["--grace", "1"],
        ) as agent:
            result = await agent.run_process(["sh", "-c", "printf %s \"$0\"", "it's"],
                                             capture_stdout=True)
            assert result.stdout == b"it's"


def test_ssh_argv_refuses_a_destination_ssh_would_take_for_an_option() -> None:
    for bad in ("", "-oProxyCommand=touch /tmp/x"):
        with pytest.raises(ValueError, match="destination"):
            controller.ssh_argv(bad, ["true"])
    assert controller.ssh_argv("h", ["a b", "c"], ssh_options=["Port=2"], ssh_config="f") == [
        "ssh", "-F", "f", "-o", "Port=2", "--", "h", "'a b' c"]
