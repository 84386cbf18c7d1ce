"""How many reconcile passes run at once, which go first, and the pools sized to match.

A reconcile pass is blocking I/O (a handful of API calls, maybe an audit write), so passes run
on threads. Measured on the real control plane (issue #7), a pass woken by a finished Job ran in
0.7 s (median) but first waited 35 s for one of the 6 threads of asyncio's default executor,
behind the first passes of 200 backfills created at once. So:

- passes run on one executor of ``workers`` threads, and no more than ``workers`` passes are
  handed to it at once (`PassSlots`), so nothing queues inside it;
- a pass of a backfill that has started goes before the first pass of a new one, and first
  passes never hold more than a quarter of the slots: a finished Job finds one soon;
- the kubernetes client's connection pool and the audit database's pool hold a connection for
  every thread that may call them (the reconcile workers plus kopf's own sync-handler threads),
  so no thread waits for a connection or opens one the pool then throws away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

WORKERS_ENV: Final = "DBT_BACKFILL_WORKERS"
DEFAULT_WORKERS: Final = 16
MAX_WORKERS: Final = 256
# kopf's threads for the sync handlers: on_create parses a spec, on_delete finalises one backfill.
HANDLER_WORKERS: Final = 4
# Connections the audit pool keeps open between bursts; the rest open on demand.
AUDIT_POOL_KEPT: Final = 8


class WorkersConfigError(ValueError):
    """A malformed worker count (the operator refuses to start: exit 2, one line)."""


@dataclass(frozen=True)
class PoolSizes:
    reconcile_workers: int  # threads (and slots) for reconcile passes; each has one more for a read beside its own
    first_pass_slots: int  # of those, at most this many first passes of new backfills at once
    handler_workers: int  # kopf's ``settings.execution.max_workers``
    api_connections: int  # the kubernetes client's ``connection_pool_maxsize``
    audit_pool_size: int  # SQLAlchemy ``pool_size`` (kept open) ...
    audit_max_overflow: int  # ... plus ``max_overflow`` (opened under load)


def pool_sizes(workers: int) -> PoolSizes:
    callers = workers + HANDLER_WORKERS  # every thread that may make an API call or an audit write
    kept = min(AUDIT_POOL_KEPT, callers)
    return PoolSizes(
        reconcile_workers=workers,
        first_pass_slots=max(1, workers // 4),
        handler_workers=HANDLER_WORKERS,
        api_connections=callers + workers,  # a pass lists its Pods on a second thread while it lists Jobs
        audit_pool_size=kept,
        audit_max_overflow=callers - kept,
    )


def parse_workers(text: str | None) -> int:
    """``DBT_BACKFILL_WORKERS`` (or ``--workers``): a whole number from 1 to ``MAX_WORKERS``."""
    if text is None or not text.strip():
        return DEFAULT_WORKERS
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_WORKERS:
        raise WorkersConfigError(f"{WORKERS_ENV} must be a whole number from 1 to {MAX_WORKERS}, got {text!r}")
    return value


class PassSlots:
    """At most ``total`` passes at once, at most ``first_limit`` of them first passes.

    Waiting passes of started backfills are let in before waiting first passes; within each
    kind, in arrival order. Runs on one event loop (the operator's), so needs no lock.
    """

    def __init__(self, total: int, first_limit: int) -> None:
        if not 1 <= first_limit <= total:
            raise ValueError(f"need 1 <= first_limit <= total, got {first_limit} and {total}")
        self.total = total
        self.first_limit = first_limit
        self.in_use = 0
        self.first_in_use = 0
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {False: deque(), True: deque()}

    def waiting(self, *, first: bool) -> int:
        return sum(1 for f in self._waiting[first] if not f.done())

    def _free(self, first: bool) -> bool:
        return self.in_use < self.total and (not first or self.first_in_use < self.first_limit)

    def _take(self, first: bool) -> None:
        self.in_use += 1
        self.first_in_use += first

    def _release(self, first: bool) -> None:
        self.in_use -= 1
        self.first_in_use -= first
        for kind in (False, True):  # started backfills first
            queue = self._waiting[kind]
            while queue and self._free(kind):
                waiter = queue.popleft()
                if not waiter.done():  # a cancelled waiter left its place
                    self._take(kind)
                    waiter.set_result(None)

    @contextlib.asynccontextmanager
    async def slot(self, *, first: bool) -> AsyncIterator[None]:
        if self._free(first) and not self.waiting(first=first):
            self._take(first)
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._waiting[first].append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release(first)  # granted just as it was cancelled: hand it on
                raise
        try:
            yield
        finally:
            self._release(first)
