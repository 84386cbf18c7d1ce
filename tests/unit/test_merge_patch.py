"""`status.changed` must be a correct JSON merge patch: the API server applies it by RFC 7386."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from dbtbackfill.operator.status import changed
from tests.support.merge_patch import merge_patch

keys = st.sampled_from(["a", "b", "c", "retryAt", "attempts"])
leaves = st.one_of(st.integers(0, 3), st.text(max_size=2), st.lists(st.integers(0, 3), max_size=2))
values = st.recursive(leaves, lambda inner: st.dictionaries(keys, inner, max_size=3), max_leaves=8)
documents = st.dictionaries(keys, values, max_size=4)


@given(documents, documents)
def test_applying_the_patch_yields_the_new_status(previous: dict[str, Any], new: dict[str, Any]) -> None:
    patched = merge_patch(previous, changed(previous, new))
    for key, value in new.items():
        assert patched[key] == value
    for key in previous.keys() - new.keys():
        assert patched[key] == previous[key]  # keys we do not manage are left alone


def test_a_key_leaving_a_nested_map_is_deleted() -> None:
    previous = {"chunkState": {"retryAt": {"1": "2024-01-01T00:00:00Z"}, "records": 5}}
    new = {"chunkState": {"retryAt": {}, "records": 5}}
    assert changed(previous, new) == {"chunkState": {"retryAt": {"1": None}}}


def test_nothing_changed_is_an_empty_patch() -> None:
    status = {"phase": "Running", "chunkState": {"attempts": {"3": 1}}}
    assert changed(status, status) == {}
