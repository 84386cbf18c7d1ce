"""Tests of the test infrastructure itself: the Kubernetes API emulator, the kubelet, kopf on top.

Each test of the emulator proves one gap of kmock 0.8 closed (see tests/support/kubeapi.py).
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import kmock
import kopf
import kubernetes.client
import kubernetes.watch
import pytest
from kubernetes.client import ApiException

from tests.support import kubelet as kubelet_module
from tests.support.kubeapi import MINIMAL_DBT_BACKFILL_CRD, KopfOperator, KubeAPI, operator_settings
from tests.support.kubelet import Kubelet

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(20)]

GROUP, VERSION, PLURAL = "dbt-backfill.io", "v1alpha1", "dbtbackfills"
CR_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}"
JOBS_PATH = "/apis/batch/v1/namespaces/default/jobs"
PY = "python"  # the kubelet replaces it with sys.executable


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def http(
    api: KubeAPI,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
) -> tuple[int, Any]:
    """A raw HTTP request to the emulator: (status code, decoded JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": content_type}
    request = urllib.request.Request(api.url + path, data=data, method=method, headers=headers)  # noqa: S310 (http://127.0.0.1)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read() or b"null")


def watch_lines(api: KubeAPI, path: str) -> list[dict[str, Any]]:
    """Read a (server-side limited) watch stream to its end."""
    with urllib.request.urlopen(api.url + path, timeout=5) as response:  # noqa: S310 (http://127.0.0.1)
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]


def backfill(name: str, **extra_meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DbtBackfill",
        "metadata": {"name": name, **extra_meta},
        "spec": {"startDate": "2024-01-01", "endDate": "2024-01-31", "select": "orders"},
    }


def job(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    labels = spec.pop("labels", {})
    env = spec.pop("env", [])
    owner_references = spec.pop("owner_references", [])
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if owner_references:
        metadata["ownerReferences"] = owner_references
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": 0,
            **spec,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "dbt-backfill:test", "command": command, "env": env}],
                }
            },
        },
    }


def api_error(e: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(e.body)
    return body


@pytest.fixture
def kubelet_env() -> dict[str, str]:
    """Overrides the conftest's: what every kubelet in this module adds to the Jobs' environment."""
    return {"DATABASE_URL": "postgresql://test/db", "OVERRIDDEN": "by-kubelet"}


@pytest.fixture
def batch(kube_client: kubernetes.client.ApiClient) -> kubernetes.client.BatchV1Api:
    return kubernetes.client.BatchV1Api(kube_client)


@pytest.fixture
def core(kube_client: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(kube_client)


@pytest.fixture
def custom(kube_client: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(kube_client)


def create_cr(custom: kubernetes.client.CustomObjectsApi, body: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, body)
    return result


# ---------------------------------------------------------------------------------------------
# the emulator
# ---------------------------------------------------------------------------------------------


def test_post_answers_201_and_the_client_returns_the_object(kube_api, batch):
    status, body = http(kube_api, "POST", JOBS_PATH, job("raw", ["true"]))
    assert status == 201
    assert body["metadata"]["name"] == "raw"

    created = batch.create_namespaced_job("default", job("typed", ["true"]))
    assert created is not None
    assert created.metadata.name == "typed"
    assert created.metadata.namespace == "default"
    assert created.kind == "Job"
    assert created.api_version == "batch/v1"


def test_metadata_uid_generation_resource_version(kube_api, custom):
    created = create_cr(custom, backfill("bf", labels={"a": "1"}))
    meta = created["metadata"]
    assert meta["generation"] == 1
    assert meta["creationTimestamp"].endswith("Z")
    uid, rv = meta["uid"], int(meta["resourceVersion"])
    seen_rvs = [rv]

    def patch(path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, result = http(kube_api, "PATCH", CR_PATH + path, body, "application/merge-patch+json")
        assert status == 200, result
        assert result["metadata"]["uid"] == uid
        assert result["metadata"]["creationTimestamp"] == meta["creationTimestamp"]
        seen_rvs.append(int(result["metadata"]["resourceVersion"]))
        return result

    assert patch("/bf", {"spec": {"select": "payments"}})["metadata"]["generation"] == 2  # spec: bumped
    assert patch("/bf", {"metadata": {"labels": {"a": "2"}}})["metadata"]["generation"] == 2  # metadata: not
    assert patch("/bf/status", {"status": {"phase": "Running"}})["metadata"]["generation"] == 2  # status: not
    assert patch("/bf", {"metadata": {"annotations": {"x": "y"}}})["metadata"]["generation"] == 2
    assert seen_rvs == sorted(set(seen_rvs)), "every write must produce a new, higher resourceVersion"

    # A no-op patch changes nothing: same resourceVersion, no watch event (as in Kubernetes).
    last = patch("/bf", {"spec": {"select": "payments"}})
    assert last["metadata"]["resourceVersion"] == str(seen_rvs[-2])


def test_list_has_kind_api_version_resource_version_and_pages(kube_api, batch):
    for name in ["a", "b", "c"]:
        batch.create_namespaced_job("default", job(name, ["true"]))
    status, listing = http(kube_api, "GET", JOBS_PATH)
    assert status == 200
    assert listing["kind"] == "JobList"
    assert listing["apiVersion"] == "batch/v1"
    assert listing["metadata"]["resourceVersion"].isdigit()
    assert [item["metadata"]["name"] for item in listing["items"]] == ["a", "b", "c"]

    page1 = batch.list_namespaced_job("default", limit=2)
    assert [j.metadata.name for j in page1.items] == ["a", "b"]
    page2 = batch.list_namespaced_job("default", limit=2, _continue=page1.metadata._continue)
    assert [j.metadata.name for j in page2.items] == ["c"]
    assert page2.metadata._continue is None


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("tier=web", ["web1", "web2"]),
        ("tier==web", ["web1", "web2"]),
        ("tier!=web", ["db", "plain"]),
        ("tier", ["db", "web1", "web2"]),
        ("!tier", ["plain"]),
        ("tier in (db, cache)", ["db"]),
        ("tier notin (web)", ["db", "plain"]),
        ("tier=web,env=prod", ["web1"]),
        ("tier=web,!env", ["web2"]),
        ("app.kubernetes.io/name=dbt", ["db"]),
    ],
)
def test_label_selector_on_list(kube_api, batch, selector, expected):
    labels = {
        "web1": {"tier": "web", "env": "prod"},
        "web2": {"tier": "web"},
        "db": {"tier": "db", "app.kubernetes.io/name": "dbt"},
        "plain": {},
    }
    for name, job_labels in labels.items():
        batch.create_namespaced_job("default", job(name, ["true"], labels=job_labels))
    found = batch.list_namespaced_job("default", label_selector=selector).items
    assert sorted(j.metadata.name for j in found) == expected
    assert sorted(o["metadata"]["name"] for o in kube_api.list_objects("jobs", label_selector=selector)) == expected


def test_bad_selectors_are_400_and_field_selectors_work(kube_api, batch):
    batch.create_namespaced_job("default", job("one", ["true"]))
    batch.create_namespaced_job("default", job("two", ["true"]))
    with pytest.raises(ApiException) as e:
        batch.list_namespaced_job("default", label_selector="a in (b")
    assert e.value.status == 400
    found = batch.list_namespaced_job("default", field_selector="metadata.name=two").items
    assert [j.metadata.name for j in found] == ["two"]
    found = batch.list_namespaced_job("default", field_selector="metadata.name!=two").items
    assert [j.metadata.name for j in found] == ["one"]


def test_namespaces_are_listable_gettable_and_deletable(kube_api, core, batch):
    names = [ns.metadata.name for ns in core.list_namespace().items]
    assert "default" in names
    assert core.read_namespace("default").status.phase == "Active"

    core.create_namespace({"metadata": {"name": "team-a"}})
    batch.create_namespaced_job("team-a", job("j", ["true"]))
    assert [j.metadata.name for j in batch.list_namespaced_job("team-a").items] == ["j"]
    assert [j.metadata.name for j in batch.list_job_for_all_namespaces().items] == ["j"]

    core.delete_namespace("team-a")
    with pytest.raises(ApiException) as e:
        core.read_namespace("team-a")
    assert e.value.status == 404
    assert kube_api.get("jobs", "j", "team-a") is None  # the namespace's content went with it

    # Namespaces are auto-created on first use (a convenience; see strict mode below).
    batch.create_namespaced_job("team-b", job("j", ["true"]))
    assert kube_api.get("namespaces", "team-b", None) is not None


def test_strict_namespaces_reject_unknown_namespaces(tmp_path):
    with KubeAPI(auto_namespaces=False, workdir=tmp_path) as api:
        status, body = http(api, "POST", "/apis/batch/v1/namespaces/nowhere/jobs", job("j", ["true"]))
        assert (status, body["reason"]) == (404, "NotFound")
        assert body["message"] == 'namespaces "nowhere" not found'


@pytest.mark.parametrize("kind", ["cr", "job"])
def test_status_subresource_is_isolated_both_ways(kube_api, kind):
    path, body = (CR_PATH, backfill("obj")) if kind == "cr" else (JOBS_PATH, job("obj", ["true"]))
    body["status"] = {"phase": "Injected"}
    status, created = http(kube_api, "POST", path, body)
    assert status == 201
    assert "status" not in created  # dropped on create, as the apiserver does

    # A /status patch changes only .status -- not spec, not metadata.
    status, patched = http(
        kube_api,
        "PATCH",
        f"{path}/obj/status",
        {"status": {"phase": "Running"}, "spec": {"hacked": True}, "metadata": {"labels": {"x": "y"}}},
        "application/merge-patch+json",
    )
    assert status == 200
    assert patched["status"] == {"phase": "Running"}
    assert "hacked" not in patched["spec"]
    assert "labels" not in patched["metadata"]

    # A main-resource patch never changes .status.
    status, patched = http(
        kube_api,
        "PATCH",
        f"{path}/obj",
        {"status": {"phase": "Hacked"}, "metadata": {"labels": {"x": "y"}}},
        "application/merge-patch+json",
    )
    assert status == 200
    assert patched["status"] == {"phase": "Running"}
    assert patched["metadata"]["labels"] == {"x": "y"}

    # Nor does a replace (PUT) of the main resource; a PUT to /status changes only the status.
    current = kube_api.get("jobs" if kind == "job" else PLURAL, "obj")
    assert current is not None
    replaced = dict(current, status={"phase": "Hacked"})
    status, result = http(kube_api, "PUT", f"{path}/obj", replaced)
    assert status == 200
    assert result["status"] == {"phase": "Running"}
    status, result = http(kube_api, "PUT", f"{path}/obj/status", dict(result, status={"phase": "Done"}))
    assert status == 200
    assert result["status"] == {"phase": "Done"}


def test_without_status_subresource_status_is_an_ordinary_field(tmp_path):
    crd = json.loads(json.dumps(MINIMAL_DBT_BACKFILL_CRD))
    crd["metadata"]["name"] = "plains.example.com"
    crd["spec"].update(group="example.com", names={"kind": "Plain", "plural": "plains", "singular": "plain"})
    del crd["spec"]["versions"][0]["subresources"]
    with KubeAPI(crds=[crd], workdir=tmp_path) as api:
        path = "/apis/example.com/v1alpha1/namespaces/default/plains"
        status, created = http(api, "POST", path, {"metadata": {"name": "p"}, "spec": {}, "status": {"a": 1}})
        assert (status, created["status"]) == (201, {"a": 1})
        status, _ = http(api, "PATCH", f"{path}/p/status", {"status": {"a": 2}}, "application/merge-patch+json")
        assert status == 404
        status, patched = http(api, "PATCH", f"{path}/p", {"status": {"a": 3}}, "application/merge-patch+json")
        assert (status, patched["status"], patched["metadata"]["generation"]) == (200, {"a": 3}, 2)


def test_duplicate_create_is_409_already_exists(kube_api, batch):
    batch.create_namespaced_job("default", job("dup", ["true"]))
    with pytest.raises(ApiException) as e:
        batch.create_namespaced_job("default", job("dup", ["true"]))
    assert e.value.status == 409
    body = api_error(e.value)
    assert body["kind"] == "Status"
    assert body["reason"] == "AlreadyExists"
    assert body["message"] == 'jobs.batch "dup" already exists'
    assert body["details"] == {"name": "dup", "group": "batch", "kind": "jobs"}


def test_not_found_is_a_proper_status(kube_api, batch):
    with pytest.raises(ApiException) as e:
        batch.read_namespaced_job("missing", "default")
    body = api_error(e.value)
    assert (e.value.status, body["kind"], body["status"], body["reason"]) == (404, "Status", "Failure", "NotFound")
    assert body["message"] == 'jobs.batch "missing" not found'
    assert body["details"] == {"name": "missing", "group": "batch", "kind": "jobs"}

    # Unknown resources/groups (e.g. kopf's peering resources) are a clean 404 Status too.
    for path in ["/apis/kopf.dev/v1", "/apis/kopf.dev/v1/clusterkopfpeerings", "/api/v1/namespaces/default/nopes"]:
        status, body = http(kube_api, "GET", path)
        assert (status, body["kind"], body["reason"]) == (404, "Status", "NotFound"), path


def test_generate_name_and_name_validation(kube_api, core, batch):
    involved = {"kind": "Job", "namespace": "default", "name": "x"}
    event = core.create_namespaced_event(
        "default", {"metadata": {"generateName": "kopf-event-"}, "involvedObject": involved, "reason": "R"}
    )
    assert event.metadata.name.startswith("kopf-event-")
    assert len(event.metadata.name) == len("kopf-event-") + 5

    for bad in ["Upper", "under_score", "j" * 64]:  # Jobs' names must fit in a label value
        with pytest.raises(ApiException) as e:
            batch.create_namespaced_job("default", job(bad, ["true"]))
        assert (e.value.status, api_error(e.value)["reason"]) == (422, "Invalid")


def test_optimistic_concurrency_on_put_and_patch(kube_api, batch):
    created = batch.create_namespaced_job("default", job("occ", ["true"]))
    stale = created.metadata.resource_version
    batch.patch_namespaced_job("occ", "default", {"metadata": {"labels": {"a": "1"}}})

    body = kube_api.get("jobs", "occ")
    assert body is not None
    body["metadata"]["resourceVersion"] = stale
    with pytest.raises(ApiException) as e:
        batch.replace_namespaced_job("occ", "default", body)
    assert (e.value.status, api_error(e.value)["reason"]) == (409, "Conflict")

    patch = {"metadata": {"resourceVersion": stale, "labels": {"a": "2"}}}
    status, result = http(kube_api, "PATCH", f"{JOBS_PATH}/occ", patch, "application/merge-patch+json")
    assert (status, result["reason"]) == (409, "Conflict")

    body["metadata"]["resourceVersion"] = None  # unconditional replace
    replaced = batch.replace_namespaced_job("occ", "default", dict(body, metadata=dict(body["metadata"], labels={})))
    assert replaced.metadata.labels is None


def test_json_patch_and_its_test_operation(kube_api, batch):
    created = batch.create_namespaced_job("default", job("jp", ["true"]))
    rv = created.metadata.resource_version
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
        {"op": "replace", "path": "/spec/backoffLimit", "value": 2},
    ]
    patched = batch.patch_namespaced_job("jp", "default", ops)  # a list: sent as json-patch+json
    assert patched.metadata.finalizers == ["x/y"]
    assert patched.spec.backoff_limit == 2
    status, body = http(kube_api, "PATCH", f"{JOBS_PATH}/jp", ops, "application/json-patch+json")
    assert (status, body["reason"]) == (422, "Invalid")  # the stale "test" fails: what kopf expects


def test_strategic_merge_patch_on_builtins_and_415_on_custom_resources(kube_api, batch, custom):
    batch.create_namespaced_job("default", job("smp", ["true"]))
    conditions = {"status": {"conditions": [{"type": "A", "status": "True"}, {"type": "B", "status": "True"}]}}
    batch.patch_namespaced_job_status("smp", "default", conditions)  # strategic merge (the client's default)
    patched = batch.patch_namespaced_job_status(
        "smp", "default", {"status": {"conditions": [{"type": "B", "status": "False"}]}}
    )
    assert [(c.type, c.status) for c in patched.status.conditions] == [("A", "True"), ("B", "False")]

    create_cr(custom, backfill("smp"))
    status, body = http(kube_api, "PATCH", f"{CR_PATH}/smp", {"spec": {}}, "application/strategic-merge-patch+json")
    assert (status, body["reason"]) == (415, "UnsupportedMediaType")
    patched_cr = custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "smp", {"spec": {"a": 1}})
    assert patched_cr["spec"]["a"] == 1  # CustomObjectsApi uses merge-patch+json: fine


def test_deletion_with_finalizers(kube_api, custom):
    create_cr(custom, backfill("fin", finalizers=["example.com/guard"]))
    status, deleting = http(kube_api, "DELETE", f"{CR_PATH}/fin")
    assert status == 202
    assert deleting["metadata"]["deletionTimestamp"].endswith("Z")
    assert deleting["metadata"]["generation"] == 2  # bumped when marked for deletion, as in Kubernetes
    assert kube_api.get(PLURAL, "fin") is not None  # kept until the finalizers are gone

    status, body = http(kube_api, "DELETE", f"{CR_PATH}/fin")  # deleting again: idempotent
    assert (status, body["metadata"]["deletionTimestamp"]) == (202, deleting["metadata"]["deletionTimestamp"])

    add = {"metadata": {"finalizers": ["example.com/guard", "example.com/late"]}}
    status, body = http(kube_api, "PATCH", f"{CR_PATH}/fin", add, "application/merge-patch+json")
    assert (status, body["reason"]) == (422, "Invalid")  # no new finalizers on a deleting object

    status, body = http(
        kube_api, "PATCH", f"{CR_PATH}/fin", {"metadata": {"finalizers": None}}, "application/merge-patch+json"
    )
    assert status == 200
    assert kube_api.get(PLURAL, "fin") is None
    versions = kube_api.history(PLURAL, "fin")
    assert versions[-1] is None  # soft-deleted in kmock's history

    status, _ = http(kube_api, "DELETE", f"{CR_PATH}/fin")
    assert status == 404


def test_delete_returns_status_for_builtins_and_honours_preconditions(kube_api, batch):
    created = batch.create_namespaced_job("default", job("del", ["true"]))
    with pytest.raises(ApiException) as e:
        batch.delete_namespaced_job("del", "default", body={"preconditions": {"uid": "not-the-uid"}})
    assert e.value.status == 409
    result = batch.delete_namespaced_job("del", "default", body={"preconditions": {"uid": created.metadata.uid}})
    assert result["kind"] == "Status"  # the client returns this one as a plain dict
    assert result["status"] == "Success"
    assert result["details"]["name"] == "del"


@pytest.mark.parametrize("policy", ["Background", "Foreground", "Orphan", None])
def test_garbage_collection_of_owned_jobs(kube_api, batch, custom, policy):
    owner = create_cr(custom, backfill("owner", finalizers=["example.com/guard"]))
    ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DbtBackfill", "name": "owner", "uid": owner["metadata"]["uid"]}
    batch.create_namespaced_job("default", job("owned", ["true"], owner_references=[ref]))
    batch.create_namespaced_job("default", job("unrelated", ["true"]))

    query = f"?propagationPolicy={policy}" if policy else ""
    status, _ = http(kube_api, "DELETE", f"{CR_PATH}/owner{query}")
    assert status == 202
    owned_after_mark = kube_api.get("jobs", "owned") is not None
    assert owned_after_mark == (policy != "Foreground")  # foreground: dependents go first

    http(kube_api, "PATCH", f"{CR_PATH}/owner", {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    assert kube_api.get(PLURAL, "owner") is None
    assert (kube_api.get("jobs", "owned") is not None) == (policy == "Orphan")
    assert kube_api.get("jobs", "unrelated") is not None


def test_watch_from_a_resource_version_with_a_label_selector(kube_api, batch):
    start = batch.list_namespaced_job("default").metadata.resource_version
    batch.create_namespaced_job("default", job("w1", ["true"], labels={"app": "x"}))
    batch.create_namespaced_job("default", job("other", ["true"], labels={"app": "y"}))
    batch.patch_namespaced_job("w1", "default", {"spec": {"suspend": True}})
    batch.patch_namespaced_job("other", "default", {"metadata": {"labels": {"app": "x"}}})  # enters
    batch.patch_namespaced_job("w1", "default", {"metadata": {"labels": {"app": "z"}}})  # leaves
    batch.delete_namespaced_job("other", "default")

    events = watch_lines(
        kube_api, f"{JOBS_PATH}?watch=true&resourceVersion={start}&labelSelector=app%3Dx&timeoutSeconds=0.3"
    )
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "w1"),
        ("MODIFIED", "w1"),
        ("ADDED", "other"),  # entered the selector
        ("DELETED", "w1"),  # left the selector
        ("DELETED", "other"),
    ]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(start)

    # Without a resourceVersion: the current state first, as ADDED.
    events = watch_lines(kube_api, f"{JOBS_PATH}?watch=true&timeoutSeconds=0.1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "w1")]


def test_live_watch_with_the_official_client(kube_api, batch):
    start = batch.list_namespaced_job("default").metadata.resource_version
    seen: list[tuple[str, str]] = []
    watcher = kubernetes.watch.Watch()

    def consume() -> None:
        stream = watcher.stream(
            batch.list_namespaced_job, "default", label_selector="app=x", resource_version=start, timeout_seconds=3
        )
        for event in stream:
            seen.append((event["type"], event["object"].metadata.name))
            if event["type"] == "DELETED":
                watcher.stop()

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.1)
    batch.create_namespaced_job("default", job("live", ["true"], labels={"app": "x"}))
    batch.create_namespaced_job("default", job("ignored", ["true"]))
    batch.patch_namespaced_job_status("live", "default", {"status": {"active": 1}})
    batch.delete_namespaced_job("live", "default")
    thread.join(5)
    assert not thread.is_alive()
    assert seen == [("ADDED", "live"), ("MODIFIED", "live"), ("DELETED", "live")]


def test_watch_bookmarks_initial_events_and_expiry(tmp_path):
    with KubeAPI(workdir=tmp_path, bookmark_interval=0.1, event_log_limit=3) as api:
        for name in ["a", "b", "c", "d", "e"]:
            http(api, "POST", JOBS_PATH, job(name, ["true"]))

        # rv 1 is the "default" namespace, the jobs are rv 2..6; the log keeps only rv 4..6.
        events = watch_lines(
            api, f"{JOBS_PATH}?watch=true&resourceVersion=5&allowWatchBookmarks=true&timeoutSeconds=0.35"
        )
        types = [e["type"] for e in events]
        assert (types[0], events[0]["object"]["metadata"]["name"]) == ("ADDED", "e")
        assert set(types[1:]) == {"BOOKMARK"} and len(types) >= 3
        bookmark = next(e for e in events if e["type"] == "BOOKMARK")
        assert bookmark["object"]["kind"] == "Job"
        assert bookmark["object"]["metadata"]["resourceVersion"].isdigit()

        query = "watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"
        events = watch_lines(api, f"{JOBS_PATH}?{query}&timeoutSeconds=0.05")
        assert [e["type"] for e in events[:6]] == ["ADDED"] * 5 + ["BOOKMARK"]
        assert events[5]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}

        events = watch_lines(api, f"{JOBS_PATH}?watch=true&resourceVersion=1&timeoutSeconds=1")
        assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in events] == [("ERROR", 410, "Expired")]


def test_stopping_the_server_ends_open_watches(tmp_path):
    api = KubeAPI(workdir=tmp_path).start()
    http(api, "POST", JOBS_PATH, job("j", ["true"]))
    ended = threading.Event()

    def consume() -> None:
        assert [e["type"] for e in watch_lines(api, f"{JOBS_PATH}?watch=true")] == ["ADDED"]
        ended.set()

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    api.stop()
    thread.join(5)
    assert ended.is_set()
    assert time.monotonic() - started < 2


def test_events_are_accepted_and_listable(kube_api, core):
    involved = {"kind": "DbtBackfill", "namespace": "default", "name": "bf", "apiVersion": f"{GROUP}/{VERSION}"}
    core.create_namespaced_event(
        "default",
        {"metadata": {"generateName": "bf."}, "involvedObject": involved, "reason": "Started", "type": "Normal"},
    )
    events_v1 = kubernetes.client.EventsV1Api(core.api_client)
    events_v1.create_namespaced_event(
        "default",
        {
            "metadata": {"generateName": "bf."},
            "regarding": involved,
            "reason": "Chunk",
            "action": "Run",
            "type": "Normal",
            "eventTime": "2024-01-01T00:00:00.000000Z",
            "reportingController": "test",
            "reportingInstance": "test",
        },
    )
    assert [e["reason"] for e in kube_api.events(involved_name="bf")] == ["Started", "Chunk"]
    assert [e["reason"] for e in kube_api.events(reason="Chunk")] == ["Chunk"]
    assert len(core.list_namespaced_event("default", field_selector="involvedObject.name=bf").items) == 1


def test_discovery_lists_what_kopf_and_the_operator_use(kube_api, custom):
    status, api = http(kube_api, "GET", "/api")
    assert (status, api["versions"]) == (200, ["v1"])
    status, core_v1 = http(kube_api, "GET", "/api/v1")
    names = {r["name"]: r for r in core_v1["resources"]}
    assert {"namespaces", "pods", "pods/status", "secrets", "events", "configmaps"} <= set(names)
    assert names["namespaces"]["namespaced"] is False and names["secrets"]["namespaced"] is True

    status, apis = http(kube_api, "GET", "/apis")
    groups = {g["name"] for g in apis["groups"]}
    assert {"batch", GROUP, "apiextensions.k8s.io", "events.k8s.io", "coordination.k8s.io"} <= groups
    assert "kopf.dev" not in groups  # standalone operators need no peering

    status, version = http(kube_api, "GET", f"/apis/{GROUP}/{VERSION}")
    resources = {r["name"]: r for r in version["resources"]}
    assert set(resources) == {PLURAL, f"{PLURAL}/status"}
    assert resources[PLURAL]["kind"] == "DbtBackfill"
    assert resources[PLURAL]["namespaced"] is True
    assert {"create", "get", "list", "watch", "patch", "delete"} <= set(resources[PLURAL]["verbs"])
    status, batch_v1 = http(kube_api, "GET", "/apis/batch/v1")
    assert {"jobs", "jobs/status"} <= {r["name"] for r in batch_v1["resources"]}

    # A CRD created through the API becomes discoverable and usable at once.
    crd = json.loads(json.dumps(MINIMAL_DBT_BACKFILL_CRD))
    crd["metadata"]["name"] = "widgets.example.com"
    crd["spec"].update(group="example.com", names={"kind": "Widget", "plural": "widgets", "singular": "widget"})
    kubernetes.client.ApiextensionsV1Api(custom.api_client).create_custom_resource_definition(crd)
    status, version = http(kube_api, "GET", "/apis/example.com/v1alpha1")
    assert status == 200 and {r["name"] for r in version["resources"]} == {"widgets", "widgets/status"}
    status, _ = http(
        kube_api, "POST", "/apis/example.com/v1alpha1/namespaces/default/widgets", {"metadata": {"name": "w"}}
    )
    assert status == 201


def test_write_counting(kube_api, batch, custom):
    batch.list_namespaced_job("default")  # reads are not writes
    kube_api.reset_counts()
    create_cr(custom, backfill("bf"))
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "bf", {"spec": {"a": 1}})
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "bf", {"status": {"p": 1}})
    batch.create_namespaced_job("default", job("j", ["true"]))
    with pytest.raises(ApiException):
        batch.create_namespaced_job("default", job("j", ["true"]))  # failed writes count too
    batch.patch_namespaced_job_status("j", "default", {"status": {"active": 1}})
    batch.delete_namespaced_job("j", "default")
    batch.list_namespaced_job("default")

    assert kube_api.writes() == Counter(
        {
            ("DbtBackfill", "create"): 1,
            ("DbtBackfill", "patch"): 1,
            ("DbtBackfill", "patch/status"): 1,
            ("Job", "create"): 2,
            ("Job", "patch/status"): 1,
            ("Job", "delete"): 1,
        }
    )
    assert kube_api.writes_total() == 7
    assert kube_api.writes_total("Job") == 4
    assert kube_api.requests()[("Job", "list")] == 1
    kube_api.reset_counts()
    assert kube_api.writes() == Counter()


def test_fault_injection_with_kmock_reactions(kube_api, batch):
    batch.create_namespaced_job("default", job("flaky", ["true"]))

    def inject() -> None:
        kube_api.emulator[kmock.method.PATCH, kmock.resource("batch", "v1", "jobs")][:1] << 500

    kube_api.call(inject)
    with pytest.raises(ApiException) as e:
        batch.patch_namespaced_job("flaky", "default", {"metadata": {"labels": {"a": "1"}}})
    assert e.value.status == 500
    assert kube_api.get("jobs", "flaky")["metadata"].get("labels") is None  # the reaction replaced the write
    batch.patch_namespaced_job("flaky", "default", {"metadata": {"labels": {"a": "2"}}})  # one-shot
    assert kube_api.get("jobs", "flaky")["metadata"]["labels"] == {"a": "2"}


def test_kubeconfig_is_usable_by_the_client_and_kopf(kube_api, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(kube_api.kubeconfig))
    info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    assert info is not None
    assert info.server == kube_api.url
    assert info.default_namespace == "default"
    with kube_api.api_client() as client:
        assert kubernetes.client.VersionApi(client).get_code().major == "1"
    assert kube_api.env() == {"KUBECONFIG": str(kube_api.kubeconfig)}


# ---------------------------------------------------------------------------------------------
# kopf on top
# ---------------------------------------------------------------------------------------------


def test_kopf_operator_smoke(kube_api, custom):
    registry = kopf.OperatorRegistry()
    calls: list[str] = []

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def created(body: kopf.Body, spec: kopf.Spec, patch: kopf.Patch, **_: Any) -> None:
        calls.append("create")
        patch.status["phase"] = "Accepted"
        patch.status["select"] = spec["select"]
        kopf.info(body, reason="Accepted", message="planned the chunks")

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def deleted(**_: Any) -> None:
        calls.append("delete")

    with KopfOperator(kube_api, registry=registry, settings=operator_settings()):
        create_cr(custom, backfill("smoke"))

        def accepted() -> dict[str, Any] | None:
            obj = kube_api.get(PLURAL, "smoke")
            return obj if obj and (obj.get("status") or {}).get("phase") == "Accepted" else None

        obj = kube_api.wait_for(accepted, message="kopf did not patch the status")
        assert obj["status"]["select"] == "orders"
        assert obj["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        assert "kopf.zalando.org/last-handled-configuration" in obj["metadata"]["annotations"]
        events = kube_api.wait_for(lambda: kube_api.events(involved_name="smoke"), message="kopf posted no events")
        assert [(e["reason"], e["message"], e["type"]) for e in events] == [
            ("Accepted", "planned the chunks", "Normal")
        ]

        custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "smoke")
        kube_api.wait_for(lambda: kube_api.get(PLURAL, "smoke") is None, message="the finalizer was not removed")

    assert calls == ["create", "delete"]
    writes = kube_api.writes()
    assert writes[("DbtBackfill", "patch/status")] >= 1
    assert writes[("DbtBackfill", "patch")] >= 2  # finalizer added, removed (+ the diff-base annotation)
    assert kube_api.server_errors() == []


def test_kopf_survives_expired_resource_versions_and_reconnects(tmp_path, kube_api_crds):
    """Watch streams end every second; the event log is tiny, so kopf's reconnects hit 410 Gone."""
    registry = kopf.OperatorRegistry()

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def created(patch: kopf.Patch, **_: Any) -> None:
        patch.status["phase"] = "Accepted"

    settings = operator_settings()
    settings.watching.server_timeout = 1
    with KubeAPI(crds=kube_api_crds, workdir=tmp_path, event_log_limit=3, bookmark_interval=60) as api:
        custom = kubernetes.client.CustomObjectsApi(api.api_client())
        core = kubernetes.client.CoreV1Api(custom.api_client)
        with KopfOperator(api, registry=registry, settings=settings):
            create_cr(custom, backfill("before"))
            api.wait_for(lambda: (api.get(PLURAL, "before") or {}).get("status"), message="not handled")
            for i in range(10):  # push kopf's last seen resourceVersion out of the log
                core.create_namespaced_config_map("default", {"metadata": {"name": f"noise-{i}"}})
            api.wait_for(lambda: api.requests()[("DbtBackfill", "list")] >= 2, timeout=5, message="no relist")
            create_cr(custom, backfill("after"))
            api.wait_for(lambda: (api.get(PLURAL, "after") or {}).get("status"), message="not handled after 410")
        assert api.server_errors() == []


def test_kopf_kubelet_and_garbage_collection_together(kube_api, kubelet, custom, batch):
    """The chain the operator relies on: CR -> owned Job -> kubelet -> Job status -> CR status -> GC."""
    registry = kopf.OperatorRegistry()
    label = "app.kubernetes.io/managed-by"

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def created(body: kopf.Body, name: str, **_: Any) -> None:
        child = job(f"{name}-chunk-1", [PY, "-c", "print('chunk done')"], labels={label: "dbt-backfill"})
        kopf.adopt(child, owner=body)
        batch.create_namespaced_job("default", child)

    @kopf.on.event("batch", "v1", "jobs", registry=registry)
    def job_event(body: kopf.Body, status: kopf.Status, **_: Any) -> None:
        owner = body["metadata"]["ownerReferences"][0]["name"]
        if status.get("succeeded"):
            patch = {"status": {"phase": "Succeeded"}}
            custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, owner, patch)

    settings = operator_settings()
    settings.watching.label_selectors["batch", "v1", "jobs"] = f"{label}=dbt-backfill"  # server-side
    with KopfOperator(kube_api, registry=registry, settings=settings):
        create_cr(custom, backfill("chain"))
        run = kubelet.wait_for_run("chain-chunk-1")
        assert (run.outcome, run.stdout) == ("succeeded", "chunk done\n")

        def succeeded() -> bool:
            return ((kube_api.get(PLURAL, "chain") or {}).get("status") or {}).get("phase") == "Succeeded"

        kube_api.wait_for(succeeded, message="kopf did not report the Job's success")
        custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "chain")
        kube_api.wait_for(lambda: kube_api.get("jobs", "chain-chunk-1") is None, message="the Job was not collected")

    # The kubelet's writes (Job status) can be told apart from the operator's by User-Agent.
    kubelet_writes = kube_api.writes(agents=[kubelet_module.USER_AGENT])
    assert kubelet_writes == Counter({("Job", "patch/status"): 2})  # active, then succeeded
    operator_writes = kube_api.writes(exclude_agents=[kubelet_module.USER_AGENT])
    assert operator_writes[("Job", "create")] == 1
    assert ("Job", "patch/status") not in operator_writes
    job_watches = [query for _, path, query in kube_api.request_log() if path == JOBS_PATH and "watch" in query]
    assert job_watches, "kopf must have watched the Jobs"
    assert {query.get("labelSelector") for query in job_watches} == {f"{label}=dbt-backfill"}


# ---------------------------------------------------------------------------------------------
# the kubelet
# ---------------------------------------------------------------------------------------------


def test_kubelet_runs_a_successful_job(kube_api, kubelet, batch):
    batch.create_namespaced_job("default", job("ok", [PY, "-c", "import sys; print('hi'); sys.exit(0)"]))
    run = kubelet.wait_for_run("ok")
    assert (run.outcome, run.exit_code, run.stdout) == ("succeeded", 0, "hi\n")
    assert run.argv[0] == sys.executable

    status = batch.read_namespaced_job_status("ok", "default").status
    assert status.succeeded == 1
    assert status.active is None
    assert status.start_time is not None and status.completion_time is not None
    assert [(c.type, c.status) for c in status.conditions] == [("SuccessCriteriaMet", "True"), ("Complete", "True")]


def test_kubelet_reports_a_failure_with_the_stderr_tail(kube_api, kubelet, batch):
    code = "import sys; print('chunk 2024-01-03 failed', file=sys.stderr); sys.exit(3)"
    batch.create_namespaced_job("default", job("bad", [PY, "-c", code]))
    run = kubelet.wait_for_run("bad")
    assert (run.outcome, run.exit_code) == ("failed", 3)

    status = batch.read_namespaced_job_status("bad", "default").status
    assert status.failed == 1 and status.succeeded is None
    assert status.completion_time is None  # as in Kubernetes: only set on success
    failed = status.conditions[-1]
    assert (failed.type, failed.status, failed.reason) == ("Failed", "True", "BackoffLimitExceeded")
    assert "exit code 3" in failed.message
    assert "chunk 2024-01-03 failed" in failed.message


def test_kubelet_resolves_env_from_values_secrets_and_configmaps(kube_api, kubelet, batch, core):
    core.create_namespaced_secret(
        "default",
        {"metadata": {"name": "db"}, "data": {"password": base64.b64encode(b"s3cr3t").decode()}},
    )
    core.create_namespaced_secret("default", {"metadata": {"name": "extra"}, "stringData": {"token": "tok"}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "cfg"}, "data": {"target": "prod"}})
    env = [
        {"name": "PLAIN", "value": "1"},
        {"name": "DERIVED", "value": "x-$(PLAIN)"},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "extra", "key": "token"}}},
        {"name": "TARGET", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "target"}}},
        {"name": "MAYBE", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}},
        {"name": "OVERRIDDEN", "value": "by-job"},
    ]
    code = "import json, os; print(json.dumps({k: os.environ.get(k) for k in os.environ['KEYS'].split()}))"
    keys = "PLAIN DERIVED PASSWORD TOKEN TARGET MAYBE OVERRIDDEN DATABASE_URL"
    env.append({"name": "KEYS", "value": keys})
    batch.create_namespaced_job("default", job("env", [PY, "-c", code], env=env))
    run = kubelet.wait_for_run("env")
    assert run.outcome == "succeeded", run.stderr
    assert json.loads(run.stdout) == {
        "PLAIN": "1",
        "DERIVED": "x-1",
        "PASSWORD": "s3cr3t",
        "TOKEN": "tok",
        "TARGET": "prod",
        "MAYBE": None,
        "OVERRIDDEN": "by-kubelet",
        "DATABASE_URL": "postgresql://test/db",
    }

    missing = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}]
    batch.create_namespaced_job("default", job("nosecret", [PY, "-c", "pass"], env=missing))
    run = kubelet.wait_for_run("nosecret")
    assert run.outcome == "config-error"
    assert (
        'secret "nope" not found'
        in batch.read_namespaced_job_status("nosecret", "default").status.conditions[-1].message
    )


def test_kubelet_gives_each_run_a_private_empty_dir(kube_api, kubelet, batch):
    code = (
        "import json, os, pathlib, tempfile; t = pathlib.Path(os.environ['DBT_TARGET_PATH']); "
        "t.mkdir(parents=True); (t / 'manifest.json').write_text('{}'); "
        "print(json.dumps([os.environ['HOME'], str(t), tempfile.gettempdir()]))"
    )
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "DBT_TARGET_PATH", "value": "/tmp/dbt/target"}]
    for name in ["scratch-a", "scratch-b"]:
        body = job(name, [PY, "-c", code], env=env)
        body["spec"]["template"]["spec"]["volumes"] = [{"name": "scratch", "emptyDir": {}}]
        body["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [{"name": "scratch", "mountPath": "/tmp"}]
        batch.create_namespaced_job("default", body)
    runs = [kubelet.wait_for_run(name) for name in ["scratch-a", "scratch-b"]]
    dirs = []
    for run in runs:
        assert run.outcome == "succeeded", run.stderr
        private = run.mounts["/tmp"]
        home, target, tmp = json.loads(run.stdout)
        assert (home, target, tmp) == (private, f"{private}/dbt/target", private)
        assert (Path(target) / "manifest.json").exists()
        dirs.append(private)
    assert dirs[0] != dirs[1]


def test_kubelet_deletes_finished_jobs_after_their_ttl(kube_api, kubelet, batch):
    batch.create_namespaced_job("default", job("ttl", [PY, "-c", "pass"], ttlSecondsAfterFinished=0))
    batch.create_namespaced_job("default", job("kept", [PY, "-c", "pass"]))
    assert kubelet.wait_for_run("ttl").outcome == "succeeded"
    assert kubelet.wait_for_run("kept").outcome == "succeeded"
    # The kubelet records a deletion only after the DELETE returns, so the Job can look gone
    # to us a moment before the record exists: wait for both.
    kube_api.wait_for(
        lambda: kube_api.get("jobs", "ttl") is None and kubelet.ttl_deleted,
        message="the TTL did not delete the Job",
    )
    assert kubelet.ttl_deleted == ["ttl"]
    assert kube_api.get("jobs", "kept") is not None


def test_kubelet_enforces_the_active_deadline(kube_api, kubelet, batch):
    started = time.monotonic()
    batch.create_namespaced_job("default", job("slow", ["sleep", "30"], activeDeadlineSeconds=1))
    run = kubelet.wait_for_run("slow")
    assert run.outcome == "deadline"
    assert run.exit_code == -9
    assert time.monotonic() - started < 3
    failed = batch.read_namespaced_job_status("slow", "default").status.conditions[-1]
    assert (failed.type, failed.reason) == ("Failed", "DeadlineExceeded")


def test_kubelet_kills_the_process_of_a_deleted_job(kube_api, kubelet, batch):
    batch.create_namespaced_job("default", job("doomed", ["sleep", "30"]))
    kubelet.wait_for_run("doomed", finished=False)
    kube_api.wait_for(lambda: (kube_api.get("jobs", "doomed") or {}).get("status", {}).get("active") == 1)
    batch.delete_namespaced_job("doomed", "default", propagation_policy="Background")
    run = kubelet.wait_for_run("doomed", timeout=3)
    assert run.outcome == "deleted"
    assert run.exit_code == -9
    assert run.duration is not None and run.duration < 3


def test_kubelet_skips_suspended_jobs_until_resumed(kube_api, kubelet, batch):
    batch.create_namespaced_job("default", job("held", [PY, "-c", "pass"], suspend=True))
    time.sleep(0.4)
    assert kubelet.run_of("held") is None
    assert (kube_api.get("jobs", "held") or {}).get("status") is None
    batch.patch_namespaced_job("held", "default", {"spec": {"suspend": False}})
    assert kubelet.wait_for_run("held").outcome == "succeeded"


@pytest.mark.parametrize("kubelet_options", [{"max_parallel": 2}])
def test_kubelet_limits_concurrency(kube_api, kubelet, batch, kubelet_options):
    for i in range(5):
        batch.create_namespaced_job("default", job(f"par-{i}", ["sleep", "0.3"]))
    runs = [kubelet.wait_for_run(f"par-{i}", timeout=5) for i in range(5)]
    assert all(run.outcome == "succeeded" for run in runs)
    assert kubelet.max_concurrent() == 2
    assert [run.name for run in kubelet.runs] == [f"par-{i}" for i in range(5)]  # oldest first


def test_kubelet_stop_kills_running_children(kube_api, tmp_path):
    kubelet = Kubelet(kube_api.kubeconfig, cwd=tmp_path, poll_interval=0.05).start()
    try:
        client = kubernetes.client.BatchV1Api(kube_api.api_client())
        client.create_namespaced_job("default", job("forever", ["sleep", "60"]))
        kubelet.wait_for_run("forever", finished=False)
    finally:
        started = time.monotonic()
        kubelet.stop()
    assert time.monotonic() - started < 2
    run = kubelet.run_of("forever")
    assert run is not None and run.outcome == "stopped" and run.exit_code == -9
    assert kubelet.errors == []
