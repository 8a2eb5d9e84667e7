"""A controller written from docs/protocol.md alone.

It uses nothing of the project (not even ``protocol/``): plain Python, the standard
library and msgpack, so that what it expects of the agent is what the document says and
not what the reference implementation happens to do. test_spec_conformance.py drives a
real ``python -m agent`` subprocess with it; where the two disagree, either the document
or the agent is wrong.

Frames are plain dicts as msgpack unpacks them (``t`` and the fields of section 4). The
controller keeps the credit of section 7 in both directions and asserts that the agent
never sends beyond what it was granted.
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack

Frame = dict[str, Any]

#: Section 1: every side accepts frames of at least this many body bytes.
MIN_MAX_FRAME = 65536
#: Section 1: a data frame's payload may use the peer's max_frame less this.
DATA_FRAME_OVERHEAD = 64
#: Section 3: the kinds that end the connection.
STREAM_LEVEL = frozenset({"handshake", "version-mismatch", "malformed", "frame-too-large"})

_TIMEOUT = 15.0


def pack(body: object) -> bytes:
    """One frame (section 1): 4-byte big-endian length, then the msgpack body."""
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed


def hello(window: int = 1 << 20, max_frame: int = MIN_MAX_FRAME) -> Frame:
    """The controller's hello (section 4.1)."""
    return {"t": "hello", "version": 1, "impl": "spec-controller", "impl_version": "1",
            "max_frame": max_frame, "window": window, "caps": [], "role": "controller"}


class SpecAgent:
    """A ``python -m agent`` subprocess and the controller's end of its stream.

    Reading and writing share one loop (``_pump``), so a large write never deadlocks
    against an agent that is itself blocked writing to us. Every received frame goes
    through the credit check of section 7 and is appended to ``received``; ``expect``
    takes frames out of ``pending`` by content, whatever their order.
    """

    def __init__(self, stderr_path: Path, args: Sequence[str] = (), *,
                 env: dict[str, str] | None = None, window: int = 1 << 20,
                 auto_grant: bool = True, send_hello: bool = True) -> None:
        self._stderr = stderr_path.open("wb")
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--grace", "1", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        os.set_blocking(self._in, False)
        os.set_blocking(self._out, False)
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self.eof = False
        self.received: list[Frame] = []
        self.received_raw: list[bytes] = []  # each frame's bytes, as received
        self.pending: list[Frame] = []
        #: What we granted the agent and what it sent, per (id, ch): section 7.
        self.window = window
        self.granted: dict[tuple[int, int], int] = {}
        self.got: dict[tuple[int, int], int] = {}
        self._unreturned: dict[tuple[int, int], int] = {}
        self.auto_grant = auto_grant
        #: The agent's grants to us and what we sent, per (id, ch).
        self.credit: dict[tuple[int, int], int] = {}
        self.sent: dict[tuple[int, int], int] = {}
        self.agent_windows: list[Frame] = []
        self.stopped: set[tuple[int, int]] = set()
        # The agent's hello comes unprompted (section 2), before we say anything.
        self.agent_hello = self.expect("hello")
        if send_hello:
            self.send(hello(window))

    # ------------------------------------------------------------------ bytes

    def send_raw(self, data: bytes) -> None:
        self._outbuf += data
        deadline = time.monotonic() + _TIMEOUT
        while self._outbuf:
            self._pump(deadline)

    def close_input(self) -> None:
        """End our side of the stream (EOF on the agent's stdin)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def _pump(self, deadline: float) -> bool:
        """Move bytes once in whichever direction is ready; False at the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        readers = [] if self.eof else [self._out]
        writers = [self._in] if self._outbuf else []
        if not readers and not writers:
            return False
        ready_r, ready_w, _ = select.select(readers, writers, [], left)
        if ready_w:
            written = os.write(self._in, self._outbuf)
            del self._outbuf[:written]
        if ready_r:
            chunk = os.read(self._out, 1 << 20)
            if chunk:
                self._inbuf += chunk
            else:
                self.eof = True
        return True

    # ------------------------------------------------------------------ frames

    def send(self, body: Frame) -> None:
        """Send one frame; data frames are held to the credit the agent granted."""
        if body.get("t") == "data" and body.get("d"):
            key = (body["id"], body["ch"])
            size = len(body["d"])
            assert self.sent.get(key, 0) + size <= self.credit_for(key), (
                f"spec controller bug: {size} bytes beyond the credit of {key}")
            self.sent[key] = self.sent.get(key, 0) + size
        self.send_raw(pack(body))

    def credit_for(self, key: tuple[int, int]) -> int:
        window: int = self.agent_hello["window"]
        return self.credit.get(key, window)

    def write(self, id: int, ch: int, data: bytes) -> None:
        """Send ``data`` on a channel as credit allows, waiting for window frames."""
        chunk = self.agent_hello["max_frame"] - DATA_FRAME_OVERHEAD
        key = (id, ch)
        while data:
            room = self.credit_for(key) - self.sent.get(key, 0)
            if room <= 0:
                self.next_frame()  # a window frame, sooner or later
                continue
            piece, data = data[: min(room, chunk)], data[min(room, chunk):]
            self.send({"t": "data", "id": id, "ch": ch, "d": piece})

    def next_frame(self, timeout: float = _TIMEOUT) -> Frame | None:
        """The next frame from the agent (also appended to ``pending``); None at EOF."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                self._account(frame)
                self.received.append(frame)
                self.pending.append(frame)
                return frame
            if self.eof:
                assert not self._inbuf, f"stream ended inside a frame: {bytes(self._inbuf)!r}"
                return None
            if not self._pump(deadline):
                raise AssertionError(
                    f"no frame from the agent within {timeout}s; pending: {self.pending}")

    def _parse(self) -> Frame | None:
        if len(self._inbuf) < 4:
            return None
        (length,) = struct.unpack(">I", self._inbuf[:4])
        assert 0 < length <= MIN_MAX_FRAME, f"the agent sent a frame of {length} bytes"
        if len(self._inbuf) < 4 + length:
            return None
        raw = bytes(self._inbuf[: 4 + length])
        del self._inbuf[: 4 + length]
        body = msgpack.unpackb(raw[4:], raw=False)
        assert type(body) is dict and type(body.get("t")) is str, body
        self.received_raw.append(raw)
        return body

    def _account(self, frame: Frame) -> None:
        """Section 7 from our side: the agent keeps within our credit, and we grant
        the consumed bytes back once they reach half a window."""
        t = frame["t"]
        if t == "window":
            key = (frame["id"], frame["ch"])
            assert type(frame["n"]) is int and frame["n"] > 0, frame
            self.credit[key] = self.credit_for(key) + frame["n"]
            self.agent_windows.append(frame)
        elif t == "data":
            key = (frame["id"], frame["ch"])
            size = len(frame["d"])
            self.got[key] = self.got.get(key, 0) + size
            granted = self.granted.setdefault(key, self.window)
            assert self.got[key] <= granted, (
                f"the agent sent {self.got[key]} bytes on {key}, beyond the {granted} granted")
            if self.auto_grant and key not in self.stopped:
                self._unreturned[key] = self._unreturned.get(key, 0) + size
                if self._unreturned[key] >= self.window // 2:
                    self.grant(*key, self._unreturned.pop(key))

    def grant(self, id: int, ch: int, n: int) -> None:
        key = (id, ch)
        self.granted[key] = self.granted.setdefault(key, self.window) + n
        self.send({"t": "window", "id": id, "ch": ch, "n": n})

    def expect(self, t: str, *, timeout: float = _TIMEOUT, **fields: object) -> Frame:
        """The first frame of type ``t`` with these field values, received or to come."""
        return self.expect_any({t}, timeout=timeout, **fields)

    def expect_error(self, kind: str, **fields: Any) -> Frame:
        return self.expect("error", kind=kind, **fields)

    def round_trip(self, n: int = 7) -> None:
        """A ping answered: every frame the agent sent before the pong has arrived."""
        self.send({"t": "ping", "n": n})
        self.expect("pong", n=n)

    def output(self, id: int, ch: int = 1) -> bytes:
        """Every byte of a channel up to its eof, which must count them (section 4.5)."""
        chunks: list[bytes] = []
        while True:
            frame = self.expect_any({"data", "eof"}, id=id, ch=ch)
            if frame["t"] == "eof":
                data = b"".join(chunks)
                assert frame.get("n") in (None, len(data)), (frame, len(data))
                return data
            chunks.append(frame["d"])

    def expect_any(self, types: set[str], *, timeout: float = _TIMEOUT,
                   **fields: object) -> Frame:
        """Like :meth:`expect`, for a frame of any of ``types``."""
        deadline = time.monotonic() + timeout
        while True:
            for frame in self.pending:
                if frame["t"] in types and all(frame.get(k) == v for k, v in fields.items()):
                    self.pending.remove(frame)
                    return frame
            if self.next_frame(max(0.0, deadline - time.monotonic())) is None:
                raise AssertionError(f"EOF while waiting for {types} {fields}; "
                                     f"got {self.pending}")

    def run(self, id: int, argv: Sequence[bytes], stdin: bytes = b"",
            **exec_fields: Any) -> tuple[Frame, bytes, bytes]:
        """exec, feed stdin and eof, and collect (exit, stdout, stderr); then close."""
        self.send({"t": "exec", "id": id, "argv": list(argv), **exec_fields})
        self.expect("started", id=id)
        if stdin:
            self.write(id, 0, stdin)
        self.send({"t": "eof", "id": id, "ch": 0, "n": len(stdin)})
        out, err = self.output(id, 1), self.output(id, 2)
        exit_frame = self.expect("exit", id=id)
        self.close(id)
        return exit_frame, out, err

    def close(self, id: int) -> None:
        self.send({"t": "close", "id": id})
        self.expect("closed", id=id)
        for key in [k for k in self.granted if k[0] == id]:
            del self.granted[key]
        for table in (self.got, self._unreturned, self.credit, self.sent):
            for key in [k for k in table if k[0] == id]:
                del table[key]

    # ------------------------------------------------------------------ the end

    def wait(self, timeout: float = _TIMEOUT) -> int:
        """The agent's exit status, after reading its output to EOF."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            if self.next_frame(max(0.0, deadline - time.monotonic())) is None:
                break
        return self.proc.wait(max(0.0, deadline - time.monotonic()))

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()
        self._stderr.close()
