"""The size of ``.status`` for a 10-year daily backfill in its largest realistic shape.

``python -m benchmarks.status_size`` builds, with the operator's real summariser, the status of a
3,652-chunk daily backfill with parallelism 32 running, 10 recent failures with 1 KiB messages and
failed chunks scattered (no two adjacent ranges merge), and reports its JSON size. Target: under
64 KiB (an object in etcd should stay far below its 1.5 MiB limit, and every watch event carries it).
Pure: no cluster, no database.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, date, datetime, timedelta
from typing import Any

from benchmarks import recording
from dbtbackfill.core.planner import plan_windows
from dbtbackfill.operator.reconcile import ChunkState, Failure
from dbtbackfill.operator.status import summarise

NAME = "status_size"
TARGET_BYTES = 64 * 1024


def status_size() -> dict[str, Any]:
    windows = plan_windows(date(2015, 1, 1), date(2024, 12, 30), "day")
    now = datetime(2025, 1, 1, tzinfo=UTC)
    failed = frozenset(range(7, len(windows), 401))
    running = frozenset(range(2000, 2032))
    succeeded = frozenset(i for i in range(len(windows)) if i not in failed and i not in running and i % 97)
    state = ChunkState(
        succeeded=succeeded,
        failed=failed,
        attempts={i: 3 for i in (*failed, *running)},
        retry_base={i: 1 for i in failed},
        retry_at={i: now + timedelta(seconds=900) for i in list(running)[:5]},
        records=123_456_789_012,
        duration_count=len(succeeded),
        duration_total=float(len(succeeded) * 42),
        recent_failures=tuple(Failure(i, windows[i].label(), 3, "E" * 1024, now) for i in sorted(failed)[:10]),
    )
    status = summarise(windows=windows, state=state, phase="Running", running=running, parallelism=32,
                       generation=3, previous=None, now=now)  # fmt: skip
    encoded = json.dumps(status, separators=(",", ":"))
    return {"chunks": len(windows), "status_bytes": len(encoded), "target_bytes": TARGET_BYTES,
            "target_met": len(encoded) <= TARGET_BYTES, "succeeded_ranges": len(status["succeededRanges"])}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    size, target = result["status_bytes"], result["target_bytes"]
    return f"""# `.status` size (`python -m benchmarks.status_size`)

{result["chunks"]} daily chunks, 32 running, 10 recent failures of 1 KiB, scattered failed chunks
({result["succeeded_ranges"]} succeeded ranges): **{size:,} bytes** (target <= {target:,}).
"""


def main() -> int:
    recording.publish(NAME, {"environment": recording.environment(), **status_size()}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
