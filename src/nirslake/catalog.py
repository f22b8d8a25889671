"""The DuckDB catalog: a small database file of views over the lake, built from ``sql/views/*.sql``.

It is never written in place: a rebuild makes a new file and renames it over the old one, so
the DuckDB shell and any number of writer processes never contend for its lock.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from importlib import resources
from pathlib import Path

import duckdb

from .query import LOWER_IS_BETTER
from .schema import FORMAT_VERSION
from .storage import Storage

CATALOG_FILE = "catalog.duckdb"
CATALOG_STAMP = "_meta/catalog.json"


def sql_dir() -> Path:
    """The ``sql/`` folder: inside the installed wheel, or at the repository root in a checkout."""
    packaged = Path(str(resources.files("nirslake"))) / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "sql"


def view_statements(storage: Storage) -> str:
    """The view SQL with the workspace location filled in."""
    # Glob characters in the workspace path itself must match literally: [ * ? become [[] [*] [?].
    literal = "".join(f"[{c}]" if c in "[*?" else c for c in storage.url())
    lake = literal.replace("'", "''")
    metrics = ", ".join(f"'{m}'" for m in sorted(LOWER_IS_BETTER))
    parts = []
    for path in sorted((sql_dir() / "views").glob("*.sql")):
        text = path.read_text(encoding="utf-8")
        parts.append(text.replace("{lake}", lake).replace("{lower_is_better}", metrics))
    return "\n".join(parts)


def create_views(con: duckdb.DuckDBPyConnection, storage: Storage) -> None:
    if not storage.is_local:
        # DuckDB reads remote workspaces through the same fsspec filesystem as the store.
        con.register_filesystem(storage.fs)
    con.execute(view_statements(storage))


def connect(storage: Storage) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with every lake view, for queries from Python."""
    con = duckdb.connect()
    create_views(con, storage)
    return con


def _stamp(storage: Storage) -> dict:
    return {"format_version": FORMAT_VERSION, "lake": storage.url(), "duckdb": duckdb.__version__}


def is_current(storage: Storage) -> bool:
    """True when the catalog exists and was built for this format, location and DuckDB line."""
    if not (storage.exists(CATALOG_FILE) and storage.exists(CATALOG_STAMP)):
        return False
    try:
        return json.loads(storage.read_bytes(CATALOG_STAMP)) == _stamp(storage)
    except (ValueError, OSError):
        return False


def build_catalog(storage: Storage) -> str:
    """(Re)build ``<workspace>/catalog.duckdb``; returns its path or URL."""
    with tempfile.TemporaryDirectory(prefix="nirslake-catalog-") as tmp:
        db_path = os.path.join(tmp, f"{uuid.uuid4().hex}.duckdb")
        con = duckdb.connect(db_path)
        try:
            create_views(con, storage)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        data = Path(db_path).read_bytes()
    storage.publish(CATALOG_FILE, data, overwrite=True)
    storage.publish(CATALOG_STAMP, json.dumps(_stamp(storage)).encode(), overwrite=True)
    return storage.url(CATALOG_FILE)


def ensure_catalog(storage: Storage) -> None:
    if not is_current(storage):
        build_catalog(storage)
