"""An HTTP Kubernetes API server for end-to-end tests: kmock 0.8, subclassed thinly, in a thread.

`KubeEmulator` subclasses ``kmock.KubernetesEmulator`` (kmock is pinned to 0.8) and keeps what
kmock does well: the aiohttp server, request parsing, the in-memory object store with its
version history (``emulator.objects``), API discovery from declared resources
(``emulator.resources``) and the DSL for fault injection (``emulator['patch', ...] << 500``:
user reactions take precedence over the emulation, which is registered as kmock fallbacks).
It replaces kmock's write path and its list/watch serving, which is where 0.8 falls short.

`KubeAPI` runs it in a background thread with its own event loop on 127.0.0.1 (a free port),
writes a kubeconfig for the official ``kubernetes`` client and for kopf, counts API requests
per kind and verb (and User-Agent, to tell the operator's writes from the test kubelet's), and
offers thread-safe helpers to read the stored objects.
`KopfOperator` runs a kopf operator (``kopf.operator``) against it in another thread.

Gaps of kmock 0.8 closed here (each verified against kmock 0.8 first, each proven by
``tests/e2e/test_kubeapi.py``):

1.  No ``metadata.uid``, ``generation``, ``resourceVersion``, ``creationTimestamp``.
    Now: uid is stable; resourceVersion is a global counter bumped on every write (and echoed
    by lists, watch events and bookmarks); generation starts at 1 and is bumped only when
    something other than metadata (and status, for resources with a status subresource)
    changes -- and when deletion is requested on an object with finalizers, as the real API does.
2.  ``POST`` answers 200; the real API answers 201. (The official client 37.0.1 maps both 200 and
    201 of ``create_*`` to the model, so it did not return None here -- but status codes, e.g.
    from ``*_with_http_info``, now match a real cluster.)
3.  Lists have no ``kind``/``apiVersion`` and a fake ``resourceVersion: "..."``; ``limit``
    and ``continue`` are ignored. Now ``{Kind}List`` with the real resourceVersion and paging.
4.  ``labelSelector`` (and ``fieldSelector``) ignored on list, watch and delete-collection.
    Now: ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``, ``a notin (x,y)``;
    field selectors ``path=value``/``path!=value`` on any dotted path (``metadata.name``,
    ``involvedObject.name``, ``status.phase``...). A malformed selector is a 400.
5.  ``GET /api/v1/namespaces`` is a 500 (kmock's path parser crashes on it) and
    ``/api/v1/namespaces/{name}`` is misread as a namespace; kopf's namespaced mode lists and
    watches namespaces. Now namespaces are a real cluster-scoped resource (get, list, watch,
    create, patch, delete -- deleting a namespace deletes what is in it). ``default`` (and the
    namespaces passed to `KubeAPI`) exist from the start; namespaces are auto-created on first
    use unless ``auto_namespaces=False`` (then: 404 like a real cluster).
6.  Status isolation: kmock merges a ``/status`` patch into the whole object (spec too), and a
    main-resource patch can change ``.status``. Now, for resources with the status subresource
    (CRDs with ``subresources.status``, Jobs, Pods, Namespaces, CRDs), writes to ``/status``
    change only ``.status``, writes to the main resource never change ``.status``, and
    ``.status`` is dropped on create -- as the real apiserver does.
7.  ``PUT`` (replace) is a 404 "Endpoint Not Found" in kmock. Now a replace, with optimistic
    concurrency: a stale ``metadata.resourceVersion`` is a 409 Conflict (for PUT and PATCH).
8.  Patch flavours: kmock applies every body as a JSON merge. Now by Content-Type:
    ``merge-patch+json`` (RFC 7386); ``json-patch+json`` (RFC 6902 incl. ``test`` -> 422, which
    kopf relies on); ``strategic-merge-patch+json`` (what the official client sends for dict
    bodies) as a merge patch that merges the well-known keyed lists (conditions by type,
    containers/env/volumes by name, ownerReferences by uid, finalizers as a set, plus
    ``$deleteFromPrimitiveList``) -- and, like the real API, a 415 for custom resources
    (``strict_patch=False`` to allow it); apply-patch (server-side apply) is a 415.
9.  Errors: kmock's Status objects carry non-standard reasons ("Object Already Exists",
    "Object Not Found") and a Python traceback. Now proper ``Status`` objects with the real
    reasons/messages/details: 404 NotFound, 409 AlreadyExists / Conflict, 400 BadRequest,
    422 Invalid, 415 UnsupportedMediaType, 410 Expired, 405 MethodNotAllowed.
10. ``generateName`` is ignored (kmock stores the object under the name ``None`` and then
    fails with a 500); kopf posts its k8s events with ``generateName``. Now supported.
11. Names are not validated. Now DNS-1123 subdomain names, and <= 63 characters for Jobs
    (the Job controller puts the name into a label), as a 422 Invalid.
12. Deletion: kmock does set ``deletionTimestamp`` and keeps an object with finalizers until
    they are removed, but answers 200 instead of 202, does not bump generation and emits no
    resourceVersion. Re-implemented together with the writes; also no new finalizers may be
    added to an object being deleted (422); ``preconditions`` (uid/resourceVersion) are honoured;
    immediate deletion returns the object for custom resources and a ``Status`` for built-ins;
    ``dryRun`` is honoured on create/update/patch/delete; delete-collection is supported.
13. Garbage collection: none in kmock. Now deleting an owner with ``propagationPolicy``
    ``Background`` (the default) deletes the objects whose ``metadata.ownerReferences[].uid``
    point to it once the owner is really gone (i.e. after its finalizers are removed),
    ``Foreground`` deletes them at once, ``Orphan`` leaves them. Unlike a real cluster (where
    the GC is a separate, asynchronous controller), this happens synchronously inside the
    request. Disable with ``garbage_collection=False`` and delete dependents explicitly.
14. Watch streams: kmock replays every existing object as ADDED on each watch, ignores
    ``resourceVersion`` (and can lose events between its snapshot and its subscription),
    ignores ``timeoutSeconds``, ``allowWatchBookmarks``, ``sendInitialEvents`` and selectors.
    Now: an event log keyed by resourceVersion; a watch with ``resourceVersion=N`` gets exactly
    the events after N (410 Expired as an ERROR event if N fell out of the log); without it (or
    with ``0``) the current objects as ADDED first; objects entering/leaving a label selector
    appear as ADDED/DELETED; ``timeoutSeconds`` ends the stream; BOOKMARKs every
    ``bookmark_interval`` seconds (kopf's inactivity timeout expects them) and the
    ``k8s.io/initial-events-end`` bookmark for ``sendInitialEvents``. All streams end when the
    server stops, so shutdown never waits on open watches.
15. Discovery knows only what was declared. Now built-ins are declared (kind, scope, verbs,
    subresources): v1 namespaces, pods, secrets, configmaps, events, serviceaccounts;
    batch/v1 jobs, cronjobs; events.k8s.io/v1 events; coordination.k8s.io/v1 leases;
    apiextensions.k8s.io/v1 customresourcedefinitions (kopf watches CRDs). CRDs given to
    `KubeAPI` (dicts, YAML text or YAML paths) or POSTed later are registered with their kind,
    scope, short names, categories and status subresource. Unknown resources and groups (e.g.
    ``kopf.dev/v1`` peerings unless ``peering=True``) are a clean 404 Status.
16. Events: ``v1`` and ``events.k8s.io/v1`` events are accepted (with generateName) and listable;
    `KubeAPI.events` filters them for assertions.

Not closed (documented limits):
- No admission: no OpenAPI schema validation, defaulting, CEL rules or webhooks; objects are
  stored as sent (no server-side defaults for Jobs either, e.g. ``backoffLimit``).
- No controllers besides the GC above: Jobs do nothing unless `tests.support.kubelet` runs
  them; no Pods are created for Jobs; namespace deletion is immediate.
- Server-side apply, ``/scale``, ``/log``, ``/exec`` and other subresources are not served;
  ``managedFields`` are not maintained; strategic merge knows only the keyed lists above.
- No authentication or RBAC: any token is accepted, nothing is forbidden.
- kmock's ``emulator.objects`` history grows on every write (fine for tests).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import pathlib
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any, Self, TypeVar

import aiohttp.web
import attrs
import kmock
import kopf
import kubernetes.client
import kubernetes.config
import yaml
from kmock._internal.rendering import Response, StreamingError  # not in kmock.__all__ (0.8)

from tests.support.merge_patch import merge_patch

JSON = dict[str, Any]
T = TypeVar("T")
CRDSource = Mapping[str, Any] | str | os.PathLike[str]

TOKEN = "kubeapi-test-token"
VERBS = frozenset({"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"})
_WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})

NAMESPACES = kmock.resource("", "v1", "namespaces")
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")

# plural resource -> (kind, namespaced, subresources, short names)
BUILTIN_RESOURCES: dict[str, tuple[str, bool, frozenset[str], frozenset[str]]] = {
    "v1/namespaces": ("Namespace", False, frozenset({"status"}), frozenset({"ns"})),
    "v1/pods": ("Pod", True, frozenset({"status"}), frozenset({"po"})),
    "v1/secrets": ("Secret", True, frozenset(), frozenset()),
    "v1/configmaps": ("ConfigMap", True, frozenset(), frozenset({"cm"})),
    "v1/events": ("Event", True, frozenset(), frozenset({"ev"})),
    "v1/serviceaccounts": ("ServiceAccount", True, frozenset(), frozenset({"sa"})),
    "batch/v1/jobs": ("Job", True, frozenset({"status"}), frozenset()),
    "batch/v1/cronjobs": ("CronJob", True, frozenset({"status"}), frozenset({"cj"})),
    "events.k8s.io/v1/events": ("Event", True, frozenset(), frozenset({"ev"})),
    "coordination.k8s.io/v1/leases": ("Lease", True, frozenset(), frozenset()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": (
        "CustomResourceDefinition",
        False,
        frozenset({"status"}),
        frozenset({"crd", "crds"}),
    ),
}
PEERING_RESOURCES: dict[str, tuple[str, bool, frozenset[str], frozenset[str]]] = {
    "kopf.dev/v1/kopfpeerings": ("KopfPeering", True, frozenset(), frozenset()),
    "kopf.dev/v1/clusterkopfpeerings": ("ClusterKopfPeering", False, frozenset(), frozenset()),
}

# A minimal CRD for the project's custom resource; the real one lives in crds/.
MINIMAL_DBT_BACKFILL_CRD: JSON = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "dbtbackfills.dbt-backfill.io"},
    "spec": {
        "group": "dbt-backfill.io",
        "scope": "Namespaced",
        "names": {
            "kind": "DbtBackfill",
            "listKind": "DbtBackfillList",
            "plural": "dbtbackfills",
            "singular": "dbtbackfill",
            "shortNames": ["dbf"],
        },
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}

_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what the apiserver uses for generateName
_SYSTEM_METADATA = (
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "resourceVersion",
)
_OMIT_WHEN_EMPTY = ("finalizers", "labels", "annotations", "ownerReferences")


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# Paths, verbs and errors
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ApiPath:
    """A parsed resource URL: ``/api/v1/...`` or ``/apis/{group}/{version}/...``."""

    group: str
    version: str
    plural: str
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse_api_path(path: str) -> ApiPath | None:
    """Parse a resource URL; None for discovery and non-API URLs. Knows ``/api/v1/namespaces``."""
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if not rest:
        return None
    namespace: str | None = None
    namespace_subresource = len(rest) == 3 and group == "" and rest[2] in {"status", "finalize"}
    if rest[0] == "namespaces" and len(rest) >= 3 and not namespace_subresource:
        namespace, rest = rest[1], rest[2:]
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return ApiPath(group, version, rest[0], namespace, name, subresource)


def request_verb(method: str, path: ApiPath, query: Mapping[str, str]) -> str:
    """The Kubernetes verb of a request (as in audit logs), with ``/subresource`` if any."""
    method = method.upper()
    if method == "GET":
        verb = "watch" if query.get("watch") in {"true", "1"} else "get" if path.name else "list"
    elif method == "POST":
        verb = "create"
    elif method == "PUT":
        verb = "update"
    elif method == "PATCH":
        verb = "patch"
    elif method == "DELETE":
        verb = "delete" if path.name else "deletecollection"
    else:
        verb = method.lower()
    return f"{verb}/{path.subresource}" if path.subresource else verb


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    500: "InternalError",
}


def api_error(code: int, message: str, reason: str | None = None, **details: Any) -> kmock.KubernetesError:
    """A kmock error rendered as a real ``Status`` object by `KubeEmulator`."""
    return kmock.KubernetesError(code, reason or _REASONS.get(code, "Unknown"), message, details or None)


def status_object(code: int, reason: str, message: str, details: Any = None) -> JSON:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details or {},
        "code": code,
    }


# ---------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------

_LABEL_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_LABEL_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET_TERM = re.compile(rf"(?P<key>{_LABEL_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)")
_NOT_EXISTS_TERM = re.compile(rf"!\s*(?P<key>{_LABEL_KEY})")
_EQUALITY_TERM = re.compile(rf"(?P<key>{_LABEL_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>{_LABEL_VALUE})")
_EXISTS_TERM = re.compile(rf"(?P<key>{_LABEL_KEY})")


def _split_terms(text: str) -> list[str]:
    terms: list[str] = []
    depth = 0
    current = ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += char
    terms.append(current.strip())
    return terms


@dataclasses.dataclass(frozen=True)
class LabelRequirement:
    key: str
    operator: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.operator == "exists":
            return present
        if self.operator == "!":
            return not present
        if self.operator in {"=", "in"}:
            return present and value in self.values
        return not present or value not in self.values  # "!=", "notin"


@dataclasses.dataclass(frozen=True)
class LabelSelector:
    """A parsed ``labelSelector``: equality- and set-based requirements, all must match."""

    requirements: tuple[LabelRequirement, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> LabelSelector:
        if text is None or not text.strip():
            return cls()
        requirements: list[LabelRequirement] = []
        for term in _split_terms(text):
            if match := _SET_TERM.fullmatch(term):
                values = tuple(value.strip() for value in match["values"].split(",") if value.strip())
                requirements.append(LabelRequirement(match["key"], match["op"], values))
            elif match := _NOT_EXISTS_TERM.fullmatch(term):
                requirements.append(LabelRequirement(match["key"], "!"))
            elif match := _EQUALITY_TERM.fullmatch(term):
                operator = "!=" if match["op"] == "!=" else "="
                requirements.append(LabelRequirement(match["key"], operator, (match["value"],)))
            elif match := _EXISTS_TERM.fullmatch(term):
                requirements.append(LabelRequirement(match["key"], "exists"))
            else:
                raise ValueError(f"unable to parse requirement: {term!r}")
        return cls(tuple(requirements))

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        return all(requirement.matches(labels or {}) for requirement in self.requirements)


_FIELD_TERM = re.compile(r"(?P<path>[A-Za-z0-9_.]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^,]*)")


@dataclasses.dataclass(frozen=True)
class FieldSelector:
    """A parsed ``fieldSelector``: ``dotted.path=value`` / ``!=``, all must match."""

    requirements: tuple[tuple[str, bool, str], ...] = ()  # (path, equal?, value)

    @classmethod
    def parse(cls, text: str | None) -> FieldSelector:
        if text is None or not text.strip():
            return cls()
        requirements: list[tuple[str, bool, str]] = []
        for term in _split_terms(text):
            match = _FIELD_TERM.fullmatch(term)
            if match is None:
                raise ValueError(f"invalid selector: {term!r}")
            requirements.append((match["path"], match["op"] != "!=", match["value"].strip()))
        return cls(tuple(requirements))

    def matches(self, obj: Mapping[str, Any]) -> bool:
        for path, equal, expected in self.requirements:
            value: Any = obj
            for part in path.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            actual = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            if (actual == expected) != equal:
                return False
        return True


# ---------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------


class JsonPatchTestFailed(ValueError):
    pass


# Lists merged by key in strategic merge patches (the ones that matter to Jobs, Pods and metadata).
_STRATEGIC_MERGE_KEYS = {
    "conditions": "type",
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "envFrom": "prefix",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
    "ports": "containerPort",
}
_STRATEGIC_MERGE_SETS = {"finalizers"}


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A simplified ``application/strategic-merge-patch+json``: a merge patch with keyed lists."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result: JSON = copy.deepcopy(dict(target)) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        current = result.get(key)
        if key.startswith("$"):
            continue  # directives: handled below or ignored ($patch, $retainKeys, $setElementOrder)
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping):
            result[key] = strategic_merge_patch(current, value)
        elif isinstance(value, list) and isinstance(current, list) and key in _STRATEGIC_MERGE_SETS:
            result[key] = current + [item for item in value if item not in current]
        elif isinstance(value, list) and isinstance(current, list) and key in _STRATEGIC_MERGE_KEYS:
            merge_key = _STRATEGIC_MERGE_KEYS[key]
            merged = list(current)
            for item in value:
                index = next(
                    (
                        i
                        for i, existing in enumerate(merged)
                        if isinstance(item, Mapping)
                        and isinstance(existing, Mapping)
                        and merge_key in item
                        and existing.get(merge_key) == item[merge_key]
                    ),
                    None,
                )
                if isinstance(item, Mapping) and item.get("$patch") == "delete":
                    if index is not None:
                        del merged[index]
                elif index is None:
                    merged.append(copy.deepcopy(item))
                else:
                    merged[index] = strategic_merge_patch(merged[index], item)
            result[key] = merged
        else:
            result[key] = copy.deepcopy(value)
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/") and isinstance(value, list):
            field = key.split("/", 1)[1]
            result[field] = [item for item in result.get(field) or [] if item not in value]
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer: {path!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _resolve(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            raise ValueError(f"path not found: /{'/'.join(tokens)}")
    return doc


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _resolve(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        index = len(parent) if last == "-" else int(last) if last.isdigit() else -1
        if not 0 <= index <= len(parent):
            raise ValueError(f"invalid list index: {last!r}")
        parent.insert(index, value)
    else:
        raise ValueError("cannot add to a scalar")
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise ValueError("cannot remove the root")
    parent = _resolve(doc, tokens[:-1])
    _resolve(parent, tokens[-1:])  # must exist
    return parent.pop(tokens[-1]) if isinstance(parent, dict) else parent.pop(int(tokens[-1]))


def json_patch(target: Any, operations: list[Any]) -> Any:
    """RFC 6902 JSON patch (``application/json-patch+json``); a failed ``test`` raises."""
    doc = copy.deepcopy(target)
    for operation in operations:
        if not isinstance(operation, Mapping) or "op" not in operation or "path" not in operation:
            raise ValueError(f"invalid operation: {operation!r}")
        op, tokens = operation["op"], _pointer(operation["path"])
        if op == "test":
            if _resolve(doc, tokens) != operation.get("value"):
                raise JsonPatchTestFailed(f"test failed at {operation['path']}")
        elif op == "remove":
            _remove(doc, tokens)
        elif op == "add":
            doc = _add(doc, tokens, copy.deepcopy(operation.get("value")))
        elif op == "replace":
            if tokens:
                _remove(doc, tokens)
            doc = _add(doc, tokens, copy.deepcopy(operation.get("value")))
        elif op in {"move", "copy"}:
            source = _pointer(operation.get("from", ""))
            value = copy.deepcopy(_resolve(doc, source)) if op == "copy" else _remove(doc, source)
            doc = _add(doc, tokens, value)
        else:
            raise ValueError(f"unknown operation: {op!r}")
    return doc


# ---------------------------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LogEntry:
    rv: int
    resource: kmock.resource
    namespace: str | None
    type: str  # ADDED, MODIFIED, DELETED
    object: JSON
    old: JSON | None


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_crds(source: CRDSource) -> list[JSON]:
    """CRD documents from a dict, a YAML path, or YAML text (multi-document allowed)."""
    if isinstance(source, Mapping):
        return [dict(source)]
    if isinstance(source, str) and "\n" in source:
        docs = list(yaml.load_all(source, Loader=_YAML_LOADER))
    else:
        docs = list(yaml.load_all(pathlib.Path(source).read_text(encoding="utf-8"), Loader=_YAML_LOADER))
    return [doc for doc in docs if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition"]


def _api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def _qualified(resource: kmock.resource) -> str:
    return f"{resource.plural}.{resource.group}" if resource.group else str(resource.plural)


def _content_type(request: kmock.Request) -> str:
    for key, value in request.headers.items():
        if key.lower() == "content-type":
            return value.split(";", 1)[0].strip().lower()
    return ""


def _normalize(obj: JSON) -> JSON:
    meta = obj["metadata"]
    for key in _OMIT_WHEN_EMPTY:
        if key in meta and not meta[key]:
            del meta[key]
    return obj


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with the gaps listed in the module docstring closed."""

    auto_namespaces: bool = True
    garbage_collection: bool = True
    strict_patch: bool = True
    bookmark_interval: float = 5.0
    event_log_limit: int = 100_000
    peering: bool = False

    _rv: int = attrs.field(default=0, init=False)
    _event_log: collections.deque[_LogEntry] = attrs.field(factory=collections.deque, init=False)
    _forgotten_rv: int = attrs.field(default=0, init=False)
    _changed: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _custom: set[kmock.resource] = attrs.field(factory=set, init=False)
    _pending_policies: dict[tuple[kmock.resource, str | None, str], str] = attrs.field(factory=dict, init=False)
    _counts: collections.Counter[tuple[str, str, str]] = attrs.field(factory=collections.Counter, init=False)
    _counts_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # kmock's fallbacks, bound to the overridden _serve_* below
        self.fallback[kmock.method.PUT] << self._serve_replace
        self.fallback[kmock.method.DELETE] << self._serve_delete  # delete-collection (no name)
        self.fallback["get /version/"] << self._serve_server_version  # the official client's URL
        resources = BUILTIN_RESOURCES | (PEERING_RESOURCES if self.peering else {})
        for key, (kind, namespaced, subresources, shortnames) in resources.items():
            self.resources[key] = kmock.ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=namespaced,
                verbs=VERBS,
                shortnames=shortnames,
                subresources=subresources,
            )

    # -- plumbing -------------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        path = parse_api_path(raw_request.path)
        self._count(raw_request.method, raw_request.path, raw_request.query, raw_request.headers.get("User-Agent", ""))
        if path is None or path.group != "" or path.plural != "namespaces":
            return await super().__call__(raw_request)

        # kmock 0.8 cannot parse /api/v1/namespaces[/{name}]: build its request here instead.
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            request = await self._namespace_request(raw_request, path)
            self._requests.append(request)
            try:
                return await self._handle(request)
            except StreamingError as e:
                raw_response = e.args[0]
                raise e.__cause__ or e from None
        except Exception as e:
            if self._errors:
                self._errors[-1].append(e)
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(e)
            await self._stream_error(e, raw_response)
            await raw_response.write_eof()
            return raw_response

    async def _namespace_request(self, raw_request: aiohttp.web.BaseRequest, path: ApiPath) -> kmock.Request:
        body = await raw_request.read()
        try:
            data = json.loads(body) if body.strip() else None
        except ValueError:
            data = None
        method = raw_request.method.upper()
        query = dict(raw_request.query)
        action: kmock.action | None = None
        if method == "GET":
            watching = query.get("watch") in {"true", "1"}
            action = kmock.action.WATCH if watching else kmock.action.FETCH if path.name else kmock.action.LIST
        elif method == "POST" and path.name is None:
            action = kmock.action.CREATE
        elif method == "PATCH" and path.name:
            action = kmock.action.UPDATE
        elif method == "DELETE" and path.name:
            action = kmock.action.DELETE
        return kmock.Request(
            id=len(self._requests),
            raw_request=raw_request,
            url=raw_request.url,
            method=method,
            params=query,
            headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies),
            body=body,
            text=body.decode("utf-8", "replace"),
            data=data,
            action=action,
            resource=NAMESPACES,
            namespace=None,
            name=path.name,
            subresource=path.subresource,
        )

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Skip KubernetesEmulator._handle(): it mutates the stored objects on every write before
        # any reaction is consulted. Here the mutations happen in the _serve_* fallbacks, so that
        # user reactions (fault injection) can replace a write entirely.
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, kmock.KubernetesError):
            code = exc.status
            known = {*_REASONS.values(), "AlreadyExists"}
            reason = exc.reason if exc.reason in known else _REASONS.get(code, "Unknown")
            details = exc.details if isinstance(exc.details, Mapping) else {}
            message = exc.message or "the server could not find the requested resource"
            payload = status_object(code, str(reason), message, dict(details))
            return aiohttp.web.json_response(payload, status=code)
        return await super()._render_error(exc)

    def _count(self, method: str, raw_path: str, query: Mapping[str, str], agent: str) -> None:
        path = parse_api_path(raw_path)
        if path is None:  # discovery and the like: "api", "apis", "version", "" for "/"
            kind, verb = (raw_path.strip("/").split("/", 1)[0], method.lower())
        else:
            resource = kmock.resource(path.group, path.version, path.plural)
            # Not .get(): kmock's ResourcesArray auto-creates entries on __getitem__.
            info = self._resources[resource] if resource in self._resources else None  # noqa: SIM401
            kind = info.kind if info is not None and info.kind else path.plural
            verb = request_verb(method, path, query)
        with self._counts_lock:
            self._counts[agent, kind, verb] += 1

    def counts(
        self, *, agents: Iterable[str] | None = None, exclude_agents: Iterable[str] = ()
    ) -> collections.Counter[tuple[str, str]]:
        """Requests so far as ``{(kind, verb): n}``; verbs as in audit logs (``patch/status``).

        ``agents``/``exclude_agents``: User-Agent prefixes to keep/drop (e.g. the test kubelet's).
        """
        keep = None if agents is None else tuple(agents)
        drop = tuple(exclude_agents)
        result: collections.Counter[tuple[str, str]] = collections.Counter()
        with self._counts_lock:
            for (agent, kind, verb), n in self._counts.items():
                if (keep is None or agent.startswith(keep)) and not (drop and agent.startswith(drop)):
                    result[kind, verb] += n
        return result

    def reset_counts(self) -> None:
        with self._counts_lock:
            self._counts.clear()

    def close_watches(self) -> None:
        """End all watch streams now (and any later ones at once): used before shutdown."""
        self._closing = True
        self._changed.set()

    @staticmethod
    def _respond(status: int, payload: kmock.Payload) -> Response:
        return Response(status=status, payload=payload)

    # -- resources --------------------------------------------------------------------------------

    def _target(self, request: kmock.Request, *, collection: bool = False) -> tuple[kmock.resource, kmock.ResourceInfo]:
        resource = request.resource
        if resource is None or resource.plural is None or resource not in self._resources:
            raise api_error(404, "the server could not find the requested resource")
        info = self._resources[resource]
        if info.namespaced and request.namespace is None and not collection:
            raise api_error(404, "the server could not find the requested resource")
        if not info.namespaced and request.namespace is not None:
            raise api_error(404, "the server could not find the requested resource")
        return resource, info

    def register_crd(self, crd: Mapping[str, Any]) -> list[kmock.resource]:
        """Store a CRD object (as if POSTed) and declare its served versions for discovery."""
        name = crd["metadata"]["name"]
        if self._live(CRDS, None, name) is None:
            self._create(CRDS, self._resources[CRDS], None, dict(crd))
        return self._declare_crd(crd)

    def _declare_crd(self, crd: Mapping[str, Any]) -> list[kmock.resource]:
        spec = crd["spec"]
        names = spec["names"]
        declared: list[kmock.resource] = []
        for version in spec.get("versions") or []:
            if not version.get("served", True):
                continue
            resource = kmock.resource(spec["group"], version["name"], names["plural"])
            self.resources[resource] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular") or names["kind"].lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs=VERBS,
                shortnames=names.get("shortNames") or (),
                categories=names.get("categories") or (),
                subresources={key for key in (version.get("subresources") or {}) if key in {"status"}},
            )
            self._custom.add(resource)
            declared.append(resource)
        return declared

    def ensure_namespace(self, name: str) -> JSON:
        return self._live(NAMESPACES, None, name) or self._create(
            NAMESPACES, self._resources[NAMESPACES], None, {"metadata": {"name": name}}
        )

    def resolve(self, spec: str | kmock.resource) -> kmock.resource:
        """``batch/v1/jobs``, ``v1/pods``, ``jobs``, ``Job``, ``dbf``, ``jobs.batch`` -> resource."""
        parsed = spec if isinstance(spec, kmock.resource) else kmock.resource(spec)
        if parsed.group is not None and parsed.version is not None and parsed in self._resources:
            return parsed
        word = (parsed.plural or "").lower()
        candidates = [
            resource
            for resource in self._resources
            if (parsed.group is None or parsed.group == resource.group)
            and (parsed.version is None or parsed.version == resource.version)
            and word
            in {
                str(resource.plural).lower(),
                (self._resources[resource].kind or "").lower(),
                (self._resources[resource].singular or "").lower(),
                *(name.lower() for name in self._resources[resource].shortnames),
            }
        ]
        if not candidates:
            raise KeyError(f"unknown resource: {spec!r}")
        return sorted(candidates, key=lambda r: (r.group != "", r.group or "", r.version or ""))[0]

    # -- the store --------------------------------------------------------------------------------

    def _live(self, resource: kmock.resource, namespace: str | None, name: str) -> JSON | None:
        key = (resource, namespace, name)
        if key in self._objects and not self._objects[key].deleted:
            return self._objects[key].raw
        return None

    def live_objects(self, resource: kmock.resource, namespace: str | None = None) -> list[JSON]:
        """Current objects of a resource (all namespaces if None), sorted by namespace & name."""
        found = [
            (ns or "", name, obj.raw)
            for (res, ns, name), obj in self._objects.items()
            if res == resource and not obj.deleted and (namespace is None or ns == namespace)
        ]
        return [obj for _, _, obj in sorted(found, key=lambda item: (item[0], item[1]))]

    def _commit(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        new: JSON | None,
        event_type: str,
        old: JSON | None,
    ) -> JSON:
        self._rv += 1
        key = (resource, namespace, name)
        if new is not None:
            new["metadata"]["resourceVersion"] = str(self._rv)
            if key in self._objects:
                self._objects[key].history.append(new)
            else:
                self._objects[key] = new
            shown = new
        else:
            assert old is not None
            shown = copy.deepcopy(old)
            shown["metadata"]["resourceVersion"] = str(self._rv)
            self._objects[key].delete()
        self._event_log.append(_LogEntry(self._rv, resource, namespace, event_type, shown, old))
        while len(self._event_log) > self.event_log_limit:
            self._forgotten_rv = self._event_log.popleft().rv
        self._changed.set()
        self._changed = asyncio.Event()
        return shown

    def _create(
        self,
        resource: kmock.resource,
        info: kmock.ResourceInfo,
        namespace: str | None,
        body: Any,
        *,
        dry_run: bool = False,
    ) -> JSON:
        if not isinstance(body, Mapping):
            raise api_error(400, "the request body must be a JSON object")
        obj: JSON = copy.deepcopy(dict(body))
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            obj["metadata"] = meta = {}
        if info.namespaced:
            if meta.get("namespace") not in {None, "", namespace}:
                raise api_error(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
            namespace = None

        name = meta.get("name")
        if not name:
            prefix = meta.get("generateName")
            if not prefix:
                raise api_error(422, "name or generateName is required", "Invalid", kind=info.kind)
            for _ in range(100):
                name = prefix + "".join(random.choices(_NAME_ALPHABET, k=5))  # noqa: S311
                if self._live(resource, namespace, name) is None:
                    break
            meta["name"] = name
        name = str(name)
        self._validate_name(resource, info, name)
        if self._live(resource, namespace, name) is not None:
            raise api_error(
                409,
                f'{_qualified(resource)} "{name}" already exists',
                "AlreadyExists",
                name=name,
                group=resource.group,
                kind=resource.plural,
            )
        if info.namespaced and self._live(NAMESPACES, None, str(namespace)) is None:
            if not self.auto_namespaces:
                raise api_error(404, f'namespaces "{namespace}" not found', name=namespace, kind="namespaces")
            if not dry_run:
                self.ensure_namespace(str(namespace))

        obj["apiVersion"] = _api_version(resource)
        obj["kind"] = info.kind or obj.get("kind")
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        if "status" in info.subresources:
            obj.pop("status", None)
        if resource == NAMESPACES:
            obj["status"] = {"phase": "Active"}
        if resource == CRDS:
            obj["status"] = {
                "acceptedNames": copy.deepcopy(obj.get("spec", {}).get("names", {})),
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"},
                ],
                "storedVersions": [v["name"] for v in obj.get("spec", {}).get("versions", []) if v.get("storage")],
            }
        _normalize(obj)
        if dry_run:
            return obj
        created = self._commit(resource, namespace, str(name), obj, "ADDED", None)
        if resource == CRDS:
            self._declare_crd(created)
        return created

    def _validate_name(self, resource: kmock.resource, info: kmock.ResourceInfo, name: str) -> None:
        limit = 63 if resource == kmock.resource("batch", "v1", "jobs") else 253
        if len(name) > limit or not _DNS1123_SUBDOMAIN.fullmatch(name):
            raise api_error(
                422,
                f'{info.kind} "{name}" is invalid: metadata.name: Invalid value: "{name}": '
                f"a lowercase RFC 1123 subdomain of at most {limit} characters is required",
                "Invalid",
                name=name,
                group=resource.group,
                kind=info.kind,
            )

    def _update(
        self,
        resource: kmock.resource,
        info: kmock.ResourceInfo,
        namespace: str | None,
        name: str,
        subresource: str | None,
        old: JSON,
        candidate: Any,
        precondition_rv: Any,
        *,
        dry_run: bool = False,
    ) -> JSON:
        if not isinstance(candidate, Mapping):
            raise api_error(400, "the object must be a JSON object")
        has_status = "status" in info.subresources
        if subresource == "status":
            if not has_status:
                raise api_error(404, "the server could not find the requested resource")
            new: JSON = copy.deepcopy(old)
            if "status" in candidate:
                new["status"] = copy.deepcopy(candidate["status"])
            else:
                new.pop("status", None)
        elif subresource is None:
            new = copy.deepcopy(dict(candidate))
            if has_status:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
        else:
            raise api_error(404, "the server could not find the requested resource")

        old_meta: JSON = old["metadata"]
        if precondition_rv not in (None, "") and str(precondition_rv) != old_meta.get("resourceVersion"):
            raise api_error(
                409,
                f'Operation cannot be fulfilled on {_qualified(resource)} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                "Conflict",
                name=name,
                group=resource.group,
                kind=resource.plural,
            )
        meta = new.get("metadata")
        if not isinstance(meta, dict):
            new["metadata"] = meta = {}
        if meta.get("name", name) != name:
            raise api_error(
                400, f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        for key in _SYSTEM_METADATA:
            if key in old_meta:
                meta[key] = copy.deepcopy(old_meta[key])
            else:
                meta.pop(key, None)
        new["apiVersion"] = old.get("apiVersion")
        new["kind"] = old.get("kind")
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise api_error(
                    422,
                    f'{info.kind} "{name}" is invalid: metadata.finalizers: Forbidden: '
                    "no new finalizers can be added if the object is being deleted",
                    "Invalid",
                    name=name,
                    kind=info.kind,
                )
        _normalize(new)

        ignored = {"metadata", "apiVersion", "kind"} | ({"status"} if has_status else set())
        old_spec = {key: value for key, value in old.items() if key not in ignored}
        new_spec = {key: value for key, value in new.items() if key not in ignored}
        if new_spec != old_spec and "generation" in old_meta:
            meta["generation"] = int(old_meta["generation"]) + 1
        if new == old or dry_run:
            return new  # a no-op write: no new resourceVersion, no watch event (as in Kubernetes)

        updated = self._commit(resource, namespace, name, new, "MODIFIED", old)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            policy = self._pending_policies.pop((resource, namespace, name), "Background")
            return self._remove(resource, namespace, name, updated, policy)
        return updated

    def _remove(self, resource: kmock.resource, namespace: str | None, name: str, current: JSON, policy: str) -> JSON:
        if resource == NAMESPACES:
            for (res, ns, obj_name), obj in list(self._objects.items()):
                if ns == name and not obj.deleted and res in self._resources:
                    self._delete(res, self._resources[res], ns, obj_name, "Background")
        final = self._commit(resource, namespace, name, None, "DELETED", current)
        uid = current["metadata"].get("uid")
        if self.garbage_collection and policy != "Orphan" and uid:
            self._collect_dependents(uid)
        return final

    def _collect_dependents(self, owner_uid: str) -> None:
        for (resource, namespace, name), obj in list(self._objects.items()):
            if obj.deleted or resource not in self._resources:
                continue
            refs = obj.raw.get("metadata", {}).get("ownerReferences") or []
            if any(isinstance(ref, Mapping) and ref.get("uid") == owner_uid for ref in refs):
                with contextlib.suppress(kmock.KubernetesError):
                    self._delete(resource, self._resources[resource], namespace, name, "Background")

    def _delete(
        self,
        resource: kmock.resource,
        info: kmock.ResourceInfo,
        namespace: str | None,
        name: str,
        policy: str,
        preconditions: Mapping[str, Any] | None = None,
        *,
        dry_run: bool = False,
    ) -> tuple[int, JSON]:
        old = self._live(resource, namespace, name)
        if old is None:
            raise self._not_found(resource, name)
        old_meta: JSON = old["metadata"]
        for key in ("uid", "resourceVersion"):
            expected = (preconditions or {}).get(key)
            if expected is not None and expected != old_meta.get(key):
                raise api_error(
                    409,
                    f"Precondition failed: {key} in precondition: {expected}, {key} in object meta: "
                    f"{old_meta.get(key)}",
                    "Conflict",
                    name=name,
                    group=resource.group,
                    kind=resource.plural,
                )
        if dry_run:
            return 200, old
        if old_meta.get("finalizers"):
            current = old
            if not old_meta.get("deletionTimestamp"):
                current = copy.deepcopy(old)
                current["metadata"]["deletionTimestamp"] = now_rfc3339()
                current["metadata"]["deletionGracePeriodSeconds"] = 0
                if "generation" in old_meta:
                    current["metadata"]["generation"] = int(old_meta["generation"]) + 1
                current = self._commit(resource, namespace, name, current, "MODIFIED", old)
                # Kubernetes keeps the policy as an "orphan"/"foregroundDeletion" finalizer; here, aside.
                self._pending_policies[resource, namespace, name] = policy
            if policy == "Foreground" and self.garbage_collection and old_meta.get("uid"):
                self._collect_dependents(old_meta["uid"])
            return 202, current
        final = self._remove(resource, namespace, name, old, policy)
        if resource in self._custom or resource in {NAMESPACES, CRDS}:
            return 200, final
        details = {"name": name, "group": resource.group, "kind": resource.plural, "uid": old_meta.get("uid")}
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}

    def _not_found(self, resource: kmock.resource, name: str) -> kmock.KubernetesError:
        return api_error(
            404,
            f'{_qualified(resource)} "{name}" not found',
            "NotFound",
            name=name,
            group=resource.group,
            kind=resource.plural,
        )

    def _selectors(self, request: kmock.Request) -> tuple[LabelSelector, FieldSelector]:
        try:
            labels = LabelSelector.parse(request.params.get("labelSelector"))
            fields = FieldSelector.parse(request.params.get("fieldSelector"))
        except ValueError as e:
            raise api_error(400, f"unable to parse requirement: {e}") from e
        return labels, fields

    @staticmethod
    def _matches(obj: JSON, name: str | None, labels: LabelSelector, fields: FieldSelector) -> bool:
        meta = obj.get("metadata") or {}
        return (name is None or meta.get("name") == name) and labels.matches(meta.get("labels")) and fields.matches(obj)

    # -- kmock fallbacks: reads -------------------------------------------------------------------

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        resource, info = self._target(request, collection=True)
        labels, fields = self._selectors(request)
        items = [
            obj for obj in self.live_objects(resource, request.namespace) if self._matches(obj, None, labels, fields)
        ]
        metadata: JSON = {"resourceVersion": str(self._rv)}
        limit_text = request.params.get("limit") or "0"
        offset_text = request.params.get("continue") or "0"
        if not limit_text.isdigit() or not offset_text.isdigit():
            raise api_error(400, "invalid limit or continue token")
        limit, offset = int(limit_text), int(offset_text)
        items = items[offset:]
        if limit and len(items) > limit:
            metadata["continue"] = str(offset + limit)
            metadata["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return self._respond(
            200,
            {"kind": f"{info.kind}List", "apiVersion": _api_version(resource), "metadata": metadata, "items": items},
        )

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        resource, _ = self._target(request)
        if request.subresource not in {None, "status"}:
            raise api_error(404, "the server could not find the requested resource")
        obj = self._live(resource, request.namespace, str(request.name))
        if obj is None:
            raise self._not_found(resource, str(request.name))
        return self._respond(200, obj)

    async def _serve_watch(self, request: kmock.Request) -> kmock.Payload:  # type: ignore[override]
        resource, info = self._target(request, collection=True)
        labels, fields = self._selectors(request)
        params = request.params
        since = params.get("resourceVersion") or None
        timeout_text = params.get("timeoutSeconds") or ""
        try:
            timeout = float(timeout_text) if timeout_text else None
        except ValueError as e:
            raise api_error(400, f"invalid timeoutSeconds: {timeout_text!r}") from e
        if since is not None and not since.isdigit():
            raise api_error(400, f"invalid resourceVersion: {since!r}")
        stream = self._watch_stream(
            resource,
            str(info.kind),
            request.namespace,
            request.name,
            labels,
            fields,
            timeout=timeout,
            bookmarks=params.get("allowWatchBookmarks") in {"true", "1"},
            send_initial=params.get("sendInitialEvents") == "true",
            since=since,
        )
        return self._respond(200, stream)

    async def _watch_stream(
        self,
        resource: kmock.resource,
        kind: str,
        namespace: str | None,
        name: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
        *,
        timeout: float | None,
        bookmarks: bool,
        send_initial: bool,
        since: str | None,
    ) -> AsyncIterator[kmock.Payload]:
        yield b""  # send the headers now, even if no events follow for a while
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def bookmark(rv: int, initial_end: bool = False) -> JSON:
            metadata: JSON = {"resourceVersion": str(rv)}
            if initial_end:
                metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
            return {
                "type": "BOOKMARK",
                "object": {"kind": kind, "apiVersion": _api_version(resource), "metadata": metadata},
            }

        if since is None or since == "0" or send_initial:
            position = self._rv
            initial = [
                obj for obj in self.live_objects(resource, namespace) if self._matches(obj, name, labels, fields)
            ]
            for obj in initial:
                yield {"type": "ADDED", "object": obj}
            if send_initial and bookmarks:
                yield bookmark(position, initial_end=True)
        else:
            position = int(since)
            if position < self._forgotten_rv:
                message = f"too old resource version: {position} ({self._forgotten_rv + 1})"
                yield {"type": "ERROR", "object": status_object(410, "Expired", message)}
                return

        next_bookmark = loop.time() + self.bookmark_interval
        while not self._closing:
            changed = self._changed
            entries = self._entries_after(position)
            for entry in entries:
                position = entry.rv
                event = self._watch_event(entry, resource, namespace, name, labels, fields)
                if event is not None:
                    yield event
            if changed.is_set() or self._closing:
                continue  # more events arrived while these were being sent
            now = loop.time()
            if deadline is not None and now >= deadline:
                return
            if bookmarks and now >= next_bookmark:
                yield bookmark(position)
                next_bookmark = now + self.bookmark_interval
                continue
            wakeups = [t for t in (deadline, next_bookmark if bookmarks else None) if t is not None]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(wakeups) - now if wakeups else None)

    def _entries_after(self, position: int) -> list[_LogEntry]:
        entries: list[_LogEntry] = []
        for entry in reversed(self._event_log):
            if entry.rv <= position:
                break
            entries.append(entry)
        entries.reverse()
        return entries

    def _watch_event(
        self,
        entry: _LogEntry,
        resource: kmock.resource,
        namespace: str | None,
        name: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
    ) -> JSON | None:
        if entry.resource != resource or (namespace is not None and entry.namespace != namespace):
            return None
        now_matches = self._matches(entry.object, name, labels, fields)
        if entry.type == "ADDED":
            return {"type": "ADDED", "object": entry.object} if now_matches else None
        if entry.type == "DELETED":
            return {"type": "DELETED", "object": entry.object} if now_matches else None
        was_matching = entry.old is not None and self._matches(entry.old, name, labels, fields)
        if now_matches:
            return {"type": "MODIFIED" if was_matching else "ADDED", "object": entry.object}
        if was_matching:  # left the selector: for this watcher, the object is gone
            return {"type": "DELETED", "object": entry.object}
        return None

    # -- kmock fallbacks: writes ------------------------------------------------------------------

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        resource, info = self._target(request)
        if request.subresource is not None or request.name is not None:
            raise api_error(405, "the server does not allow this method on the requested resource")
        dry_run = "dryRun" in request.params
        return self._respond(201, self._create(resource, info, request.namespace, request.data, dry_run=dry_run))

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        resource, info = self._target(request)
        name = str(request.name)
        old = self._live(resource, request.namespace, name)
        if old is None:
            raise self._not_found(resource, name)
        content_type = _content_type(request)
        patch = request.data
        precondition: Any = None
        try:
            if content_type == "application/json-patch+json":
                if not isinstance(patch, list):
                    raise api_error(400, "a JSON patch must be a list of operations")
                candidate = json_patch(old, patch)
            elif content_type in {"application/merge-patch+json", "application/strategic-merge-patch+json"}:
                if not isinstance(patch, Mapping):
                    raise api_error(400, "a merge patch must be a JSON object")
                if content_type == "application/strategic-merge-patch+json":
                    if self.strict_patch and resource in self._custom:
                        raise api_error(
                            415,
                            "the body of the request was in an unknown format - accepted media types include: "
                            "application/json-patch+json, application/merge-patch+json, "
                            "application/apply-patch+yaml",
                        )
                    candidate = strategic_merge_patch(old, patch)
                else:
                    candidate = merge_patch(old, patch)
                meta = patch.get("metadata")
                precondition = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
            else:
                raise api_error(415, f"the server does not support the patch type {content_type!r}")
        except JsonPatchTestFailed as e:
            raise api_error(422, str(e), "Invalid", name=name, kind=info.kind) from e
        except ValueError as e:
            raise api_error(422, f"the JSON patch cannot be applied: {e}", "Invalid", name=name) from e
        updated = self._update(
            resource,
            info,
            request.namespace,
            name,
            request.subresource,
            old,
            candidate,
            precondition,
            dry_run="dryRun" in request.params,
        )
        return self._respond(200, updated)

    async def _serve_replace(self, request: kmock.Request) -> kmock.Payload:
        resource, info = self._target(request)
        if request.name is None:
            raise api_error(405, "the server does not allow this method on the requested resource")
        name = str(request.name)
        old = self._live(resource, request.namespace, name)
        if old is None:
            raise self._not_found(resource, name)
        body = request.data
        if not isinstance(body, Mapping):
            raise api_error(400, "the request body must be a JSON object")
        meta = body.get("metadata")
        precondition = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
        updated = self._update(
            resource,
            info,
            request.namespace,
            name,
            request.subresource,
            old,
            body,
            precondition,
            dry_run="dryRun" in request.params,
        )
        return self._respond(200, updated)

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        collection = request.name is None
        resource, info = self._target(request, collection=collection)
        options = request.data if isinstance(request.data, Mapping) else {}
        policy = str(request.params.get("propagationPolicy") or options.get("propagationPolicy") or "Background")
        dry_run = "dryRun" in request.params or bool(options.get("dryRun"))
        if request.subresource is not None:
            raise api_error(405, "the server does not allow this method on the requested resource")
        if not collection:
            preconditions = options.get("preconditions")
            code, payload = self._delete(
                resource, info, request.namespace, str(request.name), policy, preconditions, dry_run=dry_run
            )
            return self._respond(code, payload)
        labels, fields = self._selectors(request)
        deleted: list[JSON] = []
        for obj in self.live_objects(resource, request.namespace):
            if self._matches(obj, None, labels, fields):
                meta = obj["metadata"]
                _, shown = self._delete(resource, info, meta.get("namespace"), meta["name"], policy, dry_run=dry_run)
                deleted.append(shown if shown.get("kind") != "Status" else obj)
        listing = {
            "kind": f"{info.kind}List",
            "apiVersion": _api_version(resource),
            "metadata": {"resourceVersion": str(self._rv)},
            "items": deleted,
        }
        return self._respond(200, listing)


# ---------------------------------------------------------------------------------------------
# The handle: a server in a background thread
# ---------------------------------------------------------------------------------------------


def write_kubeconfig(
    path: pathlib.Path, server: str, *, namespace: str = "default", token: str = TOKEN
) -> pathlib.Path:
    """A kubeconfig readable by the official client, kopf and kubectl (plain HTTP, a dummy token)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubeapi", "cluster": {"server": server}}],
        "users": [{"name": "kubeapi", "user": {"token": token}}],
        "contexts": [{"name": "kubeapi", "context": {"cluster": "kubeapi", "user": "kubeapi", "namespace": namespace}}],
        "current-context": "kubeapi",
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


class KubeAPI:
    """A `KubeEmulator` served on 127.0.0.1:<free port> by a background thread with its own loop.

    Use as a context manager (or ``start()``/``stop()``). All helpers are thread-safe: they run
    inside the server's loop and return deep copies.
    """

    def __init__(
        self,
        *,
        crds: Iterable[CRDSource] = (),
        namespaces: Iterable[str] = ("default",),
        workdir: pathlib.Path | None = None,
        peering: bool = False,
        auto_namespaces: bool = True,
        garbage_collection: bool = True,
        strict_patch: bool = True,
        bookmark_interval: float = 5.0,
        event_log_limit: int = 100_000,
    ) -> None:
        self._crds = [crd for source in crds for crd in load_crds(source)]
        self._namespaces = list(namespaces)
        self._options: dict[str, Any] = {
            "peering": peering,
            "auto_namespaces": auto_namespaces,
            "garbage_collection": garbage_collection,
            "strict_patch": strict_patch,
            "bookmark_interval": bookmark_interval,
            "event_log_limit": event_log_limit,
        }
        self._own_workdir = workdir is None
        self._workdir = workdir
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._emulator: KubeEmulator | None = None
        self._url: str | None = None
        self._kubeconfig: pathlib.Path | None = None
        self._clients: list[kubernetes.client.ApiClient] = []

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> Self:
        if self._thread is not None:
            raise RuntimeError("the API server is already started")
        self._thread = threading.Thread(target=self._run, name="kubeapi-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the API server did not start in time")
        if self._failure is not None:
            self._thread.join(timeout)
            raise RuntimeError("the API server failed to start") from self._failure
        if self._workdir is None:
            self._workdir = pathlib.Path(tempfile.mkdtemp(prefix="kubeapi-"))
        self._kubeconfig = write_kubeconfig(self._workdir / "kubeconfig.yaml", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        for client in self._clients:
            client.close()  # type: ignore[no-untyped-call]
        self._clients.clear()
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        self._thread = None
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        if thread.is_alive():
            raise RuntimeError("the API server thread did not stop in time")
        if self._failure is not None:
            raise RuntimeError("the API server thread failed") from self._failure

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:
            self._failure = e
        finally:
            self._ready.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        emulator = KubeEmulator(**self._options)
        async with emulator, kmock.Server(emulator) as server:
            for namespace in self._namespaces:
                emulator.ensure_namespace(namespace)
            for crd in self._crds:
                emulator.register_crd(crd)
            self._emulator = emulator
            self._url = str(server.url).rstrip("/")
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                emulator.close_watches()
                await asyncio.sleep(0)  # let the streams notice and finish before the server closes

    # -- connection -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash)."""
        if self._url is None:
            raise RuntimeError("the API server is not started")
        return self._url

    @property
    def kubeconfig(self) -> pathlib.Path:
        """A kubeconfig file pointing to this server (current context ``kubeapi``, ns ``default``)."""
        if self._kubeconfig is None:
            raise RuntimeError("the API server is not started")
        return self._kubeconfig

    @property
    def emulator(self) -> KubeEmulator:
        """The kmock handler itself (touch it only via `call`: it lives in another thread)."""
        if self._emulator is None:
            raise RuntimeError("the API server is not started")
        return self._emulator

    def env(self) -> dict[str, str]:
        """Environment for processes/threads that log in via kubeconfig: ``{"KUBECONFIG": path}``."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def api_client(self) -> kubernetes.client.ApiClient:
        """A new official-client ApiClient from the kubeconfig; closed by `stop` (or close it)."""
        client: kubernetes.client.ApiClient = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig)
        )
        self._clients.append(client)
        return client

    def connection_info(self) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=self.url, insecure=True, scheme="Bearer", token=TOKEN, default_namespace="default", priority=100
        )

    def login_handler(self, **_: Any) -> kopf.ConnectionInfo:
        """For ``kopf.on.login(registry=...)(kube_api.login_handler)``."""
        return self.connection_info()

    # -- thread-safe access to the state ----------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 5.0) -> T:
        """Run ``fn(*args)`` synchronously inside the server's loop; return its result."""
        loop = self._loop
        if loop is None or self._thread is None:
            raise RuntimeError("the API server is not started")

        async def run() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    def register_crd(self, crd: CRDSource) -> None:
        for doc in load_crds(crd):
            self.call(self.emulator.register_crd, doc)

    def get(self, resource: str, name: str, namespace: str | None = "default") -> JSON | None:
        """The current object or None. ``resource``: ``batch/v1/jobs``, ``jobs``, ``DbtBackfill``..."""

        def read() -> JSON | None:
            res = self.emulator.resolve(resource)
            info = self.emulator.resources[res]
            return copy.deepcopy(self.emulator._live(res, namespace if info.namespaced else None, name))

        return self.call(read)

    def list_objects(
        self, resource: str, namespace: str | None = None, *, label_selector: str | None = None
    ) -> list[JSON]:
        """Current objects (all namespaces if None), sorted by namespace and name."""
        selector = LabelSelector.parse(label_selector)

        def read() -> list[JSON]:
            res = self.emulator.resolve(resource)
            objs = self.emulator.live_objects(res, namespace)
            return copy.deepcopy([obj for obj in objs if selector.matches(obj["metadata"].get("labels"))])

        return self.call(read)

    def history(self, resource: str, name: str, namespace: str | None = "default") -> list[JSON | None]:
        """Every stored version of an object (None marks a deletion), oldest first."""

        def read() -> list[JSON | None]:
            res = self.emulator.resolve(resource)
            ns = namespace if self.emulator.resources[res].namespaced else None
            if (res, ns, name) not in self.emulator.objects:
                return []
            versions = self.emulator.objects[res, ns, name].history
            return [None if version is None else copy.deepcopy(version.raw) for version in versions]

        return self.call(read)

    def events(
        self, namespace: str | None = None, *, involved_name: str | None = None, reason: str | None = None
    ) -> list[JSON]:
        """Kubernetes events (``v1`` and ``events.k8s.io/v1``), oldest first, optionally filtered."""
        found = self.list_objects("v1/events", namespace) + self.list_objects("events.k8s.io/v1/events", namespace)
        result = []
        for event in found:
            involved = event.get("involvedObject") or event.get("regarding") or {}
            if involved_name is not None and involved.get("name") != involved_name:
                continue
            if reason is not None and event.get("reason") != reason:
                continue
            result.append(event)
        return sorted(result, key=lambda e: int(e["metadata"]["resourceVersion"]))

    def wait_for(
        self, predicate: Callable[[], T], *, timeout: float = 5.0, interval: float = 0.02, message: str = ""
    ) -> T:
        """Poll ``predicate()`` until it returns something truthy; return that or fail."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(message or f"condition not met in {timeout}s: {predicate!r}")
            time.sleep(interval)

    # -- counting ---------------------------------------------------------------------------------

    def counts(
        self, *, agents: Iterable[str] | None = None, exclude_agents: Iterable[str] = ()
    ) -> collections.Counter[tuple[str, str]]:
        """All API requests so far: ``{(kind, verb): n}``, e.g. ``("Job", "list")``.

        Non-resource requests are keyed by their first path segment: ``("apis", "get")``,
        ``("api", "get")``, ``("version", "get")``, ``("", "get")`` for ``/``.
        ``agents``/``exclude_agents``: User-Agent prefixes to keep/drop.
        """
        return self.emulator.counts(agents=agents, exclude_agents=exclude_agents)

    requests = counts  # an alias

    def writes(
        self, *, agents: Iterable[str] | None = None, exclude_agents: Iterable[str] = ()
    ) -> collections.Counter[tuple[str, str]]:
        """API write requests (POST/PUT/PATCH/DELETE) so far: ``{(kind, verb): n}``.

        Verbs: ``create``, ``update``, ``patch``, ``delete``, ``deletecollection``, with
        ``/status`` for the status subresource: ``("DbtBackfill", "patch/status")``.
        Failed writes (409, 422...) count too: they are load on the API all the same.
        Filter by User-Agent prefix: kopf sends ``kopf/...``, the official client
        ``OpenAPI-Generator/...``, the test kubelet ``tests.support.kubelet.USER_AGENT`` -- e.g.
        ``writes(exclude_agents=[kubelet.USER_AGENT])`` for the operator's writes only.
        """
        counts = self.emulator.counts(agents=agents, exclude_agents=exclude_agents)
        return collections.Counter({key: n for key, n in counts.items() if key[1].split("/", 1)[0] in _WRITE_VERBS})

    def writes_total(
        self, kind: str | None = None, *, agents: Iterable[str] | None = None, exclude_agents: Iterable[str] = ()
    ) -> int:
        writes = self.writes(agents=agents, exclude_agents=exclude_agents)
        return sum(n for (k, _), n in writes.items() if kind is None or k == kind)

    def reset_counts(self) -> None:
        self.emulator.reset_counts()

    def request_log(self) -> list[tuple[str, str, dict[str, str]]]:
        """Every request kmock recorded so far: ``(method, path, query)``, oldest first."""

        def read() -> list[tuple[str, str, dict[str, str]]]:
            return [(str(r.method.value), r.url.path, dict(r.params)) for r in self.emulator._requests]

        return self.call(read)

    def server_errors(self) -> list[Exception]:
        """Exceptions inside the emulator that became 5xx responses (bugs, not API errors)."""

        def read() -> list[Exception]:
            return [e for e in self.emulator.errors if not (isinstance(e, kmock.KubernetesError) and e.status < 500)]

        return self.call(read)


# ---------------------------------------------------------------------------------------------
# A kopf operator in a thread
# ---------------------------------------------------------------------------------------------


def operator_settings(settings: kopf.OperatorSettings | None = None) -> kopf.OperatorSettings:
    """Kopf settings that suit the emulator and short tests (adjust further as needed).

    - ``watching.server_timeout``: watch requests end (and resume from their resourceVersion)
      every few seconds, which exercises reconnects and keeps shutdowns snappy;
    - ``watching.inactivity_timeout``: above the emulator's bookmark interval (5 s);
    - posting: kopf's defaults (only explicit ``kopf.info/warn/event`` calls post k8s events;
      ``settings.posting.loggers = True`` would post handler logs too, inflating write counts);
    - ``networking.request_timeout``/``connect_timeout``: fail fast instead of hanging a test.
    """
    settings = settings if settings is not None else kopf.OperatorSettings()
    settings.watching.server_timeout = 10
    settings.watching.client_timeout = 15
    settings.watching.inactivity_timeout = 20
    settings.networking.request_timeout = 10
    settings.networking.connect_timeout = 2
    return settings


_LOGIN_TARGETS: weakref.WeakKeyDictionary[kopf.OperatorRegistry, KubeAPI] = weakref.WeakKeyDictionary()


def _login_to(kube_api: KubeAPI, registry: kopf.OperatorRegistry) -> None:
    """Add one login handler per registry; it logs in to the latest `KubeAPI` given for it."""
    first = registry not in _LOGIN_TARGETS
    _LOGIN_TARGETS[registry] = kube_api
    if first:
        registry_ref = weakref.ref(registry)

        def login(**_: Any) -> kopf.ConnectionInfo:
            registry = registry_ref()
            if registry is None or registry not in _LOGIN_TARGETS:
                raise kopf.LoginError("no KubeAPI to log in to")
            return _LOGIN_TARGETS[registry].connection_info()

        kopf.on.login(registry=registry, id="kubeapi-login")(login)


class KopfOperator:
    """Run ``kopf.operator(...)`` against a `KubeAPI` in a thread with its own event loop.

    ``standalone=True`` (no peering), namespaced to ``namespaces`` unless ``clusterwide``.
    Logs in by adding ``kube_api.login_handler`` to the registry (``login=True``); with
    ``login=False`` the registry must log in by itself (e.g. kopf's default registry falls
    back to the official client with ``KUBECONFIG=kube_api.kubeconfig``).
    """

    def __init__(
        self,
        kube_api: KubeAPI,
        *,
        registry: kopf.OperatorRegistry,
        settings: kopf.OperatorSettings | None = None,
        namespaces: Iterable[str] = ("default",),
        clusterwide: bool = False,
        memo: Any = None,
        login: bool = True,
    ) -> None:
        self.kube_api = kube_api
        self.registry = registry
        self.settings = settings if settings is not None else operator_settings()
        self.namespaces = [] if clusterwide else list(namespaces)
        self.clusterwide = clusterwide
        self.memo = memo
        self.login = login
        self.exception: BaseException | None = None
        self._stop_flag = threading.Event()
        self._ready_flag = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> Self:
        if self.login:
            _login_to(self.kube_api, self.registry)
        self._thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready_flag.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the kopf operator did not get ready in time") from self.exception
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop_flag.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("the kopf operator did not stop in time")
            self._thread = None
        if self.exception is not None:
            raise RuntimeError("the kopf operator failed") from self.exception

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(
                kopf.operator(
                    registry=self.registry,
                    settings=self.settings,
                    standalone=True,
                    clusterwide=self.clusterwide,
                    namespaces=self.namespaces,
                    memo=self.memo,
                    stop_flag=self._stop_flag,
                    ready_flag=self._ready_flag,
                )
            )
        except asyncio.CancelledError:
            pass
        except BaseException as e:
            self.exception = e
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()


@contextlib.contextmanager
def kopf_operator(kube_api: KubeAPI, **kwargs: Any) -> Iterator[KopfOperator]:
    with KopfOperator(kube_api, **kwargs) as operator:
        yield operator
