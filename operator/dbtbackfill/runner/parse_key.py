"""Which connection settings a dbt parse is allowed to depend on, so a saved parse travels.

dbt reuses a saved parse (``partial_parse.msgpack``) only when, among other things, a hash of
the target's connection values is unchanged (``ManifestLoader.build_manifest_state_check``
hashes ``credentials.connection_info()``: host, port, user, database, schema, ...). The image
parses the project at build time with placeholder credentials, so every Pod, whose
credentials differ, would parse the whole project again.

Yet only the *relation-shaping* settings (database, schema) change what a parse produces —
they become each node's ``database``/``schema``. Host, port, user and password only say where
and as whom to connect, which a parse never does. So the runner parses with fixed placeholders
for those (the same ones the Dockerfile's build-time parse uses) and keeps the real database
and schema; the runs that follow connect with the real credentials. The parse then hits the
image's saved one whenever the database and schema are the ones it was built for.

That is only sound when the project's Jinja does not read the placeholders: a model that
writes ``{{ target.user }}`` into its config (or reads ``env_var('DBT_PG_HOST')``) would be
parsed with the placeholder. :func:`connection_reads` finds such reads, and the runner then
parses with the real credentials (correct, just not reusable).

Pure: no dbt, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# The Dockerfile's build-time `dbt parse` sets exactly these (tests/unit/test_parse_key.py).
PLACEHOLDERS: Mapping[str, str] = {
    "DBT_PG_HOST": "localhost",
    "DBT_PG_PORT": "5432",
    "DBT_PG_USER": "dbt",
    "DBT_PG_PASSWORD": "",
}

# target.* fields a parse may read freely: the same whatever the connection's credentials.
_RELATION_FIELDS = frozenset({"name", "target_name", "profile_name", "type", "database", "dbname", "schema", "threads"})

_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)
_TARGET = re.compile(r"\btarget\b")
_FIELD = re.compile(r"""\s*(?:\.get\(\s*['"](\w+)['"]|\.\s*(\w+)|\[\s*['"](\w+)['"]\s*\])""")
_ENV_VAR = re.compile(r"""env_var\(\s*['"](\w+)['"]""")


def connection_reads(text: str) -> set[str]:
    """What the Jinja in ``text`` reads that a placeholder would change, e.g. ``target.user``.

    ``target`` used whole (``{{ target }}``, ``target | tojson``) counts as reading everything.
    Text outside ``{{ }}``/``{% %}`` is not Jinja and is ignored.
    """
    found: set[str] = set()
    for block in _JINJA.findall(text):
        for match in _TARGET.finditer(block):
            field = _FIELD.match(block, match.end())
            name = next((g for g in field.groups() if g), None) if field else None
            if name not in _RELATION_FIELDS:
                found.add(f"target.{name}" if name else "target")
        found.update(f"env_var('{var}')" for var in _ENV_VAR.findall(block) if var in PLACEHOLDERS)
    return found


def project_connection_reads(sources: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    """Per source file (name, text): the connection reads it holds; files without any are left out."""
    return {name: reads for name, text in sources if (reads := connection_reads(text))}


def parse_environment(real: Mapping[str, str], reads: Mapping[str, set[str]]) -> dict[str, str]:
    """The ``DBT_PG_*`` overrides for the parse: the placeholders, unless the project reads them."""
    if reads:
        return {}
    return {key: value for key, value in PLACEHOLDERS.items() if key in real}
