"""The controller library used as a new user would: wrong arguments."""

from __future__ import annotations

import errno
import subprocess
import sys
from typing import Any

import pytest
import trio
import trio.testing

import controller

# ---------------------------------------------------------------- run_process stdin


async def test_run_process_stdin_takes_bytes_likes_and_devnull(
    local_agent: controller.Agent,
) -> None:
    with trio.fail_after(10):
        for given in (b"bytes", bytearray(b"bytearray"), memoryview(b"memoryview")):
            done = await local_agent.run_process(["cat"], stdin=given, capture_stdout=True)
            assert done.stdout == bytes(given)
        done = await local_agent.run_process(["cat"], stdin=subprocess.DEVNULL,
                                             capture_stdout=True)
        assert done.stdout == b""


@pytest.mark.parametrize("stdin", [9, "text", None, True, subprocess.PIPE, sys.stdin],
                         ids=["int", "str", "None", "bool", "PIPE", "file"])
async def test_run_process_refuses_other_stdin(local_agent: controller.Agent,
                                               stdin: Any) -> None:
    with pytest.raises(TypeError, match=r"^stdin must be bytes.*DEVNULL.*cannot be handed"):
        await local_agent.run_process(["cat"], stdin=stdin)
    assert not local_agent.processes


# ---------------------------------------------------------------- argument errors


BAD_ARGUMENTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"argv": []}, ValueError, "argv must not be empty"),
    ({"argv": ["echo", "a\0b"]}, ValueError, r"argv\[1\] contains a NUL byte"),
    ({"argv": ["echo", 3]}, TypeError, r"argv\[1\] must be str, bytes or os.PathLike"),
    ({"argv": "echo hi"}, TypeError, "argv must be a sequence.*single string"),
    ({"path": ""}, ValueError, "path must not be empty"),
    ({"cwd": ""}, ValueError, "cwd must not be empty"),
    ({"cwd": "/tmp\0"}, ValueError, "cwd contains a NUL byte"),
    ({"env": {"A=B": "c"}}, ValueError, "env: variable name 'A=B' contains '='"),
    ({"env": {"": "c"}}, ValueError, "env: a variable name must not be empty"),
    ({"env": {"A\0": "c"}}, ValueError, r"env: variable name 'A\\x00' contains a NUL byte"),
    ({"env": {"A": "c\0"}}, ValueError, "env: the value of 'A' contains a NUL byte"),
    ({"env": {"A": 1}}, TypeError, "env: the value of 'A' must be str, bytes"),
    ({"env": [("A", "b")]}, TypeError, "env must be a mapping"),
    ({"env_overrides": {b"X=Y": b"z"}}, ValueError, "env_overrides: variable name b'X=Y' "
                                                     "contains '='"),
    ({"env_remove": ["A=B"]}, ValueError, "env_remove: variable name 'A=B' contains '='"),
    ({"env_remove": [""]}, ValueError, "env_remove: a variable name must not be empty"),
    ({"env_remove": "PATH"}, TypeError, "env_remove must be a sequence.*single string"),
    ({"extra_fds": [1]}, ValueError, r"extra_fds: 1 is a standard stream \(extra fds are >= 3\)"),
    ({"extra_fds": [-1]}, ValueError,
     r"extra_fds: -1 is not a valid fd number \(extra fds are >= 3\)"),
    ({"extra_fds": [2**31]}, ValueError, "extra_fds: 2147483648 is not a valid fd number"),
    ({"extra_fds": ["3"]}, TypeError, r"extra_fds: '3' is not an fd number \(an int\)"),
    ({"extra_fds": [3, 3]}, ValueError, "extra_fds: 3 appears twice"),
    ({"drop_sudo_credentials": "yes"}, TypeError, "drop_sudo_credentials must be a bool"),
]


@pytest.mark.parametrize(("arguments", "error", "message"), BAD_ARGUMENTS,
                         ids=[repr(a)[:40] for a, _, _ in BAD_ARGUMENTS])
async def test_argument_errors_name_the_argument_before_anything_is_sent(
    local_agent: controller.Agent, arguments: dict[str, Any], error: type[Exception],
    message: str,
) -> None:
    with trio.fail_after(10):
        first = await local_agent.open_process(["true"])
        await first.aclose()
        call = {"argv": ["true"], **arguments}
        for method in ("open_process", "run_process"):
            if method == "run_process" and "extra_fds" in call:
                continue  # run_process has no extra fds
            with pytest.raises(error, match=f"^{message}"):
                await getattr(local_agent, method)(**call)
            assert not local_agent.processes
        # Nothing was sent and no id was taken: the next process gets the next id.
        after = await local_agent.open_process(["true"])
        assert after.id == first.id + 1
        assert await after.wait() == 0
        await after.aclose()


async def test_arguments_beyond_the_frame_limit_are_e2big(local_agent: controller.Agent
                                                          ) -> None:
    with trio.fail_after(10), pytest.raises(OSError, match="frame limit") as info:
        await local_agent.run_process(["true", "x" * (5 << 20)])
    assert info.value.errno == errno.E2BIG
    assert (await local_agent.run_process(["true"])).returncode == 0
