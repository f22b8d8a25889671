"""The DuckDB catalog: a small database file of views over the lake, built from ``sql/views/*.sql``.

It is never written in place: a rebuild makes a new file and renames it over the old one, so
the DuckDB shell and any number of writer processes never contend for its lock.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pyarrow.parquet as pq

from ..lake.schema import FORMAT_VERSION
from ..lake.storage import Storage
from . import LOWER_IS_BETTER
from .scores import CLOSEST_TO_ZERO

if TYPE_CHECKING:
    import duckdb

# duckdb is imported where a query or a build needs it, not with nirslake: opening a store and
# its reads never use it, and the import is a tenth of `import nirslake` (issue 11).

CATALOG_FILE = "catalog.duckdb"
CATALOG_STAMP = "_meta/catalog.json"


def sql_dir() -> Path:
    """The ``sql/`` folder: inside the installed wheel, or at the repository root in a checkout."""
    packaged = Path(str(resources.files("nirslake"))) / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "sql"


def view_statements(storage: Storage) -> str:
    """The view SQL with the workspace location filled in (lake spec §9).

    The location goes only into string literals (``'{lake}`` exactly, ``'{lake_glob}`` as a
    DuckDB glob), quoted for SQL: a path holding a quote, a newline or ``--`` stays a path.
    """
    return _view_text(storage.url())


def _location_literals(location: str) -> dict[str, str]:
    # DuckDB's globs take [ * ? as patterns, matched literally as [[] [*] [?]; they cannot
    # match a backslash at all (not even escaped), so `?` stands for it and lake_files keeps
    # only the files under the exact location.
    glob = "".join(f"[{c}]" if c in "[*?" else "?" if c == "\\" else c for c in location)
    return {"lake": _sql_text(location), "lake_glob": _sql_text(glob)}


def location_statements(location: str) -> str:
    """The two macros that hold the workspace location (``sql/views/00_lake.sql``); every view
    reaches the lake through them, so replacing them moves a built catalog to another location."""
    literals = _location_literals(location)
    return (
        f"CREATE OR REPLACE MACRO lake_location() AS '{literals['lake']}';\n"
        f"CREATE OR REPLACE MACRO lake_location_glob() AS '{literals['lake_glob']}';"
    )


def _view_text(location: str) -> str:
    literals = _location_literals(location)
    metrics = ", ".join(f"'{m}'" for m in sorted(LOWER_IS_BETTER))
    zero = ", ".join(f"'{m}'" for m in sorted(CLOSEST_TO_ZERO))
    parts = []
    for path in sorted((sql_dir() / "views").glob("*.sql")):
        text = path.read_text(encoding="utf-8")
        if re.search(r"(?<!')\{lake", text):
            raise ValueError(f"{path}: the workspace location may only start a string literal ('{{lake}}...')")
        # Before the location, which may hold anything.
        text = text.replace("{lower_is_better}", metrics).replace("{closest_to_zero}", zero)
        parts.append(_PLACEHOLDER.sub(lambda m: "'" + literals[m.group(1)], text))
    return "\n".join(parts)


_PLACEHOLDER = re.compile(r"'\{(lake|lake_glob)\}")


def packaged_httpfs() -> Path | None:
    """DuckDB's httpfs extension from the ``duckdb-extension-httpfs`` package of the same DuckDB
    version (the ``s3`` extra installs it; loading it needs no network), or None."""
    try:
        import duckdb_extension_httpfs
    except ImportError:
        return None
    found = Path(duckdb_extension_httpfs.__file__).parent / "extensions" / f"v{duckdb_version()}" / "httpfs.duckdb_extension"
    return found if found.exists() else None


def httpfs_load_statement() -> str:
    """``LOAD`` of DuckDB's httpfs extension: the packaged one when installed, else DuckDB's own
    ``INSTALL``/``LOAD``."""
    found = packaged_httpfs()
    return f"LOAD '{_sql_text(str(found))}';" if found else "INSTALL httpfs; LOAD httpfs;"


def _sql_text(value: str) -> str:
    return value.replace("'", "''")


def s3_secret_statement(storage_options: dict | None = None, bucket_region: Callable[[], str | None] | None = None) -> str:
    """``CREATE SECRET`` for DuckDB's httpfs from the usual places: ``storage_options`` (key,
    secret, token, endpoint_url or client_kwargs.endpoint_url), else the AWS environment
    variables (``AWS_ENDPOINT_URL`` included) and profile, as boto resolves them. When none of
    these sets a region, ``bucket_region()`` is asked for the bucket's own: unlike boto, DuckDB
    does not follow S3's redirect to it."""
    opts = dict(storage_options or {})
    key, secret, token = opts.get("key"), opts.get("secret"), opts.get("token")
    region = (opts.get("client_kwargs") or {}).get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if key is None:
        try:
            import botocore.session

            session = botocore.session.Session(profile=opts.get("profile"))
            creds = session.get_credentials()
            if creds is not None:
                frozen = creds.get_frozen_credentials()
                key, secret, token = frozen.access_key, frozen.secret_key, frozen.token
            region = region or session.get_config_variable("region")
            endpoint = endpoint or session.get_config_variable("endpoint_url")
        except ImportError:
            pass
    if not region and bucket_region is not None:
        region = bucket_region()
    fields = []
    if key:
        fields += [f"KEY_ID '{_sql_text(key)}'", f"SECRET '{_sql_text(secret or '')}'"]
    if token:
        fields.append(f"SESSION_TOKEN '{_sql_text(token)}'")
    if region:
        fields.append(f"REGION '{_sql_text(region)}'")
    if endpoint:
        scheme, _, host = endpoint.partition("://") if "://" in endpoint else ("https", "", endpoint)
        fields += [f"ENDPOINT '{_sql_text(host.rstrip('/'))}'", "URL_STYLE 'path'", f"USE_SSL {'true' if scheme == 'https' else 'false'}"]
    return f"CREATE OR REPLACE SECRET nirslake_s3 (TYPE s3{''.join(', ' + f for f in fields)});"


def shell_init_sql(storage: Storage) -> str:
    """The SQL that makes a plain DuckDB session see the lake: for ``s3://`` workspaces httpfs and
    a secret first, then the views (docs/remote.md shows it for people who start ``duckdb`` by hand)."""
    parts = []
    if storage.protocol in ("s3", "s3a"):
        parts += [httpfs_load_statement(), s3_secret_statement(storage.storage_options, lambda: storage.bucket_region)]
    elif not storage.is_local:
        parts.append(httpfs_load_statement())
    parts.append(view_statements(storage))
    return "\n".join(parts)


# The storage options that ``s3_secret_statement`` carries over to DuckDB; with any other option
# (anon, requester_pays, config_kwargs, ...) only fsspec knows how to reach the bucket.
SECRET_OPTIONS = frozenset({"key", "secret", "token", "profile", "endpoint_url", "client_kwargs", "use_listings_cache",
                            "skip_instance_cache"})
SECRET_CLIENT_OPTIONS = frozenset({"endpoint_url", "region_name"})


def reads_through_httpfs(storage: Storage) -> bool:
    """True when DuckDB reads this workspace with its own S3 client (httpfs), as the shell does."""
    options = storage.storage_options
    return (
        storage.protocol in ("s3", "s3a")
        and packaged_httpfs() is not None
        and set(options) <= SECRET_OPTIONS
        and set(options.get("client_kwargs") or {}) <= SECRET_CLIENT_OPTIONS
    )


def create_views(con: duckdb.DuckDBPyConnection, storage: Storage) -> None:
    """The lake's views on ``con``. A remote workspace is read by DuckDB's httpfs when it can reach
    it (S3, the packaged extension, options a secret holds), else through the store's fsspec
    filesystem (``Storage.query_fs``), whose cached listings never say a file is absent (lake spec §9)."""
    _reach(con, storage)
    con.execute(view_statements(storage))


def _reach(con: duckdb.DuckDBPyConnection, storage: Storage) -> None:
    """What ``con`` needs to read a remote workspace (nothing for a local one)."""
    if reads_through_httpfs(storage):
        con.execute(httpfs_load_statement())
        con.execute(s3_secret_statement(storage.storage_options, lambda: storage.bucket_region))
        con.execute("SET enable_http_metadata_cache = true")
    elif not storage.is_local:
        con.register_filesystem(storage.query_fs())


def connect(storage: Storage) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with every lake view, for queries from Python."""
    import duckdb

    con = duckdb.connect()
    create_views(con, storage)
    return con


def duckdb_version() -> str:
    """``duckdb.__version__``, read from the installed package's metadata unless duckdb is loaded."""
    loaded = sys.modules.get("duckdb")
    return loaded.__version__ if loaded is not None else _installed_duckdb_version()


@functools.lru_cache(maxsize=1)
def _installed_duckdb_version() -> str:
    # The package's dist-info folder beside it names the version: one folder glob instead of
    # importlib.metadata's walk over every installed distribution (~2 ms of each store's open).
    spec = importlib.util.find_spec("duckdb")
    if spec is not None and spec.submodule_search_locations:
        site = Path(next(iter(spec.submodule_search_locations))).parent
        found = list(site.glob("duckdb-*.dist-info"))
        if len(found) == 1:
            return found[0].name[len("duckdb-"):-len(".dist-info")]
    return metadata.version("duckdb")


def _stamp(storage: Storage) -> dict:
    return dict(_location_stamp(storage.url()))


@functools.lru_cache(maxsize=64)
def _location_stamp(location: str) -> dict:
    # The views' own text too: a catalog built by an older nirslake lacks views and macros added
    # since (sql/queries/ use them), so it is rebuilt rather than kept. Kept per location for the
    # process, as the code it ships with (reading the SQL files and the package metadata again
    # cost each store's open a few ms).
    views = hashlib.sha256(_view_text(location).encode()).hexdigest()[:16]
    return {"format_version": FORMAT_VERSION, "lake": location, "duckdb": duckdb_version(), "views": views}


def is_current(storage: Storage) -> bool:
    """True when the catalog exists and was built for this format, location, DuckDB line and view SQL."""
    if not storage.exists(CATALOG_FILE):
        return False
    try:  # a missing stamp raises FileNotFoundError, an OSError: one request, not a HEAD and a GET
        return json.loads(storage.read_bytes(CATALOG_STAMP)) == _stamp(storage)
    except (ValueError, OSError):
        return False


class CatalogError(ValueError):
    """The catalog could not be built (a damaged data file, most often); the lake itself is untouched."""


def run_sql(storage: Storage, query: str, params: list | None = None) -> pl.DataFrame:
    """``query`` run against the lake's views (a fresh connection, closed after); returns polars.

    The connection opens a copy of a catalog this process built (``_BUILT``) with the location
    macros replaced, when there is one: creating the views binds each, most of a short query's time."""
    import duckdb

    template = _BUILT.get((duckdb_version(), _view_text("")))
    with tempfile.TemporaryDirectory(prefix="nirslake-sql-") as tmp:
        if template is None:
            con = connect(storage)
        else:
            db_path = os.path.join(tmp, "views.duckdb")
            Path(db_path).write_bytes(template)
            con = duckdb.connect(db_path)
        try:
            if template is not None:
                _reach(con, storage)
                con.execute(location_statements(storage.url()))
            result = con.execute(query, params or [])
            if result is None:  # DuckDB's answer to text without a statement ("", a comment)
                raise ValueError(f"the query holds no SQL statement: {query!r}; pass one, e.g. 'SELECT * FROM runs'")
            return result.pl()
        finally:
            con.close()


# Catalogs this process built, by the view SQL they hold with the location left out: a build for
# another location copies one and replaces the two location macros (``location_statements``)
# instead of creating every view, which binds each (reading the lake's footers) and cost most of
# opening a new workspace (0.3 s locally, seconds on S3). DuckDB binds a view again at each query,
# so what a view shows comes from the files at its location, whatever the catalog was built on.
_BUILT: dict[tuple[str, str], bytes] = {}


def build_catalog(storage: Storage, written: set[str] = frozenset()) -> str:
    """(Re)build ``<workspace>/catalog.duckdb``; returns its path or URL. ``written``: files the
    caller has just written itself (a new workspace's schema files), whose footers need no check."""
    import duckdb

    shape = (duckdb_version(), _view_text(""))
    with tempfile.TemporaryDirectory(prefix="nirslake-catalog-") as tmp:
        db_path = os.path.join(tmp, f"{uuid.uuid4().hex}.duckdb")
        template = _BUILT.get(shape)
        if template is not None:
            # No view is bound here, so nothing reads the footers a bind would: the check DuckDB
            # made is made directly, and a damaged file stops the build as it did (lake spec §10).
            damaged = _unreadable_footers(storage, skip=written)
            if damaged:
                raise CatalogError(
                    f"could not build {CATALOG_FILE} of {storage.url()}: a data file's Parquet footer does not read "
                    f"(damaged: {', '.join(damaged)}); run `nirslake check` on the workspace to find every damaged file"
                )
            Path(db_path).write_bytes(template)
        con = duckdb.connect(db_path)
        try:
            if template is not None:
                con.execute(location_statements(storage.url()))
            else:
                create_views(con, storage)
            con.execute("CHECKPOINT")
        except (duckdb.Error, OSError) as exc:
            # DuckDB reads every data file's footer to bind the views: one damaged file stops it,
            # and its error does not always say which.
            damaged = _unreadable_footers(storage)
            raise CatalogError(
                f"could not build {CATALOG_FILE} of {storage.url()}: {exc}"
                + (f" (damaged: {', '.join(damaged)})" if damaged else "")
                + "; run `nirslake check` on the workspace to find every damaged file"
            ) from exc
        finally:
            con.close()
        data = Path(db_path).read_bytes()
    _BUILT.setdefault(shape, data)
    storage.publish(CATALOG_FILE, data, overwrite=True)
    storage.publish(CATALOG_STAMP, json.dumps(_stamp(storage)).encode(), overwrite=True)
    return storage.url(CATALOG_FILE)


def _unreadable_footers(storage: Storage, skip: set[str] = frozenset()) -> list[str]:
    """The data files whose Parquet footer does not read, as DuckDB needs it to bind a view
    (``skip``: files known to be whole)."""

    def damaged(rel: str) -> bool:
        try:
            with storage.open_arrow(rel) as fh:
                pq.read_metadata(fh)
        except FileNotFoundError:
            return False  # replaced by a compaction since the listing: gone, not damaged
        except Exception:  # noqa: BLE001 - any other failure to read is what is looked for
            return True
        return False

    rels = [rel for rel in storage.list_files("tables") if rel not in skip]
    if storage.is_local or len(rels) < 2:
        return [rel for rel in rels if damaged(rel)]
    with ThreadPoolExecutor(max_workers=min(len(rels), 16)) as pool:  # a request each, in flight together
        return [rel for rel, bad in zip(rels, pool.map(damaged, rels)) if bad]


def ensure_catalog(storage: Storage) -> None:
    if not is_current(storage):
        build_catalog(storage)
