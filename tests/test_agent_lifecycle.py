"""How the agent ends, and what it leaves behind: nothing. Controller EOF, EPIPE, signals
to the agent, a controller killed outright, the grace period, the shutdown frame; orphans
adopted by the agent (a child subreaper) and its exact statuses while they come and go.

Every test here runs the real ``python -m agent`` and checks /proc: after the agent has
exited, no process of any child's group exists, not even as a zombie, and no child pid
exists either (the agent reaps everything before it exits).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
from agent_harness import Raw, RawChild, Spawned, spawned
from conftest import (
    AGENT_ARGV,
    agent_children,
    cgroups_usable,
    children_of,
    gone,
    group_all,
    guardian_of,
    session_members,
    stat_fields,
    subreaper,
    wait_all_gone,
    wait_until,
)

import controller
from agent import _cgroup
from agent import _orphans as agent_orphans
from protocol import Exec, Goodbye, Shutdown, encode

GRACE = 1.0
# Beyond the grace period: time to notice, signal, reap and exit on a loaded machine.
SLACK = 8.0


async def _start_family(raw: Raw) -> tuple[list[RawChild], list[int]]:
    """Children that must all be gone after teardown: a plain one, a group with
    grandchildren, a steady producer, and one that ignores HUP and TERM. Returns them and
    every pid of their groups."""
    children = [
        raw.exec(["sleep", "100"]),
        raw.exec(["sh", "-c", "sleep 100 & sleep 100 & echo ready; wait"]),
        raw.exec(["sh", "-c", "while :; do echo tick; sleep 0.02; done"]),
        raw.exec(["sh", "-c", "trap '' HUP TERM; sleep 100 & echo ready; wait"]),
    ]
    await raw.wait(lambda: all(k.started for k in children)
                   and children[1].output(1) == b"ready\n" and children[2].count[1] > 0
                   and children[3].output(1) == b"ready\n", 10, "the family to start")
    pids = sorted({p for k in children for p in group_all(k.pid)})
    assert len(pids) >= 7  # the producer's sleep comes and goes
    return children, pids


async def _assert_clean_exit(agent: Spawned, children: list[RawChild], pids: list[int],
                             what: str) -> int:
    with trio.fail_after(GRACE + SLACK):
        status = await agent.process.wait()
    await wait_all_gone(pids, [k.pid for k in children], 2, what)
    return status


async def test_controller_eof_ends_the_agent_and_every_child() -> None:
    async with spawned("--grace", str(GRACE)) as agent:
        children, pids = await _start_family(agent.raw)
        await agent.raw.aclose_write()
        status = await _assert_clean_exit(agent, children, pids, "after EOF")
        assert status == 0


async def test_controller_that_stops_reading_epipe_ends_the_agent() -> None:
    async with spawned("--grace", str(GRACE)) as agent:
        raw = agent.raw
        children, pids = await _start_family(raw)
        raw.stop_reading()
        await raw.ended.wait()
        await raw.receive_stream.aclose()  # our write end stays open: no EOF for the agent
        status = await _assert_clean_exit(agent, children, pids, "after EPIPE")
        assert status == 0
        assert raw.write_failed is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
async def test_signal_to_the_agent_ends_it_and_every_child(signum: int) -> None:
    async with spawned("--grace", str(GRACE)) as agent:
        children, pids = await _start_family(agent.raw)
        os.kill(agent.pid, signum)
        status = await _assert_clean_exit(agent, children, pids, f"after {signum}")
        assert status >= 0  # handled: the agent was not killed by the signal
        # It closed its end of the connection: our reader saw the stream end.
        with trio.fail_after(5):
            await agent.raw.ended.wait()


_CONTROLLER = textwrap.dedent("""
    import trio, controller

    async def main():
        async with controller.open_agent(agent_args=["--grace", "{grace}"]) as agent:
            procs = [
                await agent.open_process(["sleep", "100"]),
                await agent.open_process(["sh", "-c", "sleep 100 & sleep 100 & wait"]),
                await agent.open_process(["sh", "-c", "trap '' HUP TERM; sleep 100"]),
            ]
            print(" ".join(str(p.pid) for p in procs), flush=True)
            await trio.sleep_forever()

    trio.run(main)
""")


async def test_controller_killed_outright_leaves_nothing_behind(tmp_path: Path) -> None:
    script = tmp_path / "stuck_controller.py"  # not controller.py: it imports that
    script.write_text(_CONTROLLER.format(grace=GRACE))
    read_fd, write_fd = os.pipe()
    with subreaper():  # the orphaned agent comes to us, so we can reap it and see its status
        try:
            ctl = await trio.lowlevel.open_process([sys.executable, str(script)],
                                                   stdout=write_fd)
        finally:
            os.close(write_fd)
        try:
            with os.fdopen(read_fd, "rb") as out:
                line = await trio.to_thread.run_sync(out.readline)
            leaders = [int(p) for p in line.split()]
            assert len(leaders) == 3, line
            fields = stat_fields(leaders[0])
            assert fields is not None
            agent_pid = int(fields[1])
            assert agent_pid != ctl.pid
            await wait_until(lambda: len(group_all(leaders[1])) == 3, 10, "the sleeps")
            pids = sorted({p for leader in leaders for p in group_all(leader)})
            ctl.kill()
            await ctl.wait()
            statuses: list[int] = []

            def reaped() -> bool:
                pid, status = os.waitpid(agent_pid, os.WNOHANG)
                if pid:
                    statuses.append(status)
                return bool(pid)

            await wait_until(reaped, GRACE + SLACK, "the agent to exit")
            assert os.waitstatus_to_exitcode(statuses[0]) == 0
            await wait_all_gone([*pids, agent_pid], leaders, 2, "after the controller died")
        finally:
            if ctl.returncode is None:
                ctl.kill()
                await ctl.wait()


async def test_grace_then_sigkill_for_children_that_ignore_term() -> None:
    async with spawned("--grace", str(GRACE)) as agent:
        raw = agent.raw
        child = raw.exec(["sh", "-c", "trap '' HUP TERM INT; echo ready; "
                        "while :; do sleep 0.05; done"])
        await raw.wait(lambda: child.output(1) == b"ready\n", 10, "the trap")
        pids = group_all(child.pid)
        # It survives TERM sent by us...
        raw.signal(child.id, "TERM")
        assert (await raw.ack(child)).errno is None
        await raw.echo(raw.exec(["cat"]), b"round trip after TERM")
        assert child.exit is None and not gone(child.pid)
        # ...but not the agent's teardown.
        await raw.aclose_write()
        with trio.fail_after(GRACE + SLACK):
            assert await agent.process.wait() == 0
        await wait_all_gone(pids, [child.pid], 2, "the TERM-proof child")


# ---------------------------------------------------------------------------- guardian

needs_cgroups = pytest.mark.skipif(not cgroups_usable(),
                                   reason="needs a cgroup v2 it may write (root)")


def _guardian_of(agent_pid: int, children: list[RawChild]) -> int:
    """The agent's one child that it did not start for the controller."""
    (guardian,) = set(children_of(agent_pid)) - {k.pid for k in children}
    assert guardian_of(agent_pid) == guardian  # what other tests use to leave it out
    return guardian


async def test_agent_killed_outright_its_guardian_ends_every_child() -> None:
    # SIGKILL (or the OOM killer) leaves the agent no chance to clean up: the guardian
    # it forked at start-up sees the agent's end of their pipe close and ends the groups
    # itself, TERM-proof children included, after the same grace period.
    with subreaper():  # the orphans come to us: reap them, as init would
        async with spawned("--grace", str(GRACE), stderr=subprocess.PIPE) as agent:
            children, pids = await _start_family(agent.raw)
            guardian = _guardian_of(agent.pid, children)
            os.kill(agent.pid, signal.SIGKILL)
            with trio.fail_after(5):
                assert await agent.process.wait() == -signal.SIGKILL
            everything = [*pids, guardian]

            def all_gone() -> bool:
                # Reap what comes to us, as init would: the listed pids and whatever else
                # is left in the groups (the producer's latest sleep).
                for pid in {*everything, *(p for k in children for p in group_all(k.pid))}:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
                return all(gone(p) for p in everything) and not any(
                    group_all(k.pid) for k in children)

            await wait_until(all_gone, GRACE + SLACK, "the guardian to end every group")
            assert agent.process.stderr is not None
            stderr = await agent.process.stderr.receive_some()
            assert b"ending 4 process group(s)" in stderr, stderr


async def test_guardian_holds_nothing_of_the_agent_and_exits_with_it() -> None:
    async with spawned("--grace", str(GRACE)) as agent:
        children = [agent.raw.exec(["sleep", "100"])]
        await agent.raw.started(children[0])
        guardian = _guardian_of(agent.pid, children)
        # Its own session (a signal to the agent's group does not reach it), and no fd
        # of the agent's: the controller sees EOF the moment the agent is gone.
        assert os.getsid(guardian) == guardian
        fds = {int(fd): os.readlink(f"/proc/{guardian}/fd/{fd}")
               for fd in os.listdir(f"/proc/{guardian}/fd")}
        assert fds[0] == fds[1] == os.devnull
        assert sorted(fds) == [0, 1, 2, 3] and fds[3].startswith("pipe:"), fds
        await agent.raw.aclose_write()
        with trio.fail_after(GRACE + SLACK):
            assert await agent.process.wait() == 0
        assert gone(guardian)  # ended and reaped by the agent before it exited


async def test_agent_goes_on_unguarded_when_its_guardian_is_killed() -> None:
    async with spawned("--grace", str(GRACE)) as agent:
        raw = agent.raw
        first = raw.exec(["sleep", "100"])
        await raw.started(first)
        guardian = _guardian_of(agent.pid, [first])
        os.kill(guardian, signal.SIGKILL)
        await wait_until(lambda: (stat_fields(guardian) or ["Z"])[0] == "Z",
                         10, "the guardian to die")
        # The next child's announcement fails: a warning, and the agent serves on.
        await raw.echo(raw.exec(["cat"]), b"served without a guardian")
        await raw.wait(lambda: any("guardian" in log.msg for log in raw.logs), 10,
                       "the warning about the guardian")
        (warning,) = [log for log in raw.logs if "guardian" in log.msg]
        assert warning.level == "warning" and f"pid {guardian}" in warning.msg
        assert gone(guardian)  # reaped once its end was seen, not left a zombie
        if cgroups_usable():  # with nobody else to remove it, the agent does
            contained = _cgroup.cgroup_dir(agent.pid)
            await raw.aclose_write()
            with trio.fail_after(GRACE + SLACK):
                assert await agent.process.wait() == 0
            assert not os.path.exists(contained)


# ---------------------------------------------------------------------------- cgroup


@needs_cgroups
async def test_agent_contains_its_children_in_a_cgroup_it_removes_at_exit() -> None:
    ours = _cgroup.cgroup_dir()
    async with spawned("--grace", str(GRACE)) as agent:
        raw = agent.raw
        assert raw.hello is not None
        assert "cgroup" in raw.hello.caps
        child = raw.exec(["sh", "-c", "sleep 100 & wait"])
        await raw.started(child)
        contained = _cgroup.cgroup_dir(agent.pid)
        assert os.path.dirname(contained) == ours
        assert os.path.basename(contained).startswith(f"mproxy-agent.{agent.pid}.")
        await wait_until(lambda: len(group_all(child.pid)) == 2, 10, "the child's sleep")
        assert {_cgroup.cgroup_dir(pid) for pid in group_all(child.pid)} == {contained}
        # The guardian stays outside: it must not be ended with what it ends.
        assert _cgroup.cgroup_dir(_guardian_of(agent.pid, [child])) == ours
        await raw.aclose_write()
        with trio.fail_after(GRACE + SLACK):
            assert await agent.process.wait() == 0
        await wait_until(lambda: not os.path.exists(contained), 5, "the cgroup's removal")


@needs_cgroups
async def test_agent_killed_outright_its_guardian_ends_descendants_that_left_their_group(
) -> None:
    # A daemon that left its group and session (setsid), while its parent lives on (so
    # it is not re-parented to the agent), ignoring HUP and TERM: only the cgroup holds
    # it. Without one it survives the agent.
    daemon = "setsid sh -c 'trap \"\" HUP TERM; echo $$; exec sleep 100' & wait"
    with subreaper():
        async with spawned("--grace", str(GRACE), stderr=subprocess.PIPE) as agent:
            raw = agent.raw
            child = raw.exec(["sh", "-c", daemon])
            await raw.wait(lambda: child.output(1).endswith(b"\n"), 10, "the daemon's pid")
            pid = int(child.output(1))
            assert os.getsid(pid) == pid != child.pid
            contained = _cgroup.cgroup_dir(agent.pid)
            assert _cgroup.cgroup_dir(pid) == contained
            os.kill(agent.pid, signal.SIGKILL)
            with trio.fail_after(5):
                assert await agent.process.wait() == -signal.SIGKILL

            def daemon_gone() -> bool:
                for each in (pid, child.pid):  # they come to us: reap them, as init would
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(each, os.WNOHANG)
                return gone(pid) and gone(child.pid)

            await wait_until(daemon_gone, GRACE + SLACK, "the guardian to end the daemon")
            await wait_until(lambda: not os.path.exists(contained), 5, "the cgroup's removal")
            assert agent.process.stderr is not None
            stderr = await agent.process.stderr.receive_some()
            assert f"ending 1 process group(s) and every process in {contained}".encode() \
                in stderr, stderr


@needs_cgroups
async def test_agent_killed_as_it_makes_its_cgroup_leaves_none_behind() -> None:
    # The guardian is told the path before the directory exists: a kill at any moment of
    # the start-up leaves nothing (it used to leave the directory in 10 runs of 10).
    ours = _cgroup.cgroup_dir()
    process = await trio.lowlevel.open_process(
        [*AGENT_ARGV, "--grace", str(GRACE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        prefix = f"mproxy-agent.{process.pid}."
        deadline = trio.current_time() + 10
        # Polled without pause: the window between the mkdir and the move is short.
        while not (made := [d for d in os.listdir(ours) if d.startswith(prefix)]):
            assert trio.current_time() < deadline, "the agent made no cgroup"
        process.kill()
        with trio.fail_after(5):
            assert await process.wait() == -signal.SIGKILL
        await wait_until(lambda: not os.path.exists(os.path.join(ours, made[0])), 5,
                         "the guardian to remove the cgroup")
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


@needs_cgroups
async def test_an_agent_started_by_an_agent_is_ended_with_it() -> None:
    # The inner agent's cgroup is nested in the outer's: killing the outer agent ends the
    # inner one, its guardian and its children (a setsid daemon too), and both cgroups go.
    with subreaper(), trio.fail_after(GRACE + 2 * SLACK):
        with pytest.raises(controller.AgentLost):
            async with controller.open_agent(agent_args=["--grace", str(GRACE)],
                                              stderr=subprocess.DEVNULL) as outer:
                assert outer.agent_pid is not None
                carrier = await outer.open_process([*AGENT_ARGV, "--grace", str(GRACE)])
                assert carrier.pid is not None
                async with controller.connect(carrier.stdin, carrier.stdout) as inner:
                    assert "cgroup" in inner.info.caps
                    child = await inner.open_process(
                        ["sh", "-c", "setsid sleep 100 & echo $!; wait"])
                    daemon = int(await child.stdout.receive_some())
                    outer_cgroup = _cgroup.cgroup_dir(outer.agent_pid)
                    inner_cgroup = _cgroup.cgroup_dir(carrier.pid)
                    assert os.path.dirname(inner_cgroup) == outer_cgroup
                    assert _cgroup.cgroup_dir(daemon) == inner_cgroup
                    os.kill(outer.agent_pid, signal.SIGKILL)
                    await wait_until(lambda: outer.lost is not None, 10, "the loss")

        def all_gone() -> bool:
            for pid in children_of(os.getpid()):  # they come to us: reap, as init would
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            return gone(daemon) and not os.path.exists(outer_cgroup)

        await wait_until(all_gone, GRACE + SLACK, "the daemon and both cgroups to go")


@needs_cgroups
async def test_no_cgroup_leaves_the_agent_where_it_was() -> None:
    async with spawned("--no-cgroup") as agent:
        assert agent.raw.hello is not None
        assert "cgroup" not in agent.raw.hello.caps
        assert _cgroup.cgroup_dir(agent.pid) == _cgroup.cgroup_dir()


@needs_cgroups
async def test_agent_serves_without_a_cgroup_where_it_cannot_make_one() -> None:
    # A cgroup that may have no descendants: the agent's mkdir fails (EAGAIN), it says so
    # at debug level, and serves with its process groups guarded as before.
    cage = os.path.join(_cgroup.cgroup_dir(), f"mproxy-test.{os.getpid()}")
    os.mkdir(cage)
    try:
        with open(os.path.join(cage, "cgroup.max.depth"), "w") as f:
            f.write("0")
        enter = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cage]
        async with spawned("--log-level", "debug", prefix=enter,
                           stderr=subprocess.PIPE) as agent:
            raw = agent.raw
            assert raw.hello is not None
            assert "cgroup" not in raw.hello.caps
            assert _cgroup.cgroup_dir(agent.pid) == cage
            await raw.echo(raw.exec(["cat"]), b"served without a cgroup")
            await raw.aclose_write()
            with trio.fail_after(GRACE + SLACK):
                assert await agent.process.wait() == 0
            assert agent.process.stderr is not None
            stderr = await agent.process.stderr.receive_some()
            assert b"not contained in a cgroup: cannot create" in stderr, stderr
            assert b"EAGAIN" in stderr, stderr
    finally:
        await wait_until(lambda: not _cgroup.members(cage), 10, "the cage to empty")
        os.rmdir(cage)


# ---------------------------------------------------------------------------- shutdown

async def test_shutdown_lets_children_finish_then_says_goodbye() -> None:
    async with spawned("--grace", str(GRACE)) as agent:
        raw = agent.raw
        children = [raw.exec(["sh", "-c", f"sleep 0.5; echo done {i}"]) for i in range(3)]
        for child in children:
            raw.eof(child.id)
            await raw.started(child)
        raw.send(Shutdown())
        refused = RawChild(999)
        raw.children[999] = refused
        raw.send_raw(encode(Exec(id=999, argv=(b"true",))))  # our connection would refuse
        error = await raw.error(refused, "shutting-down")
        assert (error.id, error.ref) == (999, "exec")
        await raw.wait(lambda: raw.goodbye, 10, "goodbye")
        for i, child in enumerate(children):
            assert child.output(1) == f"done {i}\n".encode()
            assert child.exit is not None and child.exit.code == 0
            assert child.eof == {1: len(child.output(1)), 2: 0}
        # Goodbye is the last frame, then the stream ends and the agent exits 0.
        await raw.ended.wait()
        assert raw.end_reason == "EOF"
        assert isinstance(raw.frames[-1], Goodbye)
        assert refused.started is None and refused.exit is None
        with trio.fail_after(SLACK):
            assert await agent.process.wait() == 0
        pids = [k.pid for k in children]
        await wait_all_gone(pids, pids, 2, "after goodbye")


async def test_shutdown_with_no_children() -> None:
    async with spawned() as agent:
        agent.raw.send(Shutdown())
        await agent.raw.wait(lambda: agent.raw.goodbye, 10, "goodbye")
        await agent.raw.ended.wait()
        with trio.fail_after(SLACK):
            assert await agent.process.wait() == 0


_FINISHING = "finishing the shutdown"


async def _half_close_after_shutdown(raw: Raw) -> None:
    """Send shutdown, close our sending side (EOF), and wait until the agent says it
    took the EOF as a half-close (a debug log frame)."""
    raw.send(Shutdown())
    await raw.aclose_write()
    await raw.wait(lambda: any(_FINISHING in log.msg for log in raw.logs), 10,
                   "the agent to take the EOF")


async def test_eof_after_shutdown_lets_the_children_finish(tmp_path: Path) -> None:
    # A script that pipes its frames in ends them with EOF: after a shutdown, EOF is not
    # the loss of the controller. The child, still running then, finishes; its output,
    # exit and the goodbye arrive; the agent exits 0.
    go = tmp_path / "go"
    async with spawned("--grace", str(GRACE), "--log-level", "debug") as agent:
        raw = agent.raw
        child = raw.exec(["sh", "-c", 'while [ ! -e "$1" ]; do sleep 0.01; done; echo done',
                        "sh", str(go)])
        raw.eof(child.id)
        await raw.started(child)
        await _half_close_after_shutdown(raw)
        go.touch()
        await raw.wait(lambda: raw.goodbye, 10, "goodbye")
        assert child.output(1) == b"done\n"
        assert child.exit is not None and child.exit.code == 0
        with trio.fail_after(SLACK):
            assert await agent.process.wait() == 0
        await wait_all_gone([child.pid], [child.pid], 2, "after goodbye")


async def test_losing_our_output_after_shutdown_and_eof_ends_every_child() -> None:
    # Then, with silent children (no write to fail), the controller closing its end of
    # our output is what tells the agent it is gone: it ends every child and exits.
    async with spawned("--grace", str(GRACE), "--log-level", "debug") as agent:
        raw = agent.raw
        children = [
            raw.exec(["sleep", "100"]),
            raw.exec(["sh", "-c", "trap '' HUP TERM; sleep 100 & echo ready; wait"]),
        ]
        await raw.wait(lambda: children[1].output(1) == b"ready\n", 10, "the children to start")
        pids = sorted({p for k in children for p in group_all(k.pid)})
        await _half_close_after_shutdown(raw)
        assert all(not gone(pid) for pid in pids)
        raw.stop_reading()
        await raw.ended.wait()
        await raw.receive_stream.aclose()
        status = await _assert_clean_exit(agent, children, pids, "after our output was closed")
        assert status == 0


# ---------------------------------------------------------------------------- orphans

_DOUBLE_FORK = textwrap.dedent("""
    import os, sys
    if os.fork() == 0:
        os.setsid()
        pid = os.fork()
        if pid == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.execvp("sleep", ["sleep", "100"])
        print(pid, flush=True)
        os._exit(0)
    os.wait()
""")


async def test_children_and_their_states_come_from_proc() -> None:
    # What the agent's SIGCHLD reaper reads instead of scanning every process on the host.
    sleeper = subprocess.Popen(["sleep", "100"])
    quitter = subprocess.Popen(["true"])
    try:
        children = agent_orphans._children()
        assert children is not None  # Linux kernels are built with CONFIG_PROC_CHILDREN
        assert {sleeper.pid, quitter.pid} <= children
        assert agent_orphans._state(sleeper.pid) in ("S", "R")
        await wait_until(lambda: agent_orphans._state(quitter.pid) == "Z", 10, "a zombie")
    finally:
        sleeper.kill()
        sleeper.wait()
        quitter.wait()
    assert agent_orphans._state(quitter.pid) == ""
    assert not {sleeper.pid, quitter.pid} & (agent_orphans._children() or set())


async def _orphans(raw: Raw) -> tuple[list[RawChild], list[int]]:
    """Two children that leave a setsid'd grandchild behind and exit; returns the
    children and the orphans' pids (each a session leader or in its own session)."""
    children = [raw.exec(["sh", "-c", "setsid sleep 100 </dev/null >/dev/null 2>&1 & echo $!"]),
            raw.exec(["python3", "-c", _DOUBLE_FORK])]
    for child in children:
        raw.eof(child.id)
        await raw.finished(child)
        assert child.exit is not None and child.exit.code == 0
    orphans = [int(k.output(1)) for k in children]
    return children, orphans


async def _adopted(agent: Spawned, pid: int) -> None:
    def parent_is_agent() -> bool:
        fields = stat_fields(pid)
        return fields is not None and int(fields[1]) == agent.pid
    await wait_until(parent_is_agent, 10, f"orphan {pid} to be re-parented to the agent")


async def test_orphans_are_adopted_then_killed_at_teardown() -> None:
    async with spawned("--grace", str(GRACE)) as agent:
        raw = agent.raw
        children, orphans = await _orphans(raw)
        for pid in orphans:
            await _adopted(agent, pid)
        # Each is alone in a session of its own (so not in any child's group).
        for pid in orphans:
            fields = stat_fields(pid)
            assert fields is not None
            assert session_members(int(fields[3])) == [pid]
        # Closing the children does not touch the orphans (other sessions)...
        for child in children:
            raw.close(child.id)
            await raw.closed(child)
        assert all(not gone(p) for p in orphans)
        # ...the agent's end does.
        await raw.aclose_write()
        with trio.fail_after(GRACE + SLACK):
            assert await agent.process.wait() == 0
        await wait_all_gone([*orphans, *(k.pid for k in children)], [k.pid for k in children], 2,
                            "the orphans")


async def test_orphans_are_killed_at_shutdown() -> None:
    async with spawned("--grace", str(GRACE)) as agent:
        raw = agent.raw
        _, orphans = await _orphans(raw)
        for pid in orphans:
            await _adopted(agent, pid)
        raw.send(Shutdown())
        await raw.wait(lambda: raw.goodbye, GRACE + SLACK, "goodbye")
        with trio.fail_after(SLACK):
            assert await agent.process.wait() == 0
        await wait_all_gone(orphans, [], 2, "the orphans")


async def test_orphans_that_exit_are_reaped(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    async with spawned("--grace", str(GRACE)) as agent:
        raw = agent.raw
        child = raw.exec(["sh", "-c", f"setsid sh -c 'read x < {fifo}' >/dev/null 2>&1 & echo $!"])
        raw.eof(child.id)
        await raw.finished(child)
        orphan = int(child.output(1))
        await _adopted(agent, orphan)
        with open(fifo, "w") as f:  # the orphan has it open for reading: does not block
            f.write("go\n")
        await wait_until(lambda: gone(orphan), 10, "the agent to reap the orphan")
        raw.close(child.id)
        await raw.closed(child)
        assert agent_children(agent.pid) == {}


@pytest.mark.slow
async def test_exit_statuses_stay_exact_while_orphans_come_and_go() -> None:
    async with spawned("--grace", str(GRACE)) as agent:
        raw = agent.raw
        makers = [raw.exec(["sh", "-c", "for i in $(seq 150); do (true &); "
                            "(sleep 0.01 &); done"]) for _ in range(3)]
        results: dict[int, int] = {}
        async with trio.open_nursery() as nursery:
            limiter = trio.Semaphore(20)

            async def one(i: int) -> None:
                async with limiter:
                    child = raw.exec(["sh", "-c", f"exit {i % 250}"])
                    raw.eof(child.id)
                    exit_frame = await raw.finished(child, timeout=60)
                    results[i] = exit_frame.code
                    raw.close(child.id)
                    await raw.closed(child, timeout=60)

            for i in range(400):
                nursery.start_soon(one, i)
        assert results == {i: i % 250 for i in range(400)}
        for maker in makers:
            raw.eof(maker.id)
            assert (await raw.finished(maker, timeout=60)).code == 0
            raw.close(maker.id)
            await raw.closed(maker)
        # Every orphan was reaped by the agent: it has no child left at all.
        await wait_until(lambda: agent_children(agent.pid) == {}, 10, "no child of the agent")
        assert not raw.errors
