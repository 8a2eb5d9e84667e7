"""Exceptions raised by childproc."""

from __future__ import annotations

import os
from typing import Literal

Step = Literal["exec", "chdir", "credentials", "fds"]


class SpawnError(OSError):
    """The child could not be started.

    ``errno`` is that of the failing system call; ``filename`` is the program as the Spec
    gives it (decoded with os.fsdecode), whichever step failed, as subprocess names the
    executable; ``strerror`` says why, written to be read after the program's name: the C
    library's text for errno ("No such file or directory"), with what could not be done
    when it was not the exec itself ("cannot enter directory '/srv' as uid 1000:
    Permission denied"), or what is known beyond the errno ("No such file or directory
    (searched $PATH)", "interpreter '/usr/bin/pyhton' (from #!) not found"). str() is
    OSError's: "[Errno 2] No such file or directory (searched $PATH): 'prog'".

    ``step`` says which part of the start failed: "exec" (the program: not found, not
    executable, ...), "chdir" (the working directory), "credentials"
    (setgroups/setgid/setuid) or "fds" (creating or placing the child's file descriptors).
    The agent reports step "exec" with errno ENOENT as exit code 127 and every other
    failure as 126, like a shell does.
    """

    step: Step

    def __init__(
        self, errno: int, step: Step, filename: str, strerror: str | None = None
    ) -> None:
        super().__init__(errno, strerror or os.strerror(errno), filename)
        self.step = step


class StepFailed(Exception):
    """Internal: a spawn mechanism reports which step failed; Command turns it into SpawnError.

    ``strerror``, when given, replaces the one Command would write for the step.
    """

    def __init__(self, step: Step, errno: int, strerror: str | None = None) -> None:
        super().__init__(step, errno)
        self.step = step
        self.errno = errno
        self.strerror = strerror


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
