"""The chunk Job: deterministic names, valid labels, the exact runner command, a restricted
pod, and the reduction of Job objects from the API to :class:`JobView`.

Every Job built here is validated against the Kubernetes 1.32 OpenAPI schema in strict mode
(no unknown fields), so a typo in the manifest fails here rather than at the API server.
"""

from __future__ import annotations

import argparse
import copy
import re
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dbtbackfill.core.planner import Window
from dbtbackfill.core.spec import BackfillSpec, SpecError, parse_spec
from dbtbackfill.operator import jobs
from dbtbackfill.operator.jobs import (
    EXIT_REFUSED,
    JobDefaults,
    Owner,
    build_job,
    job_labels,
    job_name,
    job_view,
    runner_command,
)

K8S_VERSION = "1.32"
CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "dbtbackfills.dbt-backfill.io.yaml"
# A DNS-1123 label: what a Job name must be for its Pods' job-name label and hostname.
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
UID = "3f2b8c4e-1d2a-4b7e-9c1f-5a6b7c8d9e0f"
OTHER_UID = "0d9e8c7b-6a5f-4c1e-8b2d-a1e4c8b2f3d4"
OWNER = Owner(name="january-2024", namespace="analytics", uid=UID)
DEFAULTS = JobDefaults(image="registry.example.com/dbt-backfill:1.0.0")
BASE_SPEC: dict[str, Any] = {
    "startDate": "2024-01-01",
    "endDate": "2024-01-31",
    "databaseSecretRef": {"name": "db"},
    "parallelism": 3,
    "retry": {"limit": 1, "backoffSeconds": 10},
}
FULL_SPEC: dict[str, Any] = {
    **BASE_SPEC,
    "tenantId": "acme",
    "models": ["staging+", "fact_orders", "tag:nightly"],
    "threads": 4,
    "dryRun": True,
    "allowRecent": True,
    "verify": True,
    "allowFullRebuild": True,
    "allowCrossWindow": True,
    "databaseSecretRef": {"name": "analytics-warehouse", "key": "url"},
    "image": "ghcr.io/example/dbt@sha256:" + "a" * 64,
    "activeDeadlineSeconds": 7200,
    "ttlSecondsAfterFinished": 0,
    "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": 2, "memory": "2Gi"}},
    "serviceAccountName": "dbt-runner",
    "nodeSelector": {"kubernetes.io/os": "linux", "pool": "batch"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "batch", "effect": "NoSchedule"},
        {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60},
    ],
}

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


def make_spec(**overrides: Any) -> BackfillSpec:
    return parse_spec({**BASE_SPEC, **overrides})


def window(spec: BackfillSpec, index: int = 0) -> Window:
    return spec.windows()[index]


def validate(job: dict[str, Any]) -> None:
    """Strict schema validation as the API server would apply it (unknown fields are errors)."""
    assert kubernetes_validate.validate(job, K8S_VERSION, strict=True) == K8S_VERSION


def container_of(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def assert_label_value(value: str) -> None:
    assert len(value) <= 63, value
    assert LABEL_VALUE.fullmatch(value), value


def dns_subdomains(min_size: int = 1, max_size: int = 253) -> st.SearchStrategy[str]:
    """Valid CR names (DNS-1123 subdomains) up to 253 characters, dots and dashes included."""
    label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)
    return (
        st.lists(label, min_size=1, max_size=8)
        .map(".".join)
        .filter(lambda n: min_size <= len(n) <= max_size and DNS_SUBDOMAIN.fullmatch(n) is not None)
    )


# ----------------------------------------------------------------------------- names


LONG_NAMES = [
    "a" * 253,
    "b" * 39 + "-" + "c" * 213,  # a dash right where the prefix is cut
    "d" * 39 + "." + "e" * 63 + "." + "f" * 63 + "." + "g" * 85,  # a dot right where it is cut
    "h" * 38 + "-" + "-" + "i" * 213,  # two dashes across the cut
    ".".join(["x" * 63, "y" * 63, "z" * 63, "w" * 61]),
]


@pytest.mark.parametrize("name", LONG_NAMES, ids=lambda n: f"len{len(n)}-{n[38:41]}")
def test_job_name_fits_a_label_value_even_for_a_253_char_cr_name(name: str) -> None:
    assert len(name) <= 253
    assert DNS_SUBDOMAIN.fullmatch(name)
    owner = Owner(name=name, namespace="analytics", uid=UID)
    for chunk, attempt in [(0, 1), (3659, 1), (3659, 21), (3659, 999)]:
        job = job_name(owner, chunk, attempt)
        # The Job controller copies the name into the pods' batch.kubernetes.io/job-name label.
        assert DNS_LABEL.fullmatch(job), job
        assert_label_value(job)


@settings(max_examples=60, deadline=None)
@given(dns_subdomains(), st.integers(0, 3659), st.integers(1, 999))
def test_job_name_is_valid_for_any_cr_name(name: str, chunk: int, attempt: int) -> None:
    owner = Owner(name=name, namespace="ns", uid=UID)
    job = job_name(owner, chunk, attempt)
    assert DNS_LABEL.fullmatch(job), job
    assert job.endswith(f"-c{chunk}-a{attempt}")


def test_job_name_is_deterministic() -> None:
    again = Owner(name=OWNER.name, namespace=OWNER.namespace, uid=OWNER.uid)
    assert job_name(OWNER, 4, 2) == job_name(again, 4, 2)
    # Pinned: a new operator version must find the Jobs an old one created.
    assert job_name(OWNER, 0, 1) == "january-2024-4a71f-c0-a1"


def test_job_names_differ_across_chunks_attempts_and_uids() -> None:
    names = {job_name(OWNER, chunk, attempt) for chunk in range(120) for attempt in range(1, 25)}
    assert len(names) == 120 * 24
    # c1-a12 vs c11-a2: no ambiguity from concatenating numbers.
    assert job_name(OWNER, 1, 12) != job_name(OWNER, 11, 2)
    recreated = Owner(name=OWNER.name, namespace=OWNER.namespace, uid=OTHER_UID)
    assert job_name(OWNER, 0, 1) != job_name(recreated, 0, 1)
    # Two long names sharing their first 40 characters are told apart by the uid hash.
    first = Owner(name="p" * 40 + "-one", namespace="ns", uid=UID)
    second = Owner(name="p" * 40 + "-two", namespace="ns", uid=OTHER_UID)
    assert job_name(first, 0, 1) != job_name(second, 0, 1)


def test_execution_ids_are_uuid5_deterministic_and_distinct() -> None:
    parent = jobs.backfill_execution_id(OWNER)
    chunk = jobs.chunk_execution_id(OWNER, 0, 1)
    assert parent.version == 5
    assert chunk.version == 5
    # Pinned: audit rows written by an older operator keep their ids.
    assert str(parent) == "32af1ac2-a15e-5d8a-9663-d44ff4dd95e6"
    assert str(chunk) == "6409dbe8-2c92-540b-abb2-c2675b47d23a"
    ids = {jobs.chunk_execution_id(OWNER, c, a) for c in range(50) for a in range(1, 6)}
    assert len(ids) == 250
    assert parent not in ids
    recreated = Owner(name=OWNER.name, namespace=OWNER.namespace, uid=OTHER_UID)
    assert jobs.chunk_execution_id(recreated, 0, 1) != chunk
    assert jobs.backfill_execution_id(recreated) != parent


# ----------------------------------------------------------------------------- labels


def test_labels_identify_the_chunk_attempt_and_scope() -> None:
    spec = make_spec(tenantId="acme")
    labels = job_labels(OWNER, spec, window(spec, 4), 3)
    assert labels == {
        "app.kubernetes.io/managed-by": "dbt-backfill-operator",
        "dbt-backfill.io/backfill": "january-2024",
        "dbt-backfill.io/backfill-uid": UID,
        "dbt-backfill.io/chunk": "4",
        "dbt-backfill.io/attempt": "3",
        "dbt-backfill.io/tenant": "acme",
        "dbt-backfill.io/window-start": "2024-01-05",
        "dbt-backfill.io/window-end": "2024-01-05",
    }
    assert jobs.chunk_of(labels) == (4, 3)


def test_unscoped_backfill_is_labelled_tenant_all() -> None:
    spec = make_spec()
    assert job_labels(OWNER, spec, window(spec), 1)["dbt-backfill.io/tenant"] == "all"


@pytest.mark.parametrize("name", [*LONG_NAMES, "january-2024", "a"])
@pytest.mark.parametrize("tenant", [None, "acme", "T" * 63, "0_tenant-with_mixed-Separators"])
def test_every_label_is_a_valid_label(name: str, tenant: str | None) -> None:
    spec = make_spec(tenantId=tenant, chunk={"unit": "month"}, startDate="2014-01-01", endDate="2023-12-31")
    owner = Owner(name=name, namespace="analytics", uid=UID)
    labels = job_labels(owner, spec, window(spec, 119), 21)
    for key, value in labels.items():
        assert LABEL_NAME.fullmatch(key), key
        assert len(key.rsplit("/", 1)[-1]) <= 63
        assert_label_value(value)
    assert labels["dbt-backfill.io/backfill"] == name[:63].rstrip("-_.")
    assert labels["dbt-backfill.io/tenant"] == (tenant or "all")


CRD_TENANT = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
    "spec"
]["properties"]["tenantId"]


def crd_tenant_ids() -> st.SearchStrategy[str]:
    """Every tenant id the CRD schema admits (its pattern and maxLength, read from the CRD),
    with the awkward ends (a trailing '-' or '_', full length) drawn often."""
    pattern = CRD_TENANT["pattern"].removeprefix("^").removesuffix("$")
    admitted = st.from_regex(pattern, fullmatch=True)
    awkward = st.tuples(
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,61}", fullmatch=True), st.sampled_from(["-", "_", "--", "_-"])
    ).map("".join)
    return st.one_of(admitted, awkward).filter(lambda t: len(t) <= CRD_TENANT["maxLength"])


@settings(max_examples=300, deadline=None)
@given(crd_tenant_ids(), dns_subdomains())
def test_every_tenant_the_crd_admits_makes_valid_labels_and_names(tenant: str, name: str) -> None:
    """A tenant id ending in '-' used to reach a label value as it was: a 422 on every Job."""
    spec = make_spec(tenantId=tenant)
    owner = Owner(name=name, namespace="analytics", uid=UID)
    job = build_job(owner, spec, window(spec), 1, DEFAULTS)
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        for key, value in labels.items():
            assert LABEL_NAME.fullmatch(key), key
            assert_label_value(value)
    assert DNS_LABEL.fullmatch(job["metadata"]["name"]), job["metadata"]["name"]
    assert job["metadata"]["annotations"]["dbt-backfill.io/tenant"] == tenant
    assert spec.tenant_id == tenant


def test_a_tenant_that_is_a_label_value_is_its_own_label() -> None:
    assert jobs.tenant_label("acme") == "acme"
    assert jobs.tenant_label("T" * 63) == "T" * 63
    assert jobs.tenant_label(None) == "all"


@pytest.mark.parametrize("tenant", ["acme-", "acme_", "acme-_", "a-", "x" * 62 + "-"])
def test_a_tenant_ending_in_a_separator_gets_a_readable_hashed_label(tenant: str) -> None:
    label = jobs.tenant_label(tenant)
    assert_label_value(label)
    prefix, digest = label.rsplit(".", 1)
    assert tenant.startswith(prefix)
    assert re.fullmatch(r"[0-9a-f]{10}", digest)
    # Deterministic, so kubectl -l finds the same label on every Job of that tenant.
    assert jobs.tenant_label(tenant) == label


def test_tenant_labels_never_collide() -> None:
    """The dot a hashed label carries can appear in no tenant id, so a tenant literally named
    like another's hashed label is impossible; and near-identical awkward ids differ."""
    tenants = ["acme", "acme-", "acme_", "acme--", "acme-_", "acme_-", "acme__", "Acme-"]
    labels = [jobs.tenant_label(t) for t in tenants]
    assert len(set(labels)) == len(tenants)
    assert all(not re.fullmatch(CRD_TENANT["pattern"], label) for label in labels[1:])


def test_selector_selects_exactly_this_backfills_jobs() -> None:
    spec = make_spec()
    labels = job_labels(OWNER, spec, window(spec), 1)
    key, value = jobs.selector(OWNER).split("=")
    assert labels[key] == value == UID
    other = job_labels(Owner(OWNER.name, OWNER.namespace, OTHER_UID), spec, window(spec), 1)
    assert other[key] != value


# ----------------------------------------------------------------------------- command


def test_runner_command_minimal() -> None:
    spec = make_spec()
    argv = runner_command(OWNER, spec, window(spec, 2), 1)
    assert argv == [
        "python",
        "-m",
        "scripts.run_dbt_backfill",
        "--start-date",
        "2024-01-03",
        "--end-date",
        "2024-01-03",
        "--execution-id",
        str(jobs.chunk_execution_id(OWNER, 2, 1)),
        "--parent-id",
        str(jobs.backfill_execution_id(OWNER)),
        "--chunk-index",
        "2",
        "--attempt",
        "1",
        "--backfill-name",
        "january-2024",
        "--backfill-namespace",
        "analytics",
        "--backfill-uid",
        UID,
    ]


def test_runner_command_with_every_option() -> None:
    spec = parse_spec({**FULL_SPEC, "chunk": {"unit": "week", "size": 2}})
    w = window(spec, 1)
    assert (w.start, w.end) == (date(2024, 1, 15), date(2024, 1, 28))
    argv = runner_command(OWNER, spec, w, 3)
    assert argv == [
        "python",
        "-m",
        "scripts.run_dbt_backfill",
        "--start-date",
        "2024-01-15",
        "--end-date",
        "2024-01-28",
        "--tenant-id",
        "acme",
        "--models",
        "staging+",
        "fact_orders",
        "tag:nightly",
        "--threads",
        "4",
        "--dry-run",
        "--allow-recent",
        "--verify",
        "--allow-full-rebuild",
        "--allow-cross-window",
        "--execution-id",
        str(jobs.chunk_execution_id(OWNER, 1, 3)),
        "--parent-id",
        str(jobs.backfill_execution_id(OWNER)),
        "--chunk-index",
        "1",
        "--attempt",
        "3",
        "--backfill-name",
        "january-2024",
        "--backfill-namespace",
        "analytics",
        "--backfill-uid",
        UID,
    ]


def cli_parse(argv: list[str]) -> argparse.Namespace:
    """Parse a Job's argv with the real CLI's argument definitions."""
    from dbtbackfill.cli import add_backfill_arguments  # imports SQLAlchemy: keep it local

    assert argv[:3] == ["python", "-m", "scripts.run_dbt_backfill"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_backfill_arguments(parser)
    return parser.parse_args(argv[3:])


def test_the_cli_reads_the_command_as_the_spec_meant_it() -> None:
    spec = parse_spec(FULL_SPEC)
    args = cli_parse(runner_command(OWNER, spec, window(spec, 5), 2))
    assert (args.start_date, args.end_date) == ("2024-01-06", "2024-01-06")
    assert args.tenant_id == "acme"
    assert args.models == ["staging+", "fact_orders", "tag:nightly"]
    assert args.threads == 4
    assert args.dry_run is True
    assert args.allow_recent is True
    assert args.verify is True
    assert (args.allow_full_rebuild, args.allow_cross_window) == (True, True)
    assert args.execution_id == jobs.chunk_execution_id(OWNER, 5, 2)
    assert args.parent_id == jobs.backfill_execution_id(OWNER)
    assert (args.chunk_index, args.attempt) == (5, 2)
    assert (args.backfill_name, args.backfill_namespace, args.backfill_uid) == (OWNER.name, OWNER.namespace, UID)
    assert args.database_url is None  # the URL comes from the environment (a Secret), never argv
    assert args.chunk is None  # one window per Job: the operator does the chunking

    minimal = cli_parse(runner_command(OWNER, make_spec(), window(make_spec()), 1))
    assert minimal.tenant_id is None
    assert minimal.models == []
    assert (minimal.dry_run, minimal.allow_recent, minimal.verify, minimal.threads) == (False, False, False, None)
    assert (minimal.allow_full_rebuild, minimal.allow_cross_window) == (False, False)


@pytest.mark.parametrize(
    "selector",
    ["--tenant-id=globex", "--allow-recent", "--execution-id=00000000-0000-0000-0000-000000000000", "-v"],
)
def test_a_model_selector_cannot_become_a_runner_option(selector: str) -> None:
    """A selector the CRD and parse_spec accept must reach the runner as a selector.

    `models` and `tenantId` are separate, immutable fields and the overlap guard trusts
    `tenantId`; a selector that argparse reads as an option would rescope the chunk (or
    switch on --allow-recent, or hijack another chunk's audit id) behind the spec's back.
    """
    try:
        spec = make_spec(tenantId="acme", models=["fact_orders", selector])
    except SpecError:
        return  # rejected up front: fine
    argv = runner_command(OWNER, spec, window(spec), 1)
    try:
        args = cli_parse(argv)
    except argparse.ArgumentError:
        return  # the chunk fails loudly with a usage error: no harm done
    assert args.tenant_id == "acme"
    assert args.allow_recent is False
    assert args.execution_id == jobs.chunk_execution_id(OWNER, 0, 1)
    assert args.models == ["fact_orders", selector]


# ----------------------------------------------------------------------------- manifest


def test_minimal_job_manifest() -> None:
    spec = make_spec()
    job = build_job(OWNER, spec, window(spec, 2), 1, DEFAULTS)
    validate(job)
    assert job["apiVersion"] == "batch/v1"
    assert job["kind"] == "Job"
    meta = job["metadata"]
    assert meta["name"] == job_name(OWNER, 2, 1)
    assert meta["namespace"] == "analytics"
    assert meta["labels"] == job_labels(OWNER, spec, window(spec, 2), 1)
    assert meta["annotations"] == {"dbt-backfill.io/window": "2024-01-03..2024-01-03"}
    assert "ownerReferences" not in meta  # the caller adopts it
    assert job["spec"]["template"]["metadata"]["labels"] == meta["labels"]

    # Retries are the operator's: a pod-level retry would rerun the chunk under the same attempt.
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    for absent in ("activeDeadlineSeconds", "ttlSecondsAfterFinished", "completions", "parallelism"):
        assert absent not in job["spec"]
    for absent in ("nodeSelector", "tolerations"):
        assert absent not in pod
    assert pod["serviceAccountName"] == "dbt-backfill-job"

    container = container_of(job)
    assert container["image"] == DEFAULTS.image
    assert "resources" not in container
    # args, not command: the image's entrypoint stays PID 1 and forwards signals.
    assert "command" not in container
    assert container["args"] == runner_command(OWNER, spec, window(spec, 2), 1)


def test_database_url_comes_from_the_secret_and_never_a_literal() -> None:
    for spec in (make_spec(), parse_spec(FULL_SPEC)):
        job = build_job(OWNER, spec, window(spec), 1, DEFAULTS)
        env = container_of(job)["env"]
        db = [e for e in env if e["name"] == "DATABASE_URL"]
        assert db == [
            {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": spec.secret_name, "key": spec.secret_key}}}
        ]
        assert all("valueFrom" in e or e["name"] != "DATABASE_URL" for e in env)
        assert len({e["name"] for e in env}) == len(env)
        assert "envFrom" not in container_of(job)
        assert not any("postgres" in arg or "://" in arg for arg in container_of(job)["args"])
    assert container_of(build_job(OWNER, make_spec(), window(make_spec()), 1, DEFAULTS))["env"][0]["valueFrom"][
        "secretKeyRef"
    ] == {"name": "db", "key": "DATABASE_URL"}


def test_pod_runs_with_the_restricted_security_profile() -> None:
    spec = parse_spec(FULL_SPEC)
    job = build_job(OWNER, spec, window(spec), 1, DEFAULTS)
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    pod_sc = pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_sc["runAsUser"] != 0
    assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod
    container = container_of(job)
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in sc
    # A read-only root needs a writable scratch dir: an emptyDir at /tmp, where dbt writes.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/tmp"]] == {"name": mounts["/tmp"], "emptyDir": {}}
    env = {e["name"]: e.get("value") for e in container["env"]}
    for key in ("DBT_TARGET_PATH", "DBT_LOG_PATH", "HOME"):
        assert env[key].startswith("/tmp")


def test_spec_settings_pass_through() -> None:
    spec = parse_spec(FULL_SPEC)
    job = build_job(OWNER, spec, window(spec, 3), 2, DEFAULTS)
    validate(job)
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    assert job["spec"]["ttlSecondsAfterFinished"] == 0  # 0 is a value, not "unset"
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "dbt-runner"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "batch"}
    assert pod["tolerations"] == FULL_SPEC["tolerations"]
    container = container_of(job)
    assert container["image"] == FULL_SPEC["image"]
    assert container["resources"] == FULL_SPEC["resources"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "analytics-warehouse", "key": "url"}


def test_job_does_not_share_mutable_state_with_the_spec() -> None:
    spec = parse_spec(FULL_SPEC)
    before = copy.deepcopy((dict(spec.node_selector), [dict(t) for t in spec.tolerations], spec.resources))
    job = build_job(OWNER, spec, window(spec), 1, DEFAULTS)
    pod = job["spec"]["template"]["spec"]
    pod["nodeSelector"]["pool"] = "mutated"
    pod["tolerations"][0]["value"] = "mutated"
    container_of(job)["resources"]["limits"] = {}
    after = (dict(spec.node_selector), [dict(t) for t in spec.tolerations], spec.resources)
    assert after == before
    assert build_job(OWNER, spec, window(spec), 1, DEFAULTS) == build_job(OWNER, spec, window(spec), 1, DEFAULTS)


def test_service_account_defaults_to_the_operator_setting() -> None:
    spec = make_spec()
    job = build_job(OWNER, spec, window(spec), 1, JobDefaults(image="img:1", service_account_name="custom-sa"))
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "custom-sa"
    assert container_of(job)["image"] == "img:1"


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tenantId": "acme"},
        {"models": ["a", "b+"], "threads": 1, "dryRun": True},
        {"ttlSecondsAfterFinished": 3600, "activeDeadlineSeconds": 1},
        {"resources": {"limits": {"memory": "512Mi"}}},
        {"resources": {}},
        {"chunk": {"unit": "month", "size": 3}, "startDate": "2014-01-01", "endDate": "2023-12-31"},
        {"tolerations": [{"key": "k", "operator": "Exists"}], "nodeSelector": {"a/b": ""}},
    ],
)
def test_every_built_job_is_a_valid_kubernetes_job(overrides: dict[str, Any]) -> None:
    spec = make_spec(**overrides)
    windows = spec.windows()
    for w in (windows[0], windows[-1]):
        validate(build_job(OWNER, spec, w, 1, DEFAULTS))
    validate(build_job(Owner("x" * 253, "ns", UID), spec, windows[-1], 21, DEFAULTS))


# ----------------------------------------------------------------------------- job_view


def api_job(chunk: int = 0, attempt: int = 1, **status: Any) -> dict[str, Any]:
    """A Job as the API returns it: our manifest plus server fields and a status."""
    spec = make_spec()
    job = build_job(OWNER, spec, window(spec, chunk), attempt, DEFAULTS)
    job["metadata"].update(uid=str(uuid.uuid4()), resourceVersion="42", creationTimestamp="2024-06-01T09:59:58Z")
    job["status"] = status
    return job


def test_job_view_of_a_new_job_is_active() -> None:
    view = job_view(api_job(3, 2))
    assert view is not None
    assert (view.name, view.chunk, view.attempt, view.phase) == (job_name(OWNER, 3, 2), 3, 2, "active")
    assert (view.started, view.finished, view.message, view.records, view.deleting) == (None, None, None, None, False)
    no_status = api_job()
    del no_status["status"]
    assert job_view(no_status) == job_view(api_job())


def test_job_view_of_a_running_job() -> None:
    view = job_view(api_job(active=1, ready=1, startTime="2024-06-01T10:00:00Z"))
    assert view is not None
    assert view.phase == "active"
    assert view.started == datetime(2024, 6, 1, 10, tzinfo=UTC)
    assert view.finished is None


def test_job_view_of_a_succeeded_job() -> None:
    view = job_view(
        api_job(
            1,
            1,
            succeeded=1,
            startTime="2024-06-01T10:00:00Z",
            completionTime="2024-06-01T10:02:30Z",
            conditions=[
                {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": "2024-06-01T10:02:30Z"},
                {"type": "Complete", "status": "True", "lastTransitionTime": "2024-06-01T10:02:30Z"},
            ],
        )
    )
    assert view is not None
    assert view.phase == "succeeded"
    assert view.message is None
    assert view.finished is not None and view.started is not None
    assert (view.finished - view.started).total_seconds() == 150


def test_job_view_of_a_failed_job_carries_the_condition_message() -> None:
    view = job_view(
        api_job(
            2,
            3,
            failed=1,
            startTime="2024-06-01T10:00:00Z",
            conditions=[
                {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded", "message": "early"},
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                    "lastTransitionTime": "2024-06-01T10:01:00Z",
                },
            ],
        )
    )
    assert view is not None
    assert (view.chunk, view.attempt, view.phase) == (2, 3, "failed")
    assert view.message == "Job has reached the specified backoff limit"
    # Failed Jobs have no completionTime; the Failed condition says when.
    assert view.finished == datetime(2024, 6, 1, 10, 1, tzinfo=UTC)


def test_a_chunk_job_fails_on_the_refusal_exit_code_and_its_view_says_refused() -> None:
    spec = parse_spec(BASE_SPEC)
    rules = build_job(OWNER, spec, window(spec), 1, DEFAULTS)["spec"]["podFailurePolicy"]["rules"]
    assert rules == [
        {"action": "FailJob", "onExitCodes": {"containerName": "dbt", "operator": "In", "values": [EXIT_REFUSED]}}
    ]
    failed = {"type": "Failed", "status": "True", "message": "Container dbt for pod ns/p failed with exit code 3"}
    refused = job_view(api_job(0, 1, failed=1, conditions=[{**failed, "reason": "PodFailurePolicy"}]))
    other = job_view(api_job(0, 1, failed=1, conditions=[{**failed, "reason": "BackoffLimitExceeded"}]))
    assert refused is not None and other is not None
    assert (refused.phase, refused.refused) == ("failed", True)
    assert (other.phase, other.refused) == ("failed", False)


def test_job_view_of_a_deadline_exceeded_job_without_failed_pods() -> None:
    view = job_view(
        api_job(
            conditions=[
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "DeadlineExceeded",
                    "message": "Job was active longer than specified deadline",
                    "lastTransitionTime": "2024-06-01T12:00:00Z",
                }
            ]
        )
    )
    assert view is not None
    assert view.phase == "failed"
    assert view.message == "Job was active longer than specified deadline"


def test_job_view_of_a_failed_job_without_a_condition_yet() -> None:
    view = job_view(api_job(failed=1, startTime="2024-06-01T10:00:00Z"))
    assert view is not None
    assert view.phase == "failed"
    assert view.message  # a generic message, never empty
    assert view.finished is None


def test_job_view_ignores_conditions_that_are_not_true() -> None:
    view = job_view(
        api_job(
            active=1,
            conditions=[
                {"type": "Failed", "status": "False", "message": "not yet"},
                {"type": "Complete", "status": "Unknown"},
            ],
        )
    )
    assert view is not None
    assert view.phase == "active"
    assert view.message is None


def test_job_view_marks_a_job_being_deleted() -> None:
    job = api_job(active=1)
    job["metadata"]["deletionTimestamp"] = "2024-06-01T10:05:00Z"
    view = job_view(job)
    assert view is not None
    assert view.deleting is True
    assert view.phase == "active"


@pytest.mark.parametrize(
    "labels",
    [
        None,
        {},
        {"app": "something-else"},
        {"dbt-backfill.io/chunk": "1"},
        {"dbt-backfill.io/attempt": "1"},
        {"dbt-backfill.io/chunk": "x", "dbt-backfill.io/attempt": "1"},
        {"dbt-backfill.io/chunk": "1", "dbt-backfill.io/attempt": ""},
    ],
)
def test_job_view_ignores_jobs_without_our_labels(labels: dict[str, str] | None) -> None:
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "foreign", "namespace": "analytics"},
        "status": {"succeeded": 1},
    }
    if labels is not None:
        job["metadata"]["labels"] = labels
    assert job_view(job) is None
    assert job_view({}) is None


@pytest.mark.parametrize("allow_recent", [False, True])
def test_a_chunk_ending_9999_12_31_is_a_usage_error_or_a_plan_never_a_traceback(allow_recent: bool) -> None:
    """The runner's recent-data check used to compute end + 1 day, which overflows here."""
    from dbtbackfill.cli import UsageError, plan_from_args

    spec = make_spec(startDate="9999-12-30", endDate="9999-12-31", allowRecent=allow_recent)
    args = cli_parse(runner_command(OWNER, spec, spec.windows()[-1], 1))
    if not allow_recent:
        with pytest.raises(UsageError, match="reaches into the last 24 hours"):
            plan_from_args(args, now=datetime(2026, 1, 1, tzinfo=UTC))
    else:
        windows, _ = plan_from_args(args, now=datetime(2026, 1, 1, tzinfo=UTC))
        assert [w.label() for w in windows] == ["9999-12-31..9999-12-31"]


@pytest.mark.parametrize(
    ("end", "now", "recent"),
    [
        ("2024-01-30", datetime(2024, 2, 1, 0, 0, 0, tzinfo=UTC), False),  # window ended 24h ago exactly
        ("2024-01-31", datetime(2024, 2, 1, 23, 59, 59, tzinfo=UTC), True),
        ("2024-01-31", datetime(2024, 2, 2, 0, 0, 0, tzinfo=UTC), False),
    ],
)
def test_the_recent_check_keeps_its_boundary(end: str, now: datetime, recent: bool) -> None:
    from dbtbackfill.cli import UsageError, plan_from_args

    spec = make_spec(startDate=end, endDate=end)
    args = cli_parse(runner_command(OWNER, spec, spec.windows()[0], 1))
    if recent:
        with pytest.raises(UsageError):
            plan_from_args(args, now=now)
    else:
        plan_from_args(args, now=now)


# ----------------------------------------------------------------------------- wake_key

COMPLETE = [{"type": "Complete", "status": "True", "lastTransitionTime": "2024-06-01T10:02:30Z"}]
FAILED = [{"type": "Failed", "status": "True", "message": "backoff limit", "lastTransitionTime": "2024-06-01T10:01Z"}]


def test_a_jobs_creation_and_its_pod_starting_leave_its_wake_key_as_created() -> None:
    """The pass that created a Job expects it running: no event of that wakes the owner."""
    assert jobs.wake_key(api_job()) == jobs.JUST_CREATED
    assert jobs.wake_key(api_job(active=1, startTime="2024-06-01T10:00:00Z")) == jobs.JUST_CREATED
    assert jobs.wake_key(api_job(active=1, ready=1, startTime="2024-06-01T10:00:00Z")) == jobs.JUST_CREATED


def test_a_succeeded_jobs_wake_key_changes_once_whichever_field_shows_it_first() -> None:
    counted = jobs.wake_key(api_job(succeeded=1, uncountedTerminatedPods={}))
    assert counted != jobs.JUST_CREATED
    assert jobs.wake_key(api_job(succeeded=1, conditions=COMPLETE)) == counted  # Complete adds nothing


def test_a_failed_jobs_wake_key_changes_again_when_its_pod_is_gone() -> None:
    """A retry waits until no Pod of the failed attempt runs, so settling is a change."""
    failing = jobs.wake_key(api_job(failed=1, terminating=1))
    settled = jobs.wake_key(api_job(failed=1, conditions=FAILED))
    assert len({jobs.JUST_CREATED, failing, settled}) == 3


def test_a_job_being_deleted_has_another_wake_key() -> None:
    job = api_job(active=1)
    job["metadata"]["deletionTimestamp"] = "2024-06-01T10:05:00Z"
    assert jobs.wake_key(job) != jobs.JUST_CREATED


def test_a_job_without_chunk_labels_has_no_wake_key() -> None:
    job = api_job()
    job["metadata"]["labels"] = {}
    assert jobs.wake_key(job) is None


# ----------------------------------------------------------------------------- settled Jobs


def test_a_finished_jobs_deletion_wakes_nobody_so_labelling_it_settled_costs_no_pass() -> None:
    """The watch reports a Job that leaves its selector (labelled settled) as DELETED."""
    assert not jobs.deletion_wakes(api_job(succeeded=1, conditions=COMPLETE))
    assert not jobs.deletion_wakes(api_job(succeeded=1))  # Complete not set yet: nothing waits for it
    assert not jobs.deletion_wakes(api_job(failed=1, conditions=FAILED))


def test_deleting_a_running_failing_or_terminating_job_wakes_its_owner() -> None:
    assert jobs.deletion_wakes(api_job(active=1))
    assert jobs.deletion_wakes(api_job(failed=1, terminating=1))  # a retry waits for its Pod to go
    being_deleted = api_job(succeeded=1, conditions=COMPLETE)
    being_deleted["metadata"]["deletionTimestamp"] = "2024-06-01T10:05:00Z"
    assert jobs.deletion_wakes(being_deleted)
    assert jobs.deletion_wakes({"metadata": {"labels": {}}})  # not a chunk Job as far as it shows


def test_passes_and_the_watch_select_unsettled_jobs_and_a_pod_lookup_selects_one_attempt() -> None:
    assert jobs.unsettled_selector(OWNER) == f"{jobs.selector(OWNER)},!{jobs.LABEL_SETTLED}"
    assert jobs.chunk_selector(OWNER, 3, 2).endswith(f",{jobs.LABEL_CHUNK}=3,{jobs.LABEL_ATTEMPT}=2")
    spec = make_spec()
    assert jobs.LABEL_SETTLED not in build_job(OWNER, spec, window(spec, 0), 1, DEFAULTS)["metadata"]["labels"]
