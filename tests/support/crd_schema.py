"""A CRD's structural OpenAPI v3 schema as JSON Schema 2020-12, as strict as we want the API server.

The API server prunes fields a structural schema does not declare; here they are errors
(``additionalProperties: false``), so a typo in a spec, a sample or an example fails a test
instead of being silently dropped. Kubernetes extensions map to their JSON Schema meaning:
``nullable`` adds ``null``, ``x-kubernetes-int-or-string`` is integer-or-string, and
``x-kubernetes-preserve-unknown-fields`` keeps an object open. Values (``default``, ``enum``,
``example``) are copied as data, never converted as if they were schemas.
"""

from __future__ import annotations

import copy
from typing import Any

_SUBSCHEMA_KEYS = ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not")


def openapi_to_jsonschema(node: dict[str, Any], *, resource: bool = False) -> dict[str, Any]:
    """``node`` (a whole ``openAPIV3Schema`` with ``resource=True``, or any part of one) as JSON Schema.

    With ``resource=True`` the root also accepts ``apiVersion``, ``kind`` and any ``metadata``:
    the API server checks object metadata itself, and the CRD declares it as a bare object.
    """
    out: dict[str, Any] = _convert(node)
    if resource:
        properties = out.setdefault("properties", {})
        properties.setdefault("apiVersion", {"type": "string"})
        properties.setdefault("kind", {"type": "string"})
        properties["metadata"] = {"type": "object"}
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return out


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMA_KEYS:
            out[key] = _convert(value)
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    is_object = node.get("type") == "object" or "properties" in node
    open_object = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
    if is_object and not open_object:
        out["additionalProperties"] = False
        out.setdefault("properties", {})
    return out
