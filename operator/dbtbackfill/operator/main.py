"""``dbt-backfill operator``: run the kopf operator with metrics, liveness and log format.

Handlers are imported as a module (the equivalent of ``kopf run -m dbtbackfill.operator.handlers``),
never by file path, which would put a source folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
from typing import Any


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the backfill (kopf's object) and chunk when known."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        k8s = getattr(record, "k8s_ref", None)
        if isinstance(k8s, dict):
            entry["backfill"] = f"{k8s.get('namespace')}/{k8s.get('name')}"
        for key in ("chunk", "attempt"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def apply_policy_flags(args: argparse.Namespace) -> str | None:
    """Let the CLI flags override the policy's and the worker count's environment variables
    (the handlers read the environment at import), and check the result. Returns the one-line
    error, if any."""
    from dbtbackfill.operator import jobs, policy, worker_pools
    from dbtbackfill.operator.controller import OperatorConfig

    for flag, env in (
        (args.allowed_images, policy.ALLOWED_IMAGES_ENV),
        (args.allowed_service_accounts, policy.ALLOWED_SERVICE_ACCOUNTS_ENV),
        (args.workers, worker_pools.WORKERS_ENV),
    ):
        if flag is not None:
            os.environ[env] = flag
    try:
        OperatorConfig.from_env()
    except (policy.PolicyConfigError, worker_pools.WorkersConfigError, jobs.SettleConfigError) as exc:
        return str(exc)
    return None


def run_operator(args: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import start_http_server

    error = apply_policy_flags(args)
    if error:
        print(f"dbt-backfill operator: {error}", file=sys.stderr)
        return 2
    configure_logging(args.log_format)
    # `kill -USR1 <pid>` prints every thread's stack: the first thing to look at when it hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import dbtbackfill.operator.handlers  # registers the handlers with kopf
    import dbtbackfill.operator.queue_handlers  # noqa: F401  # and the DbtBackfillQueue's

    if args.metrics_port:
        start_http_server(args.metrics_port)
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        clusterwide=bool(args.all_namespaces),
        namespaces=args.namespace or ([] if args.all_namespaces else ["default"]),
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
    )
    return 0
