"""The agent: the frames of one controller's link, and a task tree per child."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import traceback
from collections.abc import Iterable
from typing import Final

import trio

import childproc
from link import Link, Transport, enlarge_pipe
from protocol import (
    CAP_STOP,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    Close,
    Closed,
    Config,
    Connection,
    Data,
    Eof,
    Error,
    ErrorKind,
    Exec,
    Exit,
    Frame,
    Goodbye,
    Hello,
    Log,
    Ping,
    Pong,
    RemoteProtocolError,
    Role,
    Shutdown,
    Signal,
    SignalAck,
    Started,
    Stop,
    Window,
)

from . import _orphans
from ._env import DEFAULT_POLICY, child_environment
from ._guardian import Guardian
from ._process import (
    ExitStatus,
    kill_group,
    open_pidfd,
    reap,
    signal_number,
    wait_for_exit,
)
from ._pumps import OUTPUT_BUDGET, ByteBudget, Endpoint, InPump, OutPump

__all__ = ["Agent"]

logger = logging.getLogger("mproxy.agent")

_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                  "error": logging.ERROR}
# How often teardown looks for processes left in the children's groups.
_GROUP_POLL: Final = 0.05


# How long closed may wait for the rest of a SIGKILLed group to die.
_GROUP_END_WAIT: Final = 1.0


async def _group_killed(pgid: int) -> None:
    """Wait until the rest of group ``pgid``, which was sent SIGKILL, has died, so that
    ``closed`` means nothing of the group is left alive: a kill is delivered, not done,
    when killpg returns. One syscall when the group is empty (the usual case); polls /proc
    otherwise (zombies left for the orphan reaper do not count), for at most
    ``_GROUP_END_WAIT`` seconds (a process in uninterruptible sleep dies when it wakes)."""
    if kill_group(pgid, 0) is not None:  # ESRCH: nothing left, zombies neither
        return
    with trio.move_on_after(_GROUP_END_WAIT):
        while _orphans.groups_alive({pgid}):
            await trio.sleep(0.001)


class Child:
    """Everything the agent holds for one child id, from exec until closed."""

    def __init__(self, frame: Exec, guardian: Guardian | None) -> None:
        self.id = frame.id
        self.guardian = guardian
        self.frame = frame
        self.popen: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.pipes: childproc.Pipes | None = None
        self.status: ExitStatus | None = None
        self.spawning = True
        # Channel frames that arrived before the spawn finished.
        self.early: list[Data | Eof | Stop] = []
        self.pending_signals: list[Signal] = []
        self.outs: dict[int, OutPump] = {}
        self.ins: dict[int, InPump] = {}
        self.credit_lot = trio.lowlevel.ParkingLot()
        self.exited = trio.Event()  # status known
        self.exit_sent = trio.Event()
        self.close_requested = trio.Event()
        self.finished = trio.Event()  # exit sent and every output channel at EOF
        self.drain_scope: trio.CancelScope | None = None
        self.reaped = False
        self.released = trio.Event()  # its task is over (closed sent, or torn down)

    def pumps(self) -> list[InPump | OutPump]:
        return [*self.outs.values(), *self.ins.values()]

    def pump_finished(self) -> None:
        if self.exit_sent.is_set() and all(p.finished for p in self.outs.values()):
            self.finished.set()

    def release(self) -> None:
        """Close every fd the agent holds for this child. Idempotent."""
        for pump in self.pumps():
            pump.endpoint.close()
        if self.pipes is not None:
            self.pipes.close()
        if self.pidfd is not None:
            trio.lowlevel.notify_closing(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    def reap(self) -> None:
        """Reap the child once it has ended (never before: see _process)."""
        if self.pid is not None and not self.reaped and self.status is not None:
            if self.guardian is not None:
                self.guardian.forget(self.pid)  # before its pgid can be reused
            self.reaped = reap(self.pid)
            if self.popen is not None:
                # Tell Popen it is done, so its __del__ never waits on a recycled pid.
                self.popen.returncode = self.status.returncode


class Agent:
    """Serve one controller over ``transport`` until it leaves, shuts us down, or fails.

    The receiver of its :class:`~link.Link`: frames from the controller arrive in
    :meth:`frame_received`. Guarantees: every child started is killed (its whole process
    group: SIGHUP and SIGTERM, SIGKILL after ``grace`` seconds) and reaped before
    :meth:`run` returns, whatever ends the connection; nothing the controller sends can
    crash the agent or stall another child.
    """

    def __init__(
        self,
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
        version: str = "0",
    ) -> None:
        conn = Connection(
            Role.AGENT, max_frame_size=max_frame, window=window, impl="mproxy-agent",
            impl_version=version,
            caps=("signal-ack", "half-close", "env-policy", CAP_STOP)
            + (("cgroup",) if contained else ()),
        )
        self.link = Link(conn, transport, self)
        self.output_budget = ByteBudget(OUTPUT_BUDGET)
        self.children: dict[int, Child] = {}
        # Children the controller has not closed: what --max-children limits. A closed
        # child is being torn down and no longer counts, so a controller that sends the
        # next exec right after a close (without waiting for closed) is not refused.
        self._unclosed = 0
        self.policy = DEFAULT_POLICY
        # The agent never changes its own environment, so the filtered copy children
        # inherit is computed once per policy rather than once per exec.
        self.inherited_env = self.policy.filter(os.environb)
        self.grace = grace
        self.max_children = max_children
        self.log_level = _LEVELS[log_level]
        self.reap_orphans = reap_orphans
        self.guardian = guardian
        # Our own helper, not an orphan to reap or kill.
        self._helpers = {guardian.pid} if guardian is not None else set()
        self.exit_status = 0
        self._stopped = trio.Event()  # the link has ended
        self._tearing_down = False
        self._nursery: trio.Nursery | None = None
        # Orphan reaping must not run while a spawn is in flight in a worker thread: a
        # child that exits before its pid is recorded would look like an orphan and lose
        # its status. (A spawn on the loop records its pid before the loop runs again.)
        self._spawns_in_flight = 0
        self._reaping = False
        self._spawn_gate = trio.lowlevel.ParkingLot()

    # ------------------------------------------------------------------ plumbing

    def log(self, level: str, msg: str, **attrs: object) -> None:
        """A diagnostic for the controller, as a log frame; on stderr instead once the
        connection can no longer carry it (a local controller shares our stderr, so
        writing both would show every record twice)."""
        number = _LEVELS[level]
        if number < self.log_level:
            return
        if self.link.ended is not None:
            logger.log(number, "%s %s", msg, " ".join(f"{k}={v}" for k, v in attrs.items()))
        else:
            self.link.send(Log(level=level, msg=msg, attrs={k: str(v) for k, v in attrs.items()}))

    # ------------------------------------------------------------------ main

    async def run(self) -> int:
        """Serve until the connection ends; returns the process exit status (0 clean)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.link.run)
                if self.reap_orphans:
                    nursery.start_soon(self._reap_orphans_loop)
                await self._stopped.wait()
                logger.debug("stopping: %s", self.link.ended)
                # Flush the last frames (goodbye, a fatal error), but never wait for
                # ever on a controller that stopped reading.
                await self.link.flush(max(1.0, self.grace))
                nursery.cancel_scope.cancel()
        except Exception as exc:  # a bug in the agent, not bad input: report it, clean up
            text = "".join(traceback.format_exception(exc))
            logger.error("internal error, shutting down:\n%s", text)  # noqa: TRY400
            self.exit_status = 1
            with trio.move_on_after(1.0), contextlib.suppress(Exception):
                await self.link.transport.send_all([self.link.conn.send(
                    Log(level="error", msg="internal error, shutting down",
                        attrs={"traceback": text}))])
        finally:
            with trio.CancelScope(shield=True):
                await self._teardown()
        return self.exit_status

    # ------------------------------------------------------------------ the link

    def protocol_error(self, error: RemoteProtocolError) -> None:
        if error.fatal:
            if self.link.ended is None:
                self.exit_status = 1
            # Ended first, so the log goes to stderr: the error must be the last frame
            # (protocol.md section 3).
            self.link.end(f"protocol error: {error.message}")
            self.log("error", "protocol error, closing", kind=error.kind,
                     detail=error.message)
        else:
            self.log("warning", "rejected a frame", kind=error.kind, detail=error.message)

    async def stream_ended(self) -> None:
        if self.link.conn.shutdown_requested and self.link.ended is None:
            # A half-close: the controller has said all it will and asked for the
            # children to finish (a script that pipes its frames in, as `ssh host cmd`
            # closes stdin). Only losing our output now means losing the controller.
            self.log("debug", "the controller closed its side after shutdown: "
                     "finishing the shutdown")
            await self.link.transport.wait_peer_gone()
            self.link.end("the controller closed our output before the shutdown completed")
            return
        self.link.end("the controller closed the connection (EOF)")

    def link_ended(self, reason: str) -> None:
        self._stopped.set()

    # ------------------------------------------------------------------ frames

    def frame_received(self, frame: Frame) -> None:
        if isinstance(frame, (Data, Eof, Stop)):
            child = self.children[frame.id]
            if child.spawning:
                child.early.append(frame)
            else:
                self._route_input(child, frame)
        elif isinstance(frame, Window):
            lot = self.children[frame.id].credit_lot
            if lot:  # unpark_all costs even when nobody is parked
                lot.unpark_all()
        elif isinstance(frame, Exec):
            self._on_exec(frame)
        elif isinstance(frame, Signal):
            self._on_signal(frame)
        elif isinstance(frame, Close):
            child = self.children[frame.id]
            if child.pid is not None and not child.reaped:
                # Now, not in the child's task a round later: a running child must die of
                # this SIGKILL, not of a SIGPIPE from a pump closing its pipes, and what
                # an exited child left in its group (its zombie still pins the group id)
                # is killed before any later frame of the controller is handled.
                kill_group(child.pid, signal.SIGKILL)
            child.close_requested.set()
            self._unclosed -= 1
            if child.drain_scope is not None:
                child.drain_scope.cancel()
        elif isinstance(frame, Config):
            self._on_config(frame)
        elif isinstance(frame, Shutdown):
            assert self._nursery is not None
            self._nursery.start_soon(self._shutdown_when_idle)
        elif isinstance(frame, Ping):
            self.link.send(Pong(frame.n))
        elif isinstance(frame, Error):
            self.log("warning", "the controller reported an error", kind=frame.kind,
                     detail=frame.msg)
        elif isinstance(frame, Hello):
            self.log("debug", "controller connected", impl=frame.impl,
                     version=frame.impl_version)
        # Pong needs nothing.

    def _route_input(self, child: Child, frame: Data | Eof | Stop) -> None:
        if isinstance(frame, Stop):
            out = child.outs.get(frame.ch)
            if out is not None:  # else the child never started: nothing to stop
                out.stop()
            return
        pump = child.ins.get(frame.ch)
        if pump is None:
            # The child never started: discard, but keep the controller's credit flowing.
            if isinstance(frame, Data) and frame.data:
                self.link.send(Window(child.id, frame.ch, len(frame.data)))
        elif isinstance(frame, Data):
            pump.feed(frame)
        else:
            pump.feed_eof()

    def _on_config(self, frame: Config) -> None:
        try:
            self.policy = self.policy.updated(frame.env_keep, frame.env_remove)
            self.inherited_env = self.policy.filter(os.environb)
        except ValueError as exc:
            self.link.send(Error(kind=ErrorKind.BAD_FRAME, msg=f"config frame: {exc}",
                                 ref="config"))

    def _on_exec(self, frame: Exec) -> None:
        child = Child(frame, self.guardian)
        self.children[frame.id] = child
        self._unclosed += 1
        prepared = self._prepare(child)
        if prepared is not None and prepared[0].start_is_brief:
            # Started right here, before the next frame is read: started goes out in the
            # same round (see Command.start_is_brief for why the loop may block on it).
            command, pipes = prepared
            try:
                outcome: subprocess.Popen[bytes] | OSError | ValueError = command.start()
            except (OSError, ValueError) as exc:
                outcome = exc
            self._launched(child, command, pipes, outcome)
            prepared = None
        assert self._nursery is not None
        self._nursery.start_soon(self._run_child, child, prepared)

    def _on_signal(self, frame: Signal) -> None:
        child = self.children[frame.id]
        if child.spawning:
            child.pending_signals.append(frame)
            return
        if child.pid is None or child.status is not None:
            self.link.send(Error(
                kind=ErrorKind.CHILD_EXITED, errno="ESRCH", id=child.id, ref="signal",
                msg=f"signal frame: child {child.id} has already exited; {frame.sig} not sent",
            ))
            return
        number = signal_number(frame.sig)
        if number is None:
            self.link.send(SignalAck(child.id, frame.sig, errno="EINVAL"))
            return
        self.link.send(SignalAck(child.id, frame.sig, errno=kill_group(child.pid, number)))

    # ------------------------------------------------------------------ children

    async def _run_child(
        self, child: Child, prepared: tuple[childproc.Command, childproc.Pipes] | None
    ) -> None:
        try:
            if prepared is not None:
                await self._start_in_thread(child, *prepared)
            if child.popen is not None:
                async with trio.open_nursery() as nursery:
                    for pump in child.pumps():
                        nursery.start_soon(pump.run)
                    nursery.start_soon(self._watch_exit, child)
                    await child.close_requested.wait()
                    if child.status is None:
                        assert child.pid is not None
                        kill_group(child.pid, signal.SIGKILL)
                    await child.exit_sent.wait()
                    nursery.cancel_scope.cancel()
            else:
                await child.close_requested.wait()
            # Closed: kill what is left of the group while the zombie still pins its id.
            if child.pid is not None and not child.reaped:
                kill_group(child.pid, signal.SIGKILL)
            child.release()
            pgid = child.pid if not child.reaped else None
            child.reap()
            if pgid is not None:
                await _group_killed(pgid)
            self.link.send_after_data(Closed(child.id))
        finally:
            child.release()
            if child.reaped or child.pid is None:
                del self.children[child.id]
            child.released.set()

    def _prepare(self, child: Child) -> tuple[childproc.Command, childproc.Pipes] | None:
        """Build the child's command and pipes; on failure report it (error + exit) and
        return None."""
        frame = child.frame
        if self._unclosed > self.max_children:
            self._spawn_failed(child, ErrorKind.TOO_MANY_CHILDREN, None,
                               f"exec frame: {self.max_children} children not yet "
                               f"closed (--max-children)", 126)
            self._spawn_done(child)
            return None
        try:
            spec = childproc.Spec(
                path=frame.path if frame.path is not None else frame.argv[0],
                argv=list(frame.argv),
                env=child_environment(frame, self.inherited_env),
                cwd=frame.cwd,
                extra_fds=list(frame.fds),
                drop_sudo_credentials=frame.drop_sudo,
            )
            return childproc.build(spec)
        except (OSError, ValueError) as exc:
            self._report_spawn_error(child, exc)
            self._spawn_done(child)
            return None

    async def _start_in_thread(
        self, child: Child, command: childproc.Command, pipes: childproc.Pipes
    ) -> None:
        """Start a command whose start() takes long (the credential trampoline)."""
        while self._reaping:
            await self._spawn_gate.park()
        self._spawns_in_flight += 1
        try:
            try:
                # Not abandoned on cancellation: a started child must never go untracked.
                outcome: subprocess.Popen[bytes] | OSError | ValueError = (
                    await trio.to_thread.run_sync(command.start))
            except (OSError, ValueError) as exc:
                outcome = exc
            self._launched(child, command, pipes, outcome)
        finally:
            self._spawns_in_flight -= 1
            self._spawn_gate.unpark_all()

    def _launched(
        self,
        child: Child,
        command: childproc.Command,
        pipes: childproc.Pipes,
        outcome: subprocess.Popen[bytes] | OSError | ValueError,
    ) -> None:
        """Record the result of starting ``command``: attach and announce the child, or
        report the failure; then hand it the frames and signals that arrived meanwhile."""
        childproc.close_child_side(command)
        if isinstance(outcome, subprocess.Popen):
            self._attach(child, outcome, pipes)
            if self._tearing_down:
                kill_group(outcome.pid, signal.SIGKILL)
            creds = command.credentials  # None: the agent's own, which the child inherits
            uid, gid = (os.geteuid(), os.getegid()) if creds is None else (creds.uid, creds.gid)
            self.link.send(Started(child.id, outcome.pid, uid, gid))
            self.log("debug", "started", id=child.id, pid=outcome.pid)
        else:
            pipes.close()
            self._report_spawn_error(child, outcome)
        self._spawn_done(child)

    def _spawn_done(self, child: Child) -> None:
        child.spawning = False
        for early in child.early:
            self._route_input(child, early)
        child.early.clear()
        for pending in child.pending_signals:
            self._on_signal(pending)
        child.pending_signals.clear()

    def _attach(
        self, child: Child, popen: subprocess.Popen[bytes], pipes: childproc.Pipes
    ) -> None:
        child.popen = popen
        child.pid = popen.pid
        child.pidfd = open_pidfd(popen.pid)
        child.pipes = pipes
        if self.guardian is not None:
            self.guardian.watch(popen.pid)
            if self.guardian.failure is not None:
                self.log("warning", f"{self.guardian.failure}: children will survive if "
                         "this agent is killed outright")
                self.guardian = None  # the others' announcements are dropped by it
        for stream in (pipes.stdin, pipes.stdout, pipes.stderr):
            os.set_blocking(stream.fileno(), False)
        for stream in (pipes.stdin, pipes.stdout, pipes.stderr):
            enlarge_pipe(stream.fileno())
        link, budget = self.link, self.output_budget
        child.ins[0] = InPump(link, child, 0, Endpoint(pipes.stdin.fileno(), 1,
                                                       pipes.stdin.close))
        child.outs[1] = OutPump(link, budget, child, 1, Endpoint(pipes.stdout.fileno(), 1,
                                                                 pipes.stdout.close))
        child.outs[2] = OutPump(link, budget, child, 2, Endpoint(pipes.stderr.fileno(), 1,
                                                                 pipes.stderr.close))
        for number, sock in pipes.extra.items():
            sock.setblocking(False)
            endpoint = Endpoint(sock.fileno(), 2, sock.close)
            child.ins[number] = InPump(link, child, number, endpoint)
            child.outs[number] = OutPump(link, budget, child, number, endpoint)

    def _report_spawn_error(self, child: Child, exc: OSError | ValueError) -> None:
        """Send spawn-failed: the errno by name and, as msg, why in words that follow the
        program's name (its strerror), which the controller shows after it."""
        if isinstance(exc, OSError) and exc.errno is not None:
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            step = getattr(exc, "step", "exec")
            code = 127 if (step == "exec" and exc.errno == errno.ENOENT) else 126
            msg = exc.strerror or os.strerror(exc.errno)
        else:
            name, code, msg = None, 126, str(exc)
        self._spawn_failed(child, ErrorKind.SPAWN_FAILED, name, msg, code)

    def _spawn_failed(
        self, child: Child, kind: ErrorKind, errno_name: str | None, msg: str, code: int
    ) -> None:
        self.link.send(Error(kind=kind, msg=msg, id=child.id, errno=errno_name, ref="exec"))
        self.log("debug", "spawn failed", id=child.id, detail=msg)
        child.status = ExitStatus(code, None, False, code)
        child.exited.set()
        self.link.send(Exit(child.id, code))
        child.exit_sent.set()
        child.pump_finished()

    async def _watch_exit(self, child: Child) -> None:
        assert child.pid is not None
        status = await wait_for_exit(child.pid, child.pidfd)
        child.status = status
        child.exited.set()
        # Everything the child wrote before it ended is in its pipes now: send that before
        # exit, but never wait for more (a background process may hold the pipes open).
        with trio.CancelScope() as scope:
            child.drain_scope = scope
            if child.close_requested.is_set():
                scope.cancel()
            targets = [(pump, pump.drain_target()) for pump in child.outs.values()]
            for pump, target in targets:
                await pump.drain(target)
        child.drain_scope = None
        self.link.send(Exit(child.id, status.code, status.sig, status.core))
        child.exit_sent.set()
        child.pump_finished()

    # ------------------------------------------------------------------ endings

    async def _shutdown_when_idle(self) -> None:
        """After shutdown: wait for every child to finish, clean up, say goodbye."""
        self.log("debug", "shutdown requested", children=len(self.children))
        while True:
            # Settled: finished and left alone, or released after a close.
            waiting = [c for c in self.children.values()
                       if not c.finished.is_set() or c.close_requested.is_set()]
            if not waiting:
                break
            child = waiting[0]
            if child.close_requested.is_set():
                await child.released.wait()
            else:
                await child.finished.wait()
        await self._kill_leftovers(self.children.values())
        self.link.send_after_data(Goodbye())
        self.link.end("shutdown complete")

    async def _reap_orphans_loop(self) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as batches:
            async for _ in batches:
                self._reaping = True
                try:
                    while self._spawns_in_flight:
                        await self._spawn_gate.park()
                    _orphans.reap_adopted_zombies(self._known_pids())
                finally:
                    self._reaping = False
                    self._spawn_gate.unpark_all()
                await trio.sleep(0.2)  # rate limit: one /proc scan per burst of exits

    def _known_pids(self) -> set[int]:
        return {c.pid for c in self.children.values() if c.pid is not None} | self._helpers

    async def _kill_leftovers(self, children: Iterable[Child]) -> None:
        """HUP and TERM every live group (and adopted orphan), KILL after the grace period,
        and reap them all."""
        live = [c for c in children if c.pid is not None and not c.reaped]
        groups = {c.pid for c in live if c.pid is not None}
        known = groups | self._helpers
        orphans = set(_orphans.adopted(known)) if self.reap_orphans else set()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGCONT):
            for pgid in groups:
                kill_group(pgid, sig)
            for pid in orphans:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
        with trio.move_on_after(self.grace):
            for child in live:
                await self._wait_exited(child)
            while _orphans.groups_alive(groups) or (
                self.reap_orphans and _orphans.living_adopted(known)
            ):
                await trio.sleep(_GROUP_POLL)
        for pgid in groups:
            kill_group(pgid, signal.SIGKILL)
        with trio.move_on_after(5.0):
            for child in live:
                await self._wait_exited(child)
        for child in live:
            child.reap()
        if self.reap_orphans:
            await self._kill_adopted(known)

    async def _wait_exited(self, child: Child) -> None:
        if child.status is None and child.pid is not None:
            child.status = await wait_for_exit(child.pid, child.pidfd)
            child.exited.set()

    async def _kill_adopted(self, known: set[int]) -> None:
        """SIGKILL and reap every adopted descendant, including those re-parented while
        we do so; gives up after a few seconds (a process stuck in the kernel)."""
        with trio.move_on_after(5.0):
            while True:
                found = _orphans.adopted(known)
                if not found:
                    return
                for pid, state in found.items():
                    if state != "Z":
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
                await trio.sleep(_GROUP_POLL)

    async def _teardown(self) -> None:
        self._tearing_down = True
        children = list(self.children.values())
        await self._kill_leftovers(children)
        for child in children:
            child.release()
            child.reap()
        self.children.clear()

