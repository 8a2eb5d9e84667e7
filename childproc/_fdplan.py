"""The collision-safe plan that puts the child's fds at exactly the requested numbers.

Both the posix_spawn file actions and the trampoline execute the same plan, in order:
dup2 every source to a temporary, dup2 every temporary to its target, close every range
in close_ranges, then close every fd >= close_from. A temporary is never a source or a
target, so no dup2 overwrites a source that is still needed (e.g. the parent's socket end
for child fd 7 may itself be fd 3, the target of another channel), and the temporaries
are closed with everything else that is not kept.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class FdPlan:
    dups: tuple[tuple[int, int], ...]  # (from, to), in order
    close_ranges: tuple[tuple[int, int], ...]  # [low, high) ranges, all below close_from
    close_from: int


def plan(targets: Mapping[int, int], keep: Collection[int] = ()) -> FdPlan:
    """The plan that leaves open exactly 0, 1, 2, the targets and keep.

    targets maps each child fd number to the fd that holds it before the plan runs;
    keep lists fds (>= 3, not sources) that must survive untouched.
    """
    kept = {0, 1, 2, *targets, *keep}
    busy = kept | set(targets.values())
    temporaries: list[int] = []
    candidate = 3
    for _ in targets:
        while candidate in busy:
            candidate += 1
        temporaries.append(candidate)
        candidate += 1
    pairs = list(zip(targets.items(), temporaries, strict=True))
    dups = [(source, temporary) for (_, source), temporary in pairs]
    dups += [(temporary, target) for (target, _), temporary in pairs]
    close_ranges: list[tuple[int, int]] = []
    low = 3
    for fd in sorted(kept):
        if fd > low:
            close_ranges.append((low, fd))
        low = max(low, fd + 1)
    return FdPlan(tuple(dups), tuple(close_ranges), low)
