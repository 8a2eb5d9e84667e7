"""A throwaway OpenSSH server on 127.0.0.1 for the ssh tests (session-scoped fixture).

Nothing of the system's ssh configuration is used or touched: host key, user key,
authorized_keys, sshd_config and pid file live in a temporary directory, and the ssh
client is told to ignore known_hosts. Tests run as root, so the server permits root
logins by key only. If sshd is not installed the tests using the fixture fail with a
message saying so (CI installs openssh-server: see scripts/test).

Import the fixture into a test module with ``from sshd import sshd``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["SSHD", "SshServer", "sshd"]

SSHD = "/usr/sbin/sshd"
#: Bounds the wait for sshd to accept connections.
_START_DEADLINE = 15.0
_PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it


@dataclass(frozen=True)
class SshServer:
    host: str
    port: int
    user: str
    key: Path
    log: Path  # sshd's own log (-e): read it when a test fails
    #: Absolute path of this venv's mproxy-agent: the remote login shell's PATH is not ours.
    agent_path: str

    @property
    def ssh_prefix(self) -> list[str]:
        """``ssh ... user@host``: append the remote command."""
        return [
            "ssh", "-p", str(self.port), "-i", str(self.key),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            f"{self.user}@{self.host}",
        ]

    def agent_command(self, *agent_args: str) -> list[str]:
        """The argv that starts an agent on the far side of ssh."""
        return [*self.ssh_prefix, self.agent_path, *agent_args]

    def agent_command_line(self, *agent_args: str) -> str:
        """The same as one shell-quoted string (mproxy-exec --agent)."""
        return shlex.join(self.agent_command(*agent_args))


def _require(program: str) -> str:
    path = shutil.which(program) or (program if os.access(program, os.X_OK) else None)
    if path is None:
        pytest.fail(
            f"{program} is not installed: the ssh tests need OpenSSH (Debian: apt-get install "
            f"openssh-server openssh-client; scripts/test does this when run as root)",
            pytrace=False,
        )
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _write_config(directory: Path, port: int, venv_bin: Path) -> Path:
    config = directory / "sshd_config"
    config.write_text(
        "\n".join([
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {directory / 'host_key'}",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            f"PidFile {directory / 'sshd.pid'}",
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PermitRootLogin yes",
            "AcceptEnv none",
            "PrintMotd no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "MaxStartups 100",
            "MaxSessions 100",
            f"SetEnv PATH={venv_bin}:/usr/bin:/bin",
            "",
        ])
    )
    return config


def _wait_accepting(process: subprocess.Popen[bytes], port: int, log: Path) -> bool:
    """True once the port accepts; False if sshd exited (e.g. the port was taken)."""
    deadline = time.monotonic() + _START_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.02)  # polling a condition, with a deadline
    process.kill()
    process.wait()
    pytest.fail(f"sshd did not accept connections within {_START_DEADLINE}s:\n"
                f"{log.read_text(errors='replace')}", pytrace=False)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A running sshd on a free 127.0.0.1 port, accepting our throwaway key for root."""
    sshd_path = _require(SSHD)
    keygen = _require("ssh-keygen")
    _require("ssh")
    venv_bin = Path(sys.executable).parent
    agent_path = venv_bin / "mproxy-agent"
    if not os.access(agent_path, os.X_OK):
        pytest.fail(f"{agent_path} not found: install the project in this venv "
                    f"(pip install -e .)", pytrace=False)
    directory = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", name,
                        "-f", str(directory / name)], check=True)
    shutil.copy(directory / "user_key.pub", directory / "authorized_keys")
    _PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    log = directory / "sshd.log"
    for _attempt in range(3):  # the free port may be taken before sshd binds it
        port = _free_port()
        config = _write_config(directory, port, venv_bin)
        with log.open("ab") as log_file:
            process = subprocess.Popen(
                [sshd_path, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            )
        if _wait_accepting(process, port, log):
            break
    else:
        pytest.fail(f"sshd failed to start:\n{log.read_text(errors='replace')}",
                    pytrace=False)
    try:
        yield SshServer(
            host="127.0.0.1", port=port, user="root", key=directory / "user_key", log=log,
            agent_path=str(agent_path),
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
