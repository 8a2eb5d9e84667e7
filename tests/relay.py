"""A user-space relay for the tests and the bench: what a slow, broken or lossy network
does to a byte stream, where the kernel has no netem.

    relay.py [options] tcp HOST PORT     # as ssh's ProxyCommand: stdin/stdout <-> HOST:PORT
    relay.py [options] exec -- CMD...    # stdin/stdout <-> CMD's stdin/stdout

Upstream is what we read on stdin (the client's bytes), downstream what comes back.

--delay S         hold every chunk S seconds, each way, before passing it on (in order)
--cut-after N     after N upstream bytes, end both directions (a connection cut)
--corrupt-at N,.. flip the upstream bytes at these offsets
--log FILE        append one line per chunk: "<monotonic time> up|down <size>"

With --delay and --log, :func:`round_trips` counts the round trips a latency costs.
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

_CHUNK = 65536


def round_trips(log: Path, delay: float, lines: int | None = None) -> int:
    """The round trips a --log file (its first ``lines`` lines) shows on its critical
    path: half the longest chain of chunks, each in the other direction from the one
    before and passed at least one ``delay`` after it (so that it may have answered it).

    Counting turns of direction instead would count a chunk that crossed another on the
    way (a window adjustment, our hello sent while the agent's is on its way), and how
    the bytes happened to be split into chunks; the chain counts only the waits that a
    latency makes a start pay for."""
    rows = []
    for line in log.read_text().splitlines()[:lines]:
        time_text, direction = line.split()[:2]
        if direction in ("up", "down"):
            rows.append((float(time_text), direction))
    longest: list[int] = []
    for at, direction in rows:
        longest.append(max(
            (chain + 1 for (before, other), chain in zip(rows, longest, strict=False)
             if other != direction and at - before >= 0.9 * delay),
            default=0))
    return max(longest, default=0) // 2


class _Relay:
    def __init__(self, args: argparse.Namespace) -> None:
        self.delay: float = args.delay
        self.cut_after: int | None = args.cut_after
        self.corrupt = sorted(int(n) for n in args.corrupt_at.split(",") if n)
        self.log = open(args.log, "a") if args.log else None  # noqa: SIM115
        self.lock = threading.Lock()
        self.upstream = 0
        self.done = threading.Event()

    def note(self, direction: str, size: int) -> None:
        if self.log is not None:
            with self.lock:
                self.log.write(f"{time.monotonic():.6f} {direction} {size}\n")
                self.log.flush()

    def pump(self, direction: str, read: Callable[[], bytes],
             write: Callable[[bytes], None], close: Callable[[], None]) -> None:
        """Read chunks, pass each on after the delay; at EOF close the writing side."""
        held: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def deliver() -> None:
            while True:
                due, chunk = held.get()
                if not chunk:
                    break
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                try:
                    write(chunk)
                except OSError:
                    break
            close()
            self.done.set()

        writer = threading.Thread(target=deliver, daemon=True)
        writer.start()
        while True:
            try:
                chunk = read()
            except OSError:
                chunk = b""
            if chunk and direction == "up":
                chunk = self.transform(chunk)
            if chunk:
                self.note(direction, len(chunk))
            held.put((time.monotonic() + self.delay, chunk))
            if not chunk:
                break
        writer.join()

    def transform(self, chunk: bytes) -> bytes:
        start = self.upstream
        self.upstream += len(chunk)
        data = bytearray(chunk)
        for offset in self.corrupt:
            if start <= offset < self.upstream:
                data[offset - start] ^= 0xFF
        if self.cut_after is not None and self.upstream >= self.cut_after:
            self.note("cut", self.upstream)
            os._exit(0)  # both directions end at once, as when a link drops
        return bytes(data)


def _write_all(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    return write


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--cut-after", type=int)
    parser.add_argument("--corrupt-at", default="")
    parser.add_argument("--log")
    sub = parser.add_subparsers(dest="mode", required=True)
    tcp = sub.add_parser("tcp")
    tcp.add_argument("host")
    tcp.add_argument("port", type=int)
    run = sub.add_parser("exec")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    relay = _Relay(args)
    if args.mode == "tcp":
        sock = socket.create_connection((args.host, args.port))
        up_write: Callable[[bytes], None] = sock.sendall
        down_read: Callable[[], bytes] = lambda: sock.recv(_CHUNK)  # noqa: E731

        def up_close() -> None:
            sock.shutdown(socket.SHUT_WR)
    else:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert child.stdin is not None and child.stdout is not None
        child_in, child_out = child.stdin.fileno(), child.stdout.fileno()
        up_write = _write_all(child_in)
        down_read = lambda: os.read(child_out, _CHUNK)  # noqa: E731

        def up_close() -> None:
            child.stdin.close()  # type: ignore[union-attr]
    upstream = threading.Thread(
        target=relay.pump, args=("up", lambda: os.read(0, _CHUNK), up_write, up_close),
        daemon=True)
    upstream.start()
    relay.pump("down", down_read, _write_all(1), lambda: os.close(1))
    if args.mode == "exec":
        return child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
