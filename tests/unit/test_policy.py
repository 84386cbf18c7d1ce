"""dbtbackfill.operator.policy: which images, ServiceAccounts and Secrets a DbtBackfill may use.

Pure: the Secret's labels are passed in as the controller reads them from the API.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from dbtbackfill.core.spec import parse_spec
from dbtbackfill.operator import policy
from dbtbackfill.operator.policy import JobPolicy, PolicyConfigError, build_policy, secret_refusal, spec_refusal

DEFAULT_IMAGE = "registry.example/dbt-backfill-operator:0.1.0"
DEFAULT_SA = "dbt-backfill-job"
LABELLED = {policy.WAREHOUSE_LABEL: "true"}


def spec(**changes: Any) -> Any:
    return parse_spec(
        {"startDate": "2024-01-01", "endDate": "2024-01-31", "databaseSecretRef": {"name": "warehouse"}, **changes}
    )


def defaults_only() -> JobPolicy:
    return build_policy(DEFAULT_IMAGE, DEFAULT_SA, None, None)


def test_by_default_only_the_default_image_and_service_account_run() -> None:
    assert spec_refusal(spec(), defaults_only()) is None
    assert spec_refusal(spec(image=DEFAULT_IMAGE, serviceAccountName=DEFAULT_SA), defaults_only()) is None
    refused = spec_refusal(spec(image="evil.example/miner:1"), defaults_only())
    assert refused == (
        "spec.image: 'evil.example/miner:1' is not allowed by the operator's policy; allowed: "
        f"{DEFAULT_IMAGE} (the operator's DBT_BACKFILL_ALLOWED_IMAGES)"
    )
    refused = spec_refusal(spec(serviceAccountName="default"), defaults_only())
    assert refused == (
        "spec.serviceAccountName: 'default' is not allowed by the operator's policy; allowed: "
        "dbt-backfill-job (the operator's DBT_BACKFILL_ALLOWED_SERVICE_ACCOUNTS)"
    )


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("registry.example/team/dbt:1", True),
        ("registry.example/team/sub/dbt@sha256:" + "a" * 64, True),
        ("registry.example/teamster/dbt:1", False),  # a prefix ends where the entry says
        ("registry.example/team", False),
        ("ghcr.io/org/dbt:2.0", True),  # exact
        ("ghcr.io/org/dbt:2.0.1", False),
        ("ghcr.io/org/dbt", False),
        (DEFAULT_IMAGE, True),
    ],
)
def test_configured_images_are_exact_or_prefixes(image: str, allowed: bool) -> None:
    job_policy = build_policy(DEFAULT_IMAGE, DEFAULT_SA, " registry.example/team/* , ghcr.io/org/dbt:2.0,", None)
    assert job_policy.images == ("registry.example/team/*", "ghcr.io/org/dbt:2.0")
    assert (spec_refusal(spec(image=image), job_policy) is None) is allowed


def test_configured_service_accounts() -> None:
    job_policy = build_policy(DEFAULT_IMAGE, DEFAULT_SA, None, "etl-runner,reporting")
    assert spec_refusal(spec(serviceAccountName="etl-runner"), job_policy) is None
    assert spec_refusal(spec(serviceAccountName="reporting"), job_policy) is None
    assert spec_refusal(spec(), job_policy) is None  # the default stays allowed
    refused = spec_refusal(spec(serviceAccountName="admin"), job_policy)
    assert refused is not None
    assert refused.startswith("spec.serviceAccountName: 'admin' is not allowed")
    assert "dbt-backfill-job, etl-runner, reporting" in refused


def test_a_long_allow_list_is_abridged_in_the_message() -> None:
    job_policy = build_policy(DEFAULT_IMAGE, DEFAULT_SA, ",".join(f"r.example/i{i}:1" for i in range(9)), None)
    refused = spec_refusal(spec(image="x:1"), job_policy)
    assert refused is not None
    assert refused.endswith("(and 5 more) (the operator's DBT_BACKFILL_ALLOWED_IMAGES)")


@pytest.mark.parametrize(
    ("images", "accounts", "message"),
    [
        ("*", None, "would allow every image"),
        ("registry.example/*/dbt", None, "not an image or a prefix ending in '*'"),
        ("registry example/dbt", None, "not an image or a prefix"),
        (None, "Admin", "DBT_BACKFILL_ALLOWED_SERVICE_ACCOUNTS: 'Admin' is not a ServiceAccount name"),
    ],
)
def test_malformed_configuration_is_refused(images: str | None, accounts: str | None, message: str) -> None:
    with pytest.raises(PolicyConfigError, match=message.replace("*", r"\*")):
        build_policy(DEFAULT_IMAGE, DEFAULT_SA, images, accounts)


def test_the_secret_must_exist_and_carry_the_warehouse_label() -> None:
    assert secret_refusal(spec(), LABELLED) is None
    assert secret_refusal(spec(), {**LABELLED, "team": "a"}) is None
    missing = secret_refusal(spec(), None)
    assert missing == (
        "spec.databaseSecretRef.name: Secret 'warehouse' does not exist in this namespace; "
        "create it with the label dbt-backfill.io/warehouse=true"
    )
    for labels in ({}, {policy.WAREHOUSE_LABEL: "True"}, {policy.WAREHOUSE_LABEL: "yes"}, {"warehouse": "true"}):
        refused = secret_refusal(spec(), labels)
        assert refused is not None
        assert refused.startswith("spec.databaseSecretRef.name: Secret 'warehouse' is not labelled ")
        assert "kubectl label secret warehouse dbt-backfill.io/warehouse=true" in refused


def test_refusals_are_invalid_specs() -> None:
    """The controller reports them exactly like a spec parse_spec refuses: InvalidSpec."""
    from dbtbackfill.core.spec import SpecError

    assert issubclass(policy.PolicyRefusal, SpecError)
    assert issubclass(policy.SecretRefusal, policy.PolicyRefusal)


def operator_args(*argv: str) -> argparse.Namespace:
    from dbtbackfill.cli import build_parser

    args: argparse.Namespace = build_parser().parse_args(["operator", *argv])
    return args


def test_cli_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from dbtbackfill.operator.controller import OperatorConfig
    from dbtbackfill.operator.main import apply_policy_flags

    monkeypatch.setenv(policy.ALLOWED_IMAGES_ENV, "env.example/*")
    monkeypatch.setenv(policy.ALLOWED_SERVICE_ACCOUNTS_ENV, "from-env")
    assert apply_policy_flags(operator_args("--allowed-images", "flag.example/*")) is None
    config = OperatorConfig.from_env()
    assert config.policy.images == ("flag.example/*",)
    assert config.policy.service_accounts == frozenset({"from-env"})
    assert apply_policy_flags(operator_args("--allowed-service-accounts", "Bad Name")) is not None


def test_a_malformed_flag_makes_the_operator_exit_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dbtbackfill.operator.main import run_operator

    # Registered with monkeypatch (setenv records the value before, even "unset"; a delenv of an
    # unset variable records nothing), so what run_operator writes into the environment is undone.
    for env in (policy.ALLOWED_IMAGES_ENV, policy.ALLOWED_SERVICE_ACCOUNTS_ENV):
        monkeypatch.setenv(env, "")
        monkeypatch.delenv(env)
    assert run_operator(operator_args("--allowed-images", "*")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("dbt-backfill operator: DBT_BACKFILL_ALLOWED_IMAGES: '*' would allow every image")
