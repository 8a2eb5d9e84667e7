"""What a child can get from the agent: no fd of the agent's, no way back to root after a
sudo drop, none of the dangerous inherited variables, and nothing executed but the argv
the controller sent.

Every test runs a real local agent process (``python -m agent``), started with the
environment under test.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

import controller

PYTHON3 = "/usr/bin/python3"  # readable by nobody (our venv's python may not be)
# Lists the shell's own fds; "; true" keeps sh from exec'ing ls (whose listing would
# include the directory it reads).
LIST_FDS = ["sh", "-c", "ls /proc/$$/fd; true"]
MPROXY_EXEC = str(Path(sys.executable).parent / "mproxy-exec")


@asynccontextmanager
async def agent_with_env(**env: str) -> AsyncIterator[controller.Agent]:
    """A local agent whose environment has ``env`` added."""
    env_program = shutil.which("env")
    assert env_program is not None
    settings = [f"{k}={v}" for k, v in env.items()]
    command = [env_program, *settings, sys.executable, "-m", "agent", "--grace", "2"]
    async with controller.open_agent(command) as agent:
        yield agent


def fd_listing(output: bytes | None) -> list[int]:
    assert output is not None
    return sorted(int(name) for name in output.split())


def status_fields(text: bytes | None) -> dict[str, str]:
    assert text is not None
    fields = {}
    for line in text.decode().splitlines():
        key, _, value = line.partition(":")
        fields[key] = " ".join(value.split())
    return fields


# ---------------------------------------------------------------------------- fds


async def test_no_agent_fd_leaks_into_any_child(local_agent: controller.Agent) -> None:
    """With many children holding pipes and sockets open (and data moving), every new
    child has exactly 0, 1, 2 and the extra fds it asked for, whichever way it was
    started (plain, or with extra fds placed)."""
    agent = local_agent
    with trio.fail_after(60):
        busy = [await agent.open_process(["cat"], extra_fds=[3, 4]) for _ in range(30)]
        try:
            for i, proc in enumerate(busy):
                await proc.stdin.send_all(b"in flight %d\n" % i)  # echoed, left unread
            layouts: list[list[int]] = [[], [3], [3, 7], [5, 9, 200]] * 5
            listings: dict[int, list[int]] = {}

            async def probe(index: int) -> None:
                async with await agent.open_process(LIST_FDS, extra_fds=layouts[index]
                                                    ) as proc:
                    out = bytearray()
                    while chunk := await proc.stdout.receive_some():
                        out += chunk
                    assert await proc.wait() == 0
                    listings[index] = fd_listing(bytes(out))

            async with trio.open_nursery() as nursery:
                for index in range(len(layouts)):
                    nursery.start_soon(probe, index)
            assert listings == {i: [0, 1, 2, *fds] for i, fds in enumerate(layouts)}
        finally:
            for proc in busy:
                await proc.aclose()


# ---------------------------------------------------------------------------- sudo drop


async def test_drop_sudo_children_cannot_regain_root() -> None:
    """Agent run as root by sudo for uid/gid 65534: a drop-sudo child has that uid and
    gid everywhere (real, effective, saved, fs), only that group, no capability, and
    cannot switch back."""
    attempts = (
        "import os\n"
        "for name, call in [('setuid', lambda: os.setuid(0)),"
        " ('seteuid', lambda: os.seteuid(0)), ('setresuid', lambda: os.setresuid(0, 0, 0)),"
        " ('setgid', lambda: os.setgid(0)), ('setgroups', lambda: os.setgroups([0]))]:\n"
        "    try:\n"
        "        call()\n"
        "        print(name, 'succeeded')\n"
        "    except PermissionError as exc:\n"
        "        print(name, exc.errno)\n"
    )
    with trio.fail_after(30):
        async with agent_with_env(SUDO_UID="65534", SUDO_GID="65534") as agent:
            status = await agent.run_process(["cat", "/proc/self/status"], cwd="/",
                                             capture_stdout=True, drop_sudo_credentials=True)
            fields = status_fields(status.stdout)
            assert fields["Uid"] == "65534 65534 65534 65534"
            assert fields["Gid"] == "65534 65534 65534 65534"
            assert fields["Groups"] == "65534"
            for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                assert int(fields[cap], 16) == 0, cap

            setuid = await agent.run_process(
                [PYTHON3, "-c", "import os; os.setuid(0)"], cwd="/", capture_stderr=True,
                check=False, drop_sudo_credentials=True)
            assert setuid.returncode == 1
            assert setuid.stderr is not None
            assert b"PermissionError: [Errno 1] Operation not permitted" in setuid.stderr

            tries = await agent.run_process([PYTHON3, "-c", attempts], cwd="/",
                                            capture_stdout=True, drop_sudo_credentials=True)
            assert tries.stdout == (b"setuid 1\nseteuid 1\nsetresuid 1\nsetgid 1\n"
                                    b"setgroups 1\n")

            # The drop goes through its own start path: it leaks no fd either.
            listing = await agent.run_process(LIST_FDS, cwd="/", capture_stdout=True,
                                              drop_sudo_credentials=True)
            assert fd_listing(listing.stdout) == [0, 1, 2]
            async with await agent.open_process(LIST_FDS, cwd="/", extra_fds=[5],
                                                drop_sudo_credentials=True) as proc:
                out = bytearray()
                while chunk := await proc.stdout.receive_some():
                    out += chunk
                assert fd_listing(bytes(out)) == [0, 1, 2, 5]
                uid_check = await agent.run_process(["id", "-u"], capture_stdout=True)
                assert uid_check.stdout == b"0\n"  # without the flag: the agent's own uid


# ---------------------------------------------------------------------------- environment


def env_of(output: bytes | None) -> dict[str, str]:
    assert output is not None
    return dict(line.split("=", 1) for line in output.decode().splitlines())


async def test_dangerous_variables_are_not_inherited() -> None:
    """LD_PRELOAD, LD_LIBRARY_PATH and MPROXY_* in the agent's environment never reach a
    child that inherits it, even when the keep list is "*"."""
    dangerous = {"LD_PRELOAD": "libc.so.6", "LD_LIBRARY_PATH": "/nonexistent/lib",
                 "MPROXY_SECRET": "s3cret", "MPROXY_TOKEN": "t0ken"}
    with trio.fail_after(30):
        async with agent_with_env(**dangerous, H6_MARKER="present") as agent:
            default = env_of((await agent.run_process(
                ["/usr/bin/env"], capture_stdout=True)).stdout)
            assert not set(dangerous) & set(default)
            assert "PATH" in default and "H6_MARKER" not in default

            await agent.configure_env(keep=["*"])
            everything = env_of((await agent.run_process(
                ["/usr/bin/env"], capture_stdout=True)).stdout)
            assert everything["H6_MARKER"] == "present"
            assert not set(dangerous) & set(everything)

            # They were there all along: only the policy kept them out.
            await agent.configure_env(remove=[])
            unfiltered = env_of((await agent.run_process(
                ["/usr/bin/env"], capture_stdout=True)).stdout)
            assert {k: unfiltered.get(k) for k in dangerous} == dangerous


# ---------------------------------------------------------------------------- argv


SHELL_SYNTAX = ["$(touch {t}1)", "`touch {t}2`", "; touch {t}3", "| touch {t}4",
                "&& touch {t}5", "$HOME", "*", "'\"\\", "\n touch {t}6"]


async def test_arguments_reach_the_program_literally(local_agent: controller.Agent,
                                                     tmp_path: Path) -> None:
    """Shell syntax in argv, in the program name and in environment values is never
    interpreted: echo prints it as given and no file is created."""
    target = tmp_path / "pwned"
    args = [a.format(t=target) for a in SHELL_SYNTAX]
    with trio.fail_after(30):
        done = await local_agent.run_process(["echo", *args], capture_stdout=True)
        assert done.stdout == " ".join(args).encode() + b"\n"
        value = f"$(touch {target}7)"
        printed = await local_agent.run_process(
            ["printenv", "INJECT"], env_overrides={"INJECT": value}, capture_stdout=True)
        assert printed.stdout == value.encode() + b"\n"
        try:
            await local_agent.run_process([f"echo; touch {target}8"])
        except FileNotFoundError:
            pass
        else:
            raise AssertionError("a program name with shell syntax was run")
        cli = await trio.run_process([MPROXY_EXEC, "--", "echo", *args],
                                     capture_stdout=True, check=False)
        assert (cli.returncode, cli.stdout) == (0, done.stdout)
    assert sorted(os.listdir(tmp_path)) == []
