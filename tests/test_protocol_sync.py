"""protocol.find_hello: the agent's hello found behind what a login shell printed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocol import HELLO_SIGNATURE, Connection, Role, find_hello

HELLO = Connection(Role.AGENT).initiate()


def test_a_hello_at_the_start_is_found_at_0() -> None:
    assert find_hello(HELLO) == 0


def test_a_banner_before_the_hello_is_skipped() -> None:
    banner = b"Welcome to host\n\x00\xffconda activated\n"
    assert find_hello(banner + HELLO + b"more") == len(banner)


def test_the_signature_without_a_map_byte_and_length_before_it_is_not_a_hello() -> None:
    assert find_hello(HELLO_SIGNATURE + b"xxxx") == -1
    assert find_hello(b"1234" + b"\x00" + HELLO_SIGNATURE) == -1  # 0x00 is no fixmap
    assert find_hello(b"nothing here") == -1


def test_start_skips_what_was_searched() -> None:
    assert find_hello(HELLO + HELLO, start=1) == len(HELLO)


@given(st.binary(max_size=300).filter(lambda b: HELLO_SIGNATURE not in b + HELLO[:12]))
def test_any_noise_before_a_hello_is_skipped(noise: bytes) -> None:
    assert find_hello(noise + HELLO) == len(noise)


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=len(HELLO) - 1))
def test_a_hello_cut_short_is_found_in_the_kept_tail(noise: bytes, cut: int) -> None:
    """The docstring's promise: keep the last len(signature) + 4 bytes and search again."""
    data = noise + HELLO
    head = data[:len(noise) + cut]
    if find_hello(head) == -1:
        kept = head[-(len(HELLO_SIGNATURE) + 4 + 1):]
        assert find_hello(kept + data[len(head):]) != -1
