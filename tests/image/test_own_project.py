"""An image of one's own dbt project (deploy/examples/own-project/Dockerfile), from tests/projects/shop.

The recipe is built with podman on top of the operator image (``shop_image``), then a chunk runs
in it as the operator's Jobs run one: ``python -m scripts.run_dbt_backfill`` with the Job's
arguments, ``DATABASE_URL`` the only setting, read-only root, as 10001, against the session's real
PostgreSQL on loopback: first with ``podman run`` (/tmp a tmpfs), then as the very Job the
operator would create (`dbtbackfill.operator.jobs.build_job`), on a local cluster whose node agent runs
Pods in their images with podman (a real kube-apiserver, Job controller and scheduler). The shop's
rows and the audit row are checked against raw.*.
"""

from __future__ import annotations

import json
import uuid
from datetime import date, timedelta
from typing import Any

import pytest
from psycopg import sql

from dbtbackfill.core.spec import parse_spec
from dbtbackfill.demo.localpg import LocalPostgres
from dbtbackfill.operator.jobs import JobDefaults, Owner, backfill_execution_id, build_job, chunk_execution_id
from localcluster.cluster import LocalCluster
from tests.conftest import create_database
from tests.image.conftest import SHOP_BUILD_ARGS, Container
from tests.integration.conftest import audit_rows, query
from tests.integration.test_runner_cli import report
from tests.support.polling import wait_for
from tests.support.shop_data import STORES, load_shop_data

pytestmark = pytest.mark.image

START = date(2024, 1, 1)
PER_DAY = 6


def shop_rows(url: str, table: str, start: date, end: date) -> list[tuple[object, ...]]:
    """Per UTC day of ``table`` in schema jaffle (orders or raw.orders): (day, rows)."""
    stmt = sql.SQL(
        "select (ordered_at at time zone 'UTC')::date, count(*) from {} where (ordered_at at time zone 'UTC')::date"
        " between %s and %s group by 1 order by 1"
    ).format(sql.Identifier(*table.split(".")))
    return query(url, stmt, start, end)


def test_the_own_project_image_ships_the_shop_parsed_for_its_database(shop_container: Container) -> None:
    # Its own user again after the root build steps (runAsNonRoot checks the image's).
    run = shop_container.run("id", "-u", user=None)
    assert (run.returncode, run.stdout.strip()) == (0, "10001"), run.stderr
    script = (
        "import json; m = json.load(open('/app/workspace/projects/shop/target/manifest.json'));"
        "print(m['metadata']['project_name'], sorted({n['database'] for n in m['nodes'].values()}),"
        " sorted({n['schema'] for n in m['nodes'].values() if n['resource_type'] == 'model'}))"
    )
    run = shop_container.run("python", "-c", script)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["jaffle_shop", f"['{SHOP_BUILD_ARGS['PARSE_DATABASE']}']", "['jaffle']"]
    # Both local packages installed at build time, owned by root: 10001 cannot change them.
    run = shop_container.run(
        "sh", "-c", "cd /app/workspace/projects/shop/dbt_packages && ls; touch dbt_backfill/x 2>/dev/null || echo ro"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["dbt_backfill", "shop_utils", "ro"]


def test_a_chunk_of_the_shop_runs_in_its_own_image_and_reuses_the_build_time_parse(
    pg_server: LocalPostgres, shop_container: Container
) -> None:
    url = create_database(pg_server, SHOP_BUILD_ARGS["PARSE_DATABASE"])
    load_shop_data(url, start=START, days=6, per_day=PER_DAY)
    first, last = date(2024, 1, 2), date(2024, 1, 4)
    execution_id, parent_id = uuid.uuid4(), uuid.uuid4()

    run = shop_container.run(
        "python", "-m", "scripts.run_dbt_backfill",
        "--start-date", first.isoformat(), "--end-date", last.isoformat(), "--chunk", "day",
        "--execution-id", str(execution_id), "--parent-id", str(parent_id), "--chunk-index", "1", "--attempt", "1",
        env={"DATABASE_URL": url},
    )  # fmt: skip

    assert run.returncode == 0, run.stderr
    row = assert_chunk_wrote(url, run.stderr, first, last, daily=True)
    assert (row["id"], row["parent_id"], row["kind"]) == (execution_id, parent_id, "chunk")


def assert_chunk_wrote(url: str, stderr: str, first: date, last: date, *, daily: bool) -> Any:
    """A chunk of the shop from ``first`` to ``last`` (one window, or ``daily`` ones) ran in the image:
    its lines, rows and audit row."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    port = url.rsplit(":", 1)[1].split("/")[0]
    # The profile the image generated (only the image has /app/profile) and the parse it made.
    target = (
        f"target: postgres 127.0.0.1:{port} database shop_image schema jaffle"
        " (profile jaffle_warehouse, target backfill, /app/profile/profiles.yml)"
    )
    assert target in lines, stderr
    [parse] = [line for line in lines if line.startswith("parse: ")]
    assert parse.startswith("parse: reused the saved parse"), parse
    windows, summary = report(stderr)
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    labels = [f"{d}..{d}" for d in days] if daily else [f"{first}..{last}"]
    assert [(w.label, w.status) for w in windows] == [(label, "ok") for label in labels]
    assert (summary.verdict, summary.done) == ("completed", len(labels))
    # The chunk's days, and only those, as raw.* has them; the audit row says so too.
    assert shop_rows(url, "jaffle.orders", START, date(2024, 1, 6)) == [(d, PER_DAY * len(STORES)) for d in days]
    assert shop_rows(url, "jaffle.orders", first, last) == shop_rows(url, "raw.orders", first, last)
    [row] = audit_rows(url)
    assert (row["id"], row["status"], row["records_processed"]) == (summary.execution_id, "completed", summary.rows)
    assert (row["start_date"], row["end_date"]) == (first, last)
    assert row["target"]["schema"] == "jaffle" and row["target"]["database"] == "shop_image"
    assert summary.rows > 0
    return row


def test_the_operators_chunk_job_runs_the_own_project_image_in_podman_on_the_cluster(
    pg_server: LocalPostgres, shop_image: str, podman_cluster: LocalCluster, podman_namespace: str
) -> None:
    url = create_database(pg_server, SHOP_BUILD_ARGS["PARSE_DATABASE"])
    load_shop_data(url, start=START, days=6, per_day=PER_DAY)
    namespace = podman_namespace
    kubectl = podman_cluster.kubectl
    kubectl("create", "serviceaccount", "dbt-backfill-job", "-n", namespace)
    kubectl("create", "secret", "generic", "shop-db", f"--from-literal=DATABASE_URL={url}", "-n", namespace)
    # What a DbtBackfill with spec.image set to the shop's image makes of its one 3-day chunk.
    spec = parse_spec({
        "startDate": "2024-01-02", "endDate": "2024-01-04", "chunk": {"unit": "day", "size": 3},
        "databaseSecretRef": {"name": "shop-db"}, "image": shop_image,
    })  # fmt: skip
    owner = Owner("shop", namespace, str(uuid.uuid4()))
    [window] = spec.windows()
    job = build_job(owner, spec, window, 1, JobDefaults(image="localhost/dbt-backfill-operator:dev"))
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == shop_image
    kubectl("apply", "-f", "-", input=json.dumps(job))
    name = job["metadata"]["name"]

    def finished() -> dict[str, Any] | None:
        got = json.loads(kubectl("get", "job", name, "-n", namespace, "-o", "json").stdout)
        done = {c["type"] for c in got.get("status", {}).get("conditions", []) if c["status"] == "True"}
        return got if done & {"Complete", "Failed"} else None

    status = wait_for(finished, timeout=600, interval=1, message=f"Job {name} finished")["status"]
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", f"job-name={name}", "-o", "json").stdout)
    [pod] = pods["items"]
    logs = "".join(p.read_text() for p in podman_cluster.pod_logs(namespace, pod["metadata"]["name"]))
    assert status.get("succeeded") == 1, logs
    [container] = pod["status"]["containerStatuses"]
    assert container["image"] == shop_image and container["state"]["terminated"]["exitCode"] == 0

    row = assert_chunk_wrote(url, logs, window.start, window.end, daily=False)
    assert row["id"] == chunk_execution_id(owner, window.index, 1)
    assert (row["parent_id"], row["kind"]) == (backfill_execution_id(owner), "chunk")
    assert (row["backfill_name"], row["backfill_namespace"], row["backfill_uid"]) == ("shop", namespace, owner.uid)
