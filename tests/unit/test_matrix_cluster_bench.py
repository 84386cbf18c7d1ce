"""`benchmarks.matrix_cluster`'s own logic: its admission-rate arithmetic and its bad-input path.

The cluster run itself is a benchmark, not a test (no timed assertions here).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import matrix_cluster


def test_admission_rate_leaves_out_the_start_up_burst() -> None:
    started = 1000.0
    # Two Jobs at once (parallelism 2), then one a second; a last one in the second minute.
    creates = [1000.5, 1000.5, 1001.0, 1002.0, 1003.0, 1061.0]
    rate = matrix_cluster.admission(creates, started, parallelism=2)
    assert rate["jobs_created"] == 6
    assert rate["steady_per_second"] == round(3 / 60, 3)
    assert rate["steady_from_seconds"] == 1.0
    assert rate["jobs_per_minute"] == [5, 1]


def test_admission_rate_without_a_steady_phase_is_none() -> None:
    rate = matrix_cluster.admission([5.0, 5.1], 5.0, parallelism=2)
    assert rate["steady_per_second"] is None
    assert matrix_cluster.admission([], 5.0, parallelism=2)["jobs_per_minute"] == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--tenants", "0"],
        ["--tenants", "1001"],
        ["--days", "0"],
        ["--parallelism", "33"],
        ["--duration-seconds", "0"],
        ["--ttl-seconds", "-1"],
    ],
)
def test_bad_sizes_exit_2_with_one_line_and_write_nothing(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert matrix_cluster.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("matrix_cluster: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
