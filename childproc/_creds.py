"""The credential drop: which uid, gid and groups the child gets."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from ._errors import CredentialError

if sys.platform != "win32":
    import pwd

_ID = re.compile(r"[0-9]+")
_MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to setuid/setgid and friends


@dataclass(frozen=True)
class Credentials:
    """The identity a child is switched to before its working directory is entered."""

    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, set with setgroups


def sudo_credentials(drop: bool) -> Credentials | None:
    """The credentials for a child, or None to keep the agent's.

    Only when drop is set, the process is root (euid 0) and $SUDO_UID is set: uid from
    $SUDO_UID; gid from $SUDO_GID, falling back to the uid (as the Go original); the
    supplementary groups are the user's own (getgrouplist of the uid's passwd name) when the
    uid has a passwd entry, otherwise none; never root's. A set but invalid (or empty)
    variable raises CredentialError rather than silently running the child as root.
    """
    if not drop or os.geteuid() != 0:
        return None
    uid_text = os.environ.get("SUDO_UID")
    if uid_text is None:
        return None
    uid = _parse_id("SUDO_UID", uid_text)
    gid_text = os.environ.get("SUDO_GID")
    gid = uid if gid_text is None else _parse_id("SUDO_GID", gid_text)
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return Credentials(uid, gid, ())
    return Credentials(uid, gid, tuple(os.getgrouplist(name, gid)))


def _parse_id(variable: str, text: str) -> int:
    # The length check comes first: int() refuses strings of more than 4300 digits.
    if len(text) > 10 or not _ID.fullmatch(text) or int(text) > _MAX_ID:
        raise CredentialError(variable, text)
    return int(text)
