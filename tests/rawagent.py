"""A raw protocol peer for tests that must send what the controller library never would.

``RawPeer`` writes arbitrary bytes or msgpack maps to an agent and reads its frames back
(decoded, but not checked against any connection state). ``raw_agent_process`` starts a
real ``python -m agent`` subprocess with its stderr captured to a file, so a test can
assert that no traceback was printed. Imported by test_hostile.py and test_faults.py.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import trio

from protocol import (
    DEFAULT_MAX_FRAME,
    Connection,
    Data,
    Error,
    Frame,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    Role,
    encode,
)

#: Our hello's window: large, so the agent never waits for our window frames.
BIG_WINDOW = 1 << 30


def wire(body: Any) -> bytes:
    """One frame: 4-byte big-endian length and ``body`` packed as msgpack."""
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed


class RawPeer:
    """The controller's end of a connection, byte by byte."""

    def __init__(self, send: trio.abc.SendStream, receive: trio.abc.ReceiveStream) -> None:
        self._send = send
        self._receive = receive
        # Larger than the agent ever sends: we want to see every frame it writes.
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME * 2)
        self._pings = 0
        self.frames: list[Frame] = []  # every frame received, in order
        self.eof = False
        self.hello: Hello | None = None

    async def send_raw(self, data: bytes) -> None:
        await self._send.send_all(data)

    async def send_body(self, body: Any) -> None:
        await self.send_raw(wire(body))

    async def send_frame(self, frame: Frame) -> None:
        await self.send_raw(encode(frame))

    async def handshake(self, window: int = BIG_WINDOW) -> Hello:
        """Send our hello, return the agent's."""
        conn = Connection(Role.CONTROLLER, window=window, impl="raw-test")
        await self.send_raw(conn.initiate())
        frame = await self.next_frame()
        assert isinstance(frame, Hello), frame
        self.hello = frame
        return frame

    async def close_send(self) -> None:
        """End our stream (the agent sees EOF); keep reading the agent's."""
        if isinstance(self._send, trio.abc.HalfCloseableStream):
            await self._send.send_eof()
        else:
            await self._send.aclose()

    async def next_frame(self) -> Frame | None:
        """The agent's next frame; None once its stream has ended."""
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                self.frames.append(frame)
                return frame
            if self.eof:
                assert self._decoder.buffered == 0, "agent stream ended inside a frame"
                return None
            data = await self._receive.receive_some(1 << 18)
            if not data:
                self.eof = True
            else:
                self._decoder.feed(data)

    async def until(self, predicate: Callable[[Frame], bool]) -> list[Frame]:
        """Frames up to and including the first one matching ``predicate``."""
        seen: list[Frame] = []
        while True:
            frame = await self.next_frame()
            assert frame is not None, f"agent stream ended; frames so far: {seen[-10:]}"
            seen.append(frame)
            if predicate(frame):
                return seen

    async def until_all(self, predicate: Callable[[list[Frame]], bool]) -> None:
        """Read until ``predicate`` holds for every frame received so far."""
        while not predicate(self.frames):
            frame = await self.next_frame()
            assert frame is not None, f"agent stream ended; last frames: {self.frames[-10:]}"

    def output(self, id: int, ch: int) -> bytes:
        """Everything received on channel ``ch`` of child ``id``."""
        return b"".join(f.data for f in self.frames
                        if isinstance(f, Data) and f.id == id and f.ch == ch)

    def has(self, frame_type: type[Frame], id: int, /, **fields: object) -> bool:
        """Whether a ``frame_type`` frame about child ``id`` (with these fields) arrived."""
        return any(isinstance(f, frame_type) and getattr(f, "id", None) == id
                   and all(getattr(f, k) == v for k, v in fields.items())
                   for f in self.frames)

    async def sync(self) -> list[Frame]:
        """Ping and return every frame the agent sent before the pong: the agent answers
        frames in order, so this is everything it said synchronously about what we sent
        before (plus whatever asynchronous frames happened to come out meanwhile)."""
        self._pings += 1
        n = self._pings
        await self.send_frame(Ping(n))
        frames = await self.until(lambda f: isinstance(f, Pong) and f.n == n)
        return frames[:-1]

    async def rest(self) -> list[Frame]:
        """Every frame until the agent's stream ends."""
        frames: list[Frame] = []
        while (frame := await self.next_frame()) is not None:
            frames.append(frame)
        return frames


def errors_in(frames: Sequence[Frame]) -> list[Error]:
    return [f for f in frames if isinstance(f, Error)]


class AgentProcess:
    """A real agent subprocess, its raw peer, and its captured stderr."""

    def __init__(self, process: trio.Process, peer: RawPeer, stderr_path: Path) -> None:
        self.process = process
        self.peer = peer
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@asynccontextmanager
async def raw_agent_process(
    tmp_path: Path, args: Sequence[str] = ("--grace", "1"),
    prefix: Sequence[str] = (), env: dict[str, str] | None = None,
) -> AsyncIterator[AgentProcess]:
    """``python -m agent`` with pipes for the protocol and stderr in a file; handshake
    done. Killed (SIGKILL) and reaped on exit if still running."""
    stderr_path = tmp_path / f"agent-stderr-{os.urandom(4).hex()}.txt"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [*prefix, sys.executable, "-m", "agent", *args],
            stdin=-1, stdout=-1, stderr=stderr.fileno(), env=env,
        )
    try:
        assert process.stdin is not None and process.stdout is not None
        peer = RawPeer(process.stdin, process.stdout)
        await peer.handshake()
        yield AgentProcess(process, peer, stderr_path)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    await stream.aclose()
