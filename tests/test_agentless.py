"""Agentless starts (controller._stage, _payload): the agent run over a real OpenSSH
server on a bare Python (Debian's /usr/bin/python3, no trio, no msgpack) as an
unprivileged user with a fresh home, nothing of ours installed there."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import shlex
import signal
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from conftest import all_procs, wait_until
from relay import round_trips
from sshd import BareUser, SshServer, bare_users, sshd

import controller
from controller._payload import EXCLUDED, Payload, payload
from controller._stage import stage_command

__all__ = ["bare_users", "sshd"]  # the fixtures, re-exported for pytest

pytestmark = pytest.mark.ssh

MPROXY_EXEC = str(Path(sys.executable).parent / "mproxy-exec")
BARE_PYTHON = "/usr/bin/python3"
MakeUser = Callable[..., BareUser]


def cache_of(user: BareUser) -> Path:
    return user.home / ".cache" / "mproxy-agent"


def uploads(caplog: pytest.LogCaptureFixture) -> int:
    return sum("sending the agent's payload" in r.getMessage() for r in caplog.records)


async def run_true(sshd: SshServer, user: BareUser, **options: object) -> None:
    """One agentless start as ``user`` that runs a command and checks its output."""
    options.setdefault("ssh_options", sshd.ssh_options)
    with trio.fail_after(60):
        async with controller.open_ssh_agent(sshd.destination(user.name),
                                             **options) as agent:  # type: ignore[arg-type]
            result = await agent.run_process(["sh", "-c", "echo $(id -un) ok"],
                                             capture_stdout=True)
            assert result.stdout == f"{user.name} ok\n".encode()


def mproxy_exec(sshd: SshServer, user: BareUser, *command: str, **kwargs: object
                ) -> subprocess.CompletedProcess[bytes]:
    argv = [MPROXY_EXEC, "--ssh", sshd.destination(user.name)]
    for option in sshd.ssh_options:
        argv += ["-o", option]
    done: subprocess.CompletedProcess[bytes] = subprocess.run(  # type: ignore[call-overload]
        [*argv, "--", *command], capture_output=True, timeout=60, check=False, **kwargs)
    return done


@pytest.fixture
def user(bare_users: MakeUser) -> BareUser:
    return bare_users()


@pytest.fixture
async def cached(sshd: SshServer, user: BareUser, caplog: pytest.LogCaptureFixture) -> Payload:
    """The payload, after one start as ``user`` has cached it (debug records captured)."""
    caplog.set_level(logging.DEBUG, logger="mproxy.controller")
    await run_true(sshd, user)
    return payload()


# --------------------------------------------------------------------------- payload


def test_payload_is_deterministic_and_small() -> None:
    first = payload()
    payload.cache_clear()
    assert payload() == first  # rebuilt from the local cache: the same bytes
    assert first.size <= 512 * 1024
    names = zipfile.ZipFile(io.BytesIO(first.data)).namelist()
    assert "agent/_cli.py" in names and "msgpack/fallback.py" in names
    assert not any(name.endswith((".so", ".pyc")) for name in names)
    assert not any("/_tests/" in name or name.startswith("controller/") for name in names)


def test_payload_holds_what_the_agent_imports_and_nothing_more(tmp_path: Path) -> None:
    """A bare Python imports the agent from the payload alone: every module in it is
    loaded (nothing superfluous) and nothing is loaded from elsewhere but the stdlib."""
    archive = tmp_path / "payload.zip"
    archive.write_bytes(payload().data)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import agent._cli, childproc, msgpack\n"
        "assert msgpack.Unpacker.__module__ == 'msgpack.fallback', msgpack.Unpacker\n"
        "print('\\n'.join(sorted(name for name, m in sys.modules.items()"
        " if getattr(m, '__file__', '') and sys.argv[1] in m.__file__)))"
    )
    done = subprocess.run([BARE_PYTHON, "-I", "-S", "-c", script, str(archive)],
                          capture_output=True, check=True, timeout=60)
    imported = set(done.stdout.decode().split())
    names = zipfile.ZipFile(archive).namelist()
    shipped = {name[:-3].replace("/", ".").removesuffix(".__init__") for name in names}
    assert shipped - imported == set(), "shipped but never imported: extend EXCLUDED"
    assert not any(name.startswith(tuple(p for p in EXCLUDED if p.endswith(".")))
                   for name in imported)


@pytest.mark.parametrize("shell", ["sh", "bash", "dash", "zsh", "fish"])
def test_every_login_shell_passes_the_first_stage_unchanged(shell: str) -> None:
    """ssh hands the remote command to the login shell as one string."""
    path = subprocess.run(["sh", "-c", f"command -v {shell}"], capture_output=True,
                          text=True, check=False).stdout.strip()
    if not path:
        pytest.fail(f"{shell} is not installed (scripts/test installs it)", pytrace=False)
    command = stage_command("python3", payload(), ["--x", "a b", "$HOME", "'q'"])
    expected = shlex.split(command)
    printer = "import sys; print(repr(sys.argv[2:]))"
    echoed = command.replace("python3", shlex.join([BARE_PYTHON, "-c", printer, "python3"]), 1)
    done = subprocess.run([path, "-c", echoed], capture_output=True, text=True, timeout=30,
                          check=True)
    assert done.stdout.strip() == repr(expected[1:])


# ------------------------------------------------------------------------ start-ups


async def test_the_bare_python_has_no_trio(sshd: SshServer, user: BareUser) -> None:
    done = subprocess.run([*sshd.ssh_prefix[:-1], sshd.destination(user.name),
                           "command -v python3; python3 -c 'import trio'"],
                          capture_output=True, timeout=60, check=False)
    assert done.stdout.decode().strip() == BARE_PYTHON
    assert b"No module named 'trio'" in done.stderr


async def test_first_start_uploads_and_caches_the_second_does_not(
    sshd: SshServer, user: BareUser, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mproxy.controller")
    code = payload()
    await run_true(sshd, user)
    assert uploads(caplog) == 1
    cached = cache_of(user) / code.sha256
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == code.sha256
    for path in (cache_of(user), cached):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode) & 0o077) == (user.uid, 0)
    before = cached.stat()
    await run_true(sshd, user)
    assert uploads(caplog) == 1
    assert cached.stat().st_ino == before.st_ino  # not rewritten either
    assert sorted(p.name for p in cache_of(user).iterdir()) == [
        code.sha256, f"{code.sha256}.{sys.implementation.cache_tag}"]


async def test_twenty_concurrent_first_starts_leave_one_good_copy(
    sshd: SshServer, bare_users: MakeUser, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mproxy.controller")
    user = bare_users("/bin/bash")
    # Each login waits in ~/.bashrc until all twenty are there: then they all find the
    # cache empty at once, rather than one after the other as the handshakes finish.
    (user.home / ".bashrc").write_text(
        "for _ in $(seq 600); do [ -e ~/go ] && break; sleep 0.05; done\n")

    def waiting_logins() -> int:
        return sum(1 for pid in all_procs() if _uid_of(pid) == user.uid
                   and _command_of(pid) == "bash")

    async def release_when_all_wait() -> None:
        await wait_until(lambda: waiting_logins() >= 20, timeout=60,
                         what="twenty logins waiting")
        (user.home / "go").touch()

    # And each connection is slow (0.2 s each way): between one stage finding the cache
    # empty and installing the payload there, the others find it empty too.
    slow = through_relay(sshd, "--delay", "0.2")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_when_all_wait)
        for _ in range(20):
            nursery.start_soon(functools.partial(run_true, sshd, user, ssh_options=slow))
    assert uploads(caplog) >= 2  # they did race
    code = payload()
    assert sorted(p.name for p in cache_of(user).iterdir()) == [
        code.sha256, f"{code.sha256}.{sys.implementation.cache_tag}"]
    assert (cache_of(user) / code.sha256).read_bytes() == code.data


def _trap_zip(marker: Path) -> bytes:
    """A payload-shaped zip whose agent would create ``marker`` if it ever ran."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ("agent/__init__.py", "agent/_cli.py"):
            archive.writestr(name, f"open({str(marker)!r}, 'w').close()\n")
    return buffer.getvalue()


@pytest.mark.parametrize("corrupt", ["payload", "compiled"])
async def test_a_corrupted_cache_is_replaced_and_never_run(
    sshd: SshServer, user: BareUser, caplog: pytest.LogCaptureFixture, corrupt: str,
    cached: Payload,
) -> None:
    code = cached
    marker = user.home / "trap-ran"
    if corrupt == "payload":
        target = cache_of(user) / code.sha256
        target.write_bytes(_trap_zip(marker))
    else:  # right length, one flipped byte: the code's own sha256 no longer matches
        target = cache_of(user) / f"{code.sha256}.{sys.implementation.cache_tag}"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    await run_true(sshd, user)
    assert not marker.exists()
    assert uploads(caplog) == (2 if corrupt == "payload" else 1)
    assert (cache_of(user) / code.sha256).read_bytes() == code.data
    await run_true(sshd, user)  # repaired: no upload more
    assert uploads(caplog) == (2 if corrupt == "payload" else 1)


@pytest.mark.parametrize("fault", ["group-writable directory", "group-writable file",
                                   "file of another user", "symlinked directory"])
async def test_a_cache_others_could_write_is_never_used(
    sshd: SshServer, user: BareUser, caplog: pytest.LogCaptureFixture, fault: str,
    cached: Payload,
) -> None:
    cache = cache_of(user)
    copy = cache / cached.sha256
    if fault == "group-writable directory":
        cache.chmod(0o770)
    elif fault == "group-writable file":
        copy.chmod(0o620)
    elif fault == "file of another user":
        os.chown(copy, 0, 0)
    else:
        elsewhere = user.home / "elsewhere"
        cache.rename(elsewhere)
        cache.symlink_to(elsewhere)
    before = copy.stat()
    await run_true(sshd, user)
    assert uploads(caplog) == 2  # the cached copy was not trusted
    assert any("not used" in r.getMessage() or "cached copy" in r.getMessage()
               for r in caplog.records)
    if fault not in {"group-writable file", "file of another user"}:
        assert copy.stat().st_mtime_ns == before.st_mtime_ns  # nothing written there


async def test_a_read_only_home_runs_from_memory(
    sshd: SshServer, user: BareUser, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mproxy.controller")
    user.home.chmod(0o555)
    await run_true(sshd, user)
    await run_true(sshd, user)
    assert uploads(caplog) == 2
    assert not (user.home / ".cache").exists()
    assert any("running from memory" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------- failures


async def test_no_python3_on_the_host(sshd: SshServer, bare_users: MakeUser) -> None:
    user = bare_users(python=False)
    with pytest.raises(controller.NoPython, match=rf"{user.name}@.*: no python3 in the "
                       r"login's PATH \(exit status 127\): .*python3.*not found"):
        await run_true(sshd, user)
    done = mproxy_exec(sshd, user, "true")
    assert done.returncode == 255
    assert b"no python3 in the login's PATH" in done.stderr
    assert b"Traceback" not in done.stderr


async def test_a_python_too_old(sshd: SshServer, user: BareUser) -> None:
    fake = user.home / "python3"
    fake.write_text(
        f"#!{BARE_PYTHON}\n"
        "import sys\n"
        "sys.version_info = (3, 8, 10, 'final', 0)  # what an old interpreter reports\n"
        "code = sys.argv[sys.argv.index('-c') + 1]\n"
        "sys.argv = ['-c', *sys.argv[sys.argv.index('-c') + 2:]]\n"
        "exec(code)\n")
    fake.chmod(0o755)
    with pytest.raises(controller.PythonTooOld, match=r"is Python 3\.8\.10; the agent needs "
                       r"Python 3\.11 or later"):
        await run_true(sshd, user, python=str(fake))
    assert not (user.home / ".cache").exists()


async def test_a_host_that_does_not_exist(sshd: SshServer) -> None:
    with pytest.raises(controller.SshFailed, match=r"ssh nobody@no-such-host\.invalid failed "
                       r"\(exit status 255\): .*no-such-host\.invalid"):
        async with controller.open_ssh_agent("nobody@no-such-host.invalid",
                                             ssh_options=sshd.ssh_options):
            pass
    argv = [MPROXY_EXEC, "--ssh", "nobody@no-such-host.invalid", "--", "true"]
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert done.returncode == 255
    assert b"mproxy-exec: ssh nobody@no-such-host.invalid failed" in done.stderr
    assert b"Traceback" not in done.stderr


async def test_a_login_that_prints_to_stdout_still_connects(
    sshd: SshServer, bare_users: MakeUser, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mproxy.controller")
    user = bare_users("/bin/bash")
    # bash, started by sshd for a command, reads ~/.bashrc: a banner, conda's messages.
    (user.home / ".bashrc").write_text("echo 'Welcome to the host'\nprintf 'x\\0y\\n'\n")
    await run_true(sshd, user)
    assert any("Welcome to the host" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ mproxy-exec --ssh


def test_mproxy_exec_runs_streams_and_exits_agentless(sshd: SshServer, user: BareUser) -> None:
    data = os.urandom(1 << 20)
    done = mproxy_exec(sshd, user, "sh", "-c", "cat; echo err >&2; exit 7", input=data)
    assert (done.returncode, done.stdout) == (7, data)
    assert done.stderr == b"err\n"


def test_mproxy_exec_bridges_an_extra_fd_agentless(sshd: SshServer, user: BareUser) -> None:
    argv = [MPROXY_EXEC, "--ssh", sshd.destination(user.name), "--fd", "3"]
    for option in sshd.ssh_options:
        argv += ["-o", option]
    # mproxy-exec's fd 3 is the shell's stdout; its own stdout goes nowhere.
    line = shlex.join([*argv, "--", "sh", "-c", "echo three >&3; echo one"])
    done = subprocess.run(["sh", "-c", f"{line} 3>&1 >/dev/null"], capture_output=True,
                          timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"three\n", b"")


async def test_mproxy_exec_forwards_a_signal_agentless(sshd: SshServer, user: BareUser) -> None:
    argv = [MPROXY_EXEC, "--ssh", sshd.destination(user.name)]
    for option in sshd.ssh_options:
        argv += ["-o", option]
    script = "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.1; done"
    with subprocess.Popen([*argv, "--", "sh", "-c", script], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.read() == b"got TERM\n"
        assert proc.wait(timeout=60) == 42


async def test_killing_the_ssh_client_leaves_nothing_on_the_host(
    sshd: SshServer, user: BareUser,
) -> None:
    with trio.fail_after(60):
        with pytest.raises(controller.AgentLost):
            async with controller.open_ssh_agent(sshd.destination(user.name),
                                                 ssh_options=sshd.ssh_options) as agent:
                process = await agent.open_process(["sleep", "1000"])
                await process.wait_started()
                assert agent.agent_pid is not None
                os.kill(agent.agent_pid, signal.SIGKILL)  # the ssh client
                await process.wait()

        def users_processes() -> list[int]:
            return [pid for pid in all_procs() if _uid_of(pid) == user.uid]

        await wait_until(lambda: not users_processes(), timeout=30,
                         what=f"{user.name}'s processes to end")


def _command_of(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


# ------------------------------------------------------------- network faults, latency

RELAY = str(Path(__file__).with_name("relay.py"))


def through_relay(sshd: SshServer, *relay_options: str) -> list[str]:
    """ssh options that carry the connection through tests/relay.py."""
    proxy = shlex.join([sys.executable, RELAY, *relay_options, "tcp", sshd.host,
                        str(sshd.port)])
    return [*sshd.ssh_options, f"ProxyCommand={proxy}"]


async def test_an_upload_cut_off_is_reported(sshd: SshServer, user: BareUser) -> None:
    # The handshake and the command line take a few kB; the payload 400 more.
    options = through_relay(sshd, "--cut-after", "100000")
    with trio.fail_after(60), pytest.raises(
        controller.PayloadUploadFailed,
        match=rf"{user.name}@.*: the connection ended while the agent's payload was being sent",
    ):
        async with controller.open_ssh_agent(sshd.destination(user.name), ssh_options=options):
            pass
    await run_true(sshd, user)  # nothing half-written is left to trip over


@pytest.mark.parametrize("corrupted", [1, 2])
async def test_an_upload_that_fails_verification_is_sent_again_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, corrupted: int,
) -> None:
    """ssh's MAC stops corruption on the way; a relay between us and the stage's stdin
    (no ssh) shows what the stage does with a payload that arrives damaged."""
    caplog.set_level(logging.DEBUG, logger="mproxy.controller")
    code = payload()
    offsets = ",".join(str(n * code.size + 1000) for n in range(corrupted))
    stage = stage_command(BARE_PYTHON, code, [])
    argv = [sys.executable, RELAY, "--corrupt-at", offsets, "exec", "--", "env", "-i",
            f"HOME={tmp_path}", "PATH=/usr/bin:/bin", "sh", "-c", stage]
    opened = controller._agent.open_command_agent(
        argv, where="the relay", payload=code, window=1 << 20, max_frame=1 << 20,
        stderr=None, shutdown_timeout=5, handshake_timeout=30)
    with trio.fail_after(60):
        if corrupted == 2:
            with pytest.raises(controller.PayloadVerificationFailed,
                               match="failed verification twice on arrival"):
                async with opened:
                    pass
            assert not (tmp_path / ".cache/mproxy-agent" / code.sha256).exists()
        else:
            async with opened as agent:
                result = await agent.run_process(["echo", "ok"], capture_stdout=True)
                assert result.stdout == b"ok\n"
    assert uploads(caplog) == 2


#: Each way, in the round-trip test: longer than anything either end computes in one go
#: (a Python starting), so that only a chunk that answers another follows it that late.
ROUND_TRIP_DELAY = 0.3


async def test_round_trips_warm_as_installed_cold_one_more(
    sshd: SshServer, user: BareUser, tmp_path: Path,
) -> None:
    """Over a relay that delays every chunk each way, count the round trips a start,
    one command and the end wait for (see relay.round_trips): a warm agentless start
    waits for none more than an installed agent, a cold one (the payload asked for,
    then sent) for exactly one more."""

    async def count(destination: str, **options: object) -> int:
        log = tmp_path / f"relay-{len(list(tmp_path.iterdir()))}.log"
        relay = through_relay(sshd, "--delay", str(ROUND_TRIP_DELAY), "--log", str(log))
        with trio.fail_after(90):
            async with controller.open_ssh_agent(
                destination, ssh_options=relay, **options,  # type: ignore[arg-type]
            ) as agent:
                await agent.run_process(["true"])
        return round_trips(log, ROUND_TRIP_DELAY)

    installed = await count(sshd.destination(), agent_command=[sshd.agent_path])
    cold = await count(sshd.destination(user.name))
    warm = await count(sshd.destination(user.name))
    assert (cold, warm) == (installed + 1, installed), (installed, cold, warm)
