"""A watch on a namespace's Jobs: the most alive at once, and the order in which they appeared.

The e2e queue tests and ``benchmarks.queue_contention`` read a queue's ceiling and admission order
from it: the API server's own sequence of Job events, never timings.
"""

from __future__ import annotations

import threading
from typing import Any

import kubernetes.client
import kubernetes.watch


def _alive(job: dict[str, Any]) -> bool:
    """A Job some Pod of which may still run: not finished, or finished with Pods terminating."""
    status = job.get("status") or {}
    finished = any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in status.get("conditions") or []
    )
    return not finished or bool(status.get("active")) or bool(status.get("terminating"))


class JobCensus:
    """A watch on a namespace's Jobs, from before the first one exists: the most alive at once,
    and the order in which Jobs appeared (by their backfill label)."""

    def __init__(self, client: kubernetes.client.ApiClient, namespace: str) -> None:
        self.batch = kubernetes.client.BatchV1Api(client)
        self.namespace = namespace
        self.alive: dict[str, bool] = {}
        self.owner: dict[str, str] = {}  # Job name -> its backfill
        self.created: list[str] = []  # backfill of each Job, in creation order
        # Alive Jobs per backfill just after each Job appeared (same order as ``created``).
        self.alive_at_creation: list[dict[str, int]] = []
        self.peak = 0
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        listed = self.batch.list_namespaced_job(namespace)
        assert not listed.items, "the census must start before any Job exists"
        self.version = listed.metadata.resource_version
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                watch = kubernetes.watch.Watch()
                for event in watch.stream(self.batch.list_namespaced_job, self.namespace, timeout_seconds=5,
                                          resource_version=self.version, allow_watch_bookmarks=True,
                                          _preload_content=False):  # fmt: skip
                    self._seen(event)
                    if self.stopping.is_set():
                        watch.stop()
        except BaseException as exc:  # reported by stop(): a census with a gap proves nothing
            self.error = exc

    def _seen(self, event: dict[str, Any]) -> None:
        job = event["raw_object"]
        self.version = job["metadata"]["resourceVersion"]
        if event["type"] == "BOOKMARK":
            return
        name = job["metadata"]["name"]
        added = event["type"] == "ADDED" and name not in self.alive
        if added:
            self.owner[name] = (job["metadata"].get("labels") or {}).get("dbt-backfill.io/backfill", "")
            self.created.append(self.owner[name])
        self.alive[name] = event["type"] != "DELETED" and _alive(job)
        self.peak = max(self.peak, sum(self.alive.values()))
        if added:
            self.alive_at_creation.append(self.alive_by_backfill())

    def alive_by_backfill(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job, alive in self.alive.items():
            if alive:
                counts[self.owner[job]] = counts.get(self.owner[job], 0) + 1
        return counts

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)
        assert self.error is None, f"the Job watch broke off: {self.error!r}"
