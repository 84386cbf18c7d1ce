"""``--verify``: the selected models' data tests, scoped to each window and tenant, before it counts.

A copy of analytics/ gets one more data test, ``unique`` on ``fact_orders.ordered_at``, which the
demo data passes; the tests then give one tenant's day two orders at the same instant, so exactly
that window (and tenant) violates it. Real PostgreSQL, real dbt.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.conftest import (
    audit_rows,
    copy_analytics_project,
    execute,
    fact_checksums,
    point_dbt_at,
    query,
    run_cli,
)

pytestmark = pytest.mark.integration

TEST = "unique_fact_orders_ordered_at"
BAD_DAY = "2024-02-10"
IN_BAD_DAY = "{day} = date '2024-02-10'"


@pytest.fixture(autouse=True)
def _isolated(fresh_env: None, dispose_engines: None) -> None:
    """Clean env, private dbt target dir (``cli_env``), engines disposed after."""


@pytest.fixture
def verified_project(cli_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    project = copy_analytics_project(tmp_path / "analytics", source=cli_env / "analytics")
    facts = project / "models" / "facts" / "_facts.yml"
    before = "      - name: ordered_at\n        data_tests: [not_null]\n"
    assert facts.read_text().count(before) == 1
    facts.write_text(
        facts.read_text().replace(before, "      - name: ordered_at\n        data_tests: [not_null, unique]\n")
    )
    return point_dbt_at(project, tmp_path, monkeypatch)


def _break_the_bad_day(url: str, tenant: str = "tenant-001") -> int:
    """A second order at the same instant as one of ``tenant``'s on BAD_DAY; the test's failing rows."""
    execute(
        url,
        "insert into raw.orders (tenant_id, order_id, customer_id, status, amount, ordered_at)"
        " select tenant_id, -order_id, customer_id, status, amount, ordered_at from raw.orders"
        " where tenant_id = %s and (ordered_at at time zone 'UTC')::date = %s order by order_id limit 1",
        tenant,
        BAD_DAY,
    )
    [(failing,)] = query(
        url,
        "select count(*) from (select ordered_at from raw.orders where (ordered_at at time zone 'UTC')::date = %s"
        " group by ordered_at having count(*) > 1) d",
        BAD_DAY,
    )
    assert failing >= 1
    return int(failing)


def _order_count(url: str, day: str) -> int:
    [(n,)] = query(url, "select count(*) from analytics.fact_orders where order_date = %s", day)
    return int(n)


def _engine(err: str) -> str:
    [line] = [x for x in err.splitlines() if x.startswith("engine: ")]
    return line


def test_compiled_a_failing_test_rolls_the_window_back_and_a_clean_window_commits(
    demo_url: str, verified_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = demo_url
    for day in ("2024-02-08", BAD_DAY):  # the tables exist, and the bad day holds its clean rows
        assert run_cli("--start-date", day, "--end-date", day, "--database-url", url) == 0
    failing = _break_the_bad_day(url)
    before = fact_checksums(url, where=IN_BAD_DAY)
    assert _order_count(url, "2024-02-09") == 0
    capsys.readouterr()

    code = run_cli("--start-date", "2024-02-09", "--end-date", BAD_DAY, "--chunk", "day", "--verify",
                   "--database-url", url)  # fmt: skip

    err = capsys.readouterr().err
    assert code == 1, err
    assert _engine(err).startswith("engine: compiled: ")
    assert re.search(r"^verify: \d+ data test\(s\) of 3 model\(s\), per window$", err, re.M)
    assert re.search(r"^window 1/2 2024-02-09\.\.2024-02-09 ok ", err, re.M)
    assert re.search(rf"^window 2/2 {BAD_DAY}\.\.{BAD_DAY} FAILED ", err, re.M)
    message = f"test {TEST} failed: {failing} failing row(s)"
    assert f"error: {message}" in err.splitlines()
    assert audit_rows(url)[-1]["error_message"] == f"window {BAD_DAY}..{BAD_DAY}: {message}"
    # The clean window committed; the failing one was rolled back, every model of it.
    [(raw_feb9,)] = query(
        url, "select count(*) from raw.orders where (ordered_at at time zone 'UTC')::date = '2024-02-09'"
    )
    assert _order_count(url, "2024-02-09") == raw_feb9 > 0
    assert fact_checksums(url, where=IN_BAD_DAY) == before


def test_dbt_engine_marks_the_window_failed_after_dbt_committed_it(
    demo_url: str, verified_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = demo_url
    assert run_cli("--start-date", BAD_DAY, "--end-date", BAD_DAY, "--database-url", url) == 0
    failing = _break_the_bad_day(url)
    clean_rows = _order_count(url, BAD_DAY)
    capsys.readouterr()

    code = run_cli("--start-date", BAD_DAY, "--end-date", BAD_DAY, "--engine", "dbt", "--verify", "--database-url", url)

    err = capsys.readouterr().err
    assert code == 1, err
    assert _engine(err) == "engine: dbt per window: --engine dbt"
    message = f"test {TEST} failed: {failing} failing row(s) (dbt had committed the window)"
    assert f"error: {message}" in err.splitlines()
    row = audit_rows(url)[-1]
    assert (row["status"], row["error_message"]) == ("failed", f"window {BAD_DAY}..{BAD_DAY}: {message}")
    assert _order_count(url, BAD_DAY) == clean_rows + 1  # dbt's run of the window had committed


def test_the_tests_are_scoped_to_the_tenant(
    demo_url: str, verified_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = demo_url
    assert run_cli("--start-date", BAD_DAY, "--end-date", BAD_DAY, "--database-url", url) == 0
    _break_the_bad_day(url, tenant="tenant-001")
    capsys.readouterr()
    argv = ("--start-date", BAD_DAY, "--end-date", BAD_DAY, "--verify", "--database-url", url)

    # tenant-002's rows of the window pass; tenant-001's do not, with either engine.
    assert run_cli(*argv, "--tenant-id", "tenant-002") == 0
    assert run_cli(*argv, "--tenant-id", "tenant-001") == 1
    assert run_cli(*argv, "--tenant-id", "tenant-002", "--engine", "dbt") == 0
    err = capsys.readouterr().err
    assert err.count(f"error: test {TEST} failed: ") == 1
