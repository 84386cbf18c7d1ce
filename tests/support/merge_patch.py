"""RFC 7386 JSON merge patch, as the Kubernetes API server applies ``application/merge-patch+json``.

For the unit tests that check what the controller's status patches become on the server (the e2e
tests see the real API server apply them).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def merge_patch(target: Any, patch: Any) -> Any:
    """Objects merge key by key, null deletes a key, anything else replaces; inputs are not modified."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result: dict[str, Any] = copy.deepcopy(dict(target)) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
