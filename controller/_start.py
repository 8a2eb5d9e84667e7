"""Starting an agent as a command: what comes on its stdout before the protocol (a login
shell's banner, the agentless first stage's dialogue) and on its stderr, and the errors
that name why a start failed."""

from __future__ import annotations

import logging
import os
from typing import Final

import trio

from link import FdTransport
from protocol import find_hello

from ._errors import (
    AgentStartError,
    PayloadUploadFailed,
    PayloadVerificationFailed,
    PythonTooOld,
)
from ._payload import Payload
from ._stage import MARKER, MIN_PYTHON

__all__ = ["HelloSync", "StderrTail", "run_stage"]

logger = logging.getLogger("mproxy.controller")

#: What a start-failure message quotes at most of what the command wrote.
_QUOTE: Final = 300
#: How much of the noise before the hello is kept to quote (the rest is only counted).
_NOISE_KEPT: Final = 4096
#: Bytes at the end of a search that may be the start of a hello cut by the read.
_HELLO_TAIL: Final = 12


def quote(data: bytes) -> str:
    """``data`` for an error message: decoded, clipped, control characters escaped."""
    text = data.decode("utf-8", "replace")
    clipped = text if len(text) <= _QUOTE else text[:_QUOTE] + "…"
    return repr(clipped)


class HelloSync:
    """A transport over an agent command's :class:`~link.FdTransport` that delivers its
    stdout from the agent's hello frame on, skipping what came before it (a login
    shell's banner): ``skipped`` keeps the start of that, ``found`` says whether the
    hello came. ``pending`` is what was read from the transport already (after the
    first stage's last line). Everything but receiving is the transport's own."""

    def __init__(self, transport: FdTransport, pending: bytes = b"", *, where: str) -> None:
        self._transport = transport
        self._pending = bytearray(pending)
        self._where = where
        self.found = False
        self.skipped = bytearray()
        self.skipped_size = 0
        # The transport's own methods, not wrappers: every frame the session writes goes
        # through them, and a wrapper would add a call to each.
        self.can_splice = transport.can_splice
        self.send_all = transport.send_all
        self.try_send = transport.try_send
        self.send_spliced = transport.send_spliced
        self.wait_peer_gone = transport.wait_peer_gone
        self.aclose = transport.aclose

    async def receive_into(self, buffer: memoryview) -> int:
        while not self.found:
            at = find_hello(self._pending)
            if at != -1:
                self._skip(self._pending[:at])
                del self._pending[:at]
                self.found = True
                if self.skipped_size:
                    logger.debug("%s: skipped %d bytes before the agent's hello: %s",
                                 self._where, self.skipped_size, quote(bytes(self.skipped)))
                break
            keep = min(len(self._pending), _HELLO_TAIL)
            self._skip(self._pending[:len(self._pending) - keep])
            del self._pending[:len(self._pending) - keep]
            chunk = bytearray(65536)
            received = await self._transport.receive_into(memoryview(chunk))
            if not received:
                self._skip(self._pending)
                self._pending.clear()
                return 0
            self._pending += memoryview(chunk)[:received]
        if self._pending:
            size = min(len(buffer), len(self._pending))
            buffer[:size] = self._pending[:size]
            del self._pending[:size]
            return size
        return await self._transport.receive_into(buffer)

    def _skip(self, data: bytes | bytearray) -> None:
        self.skipped_size += len(data)
        room = _NOISE_KEPT - len(self.skipped)
        if room > 0:
            self.skipped += data[:room]

    def described(self) -> str:
        """What the command wrote instead of a hello, for an error message ('' if nothing)."""
        if not self.skipped_size:
            return ""
        return f"; instead of the agent's hello it wrote {quote(bytes(self.skipped))}"

class StderrTail:
    """Copies an agent command's stderr to ours as it comes, keeping its last lines for
    the message of a start that failed (ssh's own reason, the shell's 'not found')."""

    def __init__(self, read_fd: int) -> None:
        self._stream = trio.lowlevel.FdStream(read_fd)
        self._tail = b""
        self.ended = trio.Event()

    async def run(self) -> None:
        try:
            while chunk := await self._stream.receive_some(65536):
                self._tail = (self._tail + chunk)[-_NOISE_KEPT:]
                _write_stderr(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.ended.set()
            await self._stream.aclose()

    def last_lines(self) -> str:
        """The last non-empty lines written, joined (at most a few hundred characters)."""
        lines = [line.strip() for line in self._tail.decode("utf-8", "replace").splitlines()]
        text = " / ".join(line for line in lines[-3:] if line)
        return text[-_QUOTE:]


def _write_stderr(data: bytes) -> None:
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:  # our stderr is gone: the copy is not worth failing the agent for
        pass


async def run_stage(transport: FdTransport, payload: Payload, *, where: str, python: str,
                    noise: bytearray) -> bytes:
    """Hold the first stage's dialogue (see ``_stage``): send the payload each time it
    asks, until it says ``run``. Returns what was read after that line. What came before
    the stage's first line (a login's output) is skipped and kept in ``noise``.

    Raises :class:`PythonTooOld`, :class:`PayloadVerificationFailed`,
    :class:`PayloadUploadFailed` (the connection broke while sending, or the stage read
    a short payload), and :class:`_StageEnded` when the stream ended before ``run``: the
    caller, which has the exit status, says what that means."""
    buffer = bytearray()
    started = False
    uploads = 0
    chunk = bytearray(65536)
    while True:
        if not started:
            at = buffer.find(MARKER)
            if at == -1:
                skipped = max(0, len(buffer) - len(MARKER) + 1)
                noise += buffer[:max(0, min(skipped, _NOISE_KEPT - len(noise)))]
                del buffer[:skipped]
            else:
                noise += buffer[:max(0, min(at, _NOISE_KEPT - len(noise)))]
                del buffer[:at]
                started = True
                if noise.strip():
                    logger.debug("%s: skipped the login's output before the first stage: %s",
                                 where, quote(bytes(noise)))
        while started and (end := buffer.find(b"\n")) != -1:
            line = bytes(buffer[:end])
            del buffer[:end + 1]
            if not line:
                continue
            if not line.startswith(MARKER):
                raise AgentStartError(f"{where}: the first stage wrote {quote(line)}, "
                                      "not one of its lines")
            word, _, detail = line[len(MARKER):].decode("utf-8", "replace").partition(" ")
            if word == "run":
                return bytes(buffer)
            if word == "note":
                logger.debug("%s: %s", where, detail)
            elif word == "old":
                raise PythonTooOld(
                    f"{where}: {python} is Python {detail}; the agent needs Python "
                    f"{'.'.join(map(str, MIN_PYTHON))} or later")
            elif word == "need":
                logger.debug("%s: sending the agent's payload (%d bytes; cached copy: %s)",
                             where, payload.size, detail)
                uploads += 1
                try:
                    await transport.send_all([payload.data])
                except trio.BrokenResourceError as exc:
                    raise PayloadUploadFailed(
                        f"{where}: the connection broke while the agent's payload was "
                        f"being sent ({exc})") from None
            elif word == "bad":
                if uploads >= 2:
                    raise PayloadVerificationFailed(
                        f"{where}: the agent's payload failed verification twice on arrival "
                        f"(sha256 {detail}, expected {payload.sha256}); nothing was run")
                logger.debug("%s: the payload arrived with sha256 %s; sending it again",
                             where, detail)
            elif word == "short":
                raise PayloadUploadFailed(
                    f"{where}: the agent's payload was cut off on its way ({detail} arrived)")
            else:
                raise AgentStartError(f"{where}: the first stage said {quote(line)}")
        received = await transport.receive_into(memoryview(chunk))
        if not received:
            raise StageEnded(bytes(noise + buffer), uploads=uploads, started=started)
        buffer += memoryview(chunk)[:received]


class StageEnded(Exception):
    """The first stage's output ended before it said ``run`` (internal: the caller turns
    it into an :class:`AgentStartError` once it knows the exit status)."""

    def __init__(self, output: bytes, *, uploads: int, started: bool) -> None:
        super().__init__("the first stage's output ended")
        self.output = output
        self.uploads = uploads
        self.started = started
