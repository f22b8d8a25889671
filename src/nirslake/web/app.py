"""The JSON API (FastAPI) over one ``WorkspaceStore``, and the static dashboard pages beside it.

Every handler is one call to the store's public API (or a ``nirslake.query``/cookbook/plots
helper) plus paging: the web holds no lake logic of its own. docs/web.md pairs each endpoint
with its Python twin.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

import polars as pl

try:
    import duckdb
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # an optional extra: say how to get it
    raise ImportError("nirslake's web app needs FastAPI and uvicorn: pip install 'nirslake[web]'") from exc

from .. import __version__
from ..api.jsonable import dumps, jsonable, rows
from ..query import cookbook
from .. import query as q

MAX_PAGE = 10_000
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="rows per page")]
Offset = Annotated[int, Query(ge=0, description="rows to skip")]
Sort = Annotated[str | None, Query(description="a column to sort by; a leading '-' sorts descending")]


# --------------------------------------------------------------------------- JSON


class LakeJSON(JSONResponse):
    """JSON that is valid everywhere: ``allow_nan=False`` after NaN/inf were made null."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode()


def page(frame: pl.DataFrame, sort: str | None, limit: int, offset: int, **extra: Any) -> LakeJSON:
    """One page of ``frame``: ``{"total", "offset", "limit", "items"}``; ``sort`` is a column, '-' first for descending."""
    if sort:
        column = sort[1:] if sort.startswith("-") else sort
        if column not in frame.columns:
            raise ValueError(f"cannot sort by {column!r}: choose one of {', '.join(frame.columns)}")
        frame = frame.sort(column, descending=sort.startswith("-"), nulls_last=True, maintain_order=True)
    return LakeJSON({"total": frame.height, "offset": offset, "limit": limit, **extra,
                     "items": rows(frame.slice(offset, limit))})


def error(status: int, message: str, **extra: Any) -> LakeJSON:
    return LakeJSON({"error": message, "status": status, **extra}, status_code=status)


def _where(frame: pl.DataFrame, **filters: Any) -> pl.DataFrame:
    exprs = [pl.col(k) == v for k, v in filters.items() if v is not None]
    return frame.filter(*exprs) if exprs else frame


def _found(value: Any, what: str, key: str) -> Any:
    if value is None:
        raise HTTPException(404, f"no {what} {key!r} in this workspace")
    return value


# --------------------------------------------------------------------------- the app


def create_app(workspace: str, allow_delete: bool = False, storage_options: dict | None = None) -> FastAPI:
    """The API and dashboard over ``workspace``, which must exist. ``allow_delete`` enables
    ``DELETE /api/runs/{run_id}``; without it the app only reads (the store it opens may still
    rebuild ``catalog.duckdb`` and publish a crashed writer's journal, as every store does)."""
    from ..lake.storage import Storage
    from ..store import WorkspaceStore

    if not Storage(workspace, storage_options).exists("tables"):
        raise ValueError(f"no nirslake workspace at {workspace!r}: create one with `nirslake demo --workspace {workspace}`")
    store = WorkspaceStore(workspace, storage_options)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        try:
            yield
        finally:
            store.close()

    app = FastAPI(
        title="nirslake", version=__version__, lifespan=lifespan, default_response_class=LakeJSON,
        # Swagger's pages load scripts from a CDN; the schema alone serves offline and loopback use.
        docs_url=None, redoc_url=None,
        description="ML experiment results of one nirslake workspace: runs, pipelines, chains, predictions "
        "and their arrays, the leaderboard, run comparison and plots. NaN and infinities are sent as null; "
        "errors are JSON objects with `error` and `status`. docs/web.md pairs each endpoint with its Python twin.",
    )
    app.state.store = store
    app.state.allow_delete = allow_delete
    _errors(app)

    @app.get("/api/info", tags=["workspace"], summary="The workspace served, and whether deleting is allowed")
    def info():
        return LakeJSON({"workspace": str(store.workspace_path), "version": __version__, "allow_delete": allow_delete,
                         "read_only": not allow_delete})

    @app.get("/api/datasets", tags=["workspace"], summary="Dataset names with their pipeline and run counts")
    def datasets():
        frame = store.list_pipelines()
        frame = frame.group_by("dataset_name").agg(pl.len().alias("pipelines"), pl.col("run_id").n_unique().alias("runs"))
        return page(frame.sort("dataset_name"), None, MAX_PAGE, 0)

    # ---------------------------------------------------------------- runs
    @app.get("/api/runs", tags=["runs"], summary="Runs, newest first (store.list_runs)")
    def runs(status: str | None = None, dataset: str | None = None, sort: Sort = None, limit: Limit = 50, offset: Offset = 0):
        return page(store.list_runs(status=status, dataset=dataset, limit=None), sort, limit, offset)

    @app.get("/api/runs/{run_id}", tags=["runs"], summary="One run (store.get_run)")
    def run(run_id: str):
        return LakeJSON(_found(store.get_run(run_id), "run", run_id))

    @app.delete("/api/runs/{run_id}", tags=["runs"], summary="Delete a run and everything under it (store.delete_run)",
                description="Only when the server was started with --allow-delete (403 otherwise).")
    def delete_run(run_id: str):
        if not allow_delete:
            return error(403, "this server is read-only: start it with `nirslake serve --allow-delete` to delete runs")
        deleted = store.delete_run(run_id)
        if deleted == 0:
            raise HTTPException(404, f"no run {run_id!r} in this workspace")
        return LakeJSON({"run_id": run_id, "deleted_records": deleted})

    @app.get("/api/compare", tags=["runs"], summary="Two runs compared chain by chain (cookbook query compare_runs)")
    def compare(run_a: str | None = None, run_b: str | None = None, sort: Sort = None, limit: Limit = 1000, offset: Offset = 0):
        if run_a is None or run_b is None:
            newest = store.list_runs(limit=2)["run_id"].to_list()
            if len(newest) < 2:
                raise ValueError("comparing needs two runs: this workspace holds fewer; pass run_a and run_b")
            run_a, run_b = run_a or newest[1], run_b or newest[0]
        a = _found(store.get_run(run_a), "run", run_a)
        b = _found(store.get_run(run_b), "run", run_b)
        frame = cookbook.run_query(store, "compare_runs", run_a=run_a, run_b=run_b).drop("run_a", "run_b")
        return page(frame, sort, limit, offset, run_a=a, run_b=b)

    # ---------------------------------------------------------------- pipelines and chains
    @app.get("/api/pipelines", tags=["pipelines"], summary="Pipelines, newest first (store.list_pipelines)")
    def pipelines(run_id: str | None = None, dataset_name: str | None = None, status: str | None = None,
                  sort: Sort = None, limit: Limit = 50, offset: Offset = 0):
        frame = _where(store.list_pipelines(run_id=run_id, dataset_name=dataset_name), status=status)
        return page(frame, sort, limit, offset)

    @app.get("/api/pipelines/{pipeline_id}", tags=["pipelines"],
             summary="One pipeline with its chains (store.get_pipeline, store.get_chains_for_pipeline)")
    def pipeline(pipeline_id: str):
        found = _found(store.get_pipeline(pipeline_id), "pipeline", pipeline_id)
        return LakeJSON({**found, "chains": rows(store.get_chains_for_pipeline(pipeline_id))})

    @app.get("/api/chains", tags=["chains"], summary="Chains (nirslake.query.scan(workspace, 'chains'))")
    def chains(run_id: str | None = None, pipeline_id: str | None = None, model_class: str | None = None,
               sort: Sort = None, limit: Limit = 50, offset: Offset = 0):
        frame = q.scan(store.storage, "chains").drop("artifact_ids").sort(["created_at", "chain_id"]).collect()
        return page(_where(frame, run_id=run_id, pipeline_id=pipeline_id, model_class=model_class), sort, limit, offset)

    @app.get("/api/chains/{chain_id}", tags=["chains"],
             summary="One chain with its scores per fold and over folds (store.get_chain, query_predictions, chain_summary)")
    def chain(chain_id: str):
        found = _found(store.get_chain(chain_id), "chain", chain_id)
        folds = store.query_predictions(pipeline_id=found["pipeline_id"]).filter(pl.col("chain_id") == chain_id)
        folds = folds.select("prediction_id", "fold_id", "partition", "dataset_name", "model_name", "preprocessings",
                             "metric", "val_score", "test_score", "train_score", "n_samples").sort("partition", "fold_id")
        summary = store.sql("SELECT * FROM chain_summary WHERE chain_id = ? ORDER BY partition", [chain_id])
        return LakeJSON({**found, "folds": rows(folds), "summary": rows(summary)})

    @app.get("/api/chain-summaries", tags=["chains"], summary="Scores over folds per chain and partition (the chain_summary view)")
    def chain_summaries(dataset_name: str | None = None, run_id: str | None = None, model_name: str | None = None,
                        partition: str | None = "val", sort: Sort = None, limit: Limit = 50, offset: Offset = 0):
        frame = store.sql("SELECT * FROM chain_summary ORDER BY dataset_name, chain_id, partition")
        frame = _where(frame, dataset_name=dataset_name, run_id=run_id, model_name=model_name, partition=partition)
        return page(frame, sort, limit, offset)

    @app.get("/api/leaderboard", tags=["chains"], summary="Best chains per dataset by mean validation score (store.leaderboard)")
    def leaderboard(n: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 5, dataset_name: str | None = None):
        frame = _where(store.leaderboard(n), dataset_name=dataset_name)
        return page(frame, None, MAX_PAGE, 0)

    # ---------------------------------------------------------------- predictions
    @app.get("/api/predictions", tags=["predictions"], summary="Predictions without arrays (store.query_predictions)")
    def predictions(dataset_name: str | None = None, model_class: str | None = None, partition: str | None = None,
                    fold_id: str | None = None, branch_id: int | None = None, pipeline_id: str | None = None,
                    run_id: str | None = None, chain_id: str | None = None, model_name: str | None = None,
                    sort: Sort = None, limit: Limit = 50, offset: Offset = 0):
        frame = store.query_predictions(dataset_name=dataset_name, model_class=model_class, partition=partition,
                                        fold_id=fold_id, branch_id=branch_id, pipeline_id=pipeline_id, run_id=run_id)
        return page(_where(frame, chain_id=chain_id, model_name=model_name), sort, limit, offset)

    @app.get("/api/predictions/{prediction_id}", tags=["predictions"],
             summary="One prediction with its arrays (store.get_prediction(id, load_arrays=True))")
    def prediction(prediction_id: str, arrays: bool = True):
        return LakeJSON(_found(store.get_prediction(prediction_id, load_arrays=arrays), "prediction", prediction_id))

    # ---------------------------------------------------------------- cookbook and plots
    @app.get("/api/queries", tags=["cookbook"], summary="The named queries of sql/queries (nirslake.query.cookbook)")
    def queries():
        named = [cookbook.named_query(name) for name in cookbook.query_names()]
        return LakeJSON({"total": len(named), "items": [
            {"name": nq.name, "description": nq.description, "parameters": list(nq.parameters)} for nq in named]})

    @app.get("/api/queries/{name}", tags=["cookbook"],
             summary="Run a named query; its parameters are query-string fields (cookbook.run_query)")
    def run_named_query(name: str, request: Request, sort: Sort = None, limit: Limit = 1000, offset: Offset = 0):
        params = {k: v for k, v in request.query_params.items() if k not in ("sort", "limit", "offset")}
        return page(cookbook.run_query(store, name, **params), sort, limit, offset)

    @app.get("/api/plots/{filename}", tags=["plots"], response_class=Response,
             summary="A picture as PNG or SVG, e.g. predicted.svg?prediction_id=... (nirslake.plots, as `nirslake plot`)",
             responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}})
    def plot(filename: str, prediction_id: str | None = None, chain_id: str | None = None, dataset_name: str | None = None,
             partition: str = "val", n: Annotated[int, Query(ge=1, le=100)] = 10):
        from .. import plots

        kind, _, format = filename.rpartition(".")
        if format not in plots.FORMATS or kind not in plots.KINDS:
            raise HTTPException(404, f"no plot {filename!r}: ask for KIND.png or KIND.svg, KIND one of {', '.join(plots.KINDS)}")
        fig = plots.figure(store, kind, prediction_id=prediction_id, chain_id=chain_id, dataset_name=dataset_name,
                           partition=partition, n=n)
        media = "image/png" if format == "png" else "image/svg+xml"
        return Response(plots.render(fig, format), media_type=media)

    pages = resources.files("nirslake.web") / "static"
    app.mount("/", StaticFiles(directory=str(pages), html=True), name="dashboard")
    return app


def _errors(app: FastAPI) -> None:
    """Every error as JSON ``{"error": ..., "status": ...}`` with its status code."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(jsonable(exc.detail))
        if exc.status_code == 404 and message == "Not Found":  # no route, no page
            message = f"nothing at {request.url.path}: the API's endpoints are listed at /openapi.json"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return error(422, "; ".join(problems), detail=jsonable([{k: e.get(k) for k in ("loc", "msg", "type", "input")}
                                                                  for e in exc.errors()]))

    @app.exception_handler(KeyError)
    async def unknown_key(_request: Request, exc: KeyError):
        return error(404, str(exc.args[0]) if exc.args else "not found")

    @app.exception_handler(ValueError)
    @app.exception_handler(TypeError)
    async def bad_value(_request: Request, exc: Exception):
        return error(400, str(exc))

    @app.exception_handler(duckdb.Error)
    async def bad_query(_request: Request, exc: duckdb.Error):
        return error(400, f"the query failed: {str(exc).strip().splitlines()[0]}")

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- serving


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(workspace: str, host: str = "127.0.0.1", port: int = 8765, allow_delete: bool = False,
          announce=print) -> None:
    """Serve the API and dashboard until Ctrl-C. ``port=0`` takes a free port; the first line
    ``announce``d names the URL (tests and scripts read it)."""
    import uvicorn

    app = create_app(workspace, allow_delete=allow_delete)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # connections made once the URL is announced wait for the server, not refused
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    mode = "deleting runs allowed" if allow_delete else "read-only"
    announce(f"nirslake: serving {workspace} at http://{shown}:{bound}/ ({mode}; Ctrl-C stops)")
    if not is_loopback(host):
        announce(f"nirslake: warning: {host} is reachable from other machines, and the API has no authentication")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly on Ctrl-C, then raises it again
        pass
    announce("nirslake: server stopped")
