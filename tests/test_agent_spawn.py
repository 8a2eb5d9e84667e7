"""Starting children: spawn failures (error + exit 127/126, the agent carries on), the
environment policy and its config frame, exact environments, env_set / env_unset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from agent_harness import Raw, RawChild, inproc

from protocol import Config, encode


async def _spawn_fails(raw: Raw, argv: list[str], errno_name: str, code: int,
                       cwd: bytes | None = None) -> RawChild:
    child = raw.exec(argv, cwd=cwd)
    error = await raw.error(child, "spawn-failed")
    assert (error.errno, error.ref, error.id) == (errno_name, "exec", child.id)
    exit_frame = await raw.exited(child)
    assert (exit_frame.code, exit_frame.sig) == (code, None)
    assert child.started is None
    raw.close(child.id)
    await raw.closed(child)
    return child


async def test_spawn_failures_report_errno_and_exit_code(tmp_path: Path) -> None:
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\necho no\n")
    plain.chmod(0o644)
    async with inproc() as (raw, status):
        await _spawn_fails(raw, ["no-such-program-anywhere"], "ENOENT", 127)
        await _spawn_fails(raw, [str(tmp_path / "missing")], "ENOENT", 127)
        await _spawn_fails(raw, [str(plain)], "EACCES", 126)
        await _spawn_fails(raw, [str(tmp_path)], "EACCES", 126)  # a directory
        await _spawn_fails(raw, ["true"], "ENOENT", 126, cwd=str(tmp_path / "nowhere").encode())
        await _spawn_fails(raw, ["true"], "ENOTDIR", 126, cwd=str(plain).encode())
        # The agent is still up: the next exec works.
        child = await raw.run(["sh", "-c", "echo still here; exit 5"])
        assert child.output(1) == b"still here\n"
        assert child.exit is not None and child.exit.code == 5
        kinds = [e.kind for e in raw.errors]
        assert kinds == ["spawn-failed"] * 6
    assert status == [0]


async def test_spawn_failed_msg_says_why_in_words_that_follow_the_program(
    tmp_path: Path,
) -> None:
    # The controller shows msg after the program's name: it names neither it nor the errno.
    script = tmp_path / "s.sh"
    script.write_text("#!/no/such/sh\necho never\n")
    script.chmod(0o755)
    async with inproc() as (raw, _):
        for argv, cwd, errno_name, code, msg in [
            (["no-such-program-anywhere"], None, "ENOENT", 127,
             "No such file or directory (searched $PATH)"),
            ([str(tmp_path / "missing")], None, "ENOENT", 127, "No such file or directory"),
            (["./s.sh"], str(tmp_path).encode(), "ENOENT", 127,
             "interpreter '/no/such/sh' (from #!) not found"),
            (["true"], str(tmp_path / "nowhere").encode(), "ENOENT", 126,
             f"cannot enter directory {str(tmp_path / 'nowhere')!r}: No such file or directory"),
        ]:
            child = raw.exec(argv, cwd=cwd)
            error = await raw.error(child, "spawn-failed")
            assert (error.errno, error.msg) == (errno_name, msg)
            assert (await raw.exited(child)).code == code


async def test_a_script_without_shebang_runs_with_sh(tmp_path: Path) -> None:
    script = tmp_path / "nosb.sh"
    script.write_text('echo "$0|$#|$*"; exit 3\n')
    script.chmod(0o755)
    async with inproc() as (raw, _):
        for fds in ((), (3,)):  # Popen, posix_spawn
            child = await raw.run(["./nosb.sh", "a b", "c"], cwd=str(tmp_path).encode(), fds=fds)
            assert child.output(1) == b"./nosb.sh|2|a b c\n"  # what bash prints
            assert child.exit is not None and child.exit.code == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="the credential drop needs root")
async def test_started_gives_the_uid_and_gid_the_child_got(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with inproc() as (raw, _):  # it reads SUDO_UID from our environment at each exec
        monkeypatch.setenv("SUDO_UID", "65534")
        monkeypatch.setenv("SUDO_GID", "65533")
        for fds in ((), (3,)):
            child = await raw.run(["sh", "-c", "id -u; id -g"], drop_sudo=True, fds=fds)
            assert child.started is not None
            assert (child.started.uid, child.started.gid) == (65534, 65533)
            assert child.output(1) == b"65534\n65533\n"
        monkeypatch.delenv("SUDO_UID")
        monkeypatch.delenv("SUDO_GID")
        for drop in (True, False):  # without the variables --drop-sudo is a no-op
            child = await raw.run(["sh", "-c", "id -u; id -g"], drop_sudo=drop)
            assert child.started is not None
            assert (child.started.uid, child.started.gid) == (0, 0)
            assert child.output(1) == b"0\n0\n"


async def test_data_for_a_child_that_failed_to_start_still_gets_credit() -> None:
    async with inproc() as (raw, _):
        child = raw.exec(["no-such-program-anywhere"])
        await raw.write(child.id, 0, b"x" * (3 << 20))  # needs the agent's credit back
        raw.eof(child.id)
        assert (await raw.exited(child)).code == 127
        raw.close(child.id)
        await raw.closed(child)


# ---------------------------------------------------------------------------- environment

def _env_lines(child: RawChild) -> dict[str, str]:
    lines = child.output(1).decode().splitlines()
    return dict(line.split("=", 1) for line in lines)


@pytest.fixture
def agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process agent inherits our environment: give it some variables to filter."""
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/nowhere")
    monkeypatch.setenv("MPROXY_TOKEN", "secret")
    monkeypatch.setenv("TEST_UNKNOWN_VAR", "dropped")
    monkeypatch.setenv("FOO_A", "a")
    monkeypatch.setenv("FOO_SECRET", "s")
    monkeypatch.setenv("BAR_12", "12")
    monkeypatch.setenv("BAR_X", "x")
    monkeypatch.setenv("LC_TEST", "kept")
    monkeypatch.setenv("HOME", "/home/test-agent")


@pytest.mark.usefixtures("agent_env")
async def test_default_policy_filters_the_inherited_environment() -> None:
    async with inproc() as (raw, _):
        env = _env_lines(await raw.run(["/usr/bin/env"]))
        for name in ("LD_PRELOAD", "LD_LIBRARY_PATH", "MPROXY_TOKEN", "TEST_UNKNOWN_VAR",
                     "FOO_A", "BAR_12"):
            assert name not in env, name
        assert env["PATH"] == os.environ["PATH"]
        assert env["HOME"] == "/home/test-agent"
        assert env["LC_TEST"] == "kept"


@pytest.mark.usefixtures("agent_env")
async def test_config_frame_replaces_the_policy() -> None:
    async with inproc() as (raw, _):
        raw.send(Config(env_keep=("FOO_*", "/^BAR_[0-9]+$/", "MPROXY_*"),
                        env_remove=("FOO_SECRET",)))
        env = _env_lines(await raw.run(["/usr/bin/env"]))
        assert env == {"FOO_A": "a", "BAR_12": "12", "MPROXY_TOKEN": "secret"}

        # Only the remove list: keep stays as configured.
        raw.send(Config(env_remove=("/^FOO/",)))
        env = _env_lines(await raw.run(["/usr/bin/env"]))
        assert env == {"BAR_12": "12", "MPROXY_TOKEN": "secret"}

        # A bad regular expression: error bad-frame, the policy unchanged.
        raw.send(Config(env_keep=("/(unclosed/", "PATH"), env_remove=()))
        await raw.wait(lambda: bool(raw.errors), 10, "the config error")
        assert [(e.kind, e.ref) for e in raw.errors] == [("bad-frame", "config")]
        assert "unclosed" in raw.errors[0].msg
        env = _env_lines(await raw.run(["/usr/bin/env"]))
        assert env == {"BAR_12": "12", "MPROXY_TOKEN": "secret"}

        # A bad remove list alone leaves the keep list alone too.
        raw.send_raw(encode(Config(env_remove=("/[/",))))
        await raw.wait(lambda: len(raw.errors) == 2, 10, "the second config error")
        env = _env_lines(await raw.run(["/usr/bin/env"]))
        assert env == {"BAR_12": "12", "MPROXY_TOKEN": "secret"}


@pytest.mark.usefixtures("agent_env")
async def test_exact_environment_is_used_as_given() -> None:
    async with inproc() as (raw, _):
        entries = (b"LD_PRELOAD=", b"MPROXY_X=1", b"B=2", b"A=1", b"WEIRD=\xff\x01=x")
        child = await raw.run(["/usr/bin/env"], env=entries)
        assert child.output(1) == b"".join(e + b"\n" for e in entries)
        empty = await raw.run(["/usr/bin/env"], env=())
        assert empty.output(1) == b""


@pytest.mark.usefixtures("agent_env")
async def test_env_set_and_env_unset() -> None:
    async with inproc() as (raw, _):
        env = _env_lines(await raw.run(
            ["/usr/bin/env"], env_set=(b"NEW=1", b"HOME=/elsewhere", b"LD_PRELOAD=x"),
            env_unset=(b"PATH", b"NOT_THERE")))
        assert "PATH" not in env
        assert env["NEW"] == "1" and env["HOME"] == "/elsewhere"
        assert env["LD_PRELOAD"] == "x"  # explicitly set: the policy is for inheritance
        assert env["LC_TEST"] == "kept"

        env = _env_lines(await raw.run(["/usr/bin/env"], env=(b"A=1", b"B=2"),
                                       env_set=(b"B=3", b"C=4"), env_unset=(b"A",)))
        assert env == {"B": "3", "C": "4"}


async def test_path_lookup_uses_the_childs_path(tmp_path: Path) -> None:
    script = tmp_path / "my-tool"
    script.write_text("#!/bin/sh\necho tool \"$@\"\n")
    script.chmod(0o755)
    async with inproc() as (raw, _):
        child = await raw.run(["my-tool", "x"],
                              env_set=(f"PATH={tmp_path}:/usr/bin:/bin".encode(),))
        assert child.output(1) == b"tool x\n"
        child = await raw.run(["renamed", "y"], path=str(script).encode())
        assert child.output(1) == b"tool y\n"
        child = await raw.run(["pwd"], cwd=str(tmp_path).encode())
        assert child.output(1) == f"{tmp_path}\n".encode()
