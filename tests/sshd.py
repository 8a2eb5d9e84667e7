"""A throwaway OpenSSH server on 127.0.0.1 for the ssh tests (session-scoped fixture).

Nothing of the system's ssh configuration is used or touched: host key, user key,
authorized_keys, sshd_config and pid file live in a temporary directory, and the ssh
client is told to ignore known_hosts. Tests run as root, so the server permits root
logins by key only. If sshd is not installed the tests using the fixture fail with a
message saying so (CI installs openssh-server: see scripts/test).

Import the fixture into a test module with ``from sshd import sshd``.

Bare hosts (the agentless tests): :func:`bare_users` makes unprivileged users with a fresh
home whose logins see only Debian's ``/usr/bin/python3``, which has no trio or msgpack
(``PATH=/usr/bin:/bin``); users made with ``python=False`` get a PATH where no python3
is found at all.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["BARE_PREFIX", "NO_PYTHON_PREFIX", "SSHD", "BareUser", "SshServer", "bare_users",
           "sshd"]

SSHD = "/usr/sbin/sshd"
#: Bounds the wait for sshd to accept connections.
_START_DEADLINE = 15.0
_PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it
#: Users whose names start so log in with PATH=/usr/bin:/bin (no venv, no trio) ...
BARE_PREFIX = "mproxy-bare-"
#: ... or with a PATH where no python3 is found.
NO_PYTHON_PREFIX = "mproxy-nopy-"


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

    def destination(self, user: str | None = None) -> str:
        return f"{user or self.user}@{self.host}"

    @property
    def ssh_options(self) -> list[str]:
        """The ``-o`` options of :attr:`ssh_prefix`, for ``open_ssh_agent``."""
        return [f"Port={self.port}", f"IdentityFile={self.key}", "StrictHostKeyChecking=no",
                "UserKnownHostsFile=/dev/null", "BatchMode=yes", "LogLevel=ERROR"]

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
            # The second, for the bare users: sshd reads it as the user, who cannot enter
            # the first one's directory.
            f"AuthorizedKeysFile {directory / 'authorized_keys'} .ssh/authorized_keys",
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
            f"Match User {BARE_PREFIX}*",
            "    SetEnv PATH=/usr/bin:/bin",
            f"Match User {NO_PYTHON_PREFIX}*",
            "    SetEnv PATH=/nonexistent",
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


@dataclass(frozen=True)
class BareUser:
    name: str
    home: Path
    uid: int
    gid: int


_user_numbers = itertools.count()


@pytest.fixture
def bare_users(sshd: SshServer) -> Iterator[Callable[..., BareUser]]:
    """Make users for the agentless tests (needs root): ``bare_users(shell="/bin/sh",
    python=True)``. Each has a fresh, empty home and logs in with the suite's key; at
    the end of the test its processes are killed and it is removed."""
    if os.geteuid() != 0:
        pytest.fail("the bare-host tests make users: run them as root", pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="mproxy-homes-"))
    base.chmod(0o755)  # the users must reach their homes
    made: list[BareUser] = []

    def make(shell: str = "/bin/sh", *, python: bool = True) -> BareUser:
        prefix = BARE_PREFIX if python else NO_PYTHON_PREFIX
        name = f"{prefix}{os.getpid()}-{next(_user_numbers)}"
        home = base / name
        # -p '*': no password, but not a locked account (sshd refuses those their keys).
        subprocess.run(["useradd", "--no-create-home", "--home-dir", str(home), "--shell",
                        shell, "--user-group", "-p", "*", name], check=True)
        entry = pwd.getpwnam(name)
        home.mkdir(mode=0o700)
        (home / ".ssh").mkdir(mode=0o700)
        shutil.copy(sshd.key.with_name(sshd.key.name + ".pub"), home / ".ssh/authorized_keys")
        for path in (home, home / ".ssh", home / ".ssh/authorized_keys"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        user = BareUser(name, home, entry.pw_uid, entry.pw_gid)
        made.append(user)
        return user

    try:
        yield make
    finally:
        for user in made:
            subprocess.run(["pkill", "-KILL", "-u", user.name], check=False)
            for _attempt in range(50):  # userdel refuses while a process of the user runs
                if subprocess.run(["userdel", user.name], check=False,
                                  stderr=subprocess.DEVNULL).returncode != 8:
                    break
                time.sleep(0.1)  # polling a condition (the user's processes gone), bounded
        shutil.rmtree(base, ignore_errors=True)
