"""Choosing the dbt project, the profiles directory and the packages to install (dbtbackfill.runner.project)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dbtbackfill import cli
from dbtbackfill.runner.project import (
    ProjectError,
    Target,
    find_profiles_dir,
    find_project_dir,
    missing_packages,
    other_database,
    read_project,
    write_generated_profile,
)


def project(path: Path, name: str = "shop", profile: str | None = "warehouse") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    text = f"name: {name}\n" + (f"profile: {profile}\n" if profile else "")
    (path / "dbt_project.yml").write_text(text)
    return path


def profiles(path: Path, *names: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "profiles.yml").write_text("".join(f"{n}:\n  target: dev\n  outputs: {{}}\n" for n in names))
    return path


def test_the_project_is_the_flag_then_the_env_then_the_cwd_then_analytics(tmp_path: Path) -> None:
    a, b = project(tmp_path / "a"), project(tmp_path / "b")
    cwd = project(tmp_path / "cwd")
    project(cwd / "analytics")
    env = {"DBT_PROJECT_DIR": str(b)}
    assert find_project_dir(str(a), env, cwd) == a
    assert find_project_dir(None, env, cwd) == b
    assert find_project_dir(None, {}, cwd) == cwd
    seed = tmp_path / "seed"
    project(seed / "analytics")
    assert find_project_dir(None, {}, seed) == seed / "analytics"


def test_no_project_is_an_error_naming_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match=r"^no dbt project found in .* or .*analytics: pass --project-dir"):
        find_project_dir(None, {}, tmp_path)
    with pytest.raises(ProjectError, match=r"\(from DBT_PROJECT_DIR\): it has no dbt_project.yml$"):
        find_project_dir(None, {"DBT_PROJECT_DIR": str(tmp_path / "gone")}, tmp_path)


def test_the_profile_name_defaults_to_the_project_name(tmp_path: Path) -> None:
    assert read_project(project(tmp_path / "p", "shop", None)).profile == "shop"
    assert read_project(project(tmp_path / "q", "shop", "warehouse")).profile == "warehouse"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dbt_project.yml").write_text("profile: [\n")
    with pytest.raises(ProjectError, match="cannot read"):
        read_project(tmp_path / "bad")


def test_profiles_come_from_flag_env_project_cwd_home_or_none(tmp_path: Path) -> None:
    proj = read_project(project(tmp_path / "p"))
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    home.mkdir()
    assert find_profiles_dir(None, {}, proj, cwd, home) is None  # generated from DATABASE_URL then
    profiles(home / ".dbt", "warehouse")
    assert find_profiles_dir(None, {}, proj, cwd, home) == home / ".dbt"
    profiles(cwd, "someone_else")  # a profiles.yml without this project's profile is passed over
    assert find_profiles_dir(None, {}, proj, cwd, home) == home / ".dbt"
    profiles(proj.directory, "warehouse")
    assert find_profiles_dir(None, {}, proj, cwd, home) == proj.directory
    env_dir = profiles(tmp_path / "env", "x")
    assert find_profiles_dir(None, {"DBT_PROFILES_DIR": str(env_dir)}, proj, cwd, home) == env_dir
    flag_dir = profiles(tmp_path / "flag", "x")
    assert find_profiles_dir(str(flag_dir), {"DBT_PROFILES_DIR": str(env_dir)}, proj, cwd, home) == flag_dir
    with pytest.raises(ProjectError, match=r"no profiles.yml in .* \(from --profiles-dir\)"):
        find_profiles_dir(str(tmp_path / "nothing"), {}, proj, cwd, home)


def test_a_generated_profile_reads_the_runners_variables(tmp_path: Path) -> None:
    text = (write_generated_profile(tmp_path / "gen", "warehouse") / "profiles.yml").read_text()
    assert text.splitlines()[1] == "warehouse:"
    assert "{{ env_var('DBT_PG_DBNAME') }}" in text and "password" in text


def test_a_generated_profile_names_its_output_as_asked_and_only_plainly(tmp_path: Path) -> None:
    text = (write_generated_profile(tmp_path / "gen", "warehouse", "prod") / "profiles.yml").read_text()
    outputs = yaml.safe_load(text)["warehouse"]
    assert outputs["target"] == "prod" and list(outputs["outputs"]) == ["prod"]
    assert outputs["outputs"]["prod"]["host"] == "{{ env_var('DBT_PG_HOST') }}"
    with pytest.raises(ProjectError, match="not a plain name"):
        write_generated_profile(tmp_path / "bad", "warehouse", "prod: {}")
    assert not (tmp_path / "bad").exists()


def _tool(*argv: str) -> int:
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    return info.value.code if isinstance(info.value.code, int) else 0


def test_the_profile_command_writes_the_projects_generated_profile_once(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    proj = project(tmp_path / "shop", profile="jaffle_warehouse")
    out = tmp_path / "image-profile"

    assert _tool("profile", "--project-dir", str(proj), "--output-dir", str(out), "--target", "prod") == 0

    written = (out / "profiles.yml").read_text()
    assert (
        written == (write_generated_profile(tmp_path / "same", "jaffle_warehouse", "prod") / "profiles.yml").read_text()
    )
    assert capfd.readouterr().out.strip() == (
        f"profile jaffle_warehouse (target prod, from DBT_PG_*) written to {out / 'profiles.yml'}"
    )
    # An existing profiles.yml is someone's: kept as it is, one line, exit 2.
    assert _tool("profile", "--project-dir", str(proj), "--output-dir", str(out)) == 2
    assert (out / "profiles.yml").read_text() == written
    err = capfd.readouterr().err.strip()
    assert err == f"dbt-backfill profile: error: {out / 'profiles.yml'} exists; not overwritten"
    assert _tool("profile", "--project-dir", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o")) == 2
    assert capfd.readouterr().err.strip().startswith("dbt-backfill profile: error: no dbt project at ")
    assert not (tmp_path / "o").exists()


def test_missing_packages_names_uninstalled_local_packages(tmp_path: Path) -> None:
    pkg = project(tmp_path / "dbt-package", "dbt_backfill", None)
    proj_dir = project(tmp_path / "p")
    (proj_dir / "packages.yml").write_text("packages:\n  - local: ../dbt-package\n")
    proj = read_project(proj_dir)
    assert missing_packages(proj) == ["dbt_backfill"]
    (proj_dir / "dbt_packages").mkdir()
    (proj_dir / "dbt_packages" / "dbt_backfill").symlink_to(pkg)
    assert missing_packages(proj) == []
    (proj_dir / "packages.yml").write_text("packages:\n  - local: ../dbt-package\n  - package: org/utils\n")
    assert missing_packages(proj) == ["1 package(s)"]  # a hub package: named only once resolved
    assert missing_packages(read_project(project(tmp_path / "bare"))) == []


def test_other_database_is_none_for_the_targets_own_database() -> None:
    target = Target("p", "dev", "postgres", "127.0.0.1", 5433, "u", "shop", "jaffle", "profiles.yml")
    assert other_database(target, "postgresql://u@localhost:5433/shop") is None
    assert other_database(target, "postgresql://u@127.0.0.1:5433/audit") == "127.0.0.1:5433 database audit"
    assert other_database(target, "postgresql://u@db.internal:5433/shop") == "db.internal:5433 database shop"
    assert target.as_dict()["database"] == "shop" and "password" not in target.as_dict()
