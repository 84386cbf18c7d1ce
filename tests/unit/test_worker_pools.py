"""Reconcile passes: how many at once, which go first, and pools sized to the threads.

The slots are driven on a real event loop with real tasks; the operator's settings are read
back from the objects they configure (kopf's settings, the kubernetes client's urllib3 pool
built from a real kubeconfig, SQLAlchemy's pool), never from our own bookkeeping.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from dbtbackfill.core import audit
from dbtbackfill.operator import jobs, kube, policy, worker_pools
from dbtbackfill.operator.worker_pools import PassSlots, WorkersConfigError, parse_workers, pool_sizes


@pytest.mark.parametrize("workers", [1, 2, 16, worker_pools.MAX_WORKERS])
def test_every_thread_that_calls_out_has_a_connection_in_each_pool(workers: int) -> None:
    sizes = pool_sizes(workers)
    threads = sizes.reconcile_workers + sizes.handler_workers
    assert sizes.reconcile_workers == workers
    assert sizes.api_connections == threads + workers  # each pass's second reader (controller._side_reads)
    assert sizes.audit_pool_size + sizes.audit_max_overflow == threads
    assert 0 < sizes.audit_pool_size <= worker_pools.AUDIT_POOL_KEPT
    assert 1 <= sizes.first_pass_slots <= workers
    assert sizes.first_pass_slots < workers or workers == 1  # started backfills always keep a slot


def test_worker_count_defaults_and_refuses_nonsense() -> None:
    assert parse_workers(None) == parse_workers("  ") == worker_pools.DEFAULT_WORKERS
    assert parse_workers(" 8 ") == 8
    for bad in ("0", "-3", "eight", "1.5", str(worker_pools.MAX_WORKERS + 1)):
        with pytest.raises(WorkersConfigError, match=worker_pools.WORKERS_ENV):
            parse_workers(bad)


# ----------------------------------------------------------------------------- slots


class Pass:
    """A pass holding its slot until released, recording the order passes got in."""

    def __init__(self, slots: PassSlots, order: list[str], name: str, *, first: bool) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.task = asyncio.create_task(self._run(slots, order, name, first))

    async def _run(self, slots: PassSlots, order: list[str], name: str, first: bool) -> None:
        async with slots.slot(first=first):
            order.append(name)
            self.entered.set()
            await self.release.wait()


async def settle() -> None:
    for _ in range(5):  # let every runnable task take its next step
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_a_started_backfills_pass_goes_before_first_passes_that_waited_longer() -> None:
    slots, order = PassSlots(total=2, first_limit=2), []
    holders = [Pass(slots, order, f"holder{i}", first=False) for i in range(2)]
    await settle()
    new = [Pass(slots, order, f"new{i}", first=True) for i in range(2)]
    await settle()
    woken = Pass(slots, order, "job-finished", first=False)
    await settle()
    assert order == ["holder0", "holder1"]
    assert (slots.waiting(first=True), slots.waiting(first=False)) == (2, 1)

    holders[0].release.set()
    await settle()
    assert order[2:] == ["job-finished"]
    holders[1].release.set()
    await settle()
    assert order[3:] == ["new0"]  # first passes in arrival order
    for p in (woken, *new):
        p.release.set()
    await asyncio.gather(*(p.task for p in (*holders, *new, woken)))
    assert order[4:] == ["new1"]
    assert (slots.in_use, slots.first_in_use) == (0, 0)


@pytest.mark.asyncio
async def test_first_passes_never_take_the_slots_kept_for_started_backfills() -> None:
    slots, order = PassSlots(total=4, first_limit=2), []
    new = [Pass(slots, order, f"new{i}", first=True) for i in range(4)]
    await settle()
    assert order == ["new0", "new1"]  # two slots stay free
    assert slots.waiting(first=True) == 2
    woken = [Pass(slots, order, f"job{i}", first=False) for i in range(2)]
    await settle()
    assert order[2:] == ["job0", "job1"]  # in at once, no first pass to wait for

    woken[0].release.set()
    await settle()
    assert order[4:] == []  # a freed slot is not a first-pass slot
    new[0].release.set()
    await settle()
    assert order[4:] == ["new2"]
    for p in (*new, *woken):
        p.release.set()
    await asyncio.gather(*(p.task for p in (*new, *woken)))
    assert order[5:] == ["new3"]


@pytest.mark.asyncio
async def test_a_pass_cancelled_while_waiting_or_holding_gives_its_place_back() -> None:
    slots, order = PassSlots(total=1, first_limit=1), []
    holder = Pass(slots, order, "holder", first=False)
    await settle()
    gone = Pass(slots, order, "gone", first=False)
    after = Pass(slots, order, "after", first=True)
    await settle()
    gone.task.cancel()
    await settle()
    assert slots.waiting(first=False) == 0
    holder.task.cancel()  # a daemon stopped mid-pass
    await settle()
    assert order == ["holder", "after"]
    after.release.set()
    await asyncio.gather(after.task, holder.task, gone.task, return_exceptions=True)
    assert (slots.in_use, slots.first_in_use) == (0, 0)


def test_slots_refuse_a_first_limit_outside_the_total() -> None:
    with pytest.raises(ValueError):
        PassSlots(total=2, first_limit=3)
    with pytest.raises(ValueError):
        PassSlots(total=2, first_limit=0)


# ----------------------------------------------------------------------------- the operator's pools


@pytest.fixture
def policy_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's policy at its defaults (the CLI's flags write the environment)."""
    for env in (policy.ALLOWED_IMAGES_ENV, policy.ALLOWED_SERVICE_ACCOUNTS_ENV, worker_pools.WORKERS_ENV):
        monkeypatch.delenv(env, raising=False)


@pytest.fixture
def kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real kubeconfig file for the client to load (no server is contacted)."""
    import kubernetes.config.kube_config

    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.setattr(kube, "_pool_maxsize", None)
    kube._api_client.cache_clear()
    yield path
    kube._api_client.cache_clear()


def test_the_kubernetes_client_pool_has_the_configured_size(kubeconfig: Path) -> None:
    kube.configure_pool(23)
    pools: Any = kube._api_client().rest_client.pool_manager
    assert pools.connection_pool_kw["maxsize"] == 23


def test_the_operator_applies_one_sizing_to_its_executors_and_pools(
    kubeconfig: Path, policy_unset: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(worker_pools.WORKERS_ENV, "10")
    monkeypatch.delitem(sys.modules, "dbtbackfill.operator.handlers", raising=False)
    from dbtbackfill.operator import handlers

    sizes = pool_sizes(10)
    assert sizes == handlers.POOLS
    settings = kopf.OperatorSettings()
    handlers.configure_kopf(settings=settings)
    assert settings.execution.max_workers == sizes.handler_workers
    assert handlers.PASS_EXECUTOR._max_workers == handlers.SLOTS.total == sizes.reconcile_workers
    assert handlers.SLOTS.first_limit == sizes.first_pass_slots
    pools: Any = kube._api_client().rest_client.pool_manager
    assert pools.connection_pool_kw["maxsize"] == sizes.api_connections
    assert (handlers.AUDIT.pool_size, handlers.AUDIT.max_overflow) == (sizes.audit_pool_size, sizes.audit_max_overflow)
    handlers.PASS_EXECUTOR.shutdown()


def test_audit_engines_get_the_pool_they_ask_for() -> None:
    url = "postgresql://nobody@127.0.0.1:1/nowhere"  # engines connect lazily: nothing is contacted
    try:
        engine = audit.engine_for(url, pool_size=3, max_overflow=7)
        pool: Any = engine.pool
        assert (pool.size(), pool._max_overflow) == (3, 7)
        assert audit.engine_for(url).pool.size() == 5  # another sizing is another engine
    finally:
        audit.dispose_engines()


def test_a_bad_worker_count_stops_the_operator_with_one_line(policy_unset: None) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dbtbackfill.cli", "operator", "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert worker_pools.WORKERS_ENV in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- Job events


@pytest.mark.asyncio
async def test_only_job_changes_a_pass_acts_on_wake_the_backfill(kubeconfig: Path) -> None:
    from dbtbackfill.operator import handlers

    owner, job_uid = str(uuid.uuid4()), str(uuid.uuid4())
    wake = handlers._wakeups.setdefault(owner, asyncio.Event())
    labels = {jobs.LABEL_BACKFILL_UID: owner, jobs.LABEL_CHUNK: "0", jobs.LABEL_ATTEMPT: "1"}

    async def event(kind: str, **status: Any) -> bool:
        wake.clear()
        body = kopf.Body({"metadata": {"uid": job_uid, "name": "j", "labels": labels}, "status": status})
        await handlers.on_job_event(type=kind, body=body, labels=body.metadata.labels, uid=job_uid)
        return wake.is_set()

    try:
        assert not await event("ADDED")  # the pass that created it
        assert not await event("MODIFIED", active=1, startTime="2024-06-01T10:00:00Z")
        assert await event("MODIFIED", succeeded=1)
        assert not await event("MODIFIED", succeeded=1, conditions=COMPLETE)
        # Labelled settled (it leaves the watch's selector) or its TTL ran out: nothing to act on.
        assert not await event("DELETED", succeeded=1, conditions=COMPLETE)
        assert job_uid not in handlers._job_keys
        assert await event("DELETED", active=1)  # a running Job gone: its chunk is lost
    finally:
        handlers._wakeups.pop(owner, None)


COMPLETE = [{"type": "Complete", "status": "True"}]
