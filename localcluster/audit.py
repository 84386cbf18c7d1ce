"""Reading the API server's audit log (JSON lines, ``Metadata`` level; see `controlplane.AUDIT_POLICY`).

Each request appears once at stage ``ResponseComplete`` (a watch also at ``ResponseStarted``, which
is skipped here). The line is written after the response is sent, so a client that has just got
its answer may have to look again a moment later.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


def read_audit_events(
    path: Path,
    *,
    username: str | None = None,
    verbs: Iterable[str] | None = None,
    namespace: str | None = None,
) -> list[dict[str, Any]]:
    """Completed requests, oldest first; ``username``, ``verbs`` and ``namespace`` filter them."""
    wanted = None if verbs is None else set(verbs)
    events: list[dict[str, Any]] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return events
    for line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue  # the last line may be half-written
        if event.get("stage") != "ResponseComplete":
            continue
        if username is not None and (event.get("user") or {}).get("username") != username:
            continue
        if wanted is not None and event.get("verb") not in wanted:
            continue
        if namespace is not None and (event.get("objectRef") or {}).get("namespace") != namespace:
            continue
        events.append(event)
    return events
