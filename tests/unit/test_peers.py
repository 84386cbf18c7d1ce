"""The overlap guard's peer scan: one DbtBackfill that cannot be parsed must never stall the rest.

Pure: ``reconcile.peer_of`` turns listed objects (plain dicts, as the API returns them) into
peers; the controller only lists them.
"""

from __future__ import annotations

from typing import Any

import pytest

from dbtbackfill.core.spec import parse_spec
from dbtbackfill.operator.reconcile import Peer, blocking_peer, peer_of


def item(name: str, created: str, spec: Any, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "creationTimestamp": created}, "spec": spec, "status": status or {}}


def spec(**changes: Any) -> dict[str, Any]:
    return {"startDate": "2024-01-01", "endDate": "2024-01-31", "databaseSecretRef": {"name": "db"}, **changes}


def test_a_valid_peer_is_seen_as_the_api_lists_it() -> None:
    peer = peer_of(item("a", "2024-02-01T00:00:00Z", spec(), {"phase": "Running", "startTime": "2024-02-01T00:01:00Z"}))
    assert peer == Peer("a", "2024-02-01T00:00:00Z", parse_spec(spec()), "Running", True)


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(item("x", "t", spec(endDate="2023-01-01")), id="reversed-dates"),
        pytest.param(item("x", "t", spec(startDate="0000-01-01", endDate="0000-01-02")), id="year-0"),
        pytest.param(item("x", "t", spec(chunk={"unit": "year"})), id="bad-unit"),
        pytest.param(item("x", "t", "not a mapping"), id="spec-not-a-mapping"),
        pytest.param({"spec": spec()}, id="no-metadata"),
        pytest.param({"metadata": {}, "spec": spec()}, id="no-name"),
    ],
)
def test_an_unparseable_peer_is_skipped(broken: dict[str, Any]) -> None:
    assert peer_of(broken) is None


@pytest.mark.parametrize(
    "late",
    [
        spec(startDate="9999-12-01", endDate="9999-12-31"),
        spec(startDate="9999-01-01", endDate="9999-12-31", chunk={"unit": "month", "size": 366}),
        spec(startDate="9990-01-01", endDate="9999-12-31", chunk={"unit": "day", "size": 366}),
        spec(startDate="9999-12-27", endDate="9999-12-31", chunk={"unit": "week", "size": 366}),
    ],
)
def test_a_peer_at_the_end_of_the_calendar_is_a_peer_not_a_crash(late: dict[str, Any]) -> None:
    """These used to raise OverflowError from the planner inside the scan of every backfill."""
    peer = peer_of(item("late", "2024-01-01T00:00:00Z", late))
    assert peer is not None
    assert peer.spec.windows()[-1].end.isoformat() == "9999-12-31"


def test_the_guard_still_finds_the_real_blocker_among_broken_peers() -> None:
    listed = [
        item("broken", "2024-01-01T00:00:00Z", spec(startDate="0000-01-01")),
        item("late", "2024-01-01T00:00:01Z", spec(startDate="9999-12-01", endDate="9999-12-31")),
        item("runner", "2024-01-02T00:00:00Z", spec(), {"phase": "Running", "startTime": "2024-01-02T00:00:00Z"}),
        item("me", "2024-01-03T00:00:00Z", spec()),
    ]
    peers = [p for i in listed if (p := peer_of(i))]
    assert [p.name for p in peers] == ["late", "runner", "me"]
    assert blocking_peer("me", "2024-01-03T00:00:00Z", parse_spec(spec()), peers) == "runner"
    # The far-future one overlaps nobody here and blocks nobody.
    assert blocking_peer("me", "2024-01-03T00:00:00Z", parse_spec(spec()), peers[:1]) is None
