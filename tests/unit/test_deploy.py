"""The kustomize install under deploy/: it renders, validates, and is locked down.

`kubectl kustomize` renders deploy/ (and deploy/ plus components/peering) offline. Every
built-in object is validated with kubernetes-validate (strict, newest Kubernetes it ships);
DbtBackfill and ClusterKopfPeering objects against their CRDs' OpenAPI schemas with jsonschema.
Then the security invariants: restricted pod security, RBAC without wildcards or Secrets, a
chunk-Job ServiceAccount with no permissions, a single operator replica that never overlaps.

`rendered_rules()` is for other tests (e.g. "RBAC grants exactly what the code calls").
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from dbtbackfill.operator.kube import API_CALLS, FRAMEWORK_CALLS
from dbtbackfill.operator.policy import WAREHOUSE_LABEL
from tests.support.crd_schema import openapi_to_jsonschema

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
EXAMPLES = DEPLOY / "examples"
PEERING = DEPLOY / "components" / "peering"
LOCAL = DEPLOY / "overlays" / "local"

NAMESPACE = "dbt-backfill-system"
OPERATOR_SA = "dbt-backfill-operator"
JOB_SA = "dbt-backfill-job"
IMAGE = "dbt-backfill-operator:0.1.0"
AUDIT_SECRET = "dbt-backfill-audit-db"
LIVENESS_PORT = 8080
METRICS_PORT = 9102
K8S_VERSION = latest_version()

BUILTIN_GROUPS = {
    "v1",
    "apps/v1",
    "batch/v1",
    "rbac.authorization.k8s.io/v1",
    "apiextensions.k8s.io/v1",
    "policy/v1",
    "networking.k8s.io/v1",
}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        message = "kubectl is not installed; `kubectl kustomize` renders deploy/ offline"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} and CI must run these tests (install kubectl in .ci/run)")
        pytest.skip(message)
    return path


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def _render_default() -> tuple[dict[str, Any], ...]:
    return tuple(_kustomize(DEPLOY))


@functools.cache
def _render_local() -> tuple[dict[str, Any], ...]:
    return tuple(_kustomize(LOCAL))


@functools.cache
def _render_with_peering(workdir: str) -> tuple[dict[str, Any], ...]:
    # An overlay cannot live inside deploy/ (kustomize refuses a root inside its own base),
    # so build the overlay a user would write, in a temporary directory.
    overlay = Path(workdir)
    overlay.mkdir(parents=True, exist_ok=True)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(DEPLOY, overlay)],
                "components": [os.path.relpath(PEERING, overlay)],
            }
        )
    )
    return tuple(_kustomize(overlay))


def render() -> list[dict[str, Any]]:
    """The default install, as `kubectl kustomize deploy/` renders it (deep copies)."""
    return copy.deepcopy(list(_render_default()))


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def peering_objects(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render_with_peering(str(tmp_path_factory.mktemp("overlay")))))


def rendered_rules() -> list[dict[str, Any]]:
    """Every RBAC rule granted to the operator's ServiceAccount by the default install.

    Each rule is the rendered PolicyRule dict plus "role" (the (Cluster)Role name) and
    "scope" ("cluster" for a ClusterRoleBinding, else the RoleBinding's namespace).
    """
    objs = render()
    roles = {(o["kind"], o["metadata"]["name"]): o for o in objs if o["kind"] in ("ClusterRole", "Role")}
    rules: list[dict[str, Any]] = []
    for binding in objs:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if not any(_is_sa(s, OPERATOR_SA) for s in binding.get("subjects", [])):
            continue
        ref = binding["roleRef"]
        role = roles[(ref["kind"], ref["name"])]
        scope = "cluster" if binding["kind"] == "ClusterRoleBinding" else binding["metadata"]["namespace"]
        for rule in role.get("rules", []):
            rules.append({**rule, "role": ref["name"], "scope": scope})
    return rules


def _is_sa(subject: dict[str, Any], name: str) -> bool:
    return subject.get("kind") == "ServiceAccount" and subject.get("name") == name


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def operator_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = find(objs, "Deployment", "dbt-backfill-operator")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]


def load_examples() -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: [d for d in yaml.safe_load_all(path.read_text()) if d] for path in sorted(EXAMPLES.glob("*.yaml"))
    }


# --------------------------------------------------------------------------------------------
# Schema validation
# --------------------------------------------------------------------------------------------


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> JSON Schema, for every CRD in the default and peering renders."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    crd_docs = [
        d
        for path in sorted((REPO / "crds").glob("*.dbt-backfill.io.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]
    crd_docs += [d for d in yaml.safe_load_all((PEERING / "peering-crds.yaml").read_text()) if d]
    for crd in crd_docs:
        group = crd["spec"]["group"]
        for version in crd["spec"]["versions"]:
            key = (f"{group}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"], resource=True)
    return schemas


def validate(obj: dict[str, Any]) -> None:
    api_version, kind = obj["apiVersion"], obj["kind"]
    if api_version in BUILTIN_GROUPS:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        return
    schema = crd_schemas().get((api_version, kind))
    assert schema is not None, f"no schema for {api_version} {kind}"
    jsonschema.validate(obj, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def object_id(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


# --------------------------------------------------------------------------------------------
# Rendering and validation tests
# --------------------------------------------------------------------------------------------


def test_default_install_renders_the_expected_objects(objects: list[dict[str, Any]]) -> None:
    assert sorted(object_id(o) for o in objects) == sorted(
        [
            "CustomResourceDefinition/dbtbackfills.dbt-backfill.io",
            "CustomResourceDefinition/dbtbackfillqueues.dbt-backfill.io",
            f"Namespace/{NAMESPACE}",
            f"ServiceAccount/{OPERATOR_SA}",
            f"ServiceAccount/{JOB_SA}",
            "ClusterRole/dbt-backfill-operator-framework",
            "ClusterRoleBinding/dbt-backfill-operator-framework",
            "ClusterRole/dbt-backfill-operator",
            "ClusterRoleBinding/dbt-backfill-operator",
            "Deployment/dbt-backfill-operator",
            "Service/dbt-backfill-operator-metrics",
        ]
    )


def test_kubernetes_validate_ships_schemas_for_a_current_release() -> None:
    major, minor = (int(p) for p in K8S_VERSION.split(".")[:2])
    assert (major, minor) >= (1, 30), K8S_VERSION


def validation_errors(objects: list[dict[str, Any]]) -> list[str]:
    errors = []
    for obj in objects:
        try:
            validate(obj)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
            errors.append(f"{object_id(obj)}: {'.'.join(map(str, e.path))}: {e.message}")
    return errors


def test_every_rendered_object_is_valid(objects: list[dict[str, Any]]) -> None:
    errors = validation_errors(objects)
    assert not errors, "\n".join(errors)


def test_every_object_with_peering_is_valid(peering_objects: list[dict[str, Any]]) -> None:
    errors = validation_errors(peering_objects)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_is_valid(name: str) -> None:
    docs = load_examples()[name]
    assert docs, f"{name} is empty"
    for obj in docs:
        validate(obj)


def test_the_validator_rejects_a_typo_in_a_backfill() -> None:
    (backfill,) = load_examples()["backfill-january.yaml"]
    backfill["spec"]["paralelism"] = 2
    with pytest.raises(jsonschema.ValidationError, match="paralelism"):
        validate(backfill)


def test_kustomize_leaves_the_crd_as_written(objects: list[dict[str, Any]]) -> None:
    (source,) = [d for d in yaml.safe_load_all((REPO / "crds" / "dbtbackfills.dbt-backfill.io.yaml").read_text()) if d]
    rendered = find(objects, "CustomResourceDefinition", "dbtbackfills.dbt-backfill.io")
    assert rendered["spec"] == source["spec"]


def test_namespaced_objects_live_in_the_operator_namespace(objects: list[dict[str, Any]]) -> None:
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for obj in objects:
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"], object_id(obj)
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, object_id(obj)


def test_no_secret_is_rendered_and_the_templates_hold_only_placeholders(objects: list[dict[str, Any]]) -> None:
    assert not [o for o in objects if o["kind"] == "Secret"]
    for path in (DEPLOY / "kustomization.yaml", DEPLOY / "base" / "kustomization.yaml", LOCAL / "kustomization.yaml"):
        kustomization = yaml.safe_load(path.read_text())
        assert not any("secret" in resource for resource in kustomization["resources"]), path
        assert not kustomization.get("secretGenerator"), path
    templates = [DEPLOY / "secret-audit-db.example.yaml", EXAMPLES / "secret-database-url.yaml"]
    for path in templates:
        (secret,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert secret["kind"] == "Secret"
        assert "data" not in secret, f"{path.name}: use stringData placeholders, not data"
        for value in secret["stringData"].values():
            assert "REPLACE_" in value, f"{path.name}: not a placeholder: {value!r}"
    audit = yaml.safe_load((DEPLOY / "secret-audit-db.example.yaml").read_text())
    assert audit["metadata"] == {**audit["metadata"], "name": AUDIT_SECRET, "namespace": NAMESPACE}
    assert set(audit["stringData"]) == {"DATABASE_URL"}


def test_images_name_no_registry() -> None:
    # A registry host is the first path component when it has a dot or a port, or is localhost.
    images = [operator_container(render())["image"]]
    for docs in load_examples().values():
        images += [d["spec"]["image"] for d in docs if d.get("kind") == "DbtBackfill" and "image" in d["spec"]]
    for image in images:
        first = image.split("/")[0]
        assert "/" not in image or not ("." in first or ":" in first or first == "localhost"), image


# --------------------------------------------------------------------------------------------
# The operator Deployment
# --------------------------------------------------------------------------------------------


def test_one_replica_that_never_overlaps(objects: list[dict[str, Any]]) -> None:
    spec = find(objects, "Deployment", "dbt-backfill-operator")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_pod_runs_restricted(objects: list[dict[str, Any]]) -> None:
    pod = find(objects, "Deployment", "dbt-backfill-operator")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == OPERATOR_SA
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == 10001
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc.get("privileged", False) is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_tmp_is_the_only_writable_path_and_is_an_empty_dir(objects: list[dict[str, Any]]) -> None:
    pod = find(objects, "Deployment", "dbt-backfill-operator")["spec"]["template"]["spec"]
    (mount,) = operator_container(objects)["volumeMounts"]
    assert mount["mountPath"] == "/tmp"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


def test_image_and_default_job_image_agree(objects: list[dict[str, Any]]) -> None:
    container = operator_container(objects)
    env = {e["name"]: e for e in container["env"]}
    assert container["image"] == IMAGE
    assert env["DBT_BACKFILL_DEFAULT_IMAGE"]["value"] == IMAGE
    assert env["DBT_BACKFILL_JOB_SERVICE_ACCOUNT"]["value"] == JOB_SA


def test_database_url_comes_from_the_audit_secret_only(objects: list[dict[str, Any]]) -> None:
    container = operator_container(objects)
    env = {e["name"]: e for e in container["env"]}
    assert env["DATABASE_URL"] == {
        "name": "DATABASE_URL",
        "valueFrom": {"secretKeyRef": {"name": AUDIT_SECRET, "key": "DATABASE_URL"}},
    }
    assert "envFrom" not in container
    for item in container["env"]:
        assert not re.search(r"(postgres(ql)?|mysql)://", str(item.get("value", ""))), item


def test_probes_and_ports(objects: list[dict[str, Any]]) -> None:
    container = operator_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"healthz": LIVENESS_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert ports.get(get["port"], get["port"]) == LIVENESS_PORT, probe
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_metrics_service_targets_the_metrics_port(objects: list[dict[str, Any]]) -> None:
    service = find(objects, "Service", "dbt-backfill-operator-metrics")
    (port,) = service["spec"]["ports"]
    assert port["name"] == "metrics"
    assert port["port"] == METRICS_PORT
    assert port["targetPort"] == "metrics"
    pod_labels = find(objects, "Deployment", "dbt-backfill-operator")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def _parse_operator_args(args: list[str]) -> Any:
    from dbtbackfill.cli import build_parser

    assert args[:2] == ["dbt-backfill", "operator"], args
    try:
        return build_parser().parse_args(args[1:])
    except SystemExit as e:  # argparse reports bad arguments by exiting
        pytest.fail(f"dbt-backfill rejects the Deployment's args {args}: exit {e.code}")


def test_deployment_args_are_accepted_by_the_cli(objects: list[dict[str, Any]]) -> None:
    container = operator_container(objects)
    assert "command" not in container, "use args so the image's ENTRYPOINT (tini) stays PID 1"
    parsed = _parse_operator_args(container["args"])
    assert parsed.all_namespaces is True
    assert parsed.liveness_port == LIVENESS_PORT
    assert parsed.metrics_port == METRICS_PORT
    assert parsed.peering is None  # standalone


# --------------------------------------------------------------------------------------------
# RBAC
# --------------------------------------------------------------------------------------------


def all_rules(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(o["metadata"]["name"], rule) for o in objs if o["kind"] in ("ClusterRole", "Role") for rule in o["rules"]]


@pytest.mark.parametrize("variant", ["default", "peering"])
def test_rbac_has_no_wildcards_and_only_gets_secrets(
    variant: str, objects: list[dict[str, Any]], peering_objects: list[dict[str, Any]]
) -> None:
    rules = all_rules(objects if variant == "default" else peering_objects)
    assert rules
    for role, rule in rules:
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert not any("*" in item for item in rule.get(field, [])), f"{role}: wildcard in {field}: {rule}"
        assert rule["verbs"], f"{role}: rule without verbs"
        assert "nonResourceURLs" not in rule, f"{role}: {rule}"
        if "secrets" in rule.get("resources", []):
            # Only the policy's label check of the one Secret a backfill names: no list, no watch.
            assert rule["resources"] == ["secrets"] and rule["verbs"] == ["get"], f"{role}: {rule}"
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), f"{role}: {rule}"


def test_operator_only_lists_pods(objects: list[dict[str, Any]]) -> None:
    # Pods are read to tell why a chunk never started and whether an old attempt still runs;
    # the operator never changes them (Job deletion cascades via the garbage collector), nor
    # reads logs or execs into them.
    pod_rules = []
    for role, rule in all_rules(objects):
        assert not {"pods/log", "pods/exec"} & set(rule["resources"]), f"{role}: {rule}"
        if "pods" in rule["resources"]:
            pod_rules.append(rule)
    assert [r["verbs"] for r in pod_rules] == [["list"]]


def granted_calls() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for everything the operator's ServiceAccount may do."""
    return {
        (group, resource, verb)
        for rule in rendered_rules()
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rendered_rules_cover_the_documented_api_calls() -> None:
    granted = granted_calls()
    expected = set(API_CALLS | FRAMEWORK_CALLS)  # exactly what the code and kopf call
    assert granted == expected
    assert {r["scope"] for r in rendered_rules()} == {"cluster"}


def test_framework_and_application_roles_are_separate(objects: list[dict[str, Any]]) -> None:
    framework = find(objects, "ClusterRole", "dbt-backfill-operator-framework")
    application = find(objects, "ClusterRole", "dbt-backfill-operator")
    framework_resources = {r for rule in framework["rules"] for r in rule["resources"]}
    assert framework_resources == {"customresourcedefinitions", "namespaces"}
    for rule in framework["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}, "framework rules are read-only"
    # Only namespaced kinds, so the same ClusterRole can be bound per namespace with RoleBindings.
    application_resources = {r.split("/")[0] for rule in application["rules"] for r in rule["resources"]}
    assert application_resources == {
        "dbtbackfills", "dbtbackfillqueues", "jobs", "events", "pods", "secrets", "configmaps"
    }  # fmt: skip
    for name in ("dbt-backfill-operator-framework", "dbt-backfill-operator"):
        binding = find(objects, "ClusterRoleBinding", name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": NAMESPACE}]


def test_job_service_account_has_no_permissions_and_no_token(objects: list[dict[str, Any]]) -> None:
    service_accounts = [find(objects, "ServiceAccount", JOB_SA)]
    service_accounts += [d for d in load_examples()["job-serviceaccount.yaml"] if d["kind"] == "ServiceAccount"]
    for sa in service_accounts:
        assert sa["metadata"]["name"] == JOB_SA
        assert sa["automountServiceAccountToken"] is False
    bindings = [o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    for docs in load_examples().values():
        bindings += [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    for binding in bindings:
        assert not any(_is_sa(s, JOB_SA) for s in binding.get("subjects", [])), object_id(binding)


# --------------------------------------------------------------------------------------------
# The peering component
# --------------------------------------------------------------------------------------------


def test_peering_component_turns_peering_on(peering_objects: list[dict[str, Any]]) -> None:
    deployment = find(peering_objects, "Deployment", "dbt-backfill-operator")
    assert deployment["spec"]["replicas"] == 1, "kopf peering is mutual exclusion, not hot standby"
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    container = operator_container(peering_objects)
    parsed = _parse_operator_args(container["args"])
    assert parsed.peering == "dbt-backfill"
    assert parsed.all_namespaces is True
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    find(peering_objects, "ClusterKopfPeering", "dbt-backfill")
    find(peering_objects, "CustomResourceDefinition", "clusterkopfpeerings.kopf.dev")


def test_peering_rbac_is_limited_to_the_peering_object(peering_objects: list[dict[str, Any]]) -> None:
    role = find(peering_objects, "ClusterRole", "dbt-backfill-operator-peering")
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["kopf.dev"] and rule["resources"] == ["clusterkopfpeerings"]
        if not {"list", "watch"} & set(rule["verbs"]):
            assert rule["resourceNames"] == ["dbt-backfill"]
    granted = {v for rule in role["rules"] for v in rule["verbs"]}
    assert granted == {"get", "list", "watch", "patch"}
    binding = find(peering_objects, "ClusterRoleBinding", "dbt-backfill-operator-peering")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": NAMESPACE}]


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


def test_examples_fit_together() -> None:
    examples = load_examples()
    (secret,) = examples["secret-database-url.yaml"]
    (sa,) = examples["job-serviceaccount.yaml"]
    # The operator's policy refuses a database Secret without this label.
    assert secret["metadata"]["labels"][WAREHOUSE_LABEL] == "true"
    namespace = secret["metadata"]["namespace"]
    assert sa["metadata"]["namespace"] == namespace
    backfills = [d for docs in examples.values() for d in docs if d["kind"] == "DbtBackfill"]
    assert {b["metadata"]["name"] for b in backfills} >= {"backfill-2024-01", "backfill-acme-2024-q1"}
    for backfill in backfills:
        spec = backfill["spec"]
        assert backfill["metadata"]["namespace"] == namespace
        ref = spec["databaseSecretRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref.get("key", "DATABASE_URL") in secret["stringData"]
        assert spec.get("serviceAccountName", JOB_SA) == JOB_SA
        # The CRD's CEL rules, by hand: an ordered range of at most 3660 days.
        start, end = dt.date.fromisoformat(spec["startDate"]), dt.date.fromisoformat(spec["endDate"])
        assert start <= end and (end - start).days < 3660
        assert end < dt.date.today() - dt.timedelta(days=2) or spec.get("allowRecent")
    tenant = [b for b in backfills if "tenantId" in b["spec"]]
    assert tenant, "backfill-tenant.yaml must show a tenant-scoped backfill"
    # A backfill that names a queue finds it beside it (a missing queue would only wait).
    queues = {
        (d["metadata"]["namespace"], d["metadata"]["name"])
        for docs in examples.values()
        for d in docs
        if d["kind"] == "DbtBackfillQueue"
    }
    joined = {(b["metadata"]["namespace"], b["spec"]["queueName"]) for b in backfills if "queueName" in b["spec"]}
    assert joined and joined <= queues


def test_deployment_sets_a_valid_policy_that_allows_only_the_defaults(objects: list[dict[str, Any]]) -> None:
    from dbtbackfill.operator.policy import ALLOWED_IMAGES_ENV, ALLOWED_SERVICE_ACCOUNTS_ENV, build_policy

    env = {e["name"]: e.get("value") for e in operator_container(objects)["env"]}
    job_policy = build_policy(
        env["DBT_BACKFILL_DEFAULT_IMAGE"],
        env["DBT_BACKFILL_JOB_SERVICE_ACCOUNT"],
        env[ALLOWED_IMAGES_ENV],
        env[ALLOWED_SERVICE_ACCOUNTS_ENV],
    )
    assert job_policy.allows_image(IMAGE)
    assert not job_policy.allows_image("registry.example/anything:latest")
    assert job_policy.allows_service_account(JOB_SA)
    assert not job_policy.allows_service_account("default")


# --------------------------------------------------------------------------------------------
# The local overlay (deploy/overlays/local, for `make cluster-up`)
# --------------------------------------------------------------------------------------------


def built_image() -> str:
    """The image `make image` builds when IMAGE is not set (deploy/image/build.sh)."""
    match = re.search(r"^image=\$\{IMAGE:-([^}]+)\}$", (DEPLOY / "image" / "build.sh").read_text(), re.M)
    assert match is not None, "build.sh lost its default image"
    return match[1]


def test_the_local_overlay_renders_valid_objects_and_no_secret() -> None:
    local = list(_render_local())
    errors = validation_errors(local)
    assert not errors, "\n".join(errors)
    assert not [o for o in local if o["kind"] == "Secret"]


def test_the_local_overlay_runs_the_image_make_image_builds_and_never_pulls() -> None:
    container = operator_container(copy.deepcopy(list(_render_local())))
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == built_image()
    # The chunk Jobs run the same image: the overlay re-copies it after changing it.
    assert env["DBT_BACKFILL_DEFAULT_IMAGE"] == built_image()
    assert container["imagePullPolicy"] == "Never"  # local storage only; no registry to pull from


def test_the_local_overlay_changes_nothing_but_the_image_and_its_pull_policy(objects: list[dict[str, Any]]) -> None:
    def without_image(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        objs = copy.deepcopy(objs)
        container = operator_container(objs)
        del container["image"], container["imagePullPolicy"]
        (default_image,) = [e for e in container["env"] if e["name"] == "DBT_BACKFILL_DEFAULT_IMAGE"]
        del default_image["value"]
        return {object_id(o): o for o in objs}

    local, default = without_image(list(_render_local())), without_image(objects)
    assert sorted(local) == sorted(default)
    for key, obj in default.items():
        assert local[key] == obj, key


def test_the_local_policy_allows_the_local_image_only() -> None:
    from dbtbackfill.operator.policy import ALLOWED_IMAGES_ENV, build_policy

    env = {e["name"]: e.get("value") for e in operator_container(copy.deepcopy(list(_render_local())))["env"]}
    policy = build_policy(env["DBT_BACKFILL_DEFAULT_IMAGE"], env["DBT_BACKFILL_JOB_SERVICE_ACCOUNT"],
                          env[ALLOWED_IMAGES_ENV], "")  # fmt: skip
    assert policy.allows_image(built_image())
    assert not policy.allows_image(IMAGE)
