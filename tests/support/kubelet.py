"""A test "kubelet": a Job controller that runs ``batch/v1`` Jobs as local subprocesses.

It talks to the API only over HTTP with the official ``kubernetes`` client (so it works against
`tests.support.kubeapi.KubeAPI` or any cluster a kubeconfig points to), polling the Jobs of one
namespace every ``poll_interval`` seconds. For each Job that is not finished, not suspended and
not being deleted -- oldest first (by creationTimestamp, then name), at most ``max_parallel`` at
a time -- it:

1. patches ``/status`` with ``active: 1`` and ``startTime``;
2. runs ``containers[0].command + args`` as a subprocess (``$(VAR)`` references expanded, a
   ``python``/``python3`` argv[0] replaced by ``sys.executable``) with ``cwd`` = the configured
   repo root and env = ``os.environ`` + the container's ``env``/``envFrom`` (plain values,
   ``secretKeyRef``/``configMapKeyRef`` read through the API -- Secret ``data`` base64-decoded, or
   ``stringData`` -- and ``fieldRef`` for metadata) + the kubelet's own overrides;
3. kills it (SIGKILL to its process group) when ``activeDeadlineSeconds`` passes since start,
   when the Job is deleted (or gets a ``deletionTimestamp``), or when the kubelet stops;
4. patches ``/status`` as the real Job controller does (with ``backoffLimit: 0``, no retries):
   success: ``succeeded: 1``, ``completionTime`` and ``SuccessCriteriaMet`` + ``Complete``;
   failure: ``failed: 1`` and ``FailureTarget`` + ``Failed`` with reason ``BackoffLimitExceeded``
   (or ``DeadlineExceeded``); like a real cluster, ``completionTime`` is only set on success.
   Unlike a real cluster, the Failed message ends with the exit code and the stderr tail;
5. deletes the Jobs it ran ``ttlSecondsAfterFinished`` seconds after they finished (the TTL
   controller; Jobs finished before the kubelet started are not collected).

Deviations: no Pods are created (nothing to ``kubectl logs``); ``workingDir``, images, resources,
other volume types and retries (``backoffLimit`` > 0) are ignored; paths hard-coded in the
program (not passed via env/args) are not redirected to the emptyDir directories; a Secret or
ConfigMap that cannot be resolved fails the Job at once (a real Pod would hang in
CreateContainerConfigError until the deadline).

Each run is recorded as a `JobRun` (name, argv, monotonic start/end, exit code, outcome,
stdout/stderr) for assertions, e.g. ``kubelet.max_concurrent()``.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Self

import kubernetes.client
import kubernetes.config

logger = logging.getLogger(__name__)

JSON = dict[str, Any]
USER_AGENT = "tests-kubelet"  # the User-Agent of its API requests (to tell its writes apart)
_PYTHON = re.compile(r"python(3(\.\d+)?)?")
_VAR_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubernetes-style ``$(VAR)`` expansion; unknown references stay as they are."""
    return _VAR_REFERENCE.sub(lambda m: variables.get(m[1], m[0]), text)


def is_finished(job: Mapping[str, Any]) -> bool:
    status = job.get("status") or {}
    if status.get("succeeded") or status.get("failed"):
        return True
    return any(
        c.get("type") in {"Complete", "Failed"} and c.get("status") == "True" for c in status.get("conditions") or []
    )


class JobConfigError(Exception):
    """The Job's container cannot be started (a missing Secret key, no command...)."""


@dataclasses.dataclass
class JobRun:
    """One execution of a Job by the kubelet (times are ``time.monotonic()``)."""

    namespace: str
    name: str
    uid: str
    argv: list[str]
    env: dict[str, str]  # what the container spec and the overrides added (not os.environ)
    start: float
    end: float | None = None
    exit_code: int | None = None
    outcome: str | None = None  # succeeded, failed, deadline, deleted, stopped, config-error
    stdout: str = ""
    stderr: str = ""
    mounts: dict[str, str] = dataclasses.field(default_factory=dict)  # emptyDir mountPath -> host dir
    pid: int | None = None  # set once the subprocess is started
    reported: bool = False  # the run is over and its Job status has been patched (if applicable)

    @property
    def finished(self) -> bool:
        return self.reported

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start


@dataclasses.dataclass
class _Active:
    run: JobRun
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    reason: str | None = None
    thread: threading.Thread | None = None

    def kill(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop.set()


class Kubelet:
    """Runs the Jobs of ``namespace`` as subprocesses; start/stop it or use it as a context manager."""

    def __init__(
        self,
        kubeconfig: str | os.PathLike[str],
        *,
        namespace: str = "default",
        cwd: str | os.PathLike[str] = ".",
        env: Mapping[str, str] | None = None,
        max_parallel: int = 4,
        poll_interval: float = 0.1,
        label_selector: str | None = None,
        python: str = sys.executable,
        stderr_tail_lines: int = 20,
        scratch_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.namespace = namespace
        self.cwd = pathlib.Path(cwd)
        self.env = dict(env or {})
        self.max_parallel = max_parallel
        self.poll_interval = poll_interval
        self.label_selector = label_selector
        self.python = python
        self.stderr_tail_lines = stderr_tail_lines
        self.errors: list[BaseException] = []
        self._kubeconfig = str(kubeconfig)
        self._own_scratch = scratch_dir is None
        self._scratch_root = pathlib.Path(scratch_dir) if scratch_dir is not None else None
        self._api: kubernetes.client.ApiClient | None = None
        self._lock = threading.Lock()
        self._runs: list[JobRun] = []
        self._active: dict[str, _Active] = {}
        self._done: set[str] = set()  # uids that were run (or found finished): never run again
        self._stopping = threading.Event()
        self._poller: threading.Thread | None = None
        self._ttl_due: dict[str, tuple[str, float]] = {}  # uid -> (name, monotonic deadline)
        self.ttl_deleted: list[str] = []  # names of Jobs deleted by the TTL-after-finished emulation

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> Self:
        if self._scratch_root is None:
            self._scratch_root = pathlib.Path(tempfile.mkdtemp(prefix="kubelet-"))
        self._scratch_root.mkdir(parents=True, exist_ok=True)
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=self._kubeconfig, client_configuration=configuration
        )
        configuration.connection_pool_maxsize = self.max_parallel + 4
        self._api = kubernetes.client.ApiClient(configuration)
        self._api.user_agent = USER_AGENT
        self._poller = threading.Thread(target=self._poll_forever, name="kubelet-poller", daemon=True)
        self._poller.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling, kill running children (outcome ``stopped``), join all threads."""
        self._stopping.set()
        if self._poller is not None:
            self._poller.join(timeout)
        with self._lock:
            actives = list(self._active.values())
        for active in actives:
            active.kill("stopped")
        for active in actives:
            if active.thread is not None:
                active.thread.join(timeout)
        alive = [a.run.name for a in actives if a.thread is not None and a.thread.is_alive()]
        if self._poller is not None and self._poller.is_alive():
            alive.append("poller")
        self._poller = None
        if self._api is not None:
            self._api.close()  # type: ignore[no-untyped-call]
            self._api = None
        if self._own_scratch and self._scratch_root is not None and not alive:
            shutil.rmtree(self._scratch_root, ignore_errors=True)
            self._scratch_root = None
        if alive:
            raise RuntimeError(f"kubelet threads did not stop: {alive}")

    # -- observations -----------------------------------------------------------------------------

    @property
    def runs(self) -> list[JobRun]:
        """All runs so far (copies), in the order they started."""
        with self._lock:
            return [copy.copy(run) for run in self._runs]

    def run_of(self, name: str) -> JobRun | None:
        with self._lock:
            found = [run for run in self._runs if run.name == name]
        return copy.copy(found[-1]) if found else None

    def wait_for_run(self, name: str, *, timeout: float = 5.0, finished: bool = True) -> JobRun:
        """Wait until the Job ``name`` is over and reported, or (``finished=False``) its process runs."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.run_of(name)
            if run is not None and (run.finished or (not finished and run.pid is not None)):
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {name!r} was not {'run' if finished else 'started'} in {timeout}s")
            time.sleep(0.02)

    def running(self) -> list[str]:
        with self._lock:
            return sorted(active.run.name for active in self._active.values())

    def max_concurrent(self) -> int:
        """The highest number of Job subprocesses that were running at the same time."""
        now = time.monotonic()
        edges: list[tuple[float, int]] = []
        for run in self.runs:
            edges.append((run.start, 1))
            edges.append((run.end if run.end is not None else now, -1))
        current = peak = 0
        for _, delta in sorted(edges):  # at equal times, -1 sorts first: touching runs do not overlap
            current += delta
            peak = max(peak, current)
        return peak

    # -- polling ----------------------------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> JSON:
        """Call an API method for raw JSON (no model deserialization), releasing the connection."""
        response = fn(*args, _preload_content=False, **kwargs)
        try:
            data: JSON = json.loads(response.data or b"{}")
        finally:
            response.release_conn()
        return data

    def _poll_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                self._poll_once()
            except Exception as e:
                if not self._stopping.is_set():
                    logger.exception("kubelet: polling failed")
                    self.errors.append(e)
            self._stopping.wait(self.poll_interval)

    def _poll_once(self) -> None:
        batch = kubernetes.client.BatchV1Api(self._api)
        self._collect_expired(batch)
        kwargs = {"label_selector": self.label_selector} if self.label_selector else {}
        jobs: list[JSON] = self._call(batch.list_namespaced_job, self.namespace, **kwargs).get("items", [])
        jobs.sort(key=lambda job: (job["metadata"].get("creationTimestamp", ""), job["metadata"]["name"]))
        present = {job["metadata"]["uid"] for job in jobs}
        with self._lock:
            for uid, active in self._active.items():
                if uid not in present:
                    active.kill("deleted")
        for job in jobs:
            meta = job["metadata"]
            uid = meta["uid"]
            with self._lock:
                running = self._active.get(uid)
                if running is not None:
                    if meta.get("deletionTimestamp"):
                        running.kill("deleted")
                    continue
                if uid in self._done:
                    continue
                if is_finished(job):
                    self._done.add(uid)
                    continue
                if (job.get("spec") or {}).get("suspend") or meta.get("deletionTimestamp"):
                    continue
                if len(self._active) >= self.max_parallel or self._stopping.is_set():
                    continue
                run = JobRun(self.namespace, meta["name"], uid, [], {}, start=time.monotonic())
                active = _Active(run)
                self._active[uid] = active
                self._done.add(uid)
                self._runs.append(run)
            active.thread = threading.Thread(
                target=self._run_job, args=(job, active), name=f"kubelet-{meta['name']}", daemon=True
            )
            active.thread.start()

    def _collect_expired(self, batch: kubernetes.client.BatchV1Api) -> None:
        """The TTL-after-finished controller: delete finished Jobs ``ttlSecondsAfterFinished`` later."""
        now = time.monotonic()
        with self._lock:
            due = [(uid, name) for uid, (name, deadline) in self._ttl_due.items() if deadline <= now]
            for uid, _ in due:
                del self._ttl_due[uid]
        for uid, name in due:
            body = {"propagationPolicy": "Background", "preconditions": {"uid": uid}}
            try:
                self._call(batch.delete_namespaced_job, name, self.namespace, body=body)
            except kubernetes.client.ApiException as e:
                if e.status not in {404, 409}:  # gone already, or replaced by a namesake
                    raise
            else:
                self.ttl_deleted.append(name)

    # -- running ----------------------------------------------------------------------------------

    def _run_job(self, job: JSON, active: _Active) -> None:
        run = active.run
        start_time = _now()
        try:
            if not self._patch_status(run, {"active": 1, "ready": 0, "startTime": start_time}):
                active.kill("deleted")
                run.outcome = "deleted"
                return
            scratch = pathlib.Path(tempfile.mkdtemp(prefix=f"{run.name}-", dir=self._scratch_root))
            try:
                run.argv, run.env, run.mounts = self._command(job, scratch)
            except JobConfigError as e:
                run.outcome = "config-error"
                run.stderr = str(e)
                self._patch_status(run, self._failed_status(start_time, "BackoffLimitExceeded", str(e)))
                return
            self._execute(job, active)
            if active.reason in {"deleted", "stopped"}:
                run.outcome = active.reason
            elif active.reason == "deadline":
                run.outcome = "deadline"
                message = "Job was active longer than specified deadline"
                self._patch_status(run, self._failed_status(start_time, "DeadlineExceeded", message))
            elif run.exit_code == 0:
                run.outcome = "succeeded"
                self._patch_status(run, self._succeeded_status(start_time))
            else:
                run.outcome = "failed"
                tail = "\n".join(run.stderr.splitlines()[-self.stderr_tail_lines :])[-4000:]
                message = f"Job has reached the specified backoff limit; exit code {run.exit_code}; stderr: {tail}"
                self._patch_status(run, self._failed_status(start_time, "BackoffLimitExceeded", message))
        except Exception as e:
            if not self._stopping.is_set():
                logger.exception("kubelet: running job %s failed", run.name)
                self.errors.append(e)
            run.outcome = run.outcome or "error"
        finally:
            ttl = (job.get("spec") or {}).get("ttlSecondsAfterFinished")
            with self._lock:
                run.end = run.end if run.end is not None else time.monotonic()
                run.reported = True
                self._active.pop(run.uid, None)
                if ttl is not None and run.outcome in {"succeeded", "failed", "deadline", "config-error"}:
                    self._ttl_due[run.uid] = (run.name, time.monotonic() + float(ttl))

    def _execute(self, job: JSON, active: _Active) -> None:
        run = active.run
        deadline_seconds = (job.get("spec") or {}).get("activeDeadlineSeconds")
        deadline = None if deadline_seconds is None else run.start + float(deadline_seconds)
        env = {**os.environ, **run.env}
        if active.stop.is_set():
            return
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen(
                run.argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,  # its own process group: killed as a whole
            )
            run.pid = process.pid
            try:
                while process.poll() is None:
                    if deadline is not None and time.monotonic() >= deadline:
                        active.kill("deadline")
                    if active.stop.wait(0.02):
                        break
            finally:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                run.end = time.monotonic()
            run.exit_code = process.returncode
            stdout.seek(0)
            stderr.seek(0)
            run.stdout = stdout.read().decode("utf-8", "replace")
            run.stderr = stderr.read().decode("utf-8", "replace")

    def _command(self, job: JSON, scratch: pathlib.Path) -> tuple[list[str], dict[str, str], dict[str, str]]:
        """(argv, env, emptyDir mounts as {mountPath: host dir}) for the Job's first container."""
        pod_spec = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
        containers = pod_spec.get("containers") or []
        if not containers:
            raise JobConfigError("the Job has no containers")
        container = containers[0]

        # emptyDir volumes: a private directory per run; paths under the mountPath in env values
        # and arguments are rewritten to it (a process cannot have its own mount namespace here).
        volumes = {volume.get("name"): volume for volume in pod_spec.get("volumes") or []}
        mounts: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name"))
            if volume is not None and "emptyDir" in volume:
                host_dir = scratch / str(volume["name"])
                host_dir.mkdir(parents=True, exist_ok=True)
                mounts[str(mount["mountPath"]).rstrip("/") or "/"] = str(host_dir)

        def remap(value: str) -> str:
            for mount_path in sorted(mounts, key=len, reverse=True):
                if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                    return mounts[mount_path] + value[len(mount_path) :]
            return value

        env: dict[str, str] = {}
        if "/tmp" in mounts:  # the pod's /tmp, not ours
            env["TMPDIR"] = mounts["/tmp"]
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix") or ""
            if "secretRef" in source:
                values = self._secret(source["secretRef"]["name"], optional=source["secretRef"].get("optional"))
            elif "configMapRef" in source:
                values = self._configmap(
                    source["configMapRef"]["name"], optional=source["configMapRef"].get("optional")
                )
            else:
                values = {}
            env.update({prefix + key: value for key, value in values.items()})
        for item in container.get("env") or []:
            value = self._env_value(job, item, env)
            if value is not None:
                env[item["name"]] = remap(value) if "valueFrom" not in item else value
        env.update(self.env)
        arguments = (container.get("command") or []) + (container.get("args") or [])
        argv = [remap(_expand(str(arg), env)) for arg in arguments]
        if not argv:
            raise JobConfigError("the container has no command (images' entrypoints are not known here)")
        if _PYTHON.fullmatch(pathlib.PurePath(argv[0]).name):
            argv[0] = self.python
        return argv, env, mounts

    def _env_value(self, job: JSON, item: Mapping[str, Any], defined: Mapping[str, str]) -> str | None:
        if "valueFrom" not in item:
            return _expand(str(item.get("value", "")), defined)
        source = item["valueFrom"]
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            ref = source.get("secretKeyRef") or source["configMapKeyRef"]
            optional = bool(ref.get("optional"))
            read = self._secret if "secretKeyRef" in source else self._configmap
            values = read(ref["name"], optional=optional)
            if ref["key"] not in values:
                if optional:
                    return None
                what = "secret" if "secretKeyRef" in source else "configmap"
                raise JobConfigError(f"couldn't find key {ref['key']} in {what} {self.namespace}/{ref['name']}")
            return str(values[ref["key"]])
        if "fieldRef" in source:
            path = source["fieldRef"].get("fieldPath", "")
            meta = job["metadata"]
            fields: dict[str, str] = {
                "metadata.name": f"{meta['name']}-pod",
                "metadata.namespace": self.namespace,
                "metadata.uid": str(meta["uid"]),
            }
            return fields.get(path, "")
        return ""

    def _secret(self, name: str, *, optional: bool | None = False) -> dict[str, str]:
        core = kubernetes.client.CoreV1Api(self._api)
        try:
            secret = self._call(core.read_namespaced_secret, name, self.namespace)
        except kubernetes.client.ApiException as e:
            if e.status == 404 and optional:
                return {}
            raise JobConfigError(f'secret "{name}" not found') from e
        values = {key: base64.b64decode(value).decode("utf-8") for key, value in (secret.get("data") or {}).items()}
        values.update(secret.get("stringData") or {})  # the real API folds stringData into data
        return values

    def _configmap(self, name: str, *, optional: bool | None = False) -> dict[str, str]:
        core = kubernetes.client.CoreV1Api(self._api)
        try:
            configmap = self._call(core.read_namespaced_config_map, name, self.namespace)
        except kubernetes.client.ApiException as e:
            if e.status == 404 and optional:
                return {}
            raise JobConfigError(f'configmap "{name}" not found') from e
        return dict(configmap.get("data") or {})

    # -- status -----------------------------------------------------------------------------------

    def _patch_status(self, run: JobRun, status: JSON) -> bool:
        """Patch the Job's status; False if the Job is gone."""
        batch = kubernetes.client.BatchV1Api(self._api)
        try:
            self._call(batch.patch_namespaced_job_status, run.name, self.namespace, {"status": status})
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    @staticmethod
    def _condition(kind: str, reason: str, message: str) -> JSON:
        now = _now()
        return {
            "type": kind,
            "status": "True",
            "lastProbeTime": now,
            "lastTransitionTime": now,
            "reason": reason,
            "message": message,
        }

    def _succeeded_status(self, start_time: str) -> JSON:
        message = "Reached expected number of succeeded pods"
        return {
            "active": None,
            "ready": 0,
            "succeeded": 1,
            "startTime": start_time,
            "completionTime": _now(),
            "conditions": [
                self._condition("SuccessCriteriaMet", "CompletionsReached", message),
                self._condition("Complete", "CompletionsReached", message),
            ],
        }

    def _failed_status(self, start_time: str, reason: str, message: str) -> JSON:
        return {
            "active": None,
            "ready": 0,
            "failed": 1,
            "startTime": start_time,
            "conditions": [
                self._condition("FailureTarget", reason, message),
                self._condition("Failed", reason, message),
            ],
        }
