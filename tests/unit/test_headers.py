"""The header grammar: snapd's worked examples, its error cases, and generated round trips."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import assertions
from agent.errors import AssertionFormatError, LocalFormatError

WORKED = """zz-list:
  - a
  -
      b
      c
  -
    - x
  -
    k1: v1
    k2: v2
zz-map:
  a:
    - p
    - q
  b: 2
  c:
      multi
      line"""

WORKED_VALUES = {
    "zz-list": ["a", "b\nc", ["x"], {"k1": "v1", "k2": "v2"}],
    "zz-map": {"a": ["p", "q"], "b": "2", "c": "multi\nline"},
}


def test_worked_illustration_decodes() -> None:
    assert assertions.parse_headers(WORKED.encode()) == WORKED_VALUES


def test_worked_illustration_encodes() -> None:
    lines = [line for name, value in WORKED_VALUES.items() for line in assertions.format_header(name, value)]
    assert "\n".join(lines) == WORKED


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("a: b", "b"),
        ("a: ", ""),
        ("a:  two spaces", " two spaces"),
        ("a: x: y", "x: y"),
        ("a:\n    \n    z", "\nz"),
        ("a:\n    z\n    ", "z\n"),
        ("a:\n  - \n  - x", ["", "x"]),
        ("a:\n  k: \n  l:\n      m\n      n", {"k": "", "l": "m\nn"}),
    ],
)
def test_values(text: str, value: object) -> None:
    assert assertions.parse_headers(text.encode()) == {"a": value}
    assert "\n".join(assertions.format_header("a", value)) == text  # type: ignore[arg-type]


def test_empty_list_and_map_headers_are_omitted() -> None:
    assert assertions.format_header("a", []) == []
    assert assertions.format_header("a", {}) == []


def test_map_keys_are_emitted_sorted_bytewise() -> None:
    assert assertions.format_header("m", {"b": "1", "a-1": "2", "a": "3"}) == ["m:", "  a: 3", "  a-1: 2", "  b: 1"]


def test_unknown_headers_are_kept_in_wire_order() -> None:
    headers = assertions.parse_headers(b"type: x\nzeta: 1\nalpha: 2")
    assert list(headers) == ["type", "zeta", "alpha"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (b"a", "missing ':' separator"),
        (b"A: b", "invalid header name"),
        (b"a-: b", "invalid header name"),
        (b"a--b: c", "invalid header name"),
        (b"a:b", "should have a space or newline"),
        (b"a: 1\na: 2", "repeated header"),
        (b"a:", "nesting prefix"),
        (b"a:\n   x", "nesting prefix"),
        (b"a:\n  k: 1\n  k: 2", "repeated map entry"),
        (b"a:\n  K: 1", "invalid map entry key"),
        (b"a:\n  -", "nesting prefix"),
        (b"a: \xff", "not utf8"),
        (b"", "missing ':' separator"),
    ],
)
def test_malformed_headers(text: bytes, error: str) -> None:
    with pytest.raises(AssertionFormatError, match=error):
        assertions.parse_headers(text)


def test_encoder_refuses_what_the_decoder_would_refuse() -> None:
    with pytest.raises(LocalFormatError):
        assertions.format_header("Bad", "x")
    with pytest.raises(LocalFormatError):
        assertions.format_header("a", {"Bad": "x"})
    with pytest.raises(LocalFormatError):
        assertions.format_header("a", 1)  # type: ignore[arg-type]


_SEGMENTS = st.tuples(st.sampled_from(["", "-"]), st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789"))
NAMES = st.builds(
    lambda first, rest: first + "".join(h + c for h, c in rest),
    st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
    st.lists(_SEGMENTS, max_size=8),
)
SCALARS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, min_size=1, max_size=4) | st.dictionaries(NAMES, inner, min_size=1, max_size=4),
    max_leaves=12,
)
HEADERS = st.dictionaries(NAMES, VALUES, min_size=1, max_size=8)


def _canonical(value: object) -> object:
    """Maps compare sorted: the encoder sorts them."""
    if isinstance(value, dict):
        return sorted((k, _canonical(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


@settings(max_examples=200, deadline=None)
@given(HEADERS)
def test_headers_round_trip(headers: dict) -> None:
    text = "\n".join(line for name, value in headers.items() for line in assertions.format_header(name, value))
    decoded = assertions.parse_headers(text.encode())
    assert list(decoded) == list(headers)
    assert _canonical(decoded) == _canonical(headers)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_header_bytes_fail_only_with_the_typed_error(data: bytes) -> None:
    with contextlib.suppress(AssertionFormatError):
        assertions.parse_headers(data)
