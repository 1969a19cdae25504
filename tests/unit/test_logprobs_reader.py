"""``_logprobs``: output_token_logprobs read in C (``read_pairs``) gives exactly
what the Python lists give, and declines (None) every other shape; prompt ids
narrowed in C (``narrow_ids``) are the ids, or None past the id range."""

from __future__ import annotations

import json
import math
from array import array as floats_array
from typing import Any

import pytest
import simdjson
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout_sessions._logprobs import narrow_ids, read_pairs
from rollout_sessions.upstream import answer as answer_module
from rollout_sessions.upstream.answer import MAX_TOKEN_ID
from rollout_sessions.web.errors import ApiError


def simdjson_array(entries: list[Any]) -> Any:
    """The entries as the fast path holds them: a simdjson array of the answer."""
    raw = json.dumps({"e": entries}, separators=(",", ":")).encode()
    return simdjson.Parser().parse(raw)["e"]


def list_path(array: Any) -> Any:
    """What the general path makes of the same entries: arrays, or the error."""
    try:
        ids, logprobs = answer_module._completion(array.as_list(), len(array))
    except ApiError as exc:
        return ("error", exc.message)
    return ids.tobytes(), logprobs.tobytes()


def c_path(array: Any) -> Any:
    pairs = read_pairs(array.mini, len(array), MAX_TOKEN_ID)
    return None if pairs is None else (pairs[0].tobytes(), pairs[1].tobytes())


def test_the_usual_shape_is_read_in_c_and_equals_the_lists():
    entries = [[-0.25 * (i % 7), 1000 + i, None] for i in range(800)]
    array = simdjson_array(entries)
    got = c_path(array)
    assert got is not None
    assert got == list_path(array)


def test_no_entries():
    array = simdjson_array([])
    assert c_path(array) == list_path(array) == (b"", b"")


@pytest.mark.parametrize(
    "entries",
    [
        [[-0.1, 5, "text"]],  # a text: the lists read it
        [[-0.1, 5]],
        [[-0.1, 5, None, 1]],
        [[-0.1, -5, None]],
        [[-0.1, 5.0, None]],
        [[-0.1, MAX_TOKEN_ID + 1, None]],
        [[-0.1, 10**15, None]],
        [[True, 5, None]],
        [[None, 5, None]],
        [["-0.1", 5, None]],
        [[[-0.1], 5, None]],
        [[-0.1, 5, None], 7],
        [{"logprob": -0.1}],
        [[-0.1, 5, False]],
    ],
)
def test_every_other_shape_is_declined(entries: list[Any]):
    array = simdjson_array(entries)
    assert c_path(array) is None


def test_the_largest_token_id_is_read():
    array = simdjson_array([[-1.5, MAX_TOKEN_ID, None], [0, 0, None]])
    assert c_path(array) == list_path(array)
    assert c_path(array) is not None


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.floats(allow_nan=False, allow_infinity=False),
                st.floats(-1e-300, 1e-300),
                st.integers(-(2**63), 2**64 - 1),
            ),
            st.integers(0, MAX_TOKEN_ID),
        ),
        max_size=20,
    )
)
def test_any_number_reads_the_same_in_c_and_in_lists(pairs: list[tuple[Any, int]]):
    entries = [[logprob, token, None] for logprob, token in pairs]
    array = simdjson_array(entries)
    got = c_path(array)
    assert got is not None  # the usual shape always goes through C
    assert got == list_path(array)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.lists(
            st.one_of(
                st.floats(allow_nan=False, allow_infinity=False),
                st.integers(-3, MAX_TOKEN_ID + 3),
                st.none(),
                st.booleans(),
                st.text(max_size=2),
            ),
            max_size=4,
        ),
        max_size=5,
    )
)
def test_c_never_accepts_what_the_lists_refuse(entries: list[Any]):
    array = simdjson_array(entries)
    got = c_path(array)
    if got is not None:
        assert got == list_path(array)


def test_a_huge_logprob_is_infinite_in_both():
    # float32 overflow: both paths cast the double, as array("f") does
    array = simdjson_array([[1e300, 1, None]])
    got = c_path(array)
    assert got is not None
    assert got == list_path(array)
    values = floats_array("f")
    values.frombytes(got[1])
    assert math.isinf(values[0])


def simdjson_ids(ids: list[int]) -> Any:
    """``ids`` as the fast path hands them to ``narrow_ids``: int64, from simdjson."""
    raw = json.dumps({"p": ids}).encode()
    return simdjson.Parser().parse(raw)["p"].as_buffer(of_type="i")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40))
def test_prompt_ids_are_narrowed_exactly_or_declined(ids: list[int]):
    got = narrow_ids(simdjson_ids(ids), MAX_TOKEN_ID)
    if all(0 <= i <= MAX_TOKEN_ID for i in ids):
        assert got is not None
        assert got.typecode == "i"
        assert got.tolist() == ids
    else:
        assert got is None


@pytest.mark.parametrize("bad", [-1, MAX_TOKEN_ID + 1, -(2**63), 2**63 - 1])
def test_one_id_out_of_range_declines_a_long_prompt(bad: int):
    ids = list(range(5000))
    assert narrow_ids(simdjson_ids(ids), MAX_TOKEN_ID).tolist() == ids
    ids[4321] = bad
    assert narrow_ids(simdjson_ids(ids), MAX_TOKEN_ID) is None
