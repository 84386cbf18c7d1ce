"""The ``.status`` the operator writes: small, schema-valid, with honest conditions.

Every status built here is validated against the CRD's own status schema, made strict:
an unknown field is an error here, because the API server would silently prune it and the
operator would then see a difference (and patch again) on every pass.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dbtbackfill.core.planner import Window, plan_windows
from dbtbackfill.operator.reconcile import MAX_MESSAGE_CHARS, MAX_RECENT_FAILURES, ChunkState, Failure, Phase
from dbtbackfill.operator.status import (
    argocd_health,
    changed,
    conditions_for,
    date_ranges,
    eta,
    invalid_spec_status,
    summarise,
)
from tests.support.merge_patch import merge_patch

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "dbtbackfills.dbt-backfill.io.yaml"
CASES = json.loads(Path(__file__).with_name("argocd_health_cases.json").read_text())["cases"]
T0 = datetime(2024, 6, 1, 10, 0, 0, tzinfo=UTC)
STATUS_LIMIT = 64 * 1024  # our budget; etcd's hard limit on a whole object is 1.5 MiB
PHASES: tuple[Phase, ...] = ("Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended", "Cancelled")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def _strict(node: Any) -> Any:
    """OpenAPI v3 (structural) to JSON Schema: drop x-kubernetes-* and forbid unknown fields."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("type") == "object" and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def _status_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    assert len(crd["spec"]["versions"]) == 1
    schema: dict[str, Any] = _strict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"])
    return schema


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not RFC3339.fullmatch(value):
        raise ValueError(f"not an RFC 3339 date-time: {value!r}")
    datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


VALIDATOR = jsonschema.Draft202012Validator(_status_schema(), format_checker=FORMATS)


def without_nulls(status: dict[str, Any]) -> dict[str, Any]:
    """What the API server stores: a null at the top level is a merge-patch deletion."""
    return {k: v for k, v in status.items() if v is not None}


def assert_valid(status: dict[str, Any]) -> None:
    stored = json.loads(json.dumps(without_nulls(status)))
    errors = sorted(VALIDATOR.iter_errors(stored), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def daily(n: int, start: date = date(2014, 1, 1)) -> list[Window]:
    return plan_windows(start, start + timedelta(days=n - 1))


def failure(chunk: int, windows: list[Window], *, size: int = 40, attempt: int = 3) -> Failure:
    return Failure(chunk, windows[chunk].label(), attempt, ("E" * size)[:MAX_MESSAGE_CHARS], T0)


def status_of(
    windows: list[Window],
    state: ChunkState,
    phase: Phase = "Running",
    *,
    running: frozenset[int] = frozenset(),
    previous: dict[str, Any] | None = None,
    now: datetime = T0,
    generation: int | None = 1,
    blocked_by: str | None = None,
    parallelism: int = 3,
) -> dict[str, Any]:
    return summarise(
        windows=windows,
        state=state,
        phase=phase,
        running=running,
        parallelism=parallelism,
        generation=generation,
        previous=previous,
        now=now,
        blocked_by=blocked_by,
    )


def size_of(status: dict[str, Any]) -> int:
    return len(json.dumps(status).encode())


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


# ----------------------------------------------------------------------------- size


TEN_YEARS = daily(3650)
P = 32  # the largest parallelism the CRD allows


def _in_flight(chunks: list[int]) -> dict[str, Any]:
    """Attempts and retry times for ``chunks``, as big as they get (double-digit attempts)."""
    return {
        "attempts": dict.fromkeys(chunks, 21),
        "retry_base": dict.fromkeys(chunks, 20),
        "retry_at": dict.fromkeys(chunks, T0 + timedelta(days=1)),
    }


def _worst_failures() -> tuple[Failure, ...]:
    return tuple(failure(3000 + i, TEN_YEARS, size=MAX_MESSAGE_CHARS, attempt=21) for i in range(MAX_RECENT_FAILURES))


REALISTIC = {
    "all-succeeded": (
        ChunkState(succeeded=frozenset(range(3650)), records=2**40, duration_count=3650, duration_total=1e7),
        "Succeeded",
        frozenset(),
    ),
    "first-half-succeeded": (
        ChunkState(
            succeeded=frozenset(range(1825)),
            attempts=dict.fromkeys(range(1825, 1825 + P), 1),
            duration_count=1825,
            duration_total=99999.123,
        ),
        "Running",
        frozenset(range(1825, 1825 + P)),
    ),
    # The most fragmented status the reconciler can reach with its bounds holding: behind the
    # frontier, every other chunk is a hole (parallelism running, parallelism waiting for a
    # retry, parallelism failed), ten failures with maximal messages, huge counters.
    "alternating-holes-at-the-frontier": (
        ChunkState(
            succeeded=frozenset(range(3000)) - set(range(2000, 2000 + 6 * P, 2)),
            failed=frozenset(range(2000, 2000 + 2 * P, 2)),
            **_in_flight(list(range(2000, 2000 + 6 * P, 2))),
            records=2**62,
            duration_count=3000,
            duration_total=123456789.123,
            recent_failures=_worst_failures(),
        ),
        "Running",
        frozenset(range(2000 + 4 * P, 2000 + 6 * P, 2)),
    ),
}


@pytest.mark.parametrize("pattern", list(REALISTIC))
def test_status_of_3650_daily_chunks_stays_small(pattern: str) -> None:
    state, phase, running = REALISTIC[pattern]
    status = status_of(TEN_YEARS, state, phase, running=running, parallelism=P)  # type: ignore[arg-type]
    assert_valid(status)
    assert size_of(status) < STATUS_LIMIT, f"{pattern}: {size_of(status)} bytes"
    assert status["chunks"]["total"] == 3650
    assert len(status["recentFailures"]) <= MAX_RECENT_FAILURES


def test_worst_case_status_size_is_documented() -> None:
    """The worst case, documented in numbers (asserted loosely, so the test tracks the code).

    Within the reconciler's bounds (chunks in flight and failed ~ parallelism, recent failures
    <= 10 x 1 KiB) the 3,650-chunk status stays far below the budget: ranges and index runs do
    not grow with the plan, only with the holes in it.

    Outside them it does not: chunkState.attempts/retryBase/retryAt hold one entry per chunk
    in flight, and succeededRanges one range per hole. Today an outage sweeps the whole plan
    (test_reconcile.test_an_outage_does_not_sweep_the_whole_plan): every chunk attempted and
    waiting for a retry is ~165 KB; if half of those retries then succeed, every other chunk
    is a hole and the status is ~185 KB. That still fits etcd (1.5 MiB) but not this budget.
    """
    bounded = REALISTIC["alternating-holes-at-the-frontier"]
    bounded_size = size_of(status_of(TEN_YEARS, bounded[0], "Running", running=bounded[2], parallelism=P))
    assert bounded_size < 32 * 1024  # measured: ~23 KB, 10 KB of it failure messages

    everything = list(range(3650))
    outage = ChunkState(
        attempts=dict.fromkeys(everything, 1),
        retry_at=dict.fromkeys(everything, T0 + timedelta(hours=1)),
        recent_failures=_worst_failures(),
    )
    outage_status = status_of(TEN_YEARS, outage, "Running", parallelism=P)
    assert_valid(outage_status)
    odd = everything[1::2]
    alternating = ChunkState(
        succeeded=frozenset(everything[::2]),
        **_in_flight(odd),
        recent_failures=_worst_failures(),
    )
    alternating_status = status_of(TEN_YEARS, alternating, "Running", parallelism=P)
    assert_valid(alternating_status)
    assert len(alternating_status["succeededRanges"]) == 1825
    for status in (outage_status, alternating_status):
        assert STATUS_LIMIT < size_of(status) < 512 * 1024


# ----------------------------------------------------------------------------- content


def test_progress_counts_and_ranges() -> None:
    windows = daily(31, date(2024, 1, 1))
    state = ChunkState(
        succeeded=frozenset({0, 1, 2, 5, 6}),
        failed=frozenset({3}),
        attempts={3: 3, 4: 1, 7: 2},
        records=1234,
        recent_failures=(failure(3, windows),),
    )
    status = status_of(windows, state, running=frozenset({4, 7}))
    assert_valid(status)
    assert status["progress"] == "5/31"
    assert status["chunks"] == {"total": 31, "succeeded": 5, "failed": 1, "running": 2, "pending": 23}
    assert status["recordsProcessed"] == 1234
    assert status["succeededRanges"] == ["2024-01-01..2024-01-03", "2024-01-06..2024-01-07"]
    assert status["failedRanges"] == ["2024-01-04..2024-01-04"]
    assert status["recentFailures"] == [
        {
            "chunk": 3,
            "window": "2024-01-04..2024-01-04",
            "attempts": 3,
            "message": "E" * 40,
            "time": "2024-06-01T10:00:00Z",
        }
    ]
    assert status["chunkState"]["succeeded"] == [[0, 2], [5, 6]]
    assert status["chunkState"]["attempts"] == {"3": 3, "4": 1, "7": 2}
    assert status["observedGeneration"] == 1
    assert status["startTime"] == "2024-06-01T10:00:00Z"


def test_fresh_backfill_status() -> None:
    windows = daily(10)
    status = status_of(windows, ChunkState(), "Pending")
    assert_valid(status)
    assert status["progress"] == "0/10"
    assert status["chunks"]["pending"] == 10
    assert status["startTime"] is None
    assert (status["completionTime"], status["estimatedCompletionTime"], status["queuedBehind"]) == (None, None, None)
    assert (status["succeededRanges"], status["failedRanges"], status["recentFailures"]) == ([], [], [])


def test_queued_status_names_the_blocking_backfill() -> None:
    status = status_of(daily(5), ChunkState(), "Queued", blocked_by="backfill-2023")
    assert_valid(status)
    assert status["queuedBehind"] == "backfill-2023"
    assert conditions(status)["Succeeded"]["reason"] == "Queued"
    assert "backfill-2023" in conditions(status)["Succeeded"]["message"]
    assert status_of(daily(5), ChunkState(), "Running", blocked_by="backfill-2023")["queuedBehind"] is None


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("generation", [1, 7])
def test_every_phase_gives_a_valid_status_with_three_conditions(phase: Phase, generation: int) -> None:
    windows = daily(4)
    state = ChunkState(
        succeeded=frozenset({0}),
        failed=frozenset({1}) if phase == "Failed" else frozenset(),
        attempts={2: 1},
        duration_count=1,
        duration_total=60,
    )
    status = status_of(windows, state, phase, running=frozenset({2}), generation=generation, blocked_by="x")
    assert_valid(status)
    assert status["phase"] == phase
    assert status["observedGeneration"] == generation
    assert [c["type"] for c in status["conditions"]] == ["Succeeded", "Running", "Suspended"]
    for condition in status["conditions"]:
        assert set(condition) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
        assert condition["observedGeneration"] == generation
        assert condition["message"]
        assert condition["lastTransitionTime"] == "2024-06-01T10:00:00Z"
    expected = {"Succeeded": "True", "Failed": "False", "Cancelled": "False"}.get(phase, "Unknown")
    assert conditions(status)["Succeeded"]["status"] == expected
    assert conditions(status)["Running"]["status"] == ("True" if phase == "Running" else "False")
    assert conditions(status)["Suspended"]["status"] == ("True" if phase == "Suspended" else "False")


def test_failed_condition_carries_the_latest_failure() -> None:
    windows = daily(3)
    state = ChunkState(
        failed=frozenset({1}), recent_failures=(failure(0, windows), Failure(1, "w", 3, "dbt: boom", T0))
    )
    cond = conditions(status_of(windows, state, "Failed"))["Succeeded"]
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", "ChunksFailed", "dbt: boom")


def test_last_transition_time_moves_only_when_the_status_flips() -> None:
    windows = daily(4)
    first = status_of(windows, ChunkState(attempts={0: 1}), "Running", running=frozenset({0}))
    later = T0 + timedelta(minutes=5)
    same = status_of(
        windows, ChunkState(succeeded=frozenset({0}), attempts={1: 1}), "Running", previous=first, now=later
    )
    for ctype in ("Succeeded", "Running", "Suspended"):
        assert conditions(same)[ctype]["lastTransitionTime"] == "2024-06-01T10:00:00Z"
    # The message follows the progress even though the status did not flip.
    assert conditions(same)["Running"]["message"] != conditions(first)["Running"]["message"]

    suspended = status_of(windows, ChunkState(succeeded=frozenset({0})), "Suspended", previous=same, now=later)
    assert conditions(suspended)["Suspended"]["lastTransitionTime"] == "2024-06-01T10:05:00Z"
    assert conditions(suspended)["Running"]["lastTransitionTime"] == "2024-06-01T10:05:00Z"
    assert conditions(suspended)["Succeeded"]["lastTransitionTime"] == "2024-06-01T10:00:00Z"  # Unknown -> Unknown

    done = status_of(
        windows, ChunkState(succeeded=frozenset(range(4))), "Succeeded", previous=suspended, now=later + timedelta(1)
    )
    assert conditions(done)["Succeeded"]["lastTransitionTime"] == "2024-06-02T10:05:00Z"
    assert conditions(done)["Suspended"]["lastTransitionTime"] == "2024-06-02T10:05:00Z"
    assert conditions(done)["Running"]["lastTransitionTime"] == "2024-06-01T10:05:00Z"  # False -> False
    assert_valid(done)


def test_conditions_for_without_previous_conditions() -> None:
    result = conditions_for("Running", progress="1/2", blocked_by=None, failure=None, generation=3, previous=[], now=T0)
    assert [(c["type"], c["status"]) for c in result] == [
        ("Succeeded", "Unknown"),
        ("Running", "True"),
        ("Suspended", "False"),
    ]


def test_start_and_completion_times() -> None:
    windows = daily(2)
    started = status_of(windows, ChunkState(attempts={0: 1}), "Running", running=frozenset({0}))
    assert started["startTime"] == "2024-06-01T10:00:00Z"
    later = T0 + timedelta(hours=1)
    running = status_of(windows, ChunkState(succeeded=frozenset({0}), attempts={1: 1}), previous=started, now=later)
    assert running["startTime"] == "2024-06-01T10:00:00Z"
    assert running["completionTime"] is None

    failed = status_of(windows, ChunkState(succeeded=frozenset({0}), failed=frozenset({1})), "Failed", previous=running)
    assert failed["completionTime"] == "2024-06-01T10:00:00Z"
    again = status_of(
        windows,
        ChunkState(succeeded=frozenset({0}), failed=frozenset({1})),
        "Failed",
        previous=failed,
        now=later + timedelta(hours=1),
    )
    assert again["completionTime"] == failed["completionTime"]  # stable across passes
    assert changed(failed, again) == {}

    # retryFailed: running again clears it; finishing sets it anew.
    rerun = status_of(
        windows, ChunkState(succeeded=frozenset({0}), attempts={1: 2}), previous=again, now=later + timedelta(hours=2)
    )
    assert rerun["completionTime"] is None
    assert changed(again, rerun)["completionTime"] is None  # merge patch: delete the field
    end = later + timedelta(hours=3)
    done = status_of(windows, ChunkState(succeeded=frozenset({0, 1})), "Succeeded", previous=rerun, now=end)
    assert done["completionTime"] == "2024-06-01T14:00:00Z"
    assert done["startTime"] == "2024-06-01T10:00:00Z"


def test_eta_waits_for_a_finished_chunk_then_lies_ahead() -> None:
    windows = daily(30)
    before = status_of(windows, ChunkState(attempts={0: 1, 1: 1, 2: 1}), running=frozenset({0, 1, 2}))
    assert before["estimatedCompletionTime"] is None
    state = ChunkState(succeeded=frozenset({0}), attempts={1: 1, 2: 1, 3: 1}, duration_count=1, duration_total=600)
    after = status_of(windows, state, running=frozenset({1, 2, 3}), parallelism=3)
    eta_time = datetime.fromisoformat(after["estimatedCompletionTime"].replace("Z", "+00:00"))
    assert eta_time > T0
    assert eta_time == T0 + timedelta(seconds=600 * 10)  # 29 chunks left, 3 at a time: 10 waves of 10 min
    assert status_of(windows, state, "Suspended")["estimatedCompletionTime"] is None
    assert status_of(windows, state, "Queued")["estimatedCompletionTime"] is None


def test_eta_function() -> None:
    state = ChunkState(duration_count=4, duration_total=400)
    assert eta(ChunkState(), 10, 2, T0) is None
    assert eta(state, 0, 2, T0) is None
    assert eta(state, 10, 2, T0) == T0 + timedelta(seconds=500)
    assert eta(state, 1, 32, T0) == T0 + timedelta(seconds=100)
    assert eta(state, 33, 32, T0) == T0 + timedelta(seconds=200)


def test_changed_returns_only_the_differing_keys() -> None:
    windows = daily(5)
    first = status_of(windows, ChunkState(attempts={0: 1}), running=frozenset({0}))
    assert changed(None, first) == {k: v for k, v in first.items() if v is not None}
    assert changed(first, first) == {}
    assert changed(first, json.loads(json.dumps(first))) == {}
    second = status_of(
        windows, ChunkState(attempts={0: 1}, records=5), running=frozenset({0}), previous=first, now=T0 + timedelta(1)
    )
    assert set(changed(first, second)) == {"recordsProcessed", "chunkState"}
    assert changed({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": None}) == {"b": 3}
    assert changed({"a": 1, "c": "x"}, {"a": 1, "c": None}) == {"c": None}


def test_changed_as_a_merge_patch_turns_the_stored_status_into_the_new_one() -> None:
    """The controller sends changed(previous, new) as a JSON merge patch. Nested objects merge
    key by key, so an entry that left chunkState.attempts / retryAt / retryBase must be sent
    as null, or it stays on the server forever (and a stale retryAt makes decide ignore the
    chunk's next failure: see test_reconcile's merge-patch test)."""
    windows = daily(5)
    before = status_of(
        windows,
        ChunkState(attempts={0: 1, 1: 2, 2: 1}, retry_base={1: 1}, retry_at={1: T0 + timedelta(seconds=30)}),
        running=frozenset({0, 2}),
    )
    after = status_of(
        windows,
        ChunkState(succeeded=frozenset({0}), attempts={1: 3, 2: 1, 3: 1}, retry_base={1: 1}),
        running=frozenset({1, 2, 3}),
        previous=before,
        now=T0 + timedelta(minutes=1),
    )
    stored = merge_patch(json.loads(json.dumps(without_nulls(before))), json.loads(json.dumps(changed(before, after))))
    assert stored["chunkState"] == after["chunkState"]
    assert stored == json.loads(json.dumps(without_nulls(after)))


def test_date_ranges_merge_adjacent_chunks() -> None:
    windows = daily(10, date(2024, 1, 1))
    assert date_ranges(windows, set()) == []
    assert date_ranges(windows, {0, 1, 2, 4, 9, 8}) == [
        "2024-01-01..2024-01-03",
        "2024-01-05..2024-01-05",
        "2024-01-09..2024-01-10",
    ]
    assert date_ranges(windows, frozenset(range(10))) == ["2024-01-01..2024-01-10"]
    weeks = plan_windows(date(2024, 1, 3), date(2024, 2, 29), "week")
    assert date_ranges(weeks, {0, 1, 3}) == ["2024-01-03..2024-01-14", "2024-01-22..2024-01-28"]
    assert date_ranges(windows, {8, 9, 10, 11}) == []  # indices beyond the plan are not invented


def test_invalid_spec_status() -> None:
    message = "spec.endDate: start_date must be <= end_date"
    status = invalid_spec_status(message, 4, None, T0)
    assert_valid(status)
    assert status["phase"] == "Failed"
    assert status["observedGeneration"] == 4
    cond = conditions(status)["Succeeded"]
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", "InvalidSpec", message)
    assert conditions(status)["Running"]["status"] == "False"
    long = invalid_spec_status("x" * 5000, 4, status, T0 + timedelta(1))
    assert len(conditions(long)["Succeeded"]["message"]) == 1024
    assert conditions(long)["Succeeded"]["lastTransitionTime"] == cond["lastTransitionTime"]  # still False
    assert_valid(long)


# ----------------------------------------------------------------------------- Argo CD


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_argocd_health_status_matches_the_lua_check(case: dict[str, Any]) -> None:
    """status.argocd_health claims to be the same mapping as deploy/argocd/health.lua; the
    cases are the ones the Lua script passes (tests/unit/test_argocd_health.py)."""
    assert argocd_health(case["obj"])[0] == case["expected"]["status"]


@pytest.mark.parametrize("case", [c for c in CASES if "message" in c["expected"]], ids=lambda c: c["name"])
def test_argocd_health_message_matches_the_lua_check(case: dict[str, Any]) -> None:
    assert argocd_health(case["obj"])[1] == case["expected"]["message"]


@pytest.mark.parametrize(
    ("phase", "health"),
    [
        ("Pending", "Progressing"),
        ("Queued", "Progressing"),
        ("Running", "Progressing"),
        ("Suspended", "Suspended"),
        ("Succeeded", "Healthy"),
        ("Failed", "Degraded"),
        ("Cancelled", "Degraded"),
    ],
)
def test_argocd_health_of_what_summarise_writes(phase: Phase, health: str) -> None:
    status = without_nulls(status_of(daily(3), ChunkState(succeeded=frozenset({0})), phase, blocked_by="b"))
    obj = {"metadata": {"name": "x", "generation": 1}, "status": status}
    assert argocd_health(obj)[0] == health
