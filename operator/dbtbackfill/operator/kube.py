"""The few Kubernetes API calls the operator makes, through the official client.

Every call the operator makes goes through this module, so ``API_CALLS`` lists them
all; the RBAC test checks the shipped ClusterRole grants exactly these.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from typing import Any, Final

from dbtbackfill import __version__

GROUP: Final = "dbt-backfill.io"
VERSION: Final = "v1alpha1"
PLURAL: Final = "dbtbackfills"
QUEUE_PLURAL: Final = "dbtbackfillqueues"
MERGE_PATCH: Final = "application/merge-patch+json"
USER_AGENT: Final = f"dbt-backfill-operator/{__version__}"

# (apiGroup, resource, verb) for every call below, plus what kopf itself needs.
API_CALLS: Final = frozenset(
    {
        (GROUP, PLURAL, "get"),
        (GROUP, PLURAL, "list"),
        (GROUP, "dbtbackfills/status", "patch"),
        ("batch", "jobs", "list"),
        ("batch", "jobs", "create"),
        ("batch", "jobs", "delete"),
        # The settled label on a Job whose end the status records: later passes list without it.
        ("batch", "jobs", "patch"),
        # The policy's label check on spec.databaseSecretRef: metadata only (see below).
        ("", "secrets", "get"),
        # spec.tenantIdsFrom: the one ConfigMap a matrix backfill names, read once (snapshot).
        ("", "configmaps", "get"),
        # Why a chunk's Pod never started: its waiting reason, PodScheduled condition, and
        # whether any Pod of an earlier attempt is still alive; and the Job controller's
        # FailedCreate Events when it could not make a Pod at all.
        ("", "pods", "list"),
        ("", "events", "list"),
        # DbtBackfillQueue: admission reads the queue's spec and publishes its status.
        (GROUP, QUEUE_PLURAL, "get"),
        (GROUP, f"{QUEUE_PLURAL}/status", "patch"),
    }
)
# Ask for a Secret's metadata only, so its data never reaches the operator.
PARTIAL_METADATA: Final = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


# What kopf does on our behalf, and what admission requires; with API_CALLS, exactly what the
# shipped RBAC grants (tests/unit/test_rbac.py), and a superset of what the e2e tests observe.
FRAMEWORK_CALLS: Final = frozenset(
    {
        (GROUP, PLURAL, "list"),  # kopf's watch-stream of DbtBackfills...
        (GROUP, PLURAL, "watch"),
        (GROUP, PLURAL, "patch"),  # ...its finalizer and progress annotations
        (GROUP, "dbtbackfills/status", "patch"),  # on_create's status for an invalid spec
        # OwnerReferencesPermissionEnforcement: a Job whose ownerReference blocks owner
        # deletion may only be created by someone who can update the owner's finalizers.
        (GROUP, "dbtbackfills/finalizers", "update"),
        ("batch", "jobs", "list"),  # the Job event handler's watch-stream (labelSelector'd)
        ("batch", "jobs", "watch"),
        ("", "events", "create"),  # kopf posts our Events as core/v1 Events
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),  # kopf's resource scanning
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("", "namespaces", "list"),  # kopf's namespace observation
        ("", "namespaces", "watch"),
        (GROUP, QUEUE_PLURAL, "list"),  # kopf's watch-stream of DbtBackfillQueues (queue_handlers.py)
        (GROUP, QUEUE_PLURAL, "watch"),
    }
)


class Conflict(Exception):
    """The object already exists (a replayed create)."""


class ApiFailure(Exception):
    """An API call failed; ``message`` is the API server's own text (e.g. a 422's causes)."""

    def __init__(self, verb: str, resource: str, code: int | None, message: str) -> None:
        super().__init__(f"{verb} {resource}: {message}")
        self.verb = verb
        self.resource = resource
        self.code = code
        self.message = message


def _api_message(exc: Exception) -> str:
    """The ``message`` of the API's Status body, else the reason, else the exception."""
    body = getattr(exc, "body", None)
    if body:
        try:
            parsed = json.loads(body)
        except (TypeError, ValueError):
            parsed = None
        if isinstance(parsed, Mapping) and parsed.get("message"):
            return str(parsed["message"])
    reason = getattr(exc, "reason", None)
    code = _status_of(exc)
    if reason and code:
        return f"{code} {reason}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@contextmanager
def _calling(verb: str, resource: str) -> Iterator[None]:
    """Turn any client error (HTTP status or connection) into an :class:`ApiFailure`."""
    try:
        yield
    except (Conflict, ApiFailure):
        raise
    except Exception as exc:
        raise ApiFailure(verb, resource, _status_of(exc), _api_message(exc)) from exc


# The client's default is cpu_count * 5; a thread beyond it opens a connection that the pool
# then discards (a TLS handshake per call). The operator sizes it to its threads.
_pool_maxsize: int | None = None


def configure_pool(maxsize: int) -> None:
    """Size the connection pool of the client every call here uses (before the first call)."""
    global _pool_maxsize
    _pool_maxsize = maxsize
    _api_client.cache_clear()


@cache
def _api_client() -> Any:
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    if _pool_maxsize is not None:
        configuration.connection_pool_maxsize = _pool_maxsize
    api = client.ApiClient(configuration)
    # Named, so audit logs (and the RBAC test) can tell our calls from other clients'.
    api.user_agent = USER_AGENT
    return api


def _custom() -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(_api_client())


def _batch() -> Any:
    from kubernetes import client

    return client.BatchV1Api(_api_client())


def _status_of(exc: Exception) -> int | None:
    status = getattr(exc, "status", None)
    return int(status) if isinstance(status, int) else None


def _core() -> Any:
    from kubernetes import client

    return client.CoreV1Api(_api_client())


def _get_custom(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    """One of our custom objects, or None if it does not exist."""
    from kubernetes.client.exceptions import ApiException

    with _calling("get", f"{plural}/{name}"):
        try:
            obj: dict[str, Any] = _custom().get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as exc:
            if _status_of(exc) == 404:
                return None
            raise
    return obj


def get_backfill(namespace: str, name: str) -> dict[str, Any] | None:
    return _get_custom(PLURAL, namespace, name)


def list_backfills(namespace: str) -> list[dict[str, Any]]:
    with _calling("list", PLURAL):
        result = _custom().list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    items: list[dict[str, Any]] = result.get("items") or []
    return items


def list_jobs(namespace: str, label_selector: str) -> list[dict[str, Any]]:
    # Raw JSON: the operator reads a handful of fields and the typed models cost time.
    with _calling("list", "jobs"):
        response = _batch().list_namespaced_job(namespace, label_selector=label_selector, _preload_content=False)
    items: list[dict[str, Any]] = json.loads(response.data).get("items") or []
    return items


def list_pods(namespace: str, label_selector: str, field_selector: str | None = None) -> list[dict[str, Any]]:
    with _calling("list", "pods"):
        response = _core().list_namespaced_pod(
            namespace, label_selector=label_selector, field_selector=field_selector, _preload_content=False
        )
    items: list[dict[str, Any]] = json.loads(response.data).get("items") or []
    return items


# Pods that have not finished: a pass needs only those (a finished Pod of an active Job is
# looked up by that Job alone, see controller._observe_cluster).
LIVE_PODS: Final = "status.phase!=Succeeded,status.phase!=Failed"


def list_live_pods(namespace: str, label_selector: str) -> list[dict[str, Any]]:
    return list_pods(namespace, label_selector, LIVE_PODS)


def label_job(namespace: str, name: str, labels: Mapping[str, str]) -> None:
    """Merge ``labels`` into a Job's labels; a Job that is gone already is no error."""
    from kubernetes.client.exceptions import ApiException

    with _calling("patch", f"jobs/{name}"):
        try:
            _batch().patch_namespaced_job(
                name,
                namespace,
                {"metadata": {"labels": dict(labels)}},
                _content_type=MERGE_PATCH,
                _preload_content=False,
            )
        except ApiException as exc:
            if _status_of(exc) != 404:
                raise


def list_job_events(namespace: str, job_name: str) -> list[dict[str, Any]]:
    """core/v1 Events about one Job (the Job controller's FailedCreate, for one)."""
    selector = f"involvedObject.kind=Job,involvedObject.name={job_name}"
    with _calling("list", "events"):
        response = _core().list_namespaced_event(namespace, field_selector=selector, _preload_content=False)
    items: list[dict[str, Any]] = json.loads(response.data).get("items") or []
    return items


def create_job(namespace: str, body: Mapping[str, Any]) -> None:
    """Create a Job; raises :class:`Conflict` when it exists already (a replay)."""
    from kubernetes.client.exceptions import ApiException

    with _calling("create", f"jobs/{body['metadata']['name']}"):
        try:
            _batch().create_namespaced_job(namespace, body, _preload_content=False)
        except ApiException as exc:
            if _status_of(exc) == 409:
                raise Conflict(body["metadata"]["name"]) from None
            raise


def get_secret_labels(namespace: str, name: str) -> dict[str, str] | None:
    """A Secret's labels, or None if it does not exist. Only its metadata is fetched
    (PartialObjectMetadata): the operator checks the label, it never sees the data."""
    from kubernetes.client.exceptions import ApiException

    with _calling("get", f"secrets/{name}"):
        try:
            response = _core().read_namespaced_secret(
                name, namespace, _preload_content=False, _headers={"Accept": PARTIAL_METADATA}
            )
        except ApiException as exc:
            if _status_of(exc) == 404:
                return None
            raise
    labels: dict[str, str] = (json.loads(response.data).get("metadata") or {}).get("labels") or {}
    return labels


def get_configmap_data(namespace: str, name: str) -> dict[str, str] | None:
    """A ConfigMap's ``data``, or None if it does not exist."""
    from kubernetes.client.exceptions import ApiException

    with _calling("get", f"configmaps/{name}"):
        try:
            response = _core().read_namespaced_config_map(name, namespace, _preload_content=False)
        except ApiException as exc:
            if _status_of(exc) == 404:
                return None
            raise
    data: dict[str, str] = json.loads(response.data).get("data") or {}
    return data


def delete_job(namespace: str, name: str) -> None:
    """Delete a Job and, before the Job itself goes, its Pods.

    Foreground: the Job stays visible (with a deletionTimestamp) until the garbage collector
    has removed every Pod, which is after each has terminated. So "the Job is gone" means
    "no dbt process of it runs", and a retry never overlaps the attempt it replaces.
    """
    from kubernetes.client.exceptions import ApiException

    with _calling("delete", f"jobs/{name}"):
        try:
            _batch().delete_namespaced_job(name, namespace, propagation_policy="Foreground", _preload_content=False)
        except ApiException as exc:
            if _status_of(exc) != 404:
                raise


def patch_backfill_status(namespace: str, name: str, status: Mapping[str, Any]) -> str | None:
    """Merge-patch the status; returns the object's resourceVersion after the write."""
    with _calling("patch", f"{PLURAL}/{name}/status"):
        result = _custom().patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)}, _content_type=MERGE_PATCH
        )
    version = ((result or {}).get("metadata") or {}).get("resourceVersion") if isinstance(result, Mapping) else None
    return str(version) if version else None


def get_queue(namespace: str, name: str) -> dict[str, Any] | None:
    return _get_custom(QUEUE_PLURAL, namespace, name)


def patch_queue_status(namespace: str, name: str, status: Mapping[str, Any]) -> None:
    with _calling("patch", f"{QUEUE_PLURAL}/{name}/status"):
        _custom().patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, QUEUE_PLURAL, name, {"status": dict(status)}, _content_type=MERGE_PATCH
        )
