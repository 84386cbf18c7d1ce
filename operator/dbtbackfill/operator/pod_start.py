"""Whether a chunk Job's Pods started, are still alive, and why they never started.

Pure: reads Pod and Event objects as plain dicts from the API.

A Pod that never starts leaves its Job active with nothing to show for it: the kubelet keeps
it waiting (``CreateContainerConfigError`` for a missing Secret key, ``ErrImageNeverPull`` or
``ImagePullBackOff`` for an unknown image), the scheduler leaves it ``Unschedulable``, or the
Job controller cannot create it at all (a missing ServiceAccount: ``FailedCreate`` Events on
the Job, no Pod). These are the reasons a user needs to see.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

# Waiting reasons that are progress, not a problem.
_NORMAL_WAITING: Final = frozenset({"ContainerCreating", "PodInitializing"})
_TERMINAL_POD_PHASES: Final = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class PodsReport:
    """What the Pods of one Job (chunk attempt) tell."""

    started: bool  # a container ran (running or terminated) in some Pod
    alive: bool  # some Pod has not finished: it may run dbt now or later
    problem: str | None  # why no Pod started, as the kubelet, scheduler or Job controller said


def _statuses(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    status = pod.get("status") or {}
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def pod_started(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") in ("Running", "Succeeded"):
        return True
    for cs in _statuses(pod):
        state = cs.get("state") or {}
        if state.get("running") or state.get("terminated"):
            return True
    return False


def pod_alive(pod: Mapping[str, Any]) -> bool:
    """Not Succeeded or Failed: a Pod being deleted still runs until its grace period ends."""
    return (pod.get("status") or {}).get("phase") not in _TERMINAL_POD_PHASES


def _reason(reason: Any, message: Any) -> str:
    text = str(message or "").strip()
    return f"{reason}: {text}" if text else str(reason)


def pod_problem(pod: Mapping[str, Any]) -> str | None:
    for cs in _statuses(pod):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason and reason not in _NORMAL_WAITING:
            return _reason(reason, waiting.get("message"))
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return _reason(condition.get("reason") or "Unschedulable", condition.get("message"))
    return None


def _event_time(event: Mapping[str, Any]) -> str:
    return str(event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp") or "")


def failed_create(events: Iterable[Mapping[str, Any]]) -> str | None:
    """The Job controller's latest ``FailedCreate`` Event on the Job, if any."""
    mine = [e for e in events if e.get("reason") == "FailedCreate"]
    if not mine:
        return None
    latest = max(mine, key=_event_time)
    return _reason("FailedCreate", latest.get("message"))


def report(pods: Sequence[Mapping[str, Any]], events: Iterable[Mapping[str, Any]] = ()) -> PodsReport:
    """Pods of one Job, and Events about that Job, reduced to what the reconciler needs."""
    problem = next((p for pod in pods if (p := pod_problem(pod))), None) or failed_create(events)
    return PodsReport(
        started=any(pod_started(p) for p in pods),
        alive=any(pod_alive(p) for p in pods),
        problem=problem,
    )
