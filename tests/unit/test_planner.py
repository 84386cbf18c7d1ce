"""The calendar planner: exact cover, calendar alignment, strict validation."""

from __future__ import annotations

import itertools
from datetime import date, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbtbackfill.core import planner
from dbtbackfill.core.planner import PlanError, Window, plan_windows

dates = st.dates(min_value=date(1990, 1, 1), max_value=date(2040, 12, 31))


@st.composite
def ranges(draw: st.DrawFn, max_days: int = 800) -> tuple[date, date]:
    start = draw(dates)
    return start, start + timedelta(days=draw(st.integers(0, max_days)))


@given(ranges(), st.sampled_from(planner.CHUNK_UNITS), st.integers(1, 5))
def test_windows_cover_the_range_exactly_in_order(rng: tuple[date, date], unit: str, size: int) -> None:
    start, end = rng
    windows = plan_windows(start, end, unit, size)
    assert windows[0].start == start
    assert windows[-1].end == end
    assert [w.index for w in windows] == list(range(len(windows)))
    for before, after in itertools.pairwise(windows):
        assert after.start == before.end + timedelta(days=1)  # no gap, no overlap
    assert all(w.start <= w.end for w in windows)
    assert sum(w.days for w in windows) == (end - start).days + 1


@given(ranges())
def test_month_windows_follow_calendar_months(rng: tuple[date, date]) -> None:
    windows = plan_windows(*rng, "month")
    for w in windows:
        assert (w.start.year, w.start.month) == (w.end.year, w.end.month)
    for w in windows[1:]:
        assert w.start.day == 1
    for w in windows[:-1]:
        assert (w.end + timedelta(days=1)).day == 1
        assert 28 <= w.days <= 31 or w is windows[0]


@given(ranges())
def test_week_windows_are_iso_weeks(rng: tuple[date, date]) -> None:
    windows = plan_windows(*rng, "week")
    for w in windows:
        assert w.start.isocalendar()[:2] == w.end.isocalendar()[:2]
    for w in windows[1:]:
        assert w.start.isoweekday() == 1
    for w in windows[:-1]:
        assert w.end.isoweekday() == 7


@given(ranges(max_days=400), st.integers(1, 4))
def test_sized_day_windows_hold_size_days(rng: tuple[date, date], size: int) -> None:
    windows = plan_windows(*rng, "day", size)
    assert all(w.days == size for w in windows[:-1])
    assert 1 <= windows[-1].days <= size


def test_leap_february_is_one_window() -> None:
    assert plan_windows(date(2024, 2, 1), date(2024, 2, 29), "month") == [
        Window(0, date(2024, 2, 1), date(2024, 2, 29))
    ]


def test_two_month_chunks_count_from_the_start_month() -> None:
    windows = plan_windows(date(2024, 1, 15), date(2024, 6, 30), "month", 2)
    assert [w.label() for w in windows] == [
        "2024-01-15..2024-02-29",
        "2024-03-01..2024-04-30",
        "2024-05-01..2024-06-30",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2024-02-30", "not a real calendar date"),
        ("2024/01/01", "YYYY-MM-DD"),
        ("24-1-1", "YYYY-MM-DD"),
        ("", "YYYY-MM-DD"),
        ("2024-01-01'; drop table x;--", "YYYY-MM-DD"),
    ],
)
def test_bad_dates_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message) as info:
        planner.parse_date(text, "start_date")
    assert "\n" not in str(info.value)


def test_reversed_range_has_the_documented_message() -> None:
    with pytest.raises(PlanError, match=r"^start_date must be <= end_date$"):
        plan_windows(date(2024, 2, 1), date(2024, 1, 1))


@pytest.mark.parametrize("tenant", ["", " ", "x' or '1'='1", "a;b", "a b", "-lead", "a" * 64, "t.1", 'a"b'])
def test_unsafe_tenants_are_rejected(tenant: str) -> None:
    with pytest.raises(PlanError, match="tenant_id must match"):
        planner.validate_tenant_id(tenant)


@pytest.mark.parametrize("tenant", ["tenant-001", "ACME_2", "a", "a" * 63])
def test_safe_tenants_pass(tenant: str) -> None:
    assert planner.validate_tenant_id(tenant) == tenant


def test_too_many_windows_is_refused() -> None:
    with pytest.raises(PlanError, match="more than 3660"):
        plan_windows(date(2000, 1, 1), date(2012, 1, 1), "day")
    assert len(plan_windows(date(2000, 1, 1), date(2012, 1, 1), "month")) == 145


@pytest.mark.parametrize(("unit", "size"), [("year", 1), ("day", 0), ("week", -1), ("day", True)])
def test_bad_units_and_sizes(unit: str, size: int) -> None:
    with pytest.raises(PlanError):
        plan_windows(date(2024, 1, 1), date(2024, 1, 2), unit, size)


@given(st.sets(st.integers(0, 300)))
def test_compress_round_trips(indices: set[int]) -> None:
    runs = planner.compress_indices(indices)
    assert planner.expand_runs(runs) == indices
    for (_, last), (first, _) in itertools.pairwise(runs):
        assert first > last + 1  # runs are maximal: adjacent runs would have merged


# --- the whole domain the CRD admits --------------------------------------------------------

# Every date a DbtBackfill may carry (Python has no year 0, which parse_date refuses), every
# range the CRD's 3660-day rule admits, every chunk unit and size its schema allows.
ALL_DATES = st.dates(min_value=date.min, max_value=date.max)
CRD_SIZES = st.integers(1, 366)
EDGES = st.sampled_from([date.min, date(1, 1, 7), date(9999, 1, 1), date(9998, 12, 25), date.max])


@st.composite
def crd_ranges(draw: st.DrawFn) -> tuple[date, date]:
    start = draw(st.one_of(ALL_DATES, EDGES))
    days = draw(st.one_of(st.integers(0, 3659), st.sampled_from([0, 1, 6, 30, 365, 3659])))
    end = min(start + timedelta(days=min(days, (date.max - start).days)), date.max)
    if draw(st.booleans()):  # ranges that end at the calendar's last day are the risky ones
        end, start = date.max, max(date.max - timedelta(days=days), date.min)
    return start, end


@settings(max_examples=500, deadline=None)
@given(crd_ranges(), st.sampled_from(planner.CHUNK_UNITS), st.one_of(CRD_SIZES, st.sampled_from([1, 365, 366])))
def test_planning_is_total_over_the_crd_domain(rng: tuple[date, date], unit: str, size: int) -> None:
    """No OverflowError or ValueError, whatever the dates and chunking: a plan that covers
    the range exactly, or a PlanError (too many chunks) the operator reports as InvalidSpec."""
    start, end = rng
    try:
        windows = plan_windows(start, end, unit, size)
    except PlanError as exc:
        assert "more than 3660" in str(exc)
        return
    assert windows[0].start == start
    assert windows[-1].end == end
    for before, after in itertools.pairwise(windows):
        assert after.start == before.end + timedelta(days=1)
    assert all(w.start <= w.end for w in windows)


@pytest.mark.parametrize(
    ("start", "end", "unit", "size", "last"),
    [
        (date(9999, 12, 1), date.max, "day", 1, "9999-12-31..9999-12-31"),
        (date(9999, 12, 27), date.max, "week", 1, "9999-12-27..9999-12-31"),
        (date(9999, 1, 1), date.max, "month", 366, "9999-01-01..9999-12-31"),
        (date(9990, 1, 1), date.max, "day", 366, "9999-01-08..9999-12-31"),
        (date(9999, 12, 31), date.max, "month", 1, "9999-12-31..9999-12-31"),
    ],
)
def test_chunks_reaching_past_9999_end_with_the_range(start: date, end: date, unit: str, size: int, last: str) -> None:
    windows = plan_windows(start, end, unit, size)
    assert windows[-1].label() == last
    assert windows[-1].end == date.max


@pytest.mark.parametrize("unit", planner.CHUNK_UNITS)
@pytest.mark.parametrize("size", [1, 3])
def test_ranges_ending_at_the_last_representable_day_plan_without_overflow(unit: str, size: int) -> None:
    # The period after 9999-12-31 cannot be computed; the last window simply ends there.
    start, end = date(9999, 10, 17), date.max
    windows = plan_windows(start, end, unit, size)
    assert windows[0].start == start and windows[-1].end == end
    assert sum(w.days for w in windows) == (end - start).days + 1
    for before, after in itertools.pairwise(windows):
        assert after.start == before.end + timedelta(days=1)
