"""Waiting for a real cluster to get somewhere: poll a function until it returns something truthy."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import kubernetes.client
from kubernetes.client.exceptions import ApiException

T = TypeVar("T")


def wait_for(
    check: Callable[[], T | None], *, timeout: float = 30, interval: float = 0.1, message: str | Callable[[], str] = ""
) -> T:
    """``check()``'s first truthy result; TimeoutError (with ``message``) after ``timeout`` seconds.

    An API error inside ``check`` (an object not created yet) counts as "not yet" until the deadline;
    any other exception is a bug in the check and propagates.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except ApiException as e:  # not there yet
            last_error = e
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"not reached in {timeout:.0f} s: {text} (last error: {last_error!r})")
        time.sleep(interval)


def wait_established(client: kubernetes.client.ApiClient, crd_name: str, *, timeout: float = 60) -> None:
    """Until the API server serves ``crd_name`` (its ``Established`` condition is True).

    Not `kubectl wait --for=condition=Established`: right after the CRD's creation its status may have
    no conditions yet, and kubectl then fails at once ("accessor error") instead of waiting.
    """
    api = kubernetes.client.ApiextensionsV1Api(client)

    def established() -> bool:
        conditions = api.read_custom_resource_definition(crd_name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_for(established, timeout=timeout, message=f"CRD {crd_name} Established")
