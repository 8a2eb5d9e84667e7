"""A few seconds of mproxy: one local agent runs several commands at once.

Shows concurrent children with interleaved output, stdin piped into a child, an extra fd
channel, a signal delivered to a whole process group, and exit statuses; then prints a
one-line summary. Exits 1 if anything did not go as expected. Run it with scripts/demo
(which bootstraps .venv), or directly with a Python that has the project installed.
"""

from __future__ import annotations

import errno
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import trio

import controller

_DEADLINE = 30.0  # the demo takes a second or two; this only bounds a hang


class Demo:
    """Runs the sections, printing as it goes, and records what was not as expected."""

    def __init__(self, agent: controller.Agent) -> None:
        self.agent = agent
        self.commands = 0
        self.failures: list[str] = []

    def expect(self, what: str, ok: bool) -> None:
        if not ok:
            self.failures.append(what)
            say(f"  !! NOT AS EXPECTED: {what}")

    async def concurrent_children(self) -> None:
        section("1/5  three children at once, each line shown as it arrives")
        names = ("alpha", "beta", "gamma")
        script = 'for i in 1 2 3; do echo "$0 line $i"; sleep 0.2; done'
        arrivals: list[tuple[str, bytes]] = []

        async def follow(name: str) -> None:
            async with await self.agent.open_process(["sh", "-c", script, name]) as proc:
                self.commands += 1
                pending = b""
                while chunk := await proc.stdout.receive_some():
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        arrivals.append((name, line))
                        say(f"  [{name:<5}] {line.decode()}")
                code = await proc.wait()
                self.expect(f"{name} exits 0 (got {code})", code == 0)

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(follow, name)
        for name in names:
            lines = [line for who, line in arrivals if who == name]
            self.expect(f"{name} printed its 3 lines in order",
                        lines == [f"{name} line {i}".encode() for i in (1, 2, 3)])
        # Concurrent: every child's first line came before any child's last line.
        firsts = [arrivals.index((n, f"{n} line 1".encode())) for n in names
                  if (n, f"{n} line 1".encode()) in arrivals]
        lasts = [arrivals.index((n, f"{n} line 3".encode())) for n in names
                 if (n, f"{n} line 3".encode()) in arrivals]
        self.expect("the three ran at the same time",
                    len(firsts) == len(lasts) == 3 and max(firsts) < min(lasts))

    async def piped_stdin(self) -> None:
        section("2/5  stdin piped into a child")
        text = b"hello from the controller\n"
        done = await self.agent.run_process(["tr", "a-z", "A-Z"], stdin=text,
                                            capture_stdout=True)
        self.commands += 1
        say(f"  tr a-z A-Z  <<< {text.decode().strip()!r}  ->  {done.stdout.decode().strip()!r}")
        self.expect("tr upper-cased its stdin", done.stdout == text.upper())

    async def extra_fd(self) -> None:
        section("3/5  an extra fd channel")
        argv = ["sh", "-c", "echo via-fd3 >&3"]
        async with await self.agent.open_process(argv, extra_fds=[3]) as proc:
            self.commands += 1
            received = b""
            while chunk := await proc.fds[3].receive_some():
                received += chunk
            code = await proc.wait()
        say(f"  {shlex.join(argv)}  ->  fd 3 carried {received.decode().strip()!r}, "
            f"exit {code}")
        self.expect("the child's fd 3 reached us", (received, code) == (b"via-fd3\n", 0))

    async def group_signal(self) -> None:
        section("4/5  a signal delivered to a process group")
        argv = ["sh", "-c", "sleep 100 & sleep 100 & wait"]
        async with await self.agent.open_process(argv) as proc:
            self.commands += 1
            group = proc.pid  # the agent makes each child a process group leader
            members = await wait_for_group(group, lambda pids: len(pids) == 3)
            say(f"  {shlex.join(argv)}: group {group} = "
                + ", ".join(f"{command_name(p)}[{p}]" for p in sorted(members)))
            proc.send_signal("TERM")  # queued at once, as in trio
            code = await proc.wait()
            left = await wait_for_group(group, lambda pids: not pids)
            say(f"  TERM -> the shell ended by SIG{proc.signal} (exit code {proc.exit_code}); "
                f"group {group}: {len(left)} processes left")
        self.expect(f"the shell died of TERM (returncode {code})", code == -15)
        self.expect(f"the whole group is gone ({sorted(left)} left)", not left)

    async def exit_codes(self) -> None:
        section("5/5  exit statuses")
        done = await self.agent.run_process(["sh", "-c", "exit 3"], check=False)
        self.commands += 1
        say(f"  sh -c 'exit 3'          ->  exit code {done.returncode}")
        self.expect("exit 3 is reported as 3", done.returncode == 3)

        async with await self.agent.open_process(["sh", "-c", "kill -TERM $$"]) as proc:
            self.commands += 1
            await proc.wait()
        say(f"  sh -c 'kill -TERM $$'   ->  killed by SIG{proc.signal}: returncode "
            f"{proc.returncode}, exit code {proc.exit_code}")
        self.expect("a TERM death is -15 / 143", (proc.returncode, proc.exit_code) == (-15, 143))

        self.commands += 1
        try:
            await self.agent.open_process(["no-such-program"])
        except FileNotFoundError as exc:
            name = errno.errorcode.get(exc.errno or 0, "?")
            say(f"  no-such-program         ->  FileNotFoundError ({name}): not started")
        else:
            self.expect("a missing program raises FileNotFoundError", False)


def section(title: str) -> None:
    say(f"\n== {title}")


def say(text: str) -> None:
    print(text, flush=True)


def group_members(pgid: int) -> set[int]:
    """Live (non-zombie) processes in process group ``pgid``, from /proc."""
    members = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.add(int(entry))
    return members


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


async def wait_for_group(
    pgid: int, done: Callable[[set[int]], bool], timeout: float = 5.0
) -> set[int]:
    """Poll the group until ``done(members)``; return the members then (or at timeout)."""
    members = group_members(pgid)
    with trio.move_on_after(timeout):
        while not done(members):
            await trio.sleep(0.02)
            members = group_members(pgid)
    return members


async def main() -> int:
    start = trio.current_time()
    with trio.move_on_after(_DEADLINE) as deadline:
        async with controller.open_agent(agent_args=["--grace", "2"]) as agent:
            say(f"demo: {agent.info.impl} {agent.info.impl_version} started "
                f"(`{sys.executable} -m agent`, talking msgpack over its stdin/stdout)")
            demo = Demo(agent)
            await demo.concurrent_children()
            await demo.piped_stdin()
            await demo.extra_fd()
            await demo.group_signal()
            await demo.exit_codes()
    elapsed = trio.current_time() - start
    print()
    if deadline.cancelled_caught:
        print(f"demo: FAILED, did not finish within {_DEADLINE:.0f} s")
        return 1
    if demo.failures:
        print(f"demo: {demo.commands} commands through one agent, "
              f"{len(demo.failures)} NOT as expected in {elapsed:.1f} s")
        return 1
    print(f"demo: {demo.commands} commands through one agent, all as expected "
          f"in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
