"""Reading what happened on the cluster: the operator's requests in the audit log, and watches.

`Stamps` times each chunk twice on this process's clock: when a watch first shows its Job
``Complete``, and when a watch first shows the DbtBackfill's ``succeededRanges`` covering it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes.client
import urllib3
from kubernetes.watch.watch import iter_resp_lines

from benchmarks import recording
from benchmarks.cluster_harness import GROUP, JSON, PLURAL, VERSION, Bench, read_json

UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def audit_time(event: JSON) -> float:
    return datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()


def count_by_key(events: list[JSON]) -> dict[str, int]:
    return dict(sorted(Counter(request_key(e) for e in events).items()))


def request_key(event: JSON) -> str:
    """``verb resource[/subresource]``, as RBAC names it (e.g. ``patch dbtbackfills/status``)."""
    ref = event.get("objectRef") or {}
    resource = ref.get("resource") or event.get("requestURI", "?").split("?")[0]
    if ref.get("subresource"):
        resource += "/" + ref["subresource"]
    return f"{event['verb']} {resource}"


def watch_lines(list_call: Callable[..., Any], *args: Any, stop: Callable[[], bool], **kwargs: Any) -> Iterator[JSON]:
    """Every object of a list, then every watch event's object, re-watching until ``stop()``."""
    listing = read_json(list_call, *args, **kwargs)
    yield from listing.get("items") or []
    version = listing["metadata"]["resourceVersion"]
    while not stop():
        try:
            response = list_call(*args, watch=True, resource_version=version, timeout_seconds=30,
                                 allow_watch_bookmarks=True, _preload_content=False, **kwargs)  # fmt: skip
        except Exception:
            if stop():
                return
            raise
        try:
            for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                event = json.loads(line)
                if event["type"] == "ERROR":
                    raise RuntimeError(f"watch failed: {event['object']}")
                version = event["object"]["metadata"]["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    yield event["object"]
                if stop():
                    return
        except urllib3.exceptions.ProtocolError:
            if stop():
                return  # the cluster went down under us
            continue  # the server closed the stream: watch again from where it was
        finally:
            response.release_conn()


def days_of(ranges: list[str]) -> set[str]:
    out: set[str] = set()
    for item in ranges:
        first, _, last = item.partition("..")
        day, stop = date.fromisoformat(first), date.fromisoformat(last or first)
        while day <= stop:
            out.add(day.isoformat())
            day += timedelta(days=1)
    return out


class Stamps:
    """First-seen times (time.time()) of each chunk's Job completing and of the status saying so."""

    def __init__(self, b: Bench, namespace: str) -> None:
        self.cluster, self.namespace = b.cluster, namespace
        self.job_done: dict[tuple[str, str], tuple[float, str | None]] = {}
        self.status_done: dict[tuple[str, str], float] = {}
        self.stopped = False

    def start(self) -> None:
        for target in (self._jobs, self._backfills):
            threading.Thread(target=target, daemon=True).start()

    def _jobs(self) -> None:
        with self.cluster.api_client() as client:
            batch = kubernetes.client.BatchV1Api(client)
            for job in watch_lines(batch.list_namespaced_job, self.namespace, stop=lambda: self.stopped):
                now = time.time()
                labels = job["metadata"].get("labels") or {}
                key = (labels.get(f"{GROUP}/backfill", ""), labels.get(f"{GROUP}/window-start", ""))
                done = [c for c in (job.get("status") or {}).get("conditions") or []
                        if c["type"] == "Complete" and c["status"] == "True"]  # fmt: skip
                if done and key not in self.job_done:
                    self.job_done[key] = (now, done[0].get("lastTransitionTime"))

    def _backfills(self) -> None:
        with self.cluster.api_client() as client:
            custom = kubernetes.client.CustomObjectsApi(client)
            listing = custom.list_namespaced_custom_object
            for item in watch_lines(listing, GROUP, VERSION, self.namespace, PLURAL, stop=lambda: self.stopped):
                now = time.time()
                name = item["metadata"]["name"]
                for day in days_of((item.get("status") or {}).get("succeededRanges") or []):
                    self.status_done.setdefault((name, day), now)

    def latencies(self) -> JSON:
        local, from_condition, missing = [], [], 0
        by_tenth: list[list[float]] = [[] for _ in range(10)]
        first = min((seen for seen, _ in self.job_done.values()), default=0.0)
        last = max((seen for seen, _ in self.job_done.values()), default=0.0)
        for key, (seen, transition) in self.job_done.items():
            if key not in self.status_done:
                missing += 1
                continue
            local.append(self.status_done[key] - seen)
            by_tenth[min(9, int(10 * (seen - first) / max(last - first, 1e-9)))].append(local[-1])
            if transition:
                stamp = datetime.fromisoformat(transition.replace("Z", "+00:00")).timestamp()
                from_condition.append(self.status_done[key] - stamp)
        return {
            "watch_to_watch": recording.distribution(local),
            "from_condition": recording.distribution(from_condition),
            "jobs_complete_not_in_status": missing,
            "status_without_job_seen": len(set(self.status_done) - set(self.job_done)),
            # By when the Job completed, first tenth of the run to last: where the slow ones are.
            "p95_by_tenth_of_run": [recording.percentile(t, 95) for t in by_tenth],
            "chunks_by_tenth_of_run": [len(t) for t in by_tenth],
        }


def watch_traffic(requests: list[JSON]) -> JSON:
    streams: Counter[str] = Counter()
    for e in requests:
        if e["verb"] not in ("watch", "list"):
            continue
        query = parse_qs(urlsplit(e["requestURI"]).query)
        scope = "namespaced" if (e.get("objectRef") or {}).get("namespace") else "cluster"
        selector = "no labelSelector"
        if "labelSelector" in query:  # one stream per backfill uid reads alike: show the key only
            selector = "labelSelector=" + UID.sub("<uid>", query["labelSelector"][0])
        streams[f"{request_key(e)} ({scope}, {selector})"] += 1
    return dict(sorted(streams.items()))
