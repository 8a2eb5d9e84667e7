"""The collision-safe fd plan, executed on a model fd table for arbitrary layouts."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from childproc._fdplan import FdPlan, plan

FD = st.integers(min_value=0, max_value=300)
JUNK = st.sets(FD, max_size=30)  # inheritable fds of the parent, anywhere


def execute(fds: FdPlan, table: dict[int, str], limit: int = 1024) -> dict[int, str]:
    """What the child's fd table becomes; dup2 from a closed fd is a bug in the plan."""
    table = dict(table)
    for source, target in fds.dups:
        assert source in table, f"dup2 from closed fd {source}"
        table[target] = table[source]
    for low, high in fds.close_ranges:
        assert 3 <= low < high <= fds.close_from
        for fd in range(low, high):
            table.pop(fd, None)
    for fd in range(fds.close_from, limit):
        table.pop(fd, None)
    return table


EXTRA = st.sets(st.integers(min_value=3, max_value=300), max_size=8)


@given(extra=EXTRA, sources=st.lists(FD, min_size=11, max_size=11, unique=True), junk=JUNK)
def test_posix_spawn_layout(extra: set[int], sources: list[int], junk: set[int]) -> None:
    # Targets 0, 1, 2 and the extra fds; sources anywhere, even below 3 (when the parent
    # runs with its stdio closed) or on another channel's target.
    layout = dict(zip([0, 1, 2, *sorted(extra)], sources, strict=False))
    table = {fd: f"junk{fd}" for fd in junk} | {s: f"source{s}" for s in layout.values()}
    result = execute(plan(layout), table)
    assert result == {target: f"source{source}" for target, source in layout.items()}


@given(
    extra=EXTRA,
    sources=st.lists(st.integers(min_value=3, max_value=300), max_size=8, unique=True),
    keep=st.integers(min_value=3, max_value=400),
    junk=JUNK,
)
def test_trampoline_layout(extra: set[int], sources: list[int], keep: int, junk: set[int]) -> None:
    # The stdio is already in place; the extra fds' sources are >= 3; keep (the control
    # socket) is neither a source nor a target.
    layout = dict(zip(sorted(extra), sources, strict=False))
    assume(keep not in layout and keep not in layout.values())
    table = {fd: f"junk{fd}" for fd in junk} | {fd: f"stdio{fd}" for fd in (0, 1, 2)}
    table |= {keep: "keep"} | {s: f"source{s}" for s in layout.values()}
    result = execute(plan(layout, keep=(keep,)), table)
    expected = {fd: f"stdio{fd}" for fd in (0, 1, 2)} | {keep: "keep"}
    assert result == expected | {target: f"source{source}" for target, source in layout.items()}


def test_plan_for_a_sparse_layout() -> None:
    fds = plan({0: 10, 1: 11, 2: 12, 3: 20, 7: 3, 200: 21})
    assert fds.close_ranges == ((4, 7), (8, 200))
    assert fds.close_from == 201
    temporaries = {target for _, target in fds.dups[:6]}
    assert temporaries.isdisjoint({0, 1, 2, 3, 7, 200, 10, 11, 12, 20, 21})
