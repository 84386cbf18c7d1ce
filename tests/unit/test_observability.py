"""Metrics and structured logs: what an SRE scrapes and greps."""

from __future__ import annotations

import json
import logging

from prometheus_client import REGISTRY

from dbtbackfill.operator import controller, reconcile
from dbtbackfill.operator.main import JsonFormatter
from dbtbackfill.operator.reconcile import ChunkState


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_json_log_lines_carry_the_backfill_and_chunk() -> None:
    record = logging.LogRecord("dbtbackfill", logging.WARNING, __file__, 1, "chunk %s failed", (3,), None)
    record.k8s_ref = {"namespace": "analytics", "name": "nightly"}
    record.chunk = 3
    line = json.loads(JsonFormatter().format(record))
    assert line["backfill"] == "analytics/nightly"
    assert line["chunk"] == 3
    assert line["message"] == "chunk 3 failed"
    assert line["level"] == "WARNING"


def test_newly_finished_chunks_move_the_counters_once() -> None:
    before = {
        name: sample(name)
        for name in (
            "dbt_backfill_chunks_succeeded_total",
            "dbt_backfill_chunks_failed_total",
            "dbt_backfill_records_processed_total",
            "dbt_backfill_chunk_duration_seconds_count",
        )
    }
    previous = {"chunkState": reconcile.state_to_status(ChunkState(succeeded=frozenset({0}), records=10))}
    after = ChunkState(
        succeeded=frozenset({0, 1, 2}), failed=frozenset({5}), records=40, duration_count=2, duration_total=30.0
    )
    decision = reconcile.Decision(after, "Running", (), (), frozenset(), (), None)
    controller._observe(previous, {}, decision)
    assert sample("dbt_backfill_chunks_succeeded_total") - before["dbt_backfill_chunks_succeeded_total"] == 2
    assert sample("dbt_backfill_chunks_failed_total") - before["dbt_backfill_chunks_failed_total"] == 1
    assert sample("dbt_backfill_records_processed_total") - before["dbt_backfill_records_processed_total"] == 30
    assert (
        sample("dbt_backfill_chunk_duration_seconds_count") - before["dbt_backfill_chunk_duration_seconds_count"] == 2
    )
    # The same pass observed again (no state change) counts nothing.
    same = {"chunkState": reconcile.state_to_status(after)}
    controller._observe(same, {}, decision)
    assert sample("dbt_backfill_chunks_succeeded_total") - before["dbt_backfill_chunks_succeeded_total"] == 2


def test_phase_events_tell_the_story() -> None:
    new = {"progress": "31/31", "recordsProcessed": 900, "conditions": [{"message": "x"}]}
    assert [e.reason for e in controller._phase_events("Running", "Succeeded", new)] == ["Succeeded"]
    assert [e.reason for e in controller._phase_events("Suspended", "Running", new)] == ["Resumed"]
    assert controller._phase_events("Running", "Running", new) == []
