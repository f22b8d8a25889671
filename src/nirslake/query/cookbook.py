"""The cookbook: named SQL queries shipped in ``sql/queries/<name>.sql``, run over the lake's views.

Each file is plain DuckDB SQL that pastes into the DuckDB shell; its parameters are DuckDB
variables (``getvariable('run_a')``) with defaults in the query, set here with ``SET VARIABLE``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from .catalog import sql_dir

_VARIABLE = re.compile(r"getvariable\('([a-z_][a-z0-9_]*)'\)")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class NamedQuery:
    name: str
    description: str  # the file's leading comment, without the comment marks
    sql: str  # the file's text, as pasted into the DuckDB shell
    parameters: tuple[str, ...]  # the DuckDB variables it reads, each with a default in the query


def query_names() -> list[str]:
    """The names of the shipped queries, sorted."""
    return sorted(p.stem for p in (sql_dir() / "queries").glob("*.sql"))


def named_query(name: str) -> NamedQuery:
    """The query ``sql/queries/<name>.sql``; a ValueError names the shipped ones for an unknown name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name not in query_names():
        raise ValueError(f"no query named {name!r}: choose one of {', '.join(query_names())}")
    text = (sql_dir() / "queries" / f"{name}.sql").read_text(encoding="utf-8")
    lead = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        lead.append(line[2:].strip())
    return NamedQuery(name, " ".join(lead), text, tuple(dict.fromkeys(_VARIABLE.findall(text))))


def query_sql(name: str, params: dict[str, object] | None = None) -> str:
    """The query's SQL with ``SET VARIABLE`` statements for ``params`` in front (values as SQL literals)."""
    query = named_query(name)
    params = params or {}
    unknown = sorted(set(params) - set(query.parameters))
    if unknown:
        takes = ", ".join(query.parameters) if query.parameters else "no parameters"
        raise ValueError(f"query {name!r} has no parameter {', '.join(map(repr, unknown))}: it takes {takes}")
    sets = [f"SET VARIABLE {key} = {_literal(value)};" for key, value in params.items()]
    return "\n".join([*sets, query.sql])


def run_query(store, name: str, **params: object) -> pl.DataFrame:
    """Run the named query on ``store``'s views (``store.sql``); ``params`` set its variables."""
    return store.sql(query_sql(name, params))


def _literal(value: object) -> str:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"a query parameter is a string or a number, got {value!r}")
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"
