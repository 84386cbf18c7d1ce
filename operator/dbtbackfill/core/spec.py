"""The ``spec`` of a DbtBackfill custom resource, parsed and re-validated.

Pure: imports neither kopf, kubernetes, SQLAlchemy nor dbt.

The CRD schema and its CEL rules (crds/dbtbackfills.dbt-backfill.io.yaml) already reject bad
specs, but CEL may be off on old clusters, objects may predate a rule, and the CLI parses specs
from files. So :func:`parse_spec` checks everything the schema checks, in the same terms, and
the unit tests hold the two in agreement (every invalid sample manifest must fail both).

Errors are :class:`SpecError` with a one-line message that starts with the offending field,
e.g. ``spec.endDate: start_date must be <= end_date``.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal
from typing import Any, Final, cast

from dbtbackfill.core.planner import (
    CELL_ORDERS,
    MAX_TENANTS,
    MAX_WINDOWS,
    TENANT_ID_PATTERN,
    Cell,
    CellOrder,
    ChunkUnit,
    PlanError,
    Window,
    parse_date,
    plan_cells,
    plan_windows,
    validate_range,
    validate_tenant_id,
    validate_unit,
)

# The CRD's range rule (`self.endDate - self.startDate <= duration('87816h')`) allows this many
# days, inclusive: exactly as many as the planner allows daily chunks.
MAX_RANGE_DAYS: Final = MAX_WINDOWS

# How long a chunk Job may go without a Pod that started (Secret key missing, image unknown,
# unschedulable, no ServiceAccount) before that attempt counts as failed.
DEFAULT_START_DEADLINE_SECONDS: Final = 600
MAX_START_DEADLINE_SECONDS: Final = 86400

# Key in the database Secret read when databaseSecretRef.key is omitted.
DEFAULT_DATABASE_URL_KEY: Final = "DATABASE_URL"

MODEL_SELECTOR_PATTERN: Final = r"^[A-Za-z0-9_.:+*@/,=][A-Za-z0-9_.:+*@/,=-]*$"
MAX_MODELS: Final = 50
MAX_MODEL_LENGTH: Final = 200

# Kubernetes name and value shapes, as in the CRD.
_DNS_SUBDOMAIN_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SECRET_KEY_RE: Final = re.compile(r"^[-._a-zA-Z0-9]+$")
_LABEL_VALUE_RE: Final = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# The CRD's quantity pattern: what the API server's quantity parser and Pod validation accept
# (no sign but '+', an integral exponent that fits its int32).
_QUANTITY_RE: Final = re.compile(
    r"^\+?(?P<number>([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(?P<suffix>([KMGTPE]i)|[numkMGTPE]|([eE][-+]?[0-9]{1,9}))?$"
)
_QUANTITY_SUFFIXES: Final = {
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: Decimal(10) ** e for s, e in (("n", -9), ("u", -6), ("m", -3), ("k", 3), ("M", 6), ("G", 9))},
    **{s: Decimal(10) ** e for s, e in (("T", 12), ("P", 15), ("E", 18), ("", 0))},
}
# Enough range for every exponent the pattern admits.
_QUANTITY_CONTEXT: Final = Context(prec=60, Emax=MAX_EMAX, Emin=MIN_EMIN)
_STANDARD_RESOURCES: Final = frozenset({"cpu", "memory", "ephemeral-storage"})
_HUGEPAGES_RE: Final = re.compile(r"^hugepages-[0-9]+(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
MAX_RESOURCES: Final = 16
# A label key (a qualified name): optional DNS subdomain prefix (at most 253) and '/', then a
# name of at most 63 characters, as k8s.io/apimachinery/pkg/util/validation checks it.
_QUALIFIED_NAME_RE: Final = re.compile(
    r"^((?P<prefix>[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*)/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
MAX_NODE_SELECTOR: Final = 64
_MODEL_RE: Final = re.compile(MODEL_SELECTOR_PATTERN)
_TENANT_RE: Final = re.compile(TENANT_ID_PATTERN)
_ASCII_DATE_RE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_NO_SPACE_RE: Final = re.compile(r"^\S+$")
# spec.queueName becomes a label value on the chunk Jobs: a DNS-1123 label (at most 63).
_DNS_LABEL_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MIN_PRIORITY: Final = -1000
MAX_PRIORITY: Final = 1000

SPEC_FIELDS: Final = frozenset(
    {
        "startDate",
        "endDate",
        "tenantId",
        "tenantIds",
        "tenantIdsFrom",
        "order",
        "models",
        "chunk",
        "parallelism",
        "retry",
        "activeDeadlineSeconds",
        "startDeadlineSeconds",
        "image",
        "databaseSecretRef",
        "suspend",
        "dryRun",
        "allowRecent",
        "verify",
        "allowFullRebuild",
        "allowCrossWindow",
        "ttlSecondsAfterFinished",
        "threads",
        "resources",
        "serviceAccountName",
        "nodeSelector",
        "tolerations",
        "retryFailed",
        # DbtBackfillQueue membership (queue_admission.py)
        "queueName",
        "priority",
    }
)
_CHUNK_FIELDS: Final = frozenset({"unit", "size"})
_RETRY_FIELDS: Final = frozenset({"limit", "backoffSeconds", "maxBackoffSeconds"})
_SECRET_REF_FIELDS: Final = frozenset({"name", "key"})
_RESOURCES_FIELDS: Final = frozenset({"limits", "requests"})
_TOLERATION_FIELDS: Final = frozenset({"key", "operator", "value", "effect", "tolerationSeconds"})
_TOLERATION_OPERATORS: Final = ("Exists", "Equal")
_TAINT_EFFECTS: Final = ("NoSchedule", "PreferNoSchedule", "NoExecute")

_INT64_MAX: Final = 2**63 - 1
_INT32_MAX: Final = 2**31 - 1
# Past this exponent every backoff the schema allows is already capped.
_MAX_BACKOFF_SHIFT: Final = 40


class SpecError(ValueError):
    """A DbtBackfill spec that cannot run. The message is one line, fit for users."""


@dataclass(frozen=True)
class ConfigMapKeyRef:
    """``spec.tenantIdsFrom``: a key of a ConfigMap in the backfill's namespace."""

    name: str
    key: str

    def describe(self) -> str:
        return f"ConfigMap {self.name} key {self.key}"


@dataclass(frozen=True)
class BackfillSpec:
    """A validated DbtBackfill spec, with the CRD's defaults filled in.

    The mapping fields hold private copies of the input; treat them as read-only. They are
    left out of the hash (they are unhashable) but not out of equality.
    """

    start_date: date
    end_date: date
    secret_name: str
    secret_key: str = DEFAULT_DATABASE_URL_KEY
    tenant_id: str | None = None
    # The tenant x window matrix: the tenants listed in the spec, or the ConfigMap key that
    # lists them (read once by the operator, see :func:`parse_tenant_list`), and the cell order.
    tenant_ids: tuple[str, ...] = ()
    tenant_ids_from: ConfigMapKeyRef | None = None
    order: CellOrder = "windowMajor"
    models: tuple[str, ...] = ()
    chunk_unit: ChunkUnit = "day"
    chunk_size: int = 1
    parallelism: int = 1
    retry_limit: int = 2
    backoff_seconds: int = 30
    max_backoff_seconds: int = 900
    active_deadline_seconds: int | None = None
    start_deadline_seconds: int = DEFAULT_START_DEADLINE_SECONDS
    image: str | None = None
    suspend: bool = False
    dry_run: bool = False
    allow_recent: bool = False
    verify: bool = False
    allow_full_rebuild: bool = False
    allow_cross_window: bool = False
    ttl_seconds_after_finished: int | None = None
    threads: int | None = None
    resources: Mapping[str, Mapping[str, int | str]] | None = field(default=None, hash=False)
    service_account_name: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict, hash=False)
    tolerations: tuple[Mapping[str, Any], ...] = field(default=(), hash=False)
    retry_failed: str | None = None
    queue_name: str | None = None
    priority: int = 0

    def windows(self) -> list[Window]:
        """The chunks of this backfill, in order (see :func:`dbtbackfill.core.planner.plan_windows`)."""
        return plan_windows(self.start_date, self.end_date, self.chunk_unit, self.chunk_size)

    def tenants(self) -> tuple[str | None, ...] | None:
        """The tenants of the plan: None stands for all tenants. None (the method's result)
        when they are in a ConfigMap, which only the operator reads."""
        if self.tenant_ids_from is not None:
            return None
        return self.tenant_ids or (self.tenant_id,)

    def cells(self, tenants: Sequence[str | None] | None = None) -> Sequence[Cell]:
        """The (tenant, window) cells of this backfill, in launch order. ``tenants`` is required
        for a spec with tenantIdsFrom: the list read from (or snapshotted of) its ConfigMap."""
        chosen = self.tenants() if tenants is None else tenants
        if chosen is None:
            raise ValueError("tenantIdsFrom: pass the tenants read from the ConfigMap")
        return plan_cells(self.windows(), chosen, self.order)

    def backoff_for(self, attempt: int) -> int:
        """Seconds to wait before retry number ``attempt`` (1 = the first retry) of a chunk.

        ``backoff_seconds * 2 ** (attempt - 1)``, capped at ``max_backoff_seconds``.
        """
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be a whole number >= 1, got {attempt!r}")
        shift = min(attempt - 1, _MAX_BACKOFF_SHIFT)
        return min(self.backoff_seconds << shift, self.max_backoff_seconds)


def overlaps(
    a: BackfillSpec,
    b: BackfillSpec,
    a_tenants: Sequence[str | None] | None = None,
    b_tenants: Sequence[str | None] | None = None,
) -> bool:
    """Whether two backfills may write the same rows: they share a (tenant, day) cell.

    Their date ranges intersect and their tenant sets do too, where no tenant means all
    tenants. ``a_tenants``/``b_tenants`` are the tenant lists of a spec with tenantIdsFrom
    (read from its status); unknown (not read yet) counts as all tenants, the safe side.
    Models are not compared: two selectors may share a table only the manifest would show.
    """
    dates_meet = a.start_date <= b.end_date and b.start_date <= a.end_date
    ta = a.tenants() if a_tenants is None else tuple(a_tenants)
    tb = b.tenants() if b_tenants is None else tuple(b_tenants)
    if ta is None or tb is None or None in ta or None in tb:
        return dates_meet
    return dates_meet and not set(ta).isdisjoint(tb)


def parse_spec(spec: Mapping[str, Any]) -> BackfillSpec:
    """Parse and validate a DbtBackfill ``spec``; raise :class:`SpecError` on the first problem.

    Absent or null optional fields take the CRD's defaults.
    """
    spec = _as_mapping(spec, "spec")
    _reject_unknown(spec, SPEC_FIELDS, "spec")

    start_date = _date(spec, "startDate")
    end_date = _date(spec, "endDate")
    try:
        validate_range(start_date, end_date)
    except PlanError as exc:
        raise SpecError(f"spec.endDate: {exc}") from None
    days = (end_date - start_date).days + 1
    if days > MAX_RANGE_DAYS:
        raise SpecError(
            f"spec.endDate: the range spans {days} days; at most {MAX_RANGE_DAYS} days are allowed, "
            "split it into several DbtBackfills"
        )

    tenant_id = _optional(spec, "tenantId")
    try:
        tenant_id = validate_tenant_id(tenant_id)
    except PlanError as exc:
        raise SpecError(f"spec.tenantId: {exc}") from None
    # The planner's check lets a trailing newline through ($ matches before it); the API
    # server's regexp engine does not.
    if tenant_id is not None and not _TENANT_RE.fullmatch(tenant_id):
        raise SpecError(f"spec.tenantId: tenant_id must match {TENANT_ID_PATTERN}, got {tenant_id!r}")
    tenant_ids, tenant_ids_from, order = _matrix(spec)
    if sum(x is not None for x in (tenant_id, tenant_ids or None, tenant_ids_from)) > 1:
        raise SpecError("spec.tenantIds: set at most one of tenantId, tenantIds and tenantIdsFrom")

    models = _models(spec)

    chunk = _sub_mapping(spec, "chunk", _CHUNK_FIELDS)
    unit = _optional(chunk, "unit")
    unit = "day" if unit is None else unit
    chunk_size = _int(chunk, "size", "spec.chunk.size", default=1, low=1, high=366)
    try:
        chunk_unit = validate_unit(unit, chunk_size)
    except PlanError as exc:
        raise SpecError(f"spec.chunk.unit: {exc}") from None

    parallelism = _int(spec, "parallelism", "spec.parallelism", default=1, low=1, high=32)

    retry = _sub_mapping(spec, "retry", _RETRY_FIELDS)
    retry_limit = _int(retry, "limit", "spec.retry.limit", default=2, low=0, high=20)
    backoff = _int(retry, "backoffSeconds", "spec.retry.backoffSeconds", default=30, low=1, high=3600)
    max_backoff = _int(retry, "maxBackoffSeconds", "spec.retry.maxBackoffSeconds", default=900, low=1, high=86400)
    if max_backoff < backoff:
        raise SpecError(
            f"spec.retry.maxBackoffSeconds: maxBackoffSeconds ({max_backoff}) must be at least "
            f"backoffSeconds ({backoff})"
        )

    secret_ref = _optional(spec, "databaseSecretRef")
    if secret_ref is None:
        raise SpecError("spec.databaseSecretRef: required; name the Secret that holds the database URL")
    secret_ref = _sub_mapping(spec, "databaseSecretRef", _SECRET_REF_FIELDS)
    secret_name = _optional(secret_ref, "name")
    if secret_name is None:
        raise SpecError("spec.databaseSecretRef.name: required; the name of the Secret")
    _string(secret_name, "spec.databaseSecretRef.name", _DNS_SUBDOMAIN_RE, max_length=253)
    secret_key = _optional(secret_ref, "key")
    secret_key = DEFAULT_DATABASE_URL_KEY if secret_key is None else secret_key
    _string(secret_key, "spec.databaseSecretRef.key", _SECRET_KEY_RE, max_length=253)

    image = _optional(spec, "image")
    if image is not None:
        _string(image, "spec.image", _NO_SPACE_RE, max_length=512)
    service_account = _optional(spec, "serviceAccountName")
    if service_account is not None:
        _string(service_account, "spec.serviceAccountName", _DNS_SUBDOMAIN_RE, max_length=253)
    retry_failed = _optional(spec, "retryFailed")
    if retry_failed is not None:
        _string(retry_failed, "spec.retryFailed", None, max_length=63)
    queue_name = _optional(spec, "queueName")
    if queue_name is not None:
        _string(queue_name, "spec.queueName", _DNS_LABEL_RE, max_length=63, shape="a DNS-1123 label")

    parsed = BackfillSpec(
        start_date=start_date,
        end_date=end_date,
        secret_name=secret_name,
        secret_key=secret_key,
        tenant_id=tenant_id,
        tenant_ids=tenant_ids,
        tenant_ids_from=tenant_ids_from,
        order=order,
        models=models,
        chunk_unit=chunk_unit,
        chunk_size=chunk_size,
        parallelism=parallelism,
        retry_limit=retry_limit,
        backoff_seconds=backoff,
        max_backoff_seconds=max_backoff,
        active_deadline_seconds=_optional_int(
            spec, "activeDeadlineSeconds", "spec.activeDeadlineSeconds", low=1, high=_INT64_MAX
        ),
        start_deadline_seconds=_optional_int(
            spec, "startDeadlineSeconds", "spec.startDeadlineSeconds", low=1, high=MAX_START_DEADLINE_SECONDS
        )
        or DEFAULT_START_DEADLINE_SECONDS,
        image=image,
        suspend=_bool(spec, "suspend"),
        dry_run=_bool(spec, "dryRun"),
        allow_recent=_bool(spec, "allowRecent"),
        verify=_bool(spec, "verify"),
        allow_full_rebuild=_bool(spec, "allowFullRebuild"),
        allow_cross_window=_bool(spec, "allowCrossWindow"),
        ttl_seconds_after_finished=_optional_int(
            spec, "ttlSecondsAfterFinished", "spec.ttlSecondsAfterFinished", low=0, high=_INT32_MAX
        ),
        threads=_optional_int(spec, "threads", "spec.threads", low=1, high=64),
        resources=_resources(spec),
        service_account_name=service_account,
        node_selector=_node_selector(spec),
        tolerations=_tolerations(spec),
        retry_failed=retry_failed,
        queue_name=queue_name,
        priority=_int(spec, "priority", "spec.priority", default=0, low=MIN_PRIORITY, high=MAX_PRIORITY),
    )
    try:
        parsed.windows()
    except PlanError as exc:  # pragma: no cover - the range limit above keeps the plan small
        raise SpecError(f"spec.chunk: {exc}") from None
    except (ArithmeticError, ValueError) as exc:  # pragma: no cover - the planner is total
        # Whatever slips through must still be a clear InvalidSpec, never a crash that
        # wedges the reconciler (and, through the overlap guard, the whole namespace).
        raise SpecError(f"spec.chunk: the chunks of {start_date}..{end_date} cannot be planned: {exc}") from None
    return parsed


# --- tenant x window matrix ----------------------------------------------------------------

_CONFIG_MAP_KEY_RE: Final = re.compile(r"^[-._a-zA-Z0-9]+$")
_TENANT_IDS_FROM_FIELDS: Final = frozenset({"name", "key"})


def validate_tenant_ids(ids: object, where: str, places: Sequence[str] | None = None) -> tuple[str, ...]:
    """A list of tenant ids, each checked exactly as ``spec.tenantId`` is, no duplicates,
    1 to :data:`MAX_TENANTS` of them. ``places`` names each item in errors (default ``[i]``)."""
    if isinstance(ids, str | bytes) or not isinstance(ids, list | tuple):
        raise SpecError(f"{where}: must be a list of tenant ids, got {_type_name(ids)}")
    if not ids:
        raise SpecError(f"{where}: must not be empty; omit it to backfill all tenants")
    if len(ids) > MAX_TENANTS:
        raise SpecError(
            f"{where}: at most {MAX_TENANTS} tenants are allowed, got {len(ids)}; split them over several DbtBackfills"
        )
    seen: set[str] = set()
    for i, tenant in enumerate(ids):
        item = f"{where}{places[i] if places else f'[{i}]'}"
        if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
            raise SpecError(f"{item}: tenant_id must match {TENANT_ID_PATTERN}, got {tenant!r}")
        if tenant in seen:
            raise SpecError(f"{item}: duplicate tenant id {tenant!r}")
        seen.add(tenant)
    return tuple(ids)


def parse_tenant_list(text: object, source: ConfigMapKeyRef) -> tuple[str, ...]:
    """The tenant ids of a ConfigMap value: one per line, surrounding whitespace ignored, and
    blank lines and lines starting with ``#`` skipped. Each id is validated like tenantId;
    errors name the line (``spec.tenantIdsFrom: ConfigMap tenants key ids line 3: ...``)."""
    where = f"spec.tenantIdsFrom: {source.describe()}"
    if not isinstance(text, str):
        raise SpecError(f"{where}: must be text, got {_type_name(text)}")
    ids: list[str] = []
    places: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        tenant = line.strip()
        if tenant and not tenant.startswith("#"):
            ids.append(tenant)
            places.append(f" line {number}")
    if not ids:
        raise SpecError(f"{where}: lists no tenant id (one per line; blank lines and # comments are skipped)")
    return validate_tenant_ids(ids, where, places)


def tenant_list_hash(ids: Sequence[str]) -> str:
    """A short, stable digest of a tenant list (order included: it numbers the cells)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _matrix(spec: Mapping[str, Any]) -> tuple[tuple[str, ...], ConfigMapKeyRef | None, CellOrder]:
    raw_ids = _optional(spec, "tenantIds")
    tenant_ids = () if raw_ids is None else validate_tenant_ids(raw_ids, "spec.tenantIds")
    source = None
    if _optional(spec, "tenantIdsFrom") is not None:
        ref = _sub_mapping(spec, "tenantIdsFrom", _TENANT_IDS_FROM_FIELDS)
        for key in ("name", "key"):
            if _optional(ref, key) is None:
                raise SpecError(f"spec.tenantIdsFrom.{key}: required")
        name = _string(ref["name"], "spec.tenantIdsFrom.name", _DNS_SUBDOMAIN_RE, max_length=253)
        key = _string(ref["key"], "spec.tenantIdsFrom.key", _CONFIG_MAP_KEY_RE, max_length=253)
        source = ConfigMapKeyRef(name, key)
    order = _optional(spec, "order")
    if order is None:
        return tenant_ids, source, "windowMajor"
    if order not in CELL_ORDERS:
        raise SpecError(f"spec.order: must be one of {', '.join(CELL_ORDERS)}, got {order!r}")
    return tenant_ids, source, cast(CellOrder, order)


# --- helpers -------------------------------------------------------------------------------


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _as_mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: must be an object, got {_type_name(value)}")
    return value


def _reject_unknown(obj: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(str(k) for k in obj if k not in known)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise SpecError(f"{where}.{unknown[0]}: unknown field{more}; known: {', '.join(sorted(known))}")


def _optional(obj: Mapping[str, Any], key: str) -> Any:
    """The value at ``key``; absent and null are the same (the API server drops nulls)."""
    return obj.get(key)


def _sub_mapping(spec: Mapping[str, Any], key: str, known: frozenset[str]) -> Mapping[str, Any]:
    value = _optional(spec, key)
    if value is None:
        return {}
    mapping = _as_mapping(value, f"spec.{key}")
    _reject_unknown(mapping, known, f"spec.{key}")
    return mapping


def _date(spec: Mapping[str, Any], key: str) -> date:
    value = _optional(spec, key)
    if value is None:
        raise SpecError(f"spec.{key}: required, as YYYY-MM-DD")
    # A YAML loader turns an unquoted 2024-01-01 into a date; accept it as the text it was.
    if isinstance(value, date) and not isinstance(value, datetime):
        value = value.isoformat()
    # ASCII digits only, nothing after: Python's \d and $ are looser than the API server's.
    if isinstance(value, str) and not _ASCII_DATE_RE.fullmatch(value):
        raise SpecError(f"spec.{key}: value must be a date in YYYY-MM-DD format, got {value!r}")
    try:
        return parse_date(value, "value")
    except PlanError as exc:
        raise SpecError(f"spec.{key}: {exc}") from None


def _models(spec: Mapping[str, Any]) -> tuple[str, ...]:
    value = _optional(spec, "models")
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise SpecError(f"spec.models: must be a list of dbt selectors, got {_type_name(value)}")
    if not value:
        raise SpecError("spec.models: must not be empty; omit it to run the whole project")
    if len(value) > MAX_MODELS:
        raise SpecError(f"spec.models: at most {MAX_MODELS} selectors are allowed, got {len(value)}")
    for i, selector in enumerate(value):
        _string(
            selector,
            f"spec.models[{i}]",
            _MODEL_RE,
            max_length=MAX_MODEL_LENGTH,
            shape=f"a dbt selector matching {MODEL_SELECTOR_PATTERN}",
        )
    return tuple(value)


def _string(
    value: object,
    where: str,
    pattern: re.Pattern[str] | None,
    *,
    max_length: int,
    shape: str | None = None,
) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{where}: must be a string, got {_type_name(value)}")
    if not value:
        raise SpecError(f"{where}: must not be empty")
    if len(value) > max_length:
        raise SpecError(f"{where}: at most {max_length} characters, got {len(value)}")
    if pattern is not None and not pattern.fullmatch(value):
        raise SpecError(f"{where}: must be {shape or f'a string matching {pattern.pattern}'}, got {value!r}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(obj: Mapping[str, Any], key: str, where: str, *, default: int, low: int, high: int) -> int:
    value = _optional_int(obj, key, where, low=low, high=high)
    return default if value is None else value


def _optional_int(obj: Mapping[str, Any], key: str, where: str, *, low: int, high: int) -> int | None:
    value = _optional(obj, key)
    if value is None:
        return None
    if not _is_int(value):
        raise SpecError(f"{where}: must be a whole number, got {value!r}")
    if not low <= value <= high:
        bound = f"at least {low}" if high == _INT64_MAX else f"between {low} and {high}"
        raise SpecError(f"{where}: must be {bound}, got {value}")
    return int(value)


def _bool(spec: Mapping[str, Any], key: str) -> bool:
    value = _optional(spec, key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SpecError(f"spec.{key}: must be true or false, got {value!r}")
    return value


def _resources(spec: Mapping[str, Any]) -> dict[str, dict[str, int | str]] | None:
    if _optional(spec, "resources") is None:
        return None
    resources = _sub_mapping(spec, "resources", _RESOURCES_FIELDS)
    parsed: dict[str, dict[str, int | str]] = {}
    amounts_by_kind: dict[str, dict[str, Decimal]] = {}
    for kind in sorted(resources):
        amounts = resources[kind]
        if amounts is None:
            continue
        quantities: dict[str, int | str] = {}
        values: dict[str, Decimal] = {}
        mapping = _as_mapping(amounts, f"spec.resources.{kind}")
        if len(mapping) > MAX_RESOURCES:
            raise SpecError(f"spec.resources.{kind}: at most {MAX_RESOURCES} resources are allowed, got {len(mapping)}")
        for name, quantity in mapping.items():
            where = f"spec.resources.{kind}.{name}"
            if not isinstance(name, str) or not name:
                raise SpecError(f"spec.resources.{kind}: resource names must be non-empty strings")
            if not _is_resource_name(name):
                raise SpecError(
                    f"{where}: resource names must be cpu, memory, ephemeral-storage, hugepages-<size>, or an "
                    "extended resource with a domain, e.g. example.com/gpu (not in kubernetes.io)"
                )
            value = _quantity(quantity)
            if value is None:
                raise SpecError(f"{where}: must be a non-negative quantity such as 500m, 2Gi or 1, got {quantity!r}")
            if _is_extended_resource(name) and value != value.to_integral_value():
                raise SpecError(f"{where}: an extended resource must be a whole number, got {quantity!r}")
            quantities[name] = int(quantity) if _is_int(quantity) else quantity
            values[name] = value
        parsed[kind] = quantities
        amounts_by_kind[kind] = values
    _check_requests_fit_limits(amounts_by_kind.get("requests", {}), amounts_by_kind.get("limits", {}))
    return parsed


def _check_requests_fit_limits(requests: Mapping[str, Decimal], limits: Mapping[str, Decimal]) -> None:
    """The Pod API's own rules (ValidateResourceRequirements), so that a spec the operator
    accepts never becomes a Job the API server refuses."""
    for name, request in sorted(requests.items()):
        where = f"spec.resources.requests.{name}"
        overcommit = not _is_extended_resource(name) and not name.startswith("hugepages-")
        limit = limits.get(name)
        if limit is None:
            if not overcommit:
                raise SpecError(
                    f"{where}: {name} needs a limit too (spec.resources.limits.{name}), equal to the request"
                )
        elif not overcommit and request != limit:
            raise SpecError(f"{where}: must equal the limit of {name} ({name} cannot be overcommitted)")
        elif request > limit:
            raise SpecError(f"{where}: must not be more than the limit of {name}")
    names = set(requests) | set(limits)
    if any(n.startswith("hugepages-") for n in names) and not names & {"cpu", "memory"}:
        raise SpecError("spec.resources: hugepages need a cpu or memory request or limit too")


def _is_resource_name(name: str) -> bool:
    if name in _STANDARD_RESOURCES or _HUGEPAGES_RE.fullmatch(name):
        return True
    match = _QUALIFIED_NAME_RE.fullmatch(name)
    prefix = match.group("prefix") if match else None
    return prefix is not None and len(prefix) <= 253 and _is_extended_resource(name)


def _is_extended_resource(name: str) -> bool:
    return "/" in name and "kubernetes.io/" not in name and not name.startswith("requests.")


def _quantity(value: object) -> Decimal | None:
    """The amount of a resource quantity the CRD admits, or None if it admits none."""
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value) if value >= 0 else None
    if not isinstance(value, str):
        return None
    match = _QUANTITY_RE.fullmatch(value)
    if match is None:
        return None
    number = Decimal(match.group("number"))
    suffix = match.group("suffix") or ""
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        return _QUANTITY_CONTEXT.scaleb(number, int(suffix[1:]))
    return _QUANTITY_CONTEXT.multiply(number, _QUANTITY_SUFFIXES[suffix])


def _node_selector(spec: Mapping[str, Any]) -> dict[str, str]:
    value = _optional(spec, "nodeSelector")
    if value is None:
        return {}
    mapping = _as_mapping(value, "spec.nodeSelector")
    if len(mapping) > MAX_NODE_SELECTOR:
        raise SpecError(f"spec.nodeSelector: at most {MAX_NODE_SELECTOR} labels are allowed, got {len(mapping)}")
    selector: dict[str, str] = {}
    for key, label_value in mapping.items():
        if not isinstance(key, str) or not key:
            raise SpecError("spec.nodeSelector: label names must be non-empty strings")
        where = f"spec.nodeSelector.{key}"
        match = _QUALIFIED_NAME_RE.fullmatch(key)
        if match is None or len(match.group("prefix") or "") > 253:
            raise SpecError(
                f"{where}: nodeSelector keys must be label keys: an optional DNS subdomain prefix (at most 253 "
                "characters) and '/', then 1 to 63 letters, digits, '-', '_' or '.', starting and ending with a "
                "letter or digit"
            )
        if not isinstance(label_value, str):
            raise SpecError(f"{where}: must be a string, got {_type_name(label_value)}")
        if len(label_value) > 63 or not _LABEL_VALUE_RE.fullmatch(label_value):
            raise SpecError(f"{where}: must be a label value (at most 63 characters), got {label_value!r}")
        selector[key] = label_value
    return selector


def _tolerations(spec: Mapping[str, Any]) -> tuple[Mapping[str, Any], ...]:
    value = _optional(spec, "tolerations")
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise SpecError(f"spec.tolerations: must be a list, got {_type_name(value)}")
    if len(value) > 50:
        raise SpecError(f"spec.tolerations: at most 50 are allowed, got {len(value)}")
    return tuple(_toleration(item, f"spec.tolerations[{i}]") for i, item in enumerate(value))


def _toleration(item: object, where: str) -> dict[str, Any]:
    mapping = _as_mapping(item, where)
    _reject_unknown(mapping, _TOLERATION_FIELDS, where)
    toleration = {k: copy.deepcopy(v) for k, v in mapping.items() if v is not None}
    for name, max_length in (("key", 317), ("value", 63)):
        text = toleration.get(name)
        if text is not None and (not isinstance(text, str) or len(text) > max_length):
            raise SpecError(f"{where}.{name}: must be a string of at most {max_length} characters")
    operator = toleration.get("operator")
    if operator is not None and operator not in _TOLERATION_OPERATORS:
        raise SpecError(f"{where}.operator: must be one of {', '.join(_TOLERATION_OPERATORS)}, got {operator!r}")
    effect = toleration.get("effect")
    if effect is not None and effect not in _TAINT_EFFECTS:
        raise SpecError(f"{where}.effect: must be one of {', '.join(_TAINT_EFFECTS)}, got {effect!r}")
    seconds = toleration.get("tolerationSeconds")
    if seconds is not None and not _is_int(seconds):
        raise SpecError(f"{where}.tolerationSeconds: must be a whole number, got {seconds!r}")
    # The CRD's CEL rules on a toleration, which are the Pod API's own checks.
    if operator == "Exists" and toleration.get("value", "") != "":
        raise SpecError(f"{where}.value: value must be empty when operator is Exists")
    if toleration.get("key", "") == "" and operator != "Exists":
        raise SpecError(f"{where}.operator: operator must be Exists when key is empty")
    if seconds is not None and effect != "NoExecute":
        raise SpecError(f"{where}.tolerationSeconds: tolerationSeconds is only allowed with effect NoExecute")
    return toleration
