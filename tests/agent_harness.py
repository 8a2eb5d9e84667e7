"""The raw controller of the agent's tests: frames sent and received one by one, every
frame the agent sends recorded per child.

By default it speaks through a real :class:`protocol.Connection` in the controller role,
so every frame the agent sends is validated: a data frame beyond the credit granted, an
eof whose byte count does not match, a frame about an unknown child make the reader
raise, which fails the test. Credit for the agent's output is granted as it arrives
unless a child (or the whole harness) is put on hold. Hand-made bytes can be sent
unvalidated with :meth:`Raw.send_raw` and :meth:`Raw.send_body`.

With ``validate=False`` (the hostile tests, which send what no controller would) the
connection state is not kept: frames are decoded but checked against no state, sent
frames are encoded as they are, no credit is granted (give a window that needs none:
:data:`BIG_WINDOW`), and :attr:`Raw.frames` holds every frame, data included.
:meth:`Raw.next_frame`, :meth:`Raw.until`, :meth:`Raw.sync` and :meth:`Raw.rest` read the
frames in order, each once, in either mode.

Agents: :func:`inproc` serves ``agent.serve`` in this process over trio memory streams;
:func:`spawned` starts ``python -m agent`` over pipes (the real CLI: subreaper, signal
handling, fd sweep, RLIMIT_NOFILE), its stderr captured to a file when asked.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio
import trio.testing
from conftest import AGENT_ARGV

import agent
from protocol import (
    CONNECTION_CLOSED,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    NEED_DATA,
    Close,
    Closed,
    Connection,
    Data,
    Eof,
    Error,
    Exec,
    Exit,
    Frame,
    FrameDecoder,
    Goodbye,
    Hello,
    Log,
    Ping,
    Pong,
    RemoteProtocolError,
    Role,
    Signal,
    SignalAck,
    Started,
    Window,
    encode,
)

#: A hello window so large that the agent never waits for credit (``validate=False``).
BIG_WINDOW = 1 << 30


def wire(body: Any) -> bytes:
    """One frame: 4-byte big-endian length and ``body`` packed as msgpack."""
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed


def errors_in(frames: Sequence[Frame]) -> list[Error]:
    return [f for f in frames if isinstance(f, Error)]


@dataclass
class RawChild:
    """What the agent told us about one child id."""

    id: int
    started: Started | None = None
    exit: Exit | None = None
    closed: bool = False
    closing: bool = False  # we sent close
    errors: list[Error] = field(default_factory=list)
    acks: list[SignalAck] = field(default_factory=list)
    out: dict[int, bytearray] = field(default_factory=dict)  # ch -> bytes (when keep)
    count: dict[int, int] = field(default_factory=dict)  # ch -> bytes received
    nonzero: dict[int, int] = field(default_factory=dict)  # ch -> non-NUL bytes received
    eof: dict[int, int] = field(default_factory=dict)  # ch -> n of its eof frame
    at_exit: dict[int, int] | None = None  # count per channel when exit arrived
    keep: bool = True  # store the output bytes (else count only)
    hold: bool = False  # grant no credit for this child's output
    sink: Callable[[int, bytes], None] | None = None  # also called with (ch, data)

    def __post_init__(self) -> None:
        for ch in (1, 2):
            self.count.setdefault(ch, 0)
            self.nonzero.setdefault(ch, 0)

    @property
    def pid(self) -> int:
        assert self.started is not None, f"child {self.id} has not started"
        return self.started.pid

    def output(self, ch: int) -> bytes:
        return bytes(self.out.get(ch, b""))

    def error_kinds(self) -> list[str]:
        return [e.kind for e in self.errors]


class Raw:
    """One controller connection to an agent, driven frame by frame."""

    def __init__(
        self,
        send_stream: trio.abc.SendStream,
        receive_stream: trio.abc.ReceiveStream,
        *,
        window: int = DEFAULT_WINDOW,
        max_frame: int = DEFAULT_MAX_FRAME,
        validate: bool = True,
    ) -> None:
        self.send_stream = send_stream
        self.receive_stream = receive_stream
        self.validate = validate
        # Unvalidated, the connection only makes our hello.
        self.conn = Connection(Role.CONTROLLER, window=window, max_frame_size=max_frame,
                               impl="test-controller", impl_version="0")
        # Larger than the agent ever sends: we want to see every frame it writes.
        self._decoder = None if validate else FrameDecoder(DEFAULT_MAX_FRAME * 2)
        self.hello: Hello | None = None  # the agent's
        self.children: dict[int, RawChild] = {}
        # In arrival order; data frames only when unvalidated (else per child).
        self.frames: list[Frame] = []
        self.errors: list[Error] = []
        self.logs: list[Log] = []
        self.goodbye = False
        self.ended = trio.Event()  # the agent's stream ended (EOF or failure)
        self.end_reason = ""
        self.write_failed: BaseException | None = None
        self.hold_all = False
        self._next_id = 1
        self._lot = trio.lowlevel.ParkingLot()
        self._send_q, self._recv_q = trio.open_memory_channel[bytes](math.inf)
        self._queued = 0
        self._written = 0
        self._paused = False
        self._budget: int | None = None  # bytes left to read before pausing; None: no limit
        self._reading_scope: trio.CancelScope | None = None
        self._read_upto = 0  # frames[:_read_upto] were returned by next_frame
        self._pings = 0

    # ------------------------------------------------------------------ tasks

    async def start(self, nursery: trio.Nursery, timeout: float = 10.0,
                    hello: bytes | None = None) -> None:
        """Start the reader and writer tasks, send our hello (or the ``hello`` bytes
        given instead), wait for the agent's."""
        nursery.start_soon(self._write_loop)
        nursery.start_soon(self._read_loop)
        self._queue(self.conn.initiate() if hello is None else hello)
        await self.wait(lambda: self.hello is not None or self.ended.is_set(),
                        timeout, "the agent's hello")
        assert self.hello is not None, f"no hello: {self.end_reason}"

    async def _write_loop(self) -> None:
        async for item in self._recv_q:
            items = [item]
            with contextlib.suppress(trio.WouldBlock):
                while len(items) < 512:
                    items.append(self._recv_q.receive_nowait())
            try:
                await self.send_stream.send_all(b"".join(items))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.write_failed = exc
                self._lot.unpark_all()
                return
            self._written += len(items)
            self._lot.unpark_all()

    async def _read_loop(self) -> None:
        with trio.CancelScope() as scope:
            self._reading_scope = scope
            try:
                await self._read_frames()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._end(f"reading failed: {exc!r}")
        self._end("reading stopped")

    async def _read_frames(self) -> None:
        while True:
            while self._paused or self._budget == 0:
                await self._lot.park()
            size = 1 << 18 if self._budget is None else min(self._budget, 1 << 18)
            data = await self.receive_stream.receive_some(size)
            if self._budget is not None:
                self._budget -= len(data)
            if not (self._receive(data) if self.validate else self._receive_unchecked(data)):
                self._end("EOF")
                return
            self._lot.unpark_all()

    def _receive(self, data: bytes | bytearray) -> bool:
        """Take in ``data`` (``b""``: the stream's end) through the connection; False
        once the stream has ended."""
        self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                raise AssertionError(
                    f"the agent broke the protocol: {exc.kind}: {exc.message}"
                ) from exc
            if event is NEED_DATA:
                return True
            if event is CONNECTION_CLOSED:
                return False
            assert isinstance(event, Frame)
            self._on_frame(event)

    def _receive_unchecked(self, data: bytes | bytearray) -> bool:
        """As :meth:`_receive`, decoding frames without a connection's state."""
        assert self._decoder is not None
        if not data:
            assert self._decoder.buffered == 0, "the agent's stream ended inside a frame"
            return False
        self._decoder.feed(data)
        while (frame := self._decoder.next_frame()) is not None:
            self._on_frame(frame)
        return True

    def _end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()
        self._lot.unpark_all()

    def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, Data):
            if not self.validate:
                self.frames.append(frame)
            if self.validate or frame.id in self.children:
                self._on_data(frame)
            return
        self.frames.append(frame)
        if isinstance(frame, Hello):
            self.hello = frame
        child = self.children.get(getattr(frame, "id", -1))
        if isinstance(frame, Error):
            self.errors.append(frame)
            if frame.id is not None and child is not None:
                child.errors.append(frame)
        elif isinstance(frame, Log):
            self.logs.append(frame)
        elif isinstance(frame, Goodbye):
            self.goodbye = True
        elif child is None:
            # Validated, every frame about a child is about one we exec'd.
            assert not self.validate or isinstance(frame, (Hello, Window)) \
                or not hasattr(frame, "id"), frame
        elif isinstance(frame, Started):
            child.started = frame
        elif isinstance(frame, Exit):
            child.exit = frame
            child.at_exit = dict(child.count)
        elif isinstance(frame, Eof):
            assert frame.n is not None, "the agent's eof frames carry n"
            child.eof[frame.ch] = frame.n
        elif isinstance(frame, SignalAck):
            child.acks.append(frame)
        elif isinstance(frame, Closed):
            child.closed = True

    def _on_data(self, frame: Data) -> None:
        child = self.children[frame.id]
        data = bytes(frame.data)  # the same object: this connection does not borrow
        size = len(data)
        child.count[frame.ch] = child.count.get(frame.ch, 0) + size
        child.nonzero[frame.ch] = child.nonzero.get(frame.ch, 0) + size - data.count(0)
        if child.keep:
            child.out.setdefault(frame.ch, bytearray()).extend(data)
        if child.sink is not None:
            child.sink(frame.ch, data)
        if size and self.validate and not child.hold and not self.hold_all and not child.closing:
            self._queue(self.conn.send(Window(frame.id, frame.ch, size)))

    # ------------------------------------------------------------------ sending

    def _queue(self, data: bytes) -> None:
        if data:
            self._queued += 1
            self._send_q.send_nowait(data)

    def send(self, *frames: Frame) -> None:
        """Validate (unless ``validate=False``) and queue frames, written together, in
        one write when possible."""
        self._queue(b"".join(self.conn.send(f) if self.validate else encode(f)
                             for f in frames))

    def send_raw(self, data: bytes) -> None:
        """Queue bytes exactly as given: the connection state is not consulted."""
        self._queue(data)

    def send_body(self, body: Any) -> None:
        """Queue ``body`` (any msgpack value) as one frame, unvalidated."""
        self._queue(wire(body))

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued has been written to the agent."""
        await self.wait(lambda: self._written >= self._queued or self.write_failed is not None,
                        timeout, "our frames to be written")

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def exec(self, argv: Sequence[str | bytes], *, id: int | None = None, keep: bool = True,
             hold: bool = False, sink: Callable[[int, bytes], None] | None = None,
             before: Sequence[Frame] = (), more: Sequence[Frame] = (), **fields: Any) -> RawChild:
        """Send an exec frame, in one write with the ``before`` frames ahead of it and the
        ``more`` frames after it; return its RawChild."""
        child = RawChild(self.new_id() if id is None else id, keep=keep, hold=hold, sink=sink)
        self.children[child.id] = child
        frame = Exec(id=child.id, argv=tuple(os.fsencode(a) for a in argv), **fields)
        for ahead in before:
            if isinstance(ahead, Close):
                self.children[ahead.id].closing = True
        self.send(*before, frame, *more)
        return child

    def write_now(self, id: int, ch: int, data: bytes) -> None:
        """Send data that the credit already covers (asserted)."""
        assert len(data) <= self.conn.send_credit(id, ch), "not enough credit"
        self._queue(self.conn.send_data(id, ch, data) + data)

    async def write(self, id: int, ch: int, data: bytes, timeout: float = 10.0) -> None:
        """Send data, waiting for credit as needed."""
        view = memoryview(data)
        while view:
            await self.wait(lambda: self.conn.send_credit(id, ch) > 0, timeout,
                            f"credit on channel {ch} of child {id}")
            size = min(len(view), self.conn.send_credit(id, ch), self.conn.max_data_payload)
            self.write_now(id, ch, bytes(view[:size]))
            view = view[size:]

    def eof(self, id: int, ch: int = 0) -> None:
        self.send(Eof(id, ch))

    def signal(self, id: int, sig: str) -> None:
        self.send(Signal(id, sig))

    def close(self, id: int) -> None:
        self.children[id].closing = True
        self.send(Close(id))

    def grant(self, id: int, ch: int, n: int) -> None:
        self.send(Window(id, ch, n))

    # ------------------------------------------------------------------ reading control

    def pause_reading(self) -> None:
        """Stop reading the agent's stream (after the chunk being read, if any)."""
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        self._budget = None
        self._lot.unpark_all()

    def allow_reading(self, size: int) -> None:
        """Read exactly ``size`` more bytes of the agent's stream, then pause again."""
        self._paused = False
        self._budget = size
        self._lot.unpark_all()

    @property
    def budget_read(self) -> bool:
        """Whether the bytes :meth:`allow_reading` allowed have all been read."""
        return self._budget == 0

    def stop_reading(self) -> None:
        """End the reader task for good (e.g. before closing our read end)."""
        if self._reading_scope is not None:
            self._reading_scope.cancel()

    # ------------------------------------------------------------------ frames in order

    async def next_frame(self) -> Frame | None:
        """The first frame (of :attr:`frames`) that this has not returned yet, waiting
        for it; None once the agent's stream has ended and every frame was returned."""
        await self.wait(lambda: self._read_upto < len(self.frames) or self.ended.is_set(),
                        math.inf, "the agent's next frame")
        if self._read_upto == len(self.frames):
            return None
        self._read_upto += 1
        return self.frames[self._read_upto - 1]

    async def until(self, predicate: Callable[[Frame], bool]) -> list[Frame]:
        """The next frames, up to and including the first one matching ``predicate``."""
        seen: list[Frame] = []
        while True:
            frame = await self.next_frame()
            assert frame is not None, f"agent stream ended; frames so far: {seen[-10:]}"
            seen.append(frame)
            if predicate(frame):
                return seen

    async def until_all(self, predicate: Callable[[list[Frame]], bool]) -> None:
        """Wait until ``predicate`` holds for every frame received so far."""
        await self.wait(lambda: predicate(self.frames) or self.ended.is_set(), math.inf,
                        "the frames awaited")
        assert predicate(self.frames), f"agent stream ended; last frames: {self.frames[-10:]}"

    async def sync(self) -> list[Frame]:
        """Ping, and return the next frames up to the pong: the agent answers frames in
        order, so this is everything it said synchronously about what we sent before
        (plus whatever asynchronous frames happened to come out meanwhile)."""
        self._pings += 1
        n = self._pings
        self.send(Ping(n))
        frames = await self.until(lambda f: isinstance(f, Pong) and f.n == n)
        return frames[:-1]

    async def rest(self) -> list[Frame]:
        """The next frames, until the agent's stream ends."""
        frames: list[Frame] = []
        while (frame := await self.next_frame()) is not None:
            frames.append(frame)
        return frames

    def output(self, id: int, ch: int) -> bytes:
        """Everything received on channel ``ch`` of child ``id``."""
        if id in self.children:
            return self.children[id].output(ch)
        assert not self.validate, "validated, only the output of children exec'd is kept"
        return b"".join(f.data for f in self.frames
                        if isinstance(f, Data) and f.id == id and f.ch == ch)

    def has(self, frame_type: type[Frame], id: int, /, **fields: object) -> bool:
        """Whether a ``frame_type`` frame about child ``id`` (with these fields) arrived."""
        return any(isinstance(f, frame_type) and getattr(f, "id", None) == id
                   and all(getattr(f, k) == v for k, v in fields.items())
                   for f in self.frames)

    # ------------------------------------------------------------------ waiting

    async def wait(self, predicate: Callable[[], bool], timeout: float = 10.0,
                   what: str = "condition") -> None:
        """Wait until ``predicate()`` holds; re-checked after every batch of frames."""
        with trio.move_on_after(timeout):
            while not predicate():
                await self._lot.park()
            return
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    async def started(self, child: RawChild, timeout: float = 10.0) -> int:
        await self.wait(lambda: child.started is not None or bool(child.errors), timeout,
                        f"child {child.id} to start")
        assert child.started is not None, f"child {child.id} failed: {child.errors}"
        return child.started.pid

    async def exited(self, child: RawChild, timeout: float = 10.0) -> Exit:
        await self.wait(lambda: child.exit is not None, timeout, f"child {child.id} to exit")
        assert child.exit is not None
        return child.exit

    async def finished(self, child: RawChild, timeout: float = 10.0, chans: Sequence[int] = (1, 2)
                       ) -> Exit:
        """Wait for exit and the eof of every output channel."""
        await self.wait(lambda: child.exit is not None and all(c in child.eof for c in chans),
                        timeout, f"child {child.id} to exit and reach eof")
        assert child.exit is not None
        return child.exit

    async def closed(self, child: RawChild, timeout: float = 10.0) -> None:
        await self.wait(lambda: child.closed, timeout, f"child {child.id} to be closed")

    async def error(self, child: RawChild, kind: str, timeout: float = 10.0) -> Error:
        await self.wait(lambda: kind in child.error_kinds(), timeout,
                        f"error {kind} for child {child.id}")
        return next(e for e in child.errors if e.kind == kind)

    async def ack(self, child: RawChild, timeout: float = 10.0) -> SignalAck:
        await self.wait(lambda: bool(child.acks), timeout, f"signal_ack for child {child.id}")
        return child.acks.pop(0)

    async def run(self, argv: Sequence[str | bytes], *, stdin: bytes = b"",
                  timeout: float = 10.0, **fields: Any) -> RawChild:
        """Run a child to completion (stdin, eof, exit, output eofs) and close it."""
        child = self.exec(argv, **fields)
        if stdin:
            await self.write(child.id, 0, stdin)
        self.eof(child.id)
        await self.finished(child, timeout)
        self.close(child.id)
        await self.closed(child, timeout)
        return child

    async def output_is(self, child: RawChild, expected: bytes, ch: int = 1,
                        timeout: float = 10.0) -> None:
        """Wait until the channel has received ``len(expected)`` bytes; assert they are
        exactly ``expected``."""
        await self.wait(lambda: len(child.out.get(ch, b"")) >= len(expected), timeout,
                        f"{len(expected)} bytes on channel {ch} of child {child.id}")
        assert child.output(ch) == expected

    async def count_is(self, child: RawChild, count: int, ch: int = 1,
                       timeout: float = 10.0) -> None:
        """Wait until exactly ``count`` bytes have arrived on the channel."""
        await self.wait(lambda: child.count.get(ch, 0) >= count, timeout,
                        f"{count} bytes on channel {ch} of child {child.id}")
        assert child.count[ch] == count

    async def errors_are(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` error frames have arrived in all."""
        await self.wait(lambda: len(self.errors) >= count, timeout, f"{count} errors")

    async def echo(self, child: RawChild, payload: bytes, timeout: float = 10.0) -> None:
        """One round trip through a ``cat`` child: what we write comes back, exactly."""
        before = child.count.get(1, 0)
        await self.write(child.id, 0, payload)
        await self.wait(lambda: child.count.get(1, 0) >= before + len(payload), timeout,
                        f"echo from child {child.id}")
        assert child.output(1)[before:] == payload

    async def aclose_write(self) -> None:
        """Close our sending side: the agent sees EOF."""
        await self.flush()
        await self.send_stream.aclose()


# ---------------------------------------------------------------------------- agents

@contextlib.asynccontextmanager
async def inproc(*, window: int | None = None, max_frame: int = DEFAULT_MAX_FRAME,
                 hello: bytes | None = None, validate: bool = True, **serve_kwargs: Any
                 ) -> AsyncIterator[tuple[Raw, list[int]]]:
    """An agent served in this process over memory streams. Yields the raw controller and
    a list that receives serve()'s return value once it returned. On leaving, our side
    is closed (EOF) and serve() must return within a few seconds. ``hello`` replaces our
    hello frame (bytes sent as they are). ``window`` defaults to the protocol's default,
    or to :data:`BIG_WINDOW` unvalidated."""
    serve_kwargs.setdefault("grace", 2.0)
    agent_side, our_side = trio.testing.memory_stream_pair()
    status: list[int] = []
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            status.append(await agent.serve(agent.StreamTransport(agent_side, agent_side),
                                            **serve_kwargs))
            await agent_side.aclose()

        nursery.start_soon(serve)
        raw = Raw(our_side.send_stream, our_side.receive_stream,
                  window=_window(window, validate), max_frame=max_frame, validate=validate)
        await raw.start(nursery, hello=hello)
        yield raw, status
        with trio.fail_after(serve_kwargs["grace"] + 10):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await raw.aclose_write()
            while not status:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


def _window(window: int | None, validate: bool) -> int:
    if window is not None:
        return window
    return DEFAULT_WINDOW if validate else BIG_WINDOW


@dataclass
class Spawned:
    """A ``python -m agent`` subprocess and the raw controller connected to it."""

    process: trio.Process
    raw: Raw
    stderr_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        """What the agent wrote to its stderr (with ``spawned(stderr_to=...)``)."""
        assert self.stderr_path is not None, "the agent's stderr was not captured"
        return self.stderr_path.read_text(errors="replace")

    async def wait_exit(self, timeout: float = 10.0) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


@contextlib.asynccontextmanager
async def spawned(
    *args: str,
    prefix: Sequence[str] = (),
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    window: int | None = None,
    stderr: int | None = None,
    stderr_to: Path | None = None,
    validate: bool = True,
) -> AsyncIterator[Spawned]:
    """Start ``[*prefix, python, -m, agent, *args]`` with pipes as its stdin and stdout;
    its stderr goes to ``stderr`` (a subprocess-style fd), or to the file ``stderr_to``
    (read back with :meth:`Spawned.stderr`). ``window`` as for :func:`inproc`.

    On leaving: our side is closed, and the agent is given 15 s to exit before it is
    killed (a test that needs a precise ending checks it itself, before leaving).
    """
    to_agent_r, to_agent_w = os.pipe()
    from_agent_r, from_agent_w = os.pipe()
    try:
        with contextlib.ExitStack() as files:
            if stderr_to is not None:
                stderr = files.enter_context(stderr_to.open("wb")).fileno()
            process = await trio.lowlevel.open_process(
                [*prefix, *AGENT_ARGV, *args], stdin=to_agent_r, stdout=from_agent_w,
                stderr=stderr, env=env, pass_fds=tuple(pass_fds),
            )
    finally:
        os.close(to_agent_r)
        os.close(from_agent_w)
    send_stream = trio.lowlevel.FdStream(to_agent_w)
    receive_stream = trio.lowlevel.FdStream(from_agent_r)
    try:
        async with trio.open_nursery() as nursery:
            raw = Raw(send_stream, receive_stream, window=_window(window, validate),
                      validate=validate)
            await raw.start(nursery)
            yield Spawned(process, raw, stderr_to)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for stream in (send_stream, receive_stream):
                with contextlib.suppress(Exception):
                    await stream.aclose()
            with trio.move_on_after(15):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
