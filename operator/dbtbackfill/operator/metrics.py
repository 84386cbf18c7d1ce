"""Prometheus metrics the operator exports on ``--metrics-port``."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

BACKFILLS: Final = Gauge("dbt_backfill_backfills", "DbtBackfills by phase", ["phase"])
CHUNKS_STARTED: Final = Counter("dbt_backfill_chunks_started", "Chunk Jobs created")
CHUNKS_SUCCEEDED: Final = Counter("dbt_backfill_chunks_succeeded", "Chunks that succeeded")
CHUNKS_FAILED: Final = Counter("dbt_backfill_chunks_failed", "Chunks that failed after all retries")
CHUNKS_RETRIED: Final = Counter("dbt_backfill_chunks_retried", "Chunk attempts after the first")
CHUNK_DURATION: Final = Histogram(
    "dbt_backfill_chunk_duration_seconds",
    "Wall time of succeeded chunk Jobs",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)
RECORDS_PROCESSED: Final = Counter("dbt_backfill_records_processed", "Rows written by succeeded chunks")
AUDIT_WRITE_FAILURES: Final = Counter(
    "dbt_backfill_audit_write_failures", "Audit log reads or writes that failed and will be retried"
)
