"""How long does a chunk Pod's container take from start to its first SQL, and to its first model?

``python -m benchmarks.image_startup [--repeats 3] [--image localhost/dbt-backfill-operator:dev]``

Needs the built image (``make image``) and podman. It starts a throwaway PostgreSQL on loopback
with every statement logged (``log_statement = 'all'``, millisecond timestamps), loads the demo
data into two databases, and runs one daily chunk per repeat, exactly as a chunk Job does:
``podman run --network host --read-only --user 10001:10001 --tmpfs /tmp IMAGE python -m
scripts.run_dbt_backfill --start-date D --end-date D --chunk day`` with ``DATABASE_URL`` set.

* ``reused``: the database is ``analytics``, the one the image's build-time parse is for, so the
  run reuses the image's ``partial_parse.msgpack`` (the run's ``parse:`` line must say so);
* ``full``: another database name, so dbt parses the whole project in the Pod (the run's
  ``parse:`` line must say so) — what every Pod paid before the parse key ignored credentials.

For each run, from the moment ``podman run`` is started: the first statement the server logs from
the container (the CLI's connection check), the first statement writing a fact table (the
window's ``delete``), the process's exit, and the CPU time the chunk used (user+sys, from the
shell's ``times``: what a loaded machine does not inflate). One chunk per database runs first,
uncounted, to create the fact tables, so every measured chunk runs its window compiled, as every
chunk of a backfill but the first does. Also ``podman run ... true`` (the container runtime alone).
Writes ``benchmarks/results/image_startup.json`` and ``.md``; numbers from a loaded machine say
so (the load average is recorded next to them).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import psycopg

from benchmarks.recording import RESULTS_DIR, BenchmarkError, Stopwatch, median, publish
from dbtbackfill.demo.data import load_demo_data
from dbtbackfill.demo.localpg import LocalPostgres

DEFAULT_OUT: Final = RESULTS_DIR / "image_startup.json"
TARGET_FIRST_SQL_SECONDS: Final = 1.5
PARSED_DATABASE: Final = "analytics"
LOG_PREFIX: Final = "%m [bench] app=%a "
# Simple queries log as "statement: ..."; psycopg's prepared ones as "execute <name>: ...".
LOG_LINE: Final = re.compile(r"^(\S+ \S+) UTC \[bench\] app=(\S*) LOG:  (?:statement|execute [^:]+): (.*)$")
RECORD: Final = re.compile(r"^\S+ \S+ UTC \[bench\] ")
# dbt prefixes its statements with a /* {...} */ query comment.
WRITE: Final = re.compile(r"^\s*(?:/\*.*?\*/\s*)*(delete|insert|create|merge|update)\b.*\bfact_", re.I | re.S)


def database(server: LocalPostgres, name: str) -> str:
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')
        conn.execute(f'create database "{name}" template template0')
        conn.execute("alter system set log_statement = 'all'")
        conn.execute(f"alter system set log_line_prefix = '{LOG_PREFIX}'")
        conn.execute("alter system set log_timezone = 'UTC'")
        conn.execute("select pg_reload_conf()")
    url = server.url.rsplit("/", 1)[0] + f"/{name}"
    load_demo_data(url, tenants=3, start_date=date(2024, 1, 1), days=60, rows_per_day=20)
    return url


def statements(log: Path, offset: int) -> list[tuple[datetime, str, str]]:
    """(time, application_name, statement) of every statement logged after ``offset`` bytes.

    A statement's later lines follow its record unprefixed. One container runs at a time, so
    every statement after the offset is the run's.
    """
    out: list[tuple[datetime, str, str]] = []
    current: list[str] | None = None
    with log.open(errors="replace") as f:
        f.seek(offset)
        for line in f:
            line = line.rstrip("\n")
            m = LOG_LINE.match(line)
            if m:
                stamp = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
                current = [m[3]]
                out.append((stamp, m[2], ""))
            elif RECORD.match(line):
                current = None  # another kind of record (DETAIL, a connection, ...)
            elif current is not None:
                current.append(line)
            if current is not None:
                out[-1] = (out[-1][0], out[-1][1], "\n".join(current))
    return out


def podman_run(image: str, *command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["podman", "run", "--rm", "--network", "host", "--read-only", "--user", "10001:10001"]
    argv += ["--tmpfs", "/tmp"]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    return subprocess.run(
        [*argv, image, *command], capture_output=True, text=True, timeout=600, check=False, stdin=subprocess.DEVNULL
    )


def _seconds(text: str) -> float:
    """``1m2.500s`` (POSIX ``times``) in seconds."""
    minutes, _, rest = text.partition("m")
    return int(minutes) * 60 + float(rest.rstrip("s"))


def one_chunk(server: LocalPostgres, image: str, url: str, day: date, expect_parse: str) -> dict[str, Any]:
    offset = server.log_file.stat().st_size
    started = datetime.now(UTC)
    clock = Stopwatch()
    # `times` (the shell's children's CPU time) is the load-independent cost of the same run.
    run = podman_run(
        image,
        "sh", "-c", 'python "$@"; code=$?; times >&2; exit $code', "sh",
        "-m", "scripts.run_dbt_backfill",
        "--start-date", day.isoformat(), "--end-date", day.isoformat(), "--chunk", "day",
        env={"DATABASE_URL": url},
    )  # fmt: skip
    wall = clock.seconds(3)
    if run.returncode != 0:
        raise BenchmarkError(f"the chunk failed ({run.returncode}): {run.stderr[-2000:]}")
    cpu_user, cpu_sys = (_seconds(v) for v in run.stderr.strip().splitlines()[-1].split())
    parse = next((line.removeprefix("parse: ") for line in run.stderr.splitlines() if line.startswith("parse: ")), "")
    if not parse.startswith(expect_parse):
        raise BenchmarkError(f"expected 'parse: {expect_parse}...', the run said {parse!r}")
    time.sleep(0.2)  # the server's logger flushes asynchronously
    logged = statements(server.log_file, offset)
    if not logged:
        raise BenchmarkError("the server logged no statement from the run")
    first = logged[0][0]
    window = next((t for t, _, sql in logged if WRITE.match(sql)), None)
    if window is None:
        raise BenchmarkError("no statement writing a fact table in the server log")
    return {
        "day": day.isoformat(),
        "first_sql_seconds": round((first - started).total_seconds(), 3),
        "first_window_statement_seconds": round((window - started).total_seconds(), 3),
        "exit_seconds": wall,
        "cpu_seconds": round(cpu_user + cpu_sys, 3),
        "parse_line": parse,
    }


def markdown(report: dict[str, Any]) -> str:
    summary, machine = report["median"], report["machine"]
    rows = [
        "| | first SQL | first window statement | exit | CPU (user+sys) |",
        "|---|---|---|---|---|",
        *(
            f"| {kind} parse | {s['first_sql_seconds']} s | {s['first_window_statement_seconds']} s "
            f"| {s['exit_seconds']} s | {s['cpu_seconds']} s |"
            for kind, s in summary.items()
        ),
    ]
    md = [
        f"# Image start-up ({report['when']}, {machine['cpus']} CPUs, load {machine['load_before'][0]:.1f} before, "
        f"{report['load_after'][0]:.1f} after)",
        "",
        f"Median of {len(report['runs']['reused'])} daily chunks, seconds from `podman run` to each event; "
        f"`podman run ... true` alone: {report['podman_run_true_seconds']['median']} s.",
        "",
        *rows,
        "",
        f"Target: container start to first SQL <= {report['target_first_sql_seconds']} s with the image's parse: "
        f"{'met' if report['target_met'] else 'NOT met'}.",
    ]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.image_startup", description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=os.environ.get("IMAGE", "localhost/dbt-backfill-operator:dev"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if subprocess.run(["podman", "image", "exists", args.image], check=False).returncode != 0:
        print(f"image_startup: {args.image} is not built; run `make image`", file=sys.stderr)
        return 2

    load_before = os.getloadavg()
    runtime = []
    for _ in range(args.repeats):
        clock = Stopwatch()
        podman_run(args.image, "true")
        runtime.append(clock.seconds(3))

    results: dict[str, list[dict[str, Any]]] = {"reused": [], "full": []}
    with LocalPostgres() as server:
        urls = {"reused": database(server, PARSED_DATABASE), "full": database(server, "warehouse")}
        expect = {"reused": "reused the saved parse", "full": "full parse"}
        for kind in ("reused", "full"):  # not counted: creates the fact tables (dbt, not compiled)
            one_chunk(server, args.image, urls[kind], date(2024, 1, 5), expect[kind])
        for n in range(args.repeats):
            for kind in ("reused", "full"):
                day = date(2024, 1, 10) + timedelta(days=n)
                results[kind].append(one_chunk(server, args.image, urls[kind], day, expect[kind]))
                print(f"{kind}: {results[kind][-1]}", file=sys.stderr)

    summary = {
        kind: {
            key: median(r[key] for r in results[kind])
            for key in ("first_sql_seconds", "first_window_statement_seconds", "exit_seconds", "cpu_seconds")
        }
        for kind in results
    }
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load_before},
        "load_after": os.getloadavg(),
        "image": args.image,
        "image_size_bytes": int(
            subprocess.run(
                ["podman", "image", "inspect", "--format", "{{.Size}}", args.image],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        ),
        "podman_run_true_seconds": {"median": median(runtime), "runs": runtime},
        "median": summary,
        "runs": results,
        "target_first_sql_seconds": TARGET_FIRST_SQL_SECONDS,
        "target_met": summary["reused"]["first_sql_seconds"] <= TARGET_FIRST_SQL_SECONDS,
    }
    publish(args.out.stem, report, markdown, args.out.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
