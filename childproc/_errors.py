"""Exceptions raised by childproc."""

from __future__ import annotations

import os
from typing import Literal

Step = Literal["exec", "chdir", "credentials", "fds"]


class SpawnError(OSError):
    """The child could not be started.

    ``errno``/``strerror``/``filename`` are those of the failing system call; ``step`` says
    which part of the start failed: "exec" (the program: not found, not executable, ...),
    "chdir" (the working directory), "credentials" (setgroups/setgid/setuid) or "fds"
    (creating or placing the child's file descriptors). The agent reports step "exec" with
    errno ENOENT as exit code 127 and every other failure as 126, like a shell does.
    """

    step: Step

    def __init__(self, errno: int, step: Step, filename: str | bytes | None, what: str) -> None:
        super().__init__(errno, os.strerror(errno), filename)
        self.step = step
        self._message = f"{what}: [Errno {errno}] {self.strerror}"

    def __str__(self) -> str:
        return self._message


class StepFailed(Exception):
    """Internal: a spawn mechanism reports which step failed; Command turns it into SpawnError."""

    def __init__(self, step: Step, errno: int) -> None:
        super().__init__(step, errno)
        self.step = step
        self.errno = errno


def popen_step(error: OSError, executable: object, cwd: object) -> Step:
    """The step a Popen failure happened in, from the filename Popen gives its exception.

    A failure in the child before exec carries the cwd object (Popen assumes chdir), one
    of exec the executable object, and one in the parent (creating Popen's own pipe, e.g.
    EMFILE) none.
    """
    if cwd is not None and error.filename is cwd:
        return "chdir"
    if error.filename is executable:
        return "exec"
    return "fds"


class CredentialError(ValueError):
    """$SUDO_UID or $SUDO_GID does not hold a valid id; no child was started."""

    def __init__(self, variable: str, value: str) -> None:
        super().__init__(f"invalid {variable}={value!r}: expected a decimal id in 0..4294967294")
        self.variable = variable
        self.value = value
