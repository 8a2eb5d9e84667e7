"""Environment policy for children that inherit the agent's environment."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from protocol import DEFAULT_ENV_KEEP, DEFAULT_ENV_REMOVE, Exec

__all__ = ["DEFAULT_POLICY", "EnvPolicy", "child_environment"]


class _Pattern:
    """A glob (whole name, case-sensitive) or a ``/regex/`` (re.search on the name)."""

    __slots__ = ("_match", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
            try:
                self._match = re.compile(text[1:-1]).search
            except re.error as exc:
                raise ValueError(f"bad regular expression {text!r}: {exc}") from None
        else:
            self._match = re.compile(fnmatch.translate(text)).match

    def matches(self, name: str) -> bool:
        return self._match(name) is not None


@dataclass(frozen=True)
class EnvPolicy:
    """Which inherited variables a child gets: remove patterns win, then keep patterns;
    everything else is dropped."""

    keep: tuple[_Pattern, ...]
    remove: tuple[_Pattern, ...]

    @classmethod
    def from_patterns(cls, keep: Iterable[str], remove: Iterable[str]) -> EnvPolicy:
        """Raises ValueError naming a bad ``/regex/``."""
        return cls(tuple(map(_Pattern, keep)), tuple(map(_Pattern, remove)))

    def updated(self, keep: Sequence[str] | None, remove: Sequence[str] | None) -> EnvPolicy:
        """This policy with either list replaced (None keeps it)."""
        return EnvPolicy(
            self.keep if keep is None else tuple(map(_Pattern, keep)),
            self.remove if remove is None else tuple(map(_Pattern, remove)),
        )

    def allows(self, name: str) -> bool:
        if any(p.matches(name) for p in self.remove):
            return False
        return any(p.matches(name) for p in self.keep)

    def filter(self, environ: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
        return {
            k: v
            for k, v in environ.items()
            if self.allows(k.decode("utf-8", "surrogateescape"))
        }


DEFAULT_POLICY: Final = EnvPolicy.from_patterns(DEFAULT_ENV_KEEP, DEFAULT_ENV_REMOVE)


def child_environment(frame: Exec, inherited: Mapping[bytes, bytes]) -> list[bytes]:
    """The child's environment as ``K=V`` entries: ``frame.env`` exactly when given, else
    ``inherited`` (already filtered by the policy); then ``env_unset`` removed and
    ``env_set`` applied."""
    if frame.env is not None and not frame.env_unset and not frame.env_set:
        return list(frame.env)
    if frame.env is not None:
        env = dict(entry.split(b"=", 1) for entry in frame.env)
    else:
        env = dict(inherited)
    for name in frame.env_unset:
        env.pop(name, None)
    for entry in frame.env_set:
        key, value = entry.split(b"=", 1)
        env[key] = value
    return [k + b"=" + v for k, v in env.items()]
