"""The benchmark harness's own logic: its statistics, its recording, its rendering, its size.

Pure functions only: no benchmark is run here (no timed assertions; numbers go to benchmarks/).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import recording
from benchmarks.backfill_speed.commands import sample_days
from benchmarks.backfill_speed.variants import check_engine, cli_timeline

BENCHMARKS = recording.REPO_ROOT / "benchmarks"
MAX_LINES = 300

#: Every stored result whose Markdown is rendered from its JSON, and the function that renders it.
RENDERERS = {
    "backfill_speed": ("benchmarks.backfill_speed.report", "render_markdown"),
    "shop_backfill": ("benchmarks.shop_backfill", "render_markdown"),
    "chunk_cost_k8s": ("benchmarks.chunk_cost_k8s", "markdown"),
    "image_startup": ("benchmarks.image_startup", "markdown"),
    "status_size": ("benchmarks.status_size", "markdown"),
    "matrix_cluster_ttl30": ("benchmarks.matrix_cluster", "markdown"),
    "operator_cluster": ("benchmarks.operator_cluster", "markdown"),
    "queue_contention": ("benchmarks.queue_contention", "markdown"),
    "restart_soak": ("benchmarks.restart_soak", "markdown"),
}
# Not in RENDERERS: results/matrix_cluster.md was written before the run's --ttl-seconds existed and
# says nothing about it; its JSON, rendered today, says "ttlSecondsAfterFinished None". The next
# run of that benchmark rewrites both.


def test_every_benchmark_module_reads_in_one_sitting() -> None:
    sizes = {
        path.relative_to(BENCHMARKS.parent): len(path.read_text().splitlines()) for path in BENCHMARKS.rglob("*.py")
    }
    assert len(sizes) > 10  # the glob found the benchmarks, the package's modules included
    too_long = {str(path): lines for path, lines in sizes.items() if lines > MAX_LINES}
    assert not too_long, f"benchmark modules over {MAX_LINES} lines: {too_long}"


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 50, 5.0),
        ([3.0, 1.0, 2.0], 0, 1.0),  # unsorted input; p0 is the smallest
        ([3.0, 1.0, 2.0], 100, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),  # nearest rank, no interpolation
        ([float(i) for i in range(1, 31)], 90, 27.0),  # an exact rank: the 27th of 30, not the 28th
        ([float(i) for i in range(1, 21)], 95, 19.0),
        ([float(i) for i in range(1, 101)], 99, 99.0),
    ],
)
def test_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert recording.nearest_rank(values, q) == expected


@settings(deadline=None)  # a loaded shared machine, not a slow function
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60), st.integers(0, 100))
def test_nearest_rank_is_the_smallest_value_with_q_percent_at_or_below_it(values: list[float], q: int) -> None:
    result = recording.nearest_rank(values, q)
    assert result in values
    needed = math.ceil(q * len(values) / 100)
    assert sum(v <= result for v in values) >= needed
    assert all(sum(v <= smaller for v in values) < max(needed, 1) for smaller in values if smaller < result)


def test_nearest_rank_refuses_no_values_and_a_q_outside_0_to_100() -> None:
    with pytest.raises(ValueError, match="no values"):
        recording.nearest_rank([], 50)
    with pytest.raises(ValueError, match="is not within"):
        recording.nearest_rank([1.0], 905)
    assert recording.percentile([], 95) is None
    assert recording.percentile([2.0, 1.0], 95) == 2.0


def test_distribution_and_median_round_what_they_record() -> None:
    dist = recording.distribution([0.1234, 0.2, 0.3, 10.0], digits=2)
    assert dist == {"count": 4, "p50": 0.2, "p95": 10.0, "p99": 10.0, "max": 10.0, "mean": 2.66}
    assert recording.distribution([]) == {"count": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    assert recording.median([1.0, 2.0, 2.5, 3.0]) == 2.25
    assert recording.median([0.12345, 0.2], digits=2) == 0.16


def test_publish_stamps_writes_both_files_and_renders_the_stored_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def markdown(data: dict[str, Any]) -> str:
        return f"# result\n\nmeasured at {data['measured_at']}: {data['value']}\n\n\n"

    recording.publish("thing", {"value": 3}, markdown, tmp_path / "out")
    stored = json.loads((tmp_path / "out" / "thing.json").read_text())
    assert stored["value"] == 3
    md = (tmp_path / "out" / "thing.md").read_text()
    assert md == f"# result\n\nmeasured at {stored['measured_at']}: 3\n"  # one final newline
    assert capsys.readouterr().out.startswith(md)


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_stored_results_render_to_their_stored_markdown(name: str) -> None:
    module, function = RENDERERS[name]
    render: Callable[[dict[str, Any]], str] = getattr(importlib.import_module(module), function)
    results = json.loads((recording.RESULTS_DIR / f"{name}.json").read_text())
    assert render(results).rstrip() + "\n" == (recording.RESULTS_DIR / f"{name}.md").read_text()


@pytest.mark.parametrize(("days", "sample"), [(365, 30), (20, 3), (10, 10), (10, 50), (7, 1), (2, 2)])
def test_sample_days_are_evenly_spaced_with_the_ends(days: int, sample: int) -> None:
    offsets = sample_days(days, sample)
    assert offsets == sorted(set(offsets))
    assert len(offsets) == min(days, sample)
    assert all(0 <= o < days for o in offsets)
    if sample > 1:
        assert (offsets[0], offsets[-1]) == (0, days - 1)


EXECUTION = "0b7d0e6e-3c1f-4a52-9d57-6a1f0e2b9c11"
#: A CLI run as its stderr arrives: dbt creates the tables in the first window, then the rest run compiled.
CLI_LINES = [
    (0.5, "connecting"),
    (1.0, "plan: 3 window(s) of 1 day"),
    (1.2, "engine: dbt for the first window: table analytics.fact_orders does not exist yet"),
    (1.5, "window 1/3 2024-01-01 ok rows=5 0.30s"),
    (1.9, "engine: compiled: dbt compiled 3 model(s) once; one transaction per window"),
    (1.95, "window 2/3 2024-01-02 ok rows=5 0.01s"),
    (2.0, "window 3/3 2024-01-03 ok rows=5 0.00s"),
    (2.1, f"backfill completed: 3/3 window(s), 15 row(s), 0.80s (execution {EXECUTION})"),
]


def test_cli_timeline_splits_the_run_by_when_its_lines_arrive() -> None:
    timeline = cli_timeline(CLI_LINES, wall=2.5)
    assert [e["engine"] for e in timeline["engine_lines"]] == ["dbt", "compiled"]
    assert (timeline["windows_compiled"], timeline["windows_dbt"]) == (2, 1)
    assert timeline["before_plan_seconds"] == 1.0
    assert timeline["plan_to_first_window_seconds"] == 0.2
    assert timeline["windows_wall_seconds"] == 0.4  # 0.3 + 0.05 + 0.05
    assert timeline["between_windows_seconds"] == 0.4  # the compile after the table-creating window
    assert timeline["last_window_to_summary_seconds"] == 0.1
    assert timeline["summary_to_exit_seconds"] == 0.4
    assert (timeline["per_window_wall_median"], timeline["per_window_wall_p90"]) == (0.05, 0.3)


def test_cli_timeline_without_windows_is_an_error() -> None:
    with pytest.raises(recording.BenchmarkError, match="no plan, window or summary"):
        cli_timeline(CLI_LINES[:3], wall=2.5)


def test_check_engine_refuses_a_run_that_did_not_use_the_engine_it_measures() -> None:
    run = {"windows": 3, **cli_timeline(CLI_LINES, wall=2.5)}
    check_engine(run, "compiled", "(3)")  # all but a table-creating first window: fine
    with pytest.raises(recording.BenchmarkError, match="ran 1 of 3 window"):
        check_engine(run | {"windows_compiled": 1}, "compiled", "(3)")
    with pytest.raises(recording.BenchmarkError, match="did not run one dbt invocation per window"):
        check_engine(run, "dbt", "(3d)")
    check_engine(run | {"windows_compiled": 0}, "dbt", "(3d)")
