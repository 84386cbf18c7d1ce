"""What a DbtBackfill may ask the operator to run: the operator's own policy, on top of RBAC.

Pure: imports neither kopf, kubernetes, SQLAlchemy nor dbt. The controller reads the
configuration (environment / CLI flags) and the referenced Secret's labels, and calls
:func:`refusal` before it creates any Job.

Why: a chunk Job runs with whatever image, ServiceAccount and Secret its DbtBackfill names,
and the operator (not the user) creates it. Without a policy, anyone allowed to create a
DbtBackfill in a namespace could run any image as any ServiceAccount of that namespace, with
any Secret of that namespace in its environment, none of which their own RBAC may allow.

- Images: the operator's default image, plus the configured list. An entry is an exact image
  reference (``registry.example/dbt:1.2``) or a prefix ending in ``*``
  (``registry.example/team/*`` allows every image under ``registry.example/team/``).
- ServiceAccounts: the operator's default Job ServiceAccount, plus the configured names.
- Secrets: ``spec.databaseSecretRef`` must name a Secret labelled
  ``dbt-backfill.io/warehouse: "true"``, so only Secrets meant for backfills can reach a Job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from dbtbackfill.core.spec import BackfillSpec, SpecError

WAREHOUSE_LABEL: Final = "dbt-backfill.io/warehouse"
WAREHOUSE_LABEL_VALUE: Final = "true"
ALLOWED_IMAGES_ENV: Final = "DBT_BACKFILL_ALLOWED_IMAGES"
ALLOWED_SERVICE_ACCOUNTS_ENV: Final = "DBT_BACKFILL_ALLOWED_SERVICE_ACCOUNTS"
_SERVICE_ACCOUNT_RE: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SHOWN: Final = 5  # entries named in a refusal; the rest are counted


class PolicyRefusal(SpecError):
    """A spec the operator's policy refuses: reported like an invalid spec, and no Job runs."""


class SecretRefusal(PolicyRefusal):
    """The database Secret is missing or unlabelled: may change without the spec changing."""


class PolicyConfigError(ValueError):
    """The operator's policy configuration is malformed (a one-line message)."""


@dataclass(frozen=True)
class JobPolicy:
    """Images and ServiceAccounts a chunk Job may use. The defaults are always allowed."""

    default_image: str
    default_service_account: str
    images: tuple[str, ...] = ()
    service_accounts: frozenset[str] = frozenset()

    def allows_image(self, image: str) -> bool:
        return image == self.default_image or any(_image_matches(image, entry) for entry in self.images)

    def allows_service_account(self, name: str) -> bool:
        return name == self.default_service_account or name in self.service_accounts


def _image_matches(image: str, entry: str) -> bool:
    if entry.endswith("*"):
        return image.startswith(entry[:-1])
    return image == entry


def parse_list(text: str | None) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``: comma-separated, blanks ignored."""
    return tuple(item.strip() for item in (text or "").split(",") if item.strip())


def build_policy(
    default_image: str, default_service_account: str, images: str | None, service_accounts: str | None
) -> JobPolicy:
    """The policy from its configured text; raises :class:`PolicyConfigError` when malformed."""
    image_entries = parse_list(images)
    for entry in image_entries:
        if "*" in entry[:-1] or any(c.isspace() for c in entry):
            raise PolicyConfigError(
                f"{ALLOWED_IMAGES_ENV}: {entry!r} is not an image or a prefix ending in '*' "
                "(e.g. registry.example/team/*)"
            )
        if entry == "*":
            raise PolicyConfigError(f"{ALLOWED_IMAGES_ENV}: '*' would allow every image; list registries or images")
    accounts = parse_list(service_accounts)
    for name in accounts:
        if len(name) > 253 or not _SERVICE_ACCOUNT_RE.fullmatch(name):
            raise PolicyConfigError(f"{ALLOWED_SERVICE_ACCOUNTS_ENV}: {name!r} is not a ServiceAccount name")
    return JobPolicy(default_image, default_service_account, image_entries, frozenset(accounts))


def _listing(items: Iterable[str]) -> str:
    ordered = list(dict.fromkeys(items))
    shown = ", ".join(ordered[:_SHOWN])
    return shown + (f" (and {len(ordered) - _SHOWN} more)" if len(ordered) > _SHOWN else "")


def spec_refusal(spec: BackfillSpec, policy: JobPolicy) -> str | None:
    """Why the operator will not run this spec's image or ServiceAccount, or None."""
    image = spec.image or policy.default_image
    if not policy.allows_image(image):
        return (
            f"spec.image: {image!r} is not allowed by the operator's policy; allowed: "
            f"{_listing([policy.default_image, *policy.images])} (the operator's {ALLOWED_IMAGES_ENV})"
        )
    account = spec.service_account_name or policy.default_service_account
    if not policy.allows_service_account(account):
        return (
            f"spec.serviceAccountName: {account!r} is not allowed by the operator's policy; allowed: "
            f"{_listing([policy.default_service_account, *sorted(policy.service_accounts)])} "
            f"(the operator's {ALLOWED_SERVICE_ACCOUNTS_ENV})"
        )
    return None


def secret_refusal(spec: BackfillSpec, labels: Mapping[str, str] | None) -> str | None:
    """Why the database Secret may not reach a chunk Job, or None.

    ``labels`` are the Secret's labels, or None when the Secret does not exist.
    """
    where = f"spec.databaseSecretRef.name: Secret {spec.secret_name!r}"
    if labels is None:
        return f"{where} does not exist in this namespace; create it with the label {WAREHOUSE_LABEL}=true"
    if labels.get(WAREHOUSE_LABEL) != WAREHOUSE_LABEL_VALUE:
        return (
            f"{where} is not labelled {WAREHOUSE_LABEL}=true; only Secrets with that label may be used by "
            f"backfills (kubectl label secret {spec.secret_name} {WAREHOUSE_LABEL}=true)"
        )
    return None
