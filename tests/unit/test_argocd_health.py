"""deploy/argocd/health.lua, run by a real Lua interpreter against table-driven cases.

Argo CD evaluates health scripts in gopher-lua (Lua 5.1 semantics, safe libraries only) with
`obj` as a global and every JSON number as a float. The harness reproduces that: each case's
object becomes a Lua table literal (numbers as floats, nulls dropped) and the script runs in an
environment holding only `obj` and the safe standard libraries. lua5.4 is required (CI installs
Debian's lua5.4); lua5.1, closest to gopher-lua, runs the same cases when it is installed.

The cases live in argocd_health_cases.json so a Python port of the mapping can share them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.crd_schema import openapi_to_jsonschema

REPO = Path(__file__).resolve().parents[2]
HEALTH_LUA = REPO / "deploy" / "argocd" / "health.lua"
ARGOCD_CM = REPO / "deploy" / "argocd" / "argocd-cm.yaml"
CASES_FILE = Path(__file__).with_name("argocd_health_cases.json")
CRD = REPO / "crds" / "dbtbackfills.dbt-backfill.io.yaml"
HEALTH_KEY = "resource.customizations.health.dbt-backfill.io_DbtBackfill"
ARGO_HEALTH_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}

CASES: list[dict[str, Any]] = json.loads(CASES_FILE.read_text())["cases"]

# Run the script like Argo CD does: a chunk whose globals are `obj` and the safe libraries only
# (no io, os, require, load...). setfenv/loadstring on 5.1, load(..., env) on 5.2+.
HARNESS = r"""
local path = arg[1]
local file = assert(io.open(path, "r"))
local source = file:read("*a")
file:close()
local env = {
  obj = OBJ,
  string = string, table = table, math = math,
  ipairs = ipairs, pairs = pairs, next = next, select = select, type = type,
  tostring = tostring, tonumber = tonumber, pcall = pcall, error = error,
}
local chunk
if setfenv then
  chunk = assert(loadstring(source, "=health.lua"))
  setfenv(chunk, env)
else
  chunk = assert(load(source, "=health.lua", "t", env))
end
local hs = chunk()
assert(type(hs) == "table", "health.lua must return a table")
io.write(tostring(hs.status), "\0", tostring(hs.message))
"""


def to_lua(value: Any) -> str:
    """A Lua table literal for a JSON value, as Argo CD would hand it over."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(float(value))  # gopher-lua numbers are float64
    if isinstance(value, str):
        out = []
        for byte in value.encode("utf-8"):
            char = chr(byte)
            if char in '"\\' or byte < 32 or byte > 126:
                out.append(f"\\{byte:03d}")
            else:
                out.append(char)
        return '"' + "".join(out) + '"'
    if isinstance(value, list):
        return "{" + ", ".join(to_lua(v) for v in value if v is not None) + "}"
    if isinstance(value, dict):
        items = [f"[{to_lua(str(k))}] = {to_lua(v)}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"not a JSON value: {value!r}")


def interpreters() -> list[Any]:
    return [
        pytest.param("lua5.4", id="lua5.4"),
        pytest.param("lua5.1", id="lua5.1"),
    ]


def lua(interpreter: str) -> str:
    path = shutil.which(interpreter)
    if path is not None:
        return path
    if interpreter == "lua5.4":
        message = "lua5.4 is not installed (apt-get install lua5.4)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run the Argo CD health check tests")
        pytest.skip(message)
    pytest.skip(f"{interpreter} is optional (closest to Argo CD's gopher-lua): apt-get install {interpreter}")


def run_health(interpreter: str, obj: dict[str, Any], tmp_path: Path, script: Path = HEALTH_LUA) -> tuple[str, str]:
    harness = tmp_path / "harness.lua"
    harness.write_text(f"OBJ = {to_lua(obj)}\n{HARNESS}")
    result = subprocess.run(
        [lua(interpreter), str(harness), str(script)],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr.decode()
    status, message = result.stdout.decode("utf-8").split("\0")
    return status, message


@pytest.mark.parametrize("interpreter", interpreters())
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_health(case: dict[str, Any], interpreter: str, tmp_path: Path) -> None:
    assert run_health(interpreter, case["obj"], tmp_path) == (case["expected"]["status"], case["expected"]["message"])


def test_harness_encodes_strings_and_numbers_faithfully(tmp_path: Path) -> None:
    probe = tmp_path / "probe.lua"
    probe.write_text('local hs = {}\nhs.status = obj.s\nhs.message = string.format("%d", obj.n)\nreturn hs\n')
    text = 'quote " backslash \\ newline \n tab \t unicode \u00e9\u2014\U0001f600'
    assert run_health("lua5.4", {"s": text, "n": 42}, tmp_path, probe) == (text, "42")


def test_harness_hides_unsafe_libraries(tmp_path: Path) -> None:
    probe = tmp_path / "probe.lua"
    probe.write_text('return {status = tostring(os) .. tostring(io) .. tostring(require), message = ""}\n')
    assert run_health("lua5.4", {}, tmp_path, probe) == ("nilnilnil", "")


def test_cases_are_well_formed() -> None:
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    for case in CASES:
        assert case["expected"]["status"] in ARGO_HEALTH_STATUSES, case["name"]
        assert isinstance(case["expected"]["message"], str) and case["expected"]["message"], case["name"]
        assert isinstance(case["schemaValid"], bool), case["name"]


def crd_schema() -> dict[str, Any]:
    (crd,) = [d for d in yaml.safe_load_all(CRD.read_text()) if d]
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    schema: dict[str, Any] = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"], resource=True)
    return schema


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_objects_match_the_crd(case: dict[str, Any]) -> None:
    # Realistic input: everything but the deliberately malformed cases is a valid DbtBackfill.
    errors = list(jsonschema.Draft202012Validator(crd_schema()).iter_errors(case["obj"]))
    if case["schemaValid"]:
        assert not errors, [e.message for e in errors]
    else:
        assert errors, "marked schemaValid: false but validates"


def test_cases_cover_every_phase() -> None:
    (crd,) = [d for d in yaml.safe_load_all(CRD.read_text()) if d]
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    phases = set(version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["phase"]["enum"])
    covered = {c["obj"].get("status", {}).get("phase") for c in CASES}
    assert phases <= covered, f"no case for phases {phases - covered}"


def test_argocd_cm_snippet_carries_the_same_script() -> None:
    (config_map,) = [d for d in yaml.safe_load_all(ARGOCD_CM.read_text()) if d]
    assert config_map["kind"] == "ConfigMap"
    assert config_map["metadata"]["name"] == "argocd-cm"
    assert config_map["data"][HEALTH_KEY] == HEALTH_LUA.read_text(), (
        "argocd-cm.yaml is out of date: paste deploy/argocd/health.lua into it again"
    )


def test_script_is_lua_51_compatible_text() -> None:
    # gopher-lua has no goto, integer division, bitwise operators or <const>/<close>.
    source = "\n".join(line.split("--", 1)[0] for line in HEALTH_LUA.read_text().splitlines())
    for token in ("goto ", "//", "<const>", "<close>", " & ", " | ", "~ ", "<<", ">>"):
        assert token not in source, f"not Lua 5.1: {token!r}"
