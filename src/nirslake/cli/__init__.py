"""The ``nirslake`` command: a thin shell over the Python API, one command per user-facing method.

Each command opens a ``WorkspaceStore``, calls the API (the store, ``nirslake.api``,
``nirslake.query``) and prints its result through ``output``. Exit codes: 0 done, 1 a failure or
problems found (``check``), 2 a usage error (a bad argument, an unknown id, a missing
workspace), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). docs/cli.md lists them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import warnings
from typing import Any, Sequence

from .output import Progress, listing, print_frame, print_warning, record

DEFAULT_WORKSPACE = os.environ.get("NIRSLAKE_WORKSPACE", "lake")
VIEWS = ("runs", "pipelines", "chains", "predictions", "prediction_arrays", "artifacts", "logs",
         "predictions_with_run", "chain_summary", "leaderboard", "prediction_scores", "prediction_scores_long",
         "array_scores", "sample_scores")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class CliError(Exception):
    """A problem the user can fix; printed without a traceback (exit code 2)."""


class Failed(Exception):
    """The command ran but could not do its work (exit code 1)."""


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread so every ``finally`` and ``except BaseException``
    (the demo's ``fail_run``) runs before the process ends with 143."""


def _open(workspace: str, must_exist: bool = True, **options: Any):
    from ..lake.storage import Storage
    from ..store import WorkspaceStore

    if must_exist and not Storage(workspace).exists("tables"):
        raise CliError(
            f"no nirslake workspace at {workspace!r}: create one with `nirslake demo --workspace {workspace}` "
            "or point --workspace (or NIRSLAKE_WORKSPACE) at an existing one"
        )
    return WorkspaceStore(workspace, **options)


def _json(args: argparse.Namespace, value: Any) -> bool:
    """Print ``value`` as JSON when ``--json`` was given; True when it was."""
    if getattr(args, "json", False):
        from ..api.jsonable import dumps

        print(dumps(value, indent=1))
        return True
    return False


def _say(args: argparse.Namespace):
    """Where progress lines go: stdout for people, stderr when stdout carries JSON or CSV."""
    if getattr(args, "json", False) or getattr(args, "csv", False):
        return lambda line: print(line, file=sys.stderr, flush=True)
    return print


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    progress = Progress("demo") if not args.json else _say(args)
    try:
        result = run_demo(args.workspace, quick=args.quick, progress=progress)
    finally:
        if isinstance(progress, Progress):
            progress.close()
    with _open(args.workspace) as store:
        board = store.leaderboard(3).select(
            "dataset_name", "rank", "model_name", "preprocessings", "metric", "val_score_mean", "val_score_std", "test_score_mean", "n_folds"
        )
        n = store.sql("SELECT count(*) AS n FROM predictions").item()
        shell = _shell_hint(store)
    if _json(args, {**result, "predictions_in_workspace": n, "leaderboard": board.to_dicts(), "shell": shell}):
        return
    print_frame(board, "\nLeaderboard: best 3 chains per dataset by mean validation score over folds "
                       "(the lines above show the same mean per pipeline)")
    print(
        f"\n{result['n_pipelines']} pipelines, {result['n_predictions']} predictions written in "
        f"{result['elapsed_s']:.1f} s; the workspace now holds {n} predictions."
    )
    print("Explore it in the DuckDB shell (from any folder):")
    print(f"  {shell}")


def _shell_hint(store) -> str:
    """The command that opens the workspace in the DuckDB shell: the catalog file of a local
    workspace; ``nirslake shell URL`` for a remote one (its views need httpfs and a secret)."""
    query = "SELECT * FROM leaderboard WHERE rank <= 3"
    if store.storage.is_local:
        catalog = os.path.join(store.storage.root, "catalog.duckdb")
        return f'{_duckdb_cli()} -readonly {shlex.quote(catalog)} -c "{query}"'
    return f"nirslake shell {shlex.quote(str(store.workspace_path))} -c \"{query}\""


def _duckdb_cli() -> str:
    """The DuckDB shell installed with nirslake (duckdb-cli), or plain ``duckdb`` when it is on PATH."""
    import shutil

    beside = os.path.join(os.path.dirname(sys.executable), "duckdb")
    if shutil.which("duckdb") == beside or not os.path.exists(beside):
        return "duckdb"
    return beside


# --------------------------------------------------------------------------- listings


def cmd_runs(args: argparse.Namespace) -> None:
    with _open(args.workspace) as store:
        frame = store.list_runs(status=args.status, dataset=args.dataset, limit=None)
    _list(args, frame, "runs", ("run_id", "name", "status", "created_at", "completed_at"))


def cmd_pipelines(args: argparse.Namespace) -> None:
    import polars as pl

    with _open(args.workspace) as store:
        frame = store.list_pipelines(run_id=args.run, dataset_name=args.dataset)
        if args.status:
            frame = frame.filter(pl.col("status") == args.status)
        _nothing_matched(store, frame, dataset_name=args.dataset)
    _list(args, frame, "pipelines",
          ("pipeline_id", "name", "dataset_name", "status", "metric", "best_val", "best_test", "run_id", "created_at"))


def cmd_chains(args: argparse.Namespace) -> None:
    with _open(args.workspace) as store:
        frame = store.list_chains(run_id=args.run, pipeline_id=args.pipeline, dataset_name=args.dataset)
        _nothing_matched(store, frame, dataset_name=args.dataset)
    _list(args, frame, "chains", ("chain_id", "dataset_name", "model_class", "preprocessings", "fold_strategy", "pipeline_id", "created_at"))


def cmd_predictions(args: argparse.Namespace) -> None:
    with _open(args.workspace) as store:
        frame = store.query_predictions(dataset_name=args.dataset, model_class=args.model_class, partition=args.partition,
                                        fold_id=args.fold, pipeline_id=args.pipeline, run_id=args.run)
        _nothing_matched(store, frame, dataset_name=args.dataset, partition=args.partition)
    _list(args, frame, "predictions", ("prediction_id", "dataset_name", "model_name", "preprocessings", "fold_id",
                                       "partition", "metric", "val_score", "test_score", "train_score"))


def _list(args: argparse.Namespace, frame, what: str, columns: Sequence[str], **extra: Any) -> None:
    if not (args.json or args.csv):
        frame = frame.select([c for c in columns if c in frame.columns])
    listing(frame, args, what, **extra)


def _nothing_matched(store, frame, **filters: str | None) -> None:
    """An empty result for a filter naming what the workspace does not hold: say what it holds."""
    if frame.height:
        return
    from ..api.rankings import nothing_matched

    message = nothing_matched(store, **filters)
    if message:
        raise CliError(message)


# --------------------------------------------------------------------------- show, rankings, compare


def cmd_show(args: argparse.Namespace) -> None:
    from ..api.describe import find

    with _open(args.workspace) as store:
        try:
            kind, found = find(store, args.id, arrays=args.arrays)
        except KeyError as exc:
            raise CliError(exc.args[0]) from None
    record(kind, found, args)


def cmd_top(args: argparse.Namespace) -> None:
    from ..api import rankings

    ascending = False if args.descending else True if args.ascending else None
    with _open(args.workspace) as store:
        rank = rankings.top_predictions if args.per_fold else rankings.top_chains
        ranking = rank(store, args.n, metric=args.metric, ascending=ascending, partition=args.partition,
                       dataset_name=args.dataset, group_by=args.by)
        _nothing_matched(store, ranking.frame, dataset_name=args.dataset, partition=args.partition)
    if args.per_fold:
        columns = ["rank", "dataset_name", "model_name", "preprocessings", "fold_id", "partition", "metric", ranking.score, "prediction_id"]
    else:
        columns = ["rank", "dataset_name", "model_name", "preprocessings", "metric", ranking.score,
                   f"{args.metric}_std", "n_folds", "chain_id"]
    info = {"ranked_by": {"level": ranking.level, "metric": ranking.metric, "column": ranking.score,
                          "direction": ranking.direction, "partition": ranking.partition, "text": ranking.describe()}}
    _list(args, ranking.frame, "chains" if not args.per_fold else "predictions", list(dict.fromkeys(columns)),
          note=ranking.describe(), extra=info)


def cmd_leaderboard(args: argparse.Namespace) -> None:
    import polars as pl

    from ..query.scores import direction
    from ..api.rankings import WORDS

    if args.n < 1:
        raise CliError(f"-n must be 1 or more, got {args.n}")
    with _open(args.workspace) as store:
        frame = store.leaderboard(args.n)
        if args.dataset:
            frame = frame.filter(pl.col("dataset_name") == args.dataset)
        _nothing_matched(store, frame, dataset_name=args.dataset)
    metrics = sorted(frame["metric"].drop_nulls().unique().to_list())
    said = ", ".join(f"{m}: {WORDS[direction(m)]}" for m in metrics)
    note = f"best {args.n} chains per dataset by mean validation score over folds ({said})"
    _list(args, frame, "chains", ("dataset_name", "rank", "model_name", "preprocessings", "metric", "val_score_mean",
                                  "val_score_std", "test_score_mean", "n_folds", "chain_id"),
          note=note, extra={"ranked_by": {"level": "chain", "column": "val_score_mean", "metrics": metrics, "text": note}})


def cmd_compare(args: argparse.Namespace) -> None:
    from ..query import cookbook

    with _open(args.workspace) as store:
        for run_id in (args.run_a, args.run_b):
            if store.get_run(run_id) is None:
                raise CliError(f"no run {run_id!r} in this workspace (`nirslake runs` lists them)")
        frame = cookbook.run_query(store, "compare_runs", run_a=args.run_a, run_b=args.run_b).drop("run_a", "run_b")
    note = f"run A {args.run_a} against run B {args.run_b}, chain by chain (cookbook query compare_runs)"
    listing(frame, args, "chains", note=note, extra={"run_a": args.run_a, "run_b": args.run_b})


# --------------------------------------------------------------------------- SQL, shell


def cmd_sql(args: argparse.Namespace) -> None:
    import duckdb

    from ..query import cookbook

    if args.list_queries:
        names = cookbook.query_names()
        found = [cookbook.named_query(name) for name in names]
        if _json(args, [{"name": q.name, "description": q.description, "parameters": list(q.parameters)} for q in found]):
            return
        for query in found:
            takes = f" [parameters: {', '.join(query.parameters)}]" if query.parameters else ""
            print(f"{query.name}: {query.description}{takes}")
        return
    if (args.query is None) == (args.named is None):
        raise CliError('give a query ("SELECT ...") or --query NAME (see --list-queries), one of them')
    params = dict(_param(p) for p in args.param)
    if params and not args.named:
        raise CliError("--param sets a named query's variables: use it with --query NAME")
    text = cookbook.query_sql(args.named, params) if args.named else args.query
    with _open(args.workspace) as store:
        try:
            frame = store.sql(text)
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0]
            raise CliError(f"the query failed: {first} (views: {', '.join(VIEWS)})") from None
    listing(frame, args, "rows")


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise CliError(f"--param takes NAME=VALUE, got {text!r}")
    return name, value


def cmd_shell(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    from ..query.catalog import shell_init_sql

    workspace = args.location or args.workspace
    with _open(workspace) as store:
        init = shell_init_sql(store.storage)
    if args.print_init:
        print(init)
        return 0
    with tempfile.TemporaryDirectory(prefix="nirslake-shell-") as tmp:
        init_file = os.path.join(tmp, "init.sql")
        with open(init_file, "w", encoding="utf-8") as fh:
            # the statements' own result tables (CREATE SECRET prints "Success") are not shown
            fh.write(f".output /dev/null\n{init}\n.output\n")
        command = [_duckdb_cli(), "-init", init_file, *(["-json"] if args.json else [])]
        if args.c:
            command += ["-c", args.c]
        try:
            return subprocess.run(command).returncode
        except FileNotFoundError:
            raise CliError("the DuckDB shell was not found: pip install duckdb-cli (it comes with nirslake)") from None


def cmd_catalog(args: argparse.Namespace) -> None:
    with _open(args.workspace) as store:
        path = store.rebuild_catalog()
    if _json(args, {"catalog": path, "open_with": f"{_duckdb_cli()} -readonly {path}"}):
        return
    print(f"catalog rebuilt: {path}")
    print(f"open it with: {_duckdb_cli()} -readonly {shlex.quote(path)}")


# --------------------------------------------------------------------------- export, import, predict, delete


def cmd_export(args: argparse.Namespace) -> None:
    with _open(args.workspace) as store:
        if args.kind == "predictions":
            if args.id:
                raise CliError("export predictions takes filters (--dataset, --partition, --run), not an id")
            filters = {k: v for k, v in (("dataset_name", args.dataset), ("partition", args.partition), ("run_id", args.run)) if v}
            path = store.export_predictions_parquet(args.output, **filters)
        else:
            if not args.id:
                raise CliError(f"export {args.kind} needs the {args.kind}'s id")
            method = {"run": store.export_run, "pipeline": store.export_pipeline_config, "chain": store.export_chain}[args.kind]
            try:
                path = method(args.id, args.output)
            except KeyError as exc:
                raise CliError(exc.args[0]) from None
    size = os.path.getsize(path) if os.path.exists(str(path)) else None
    if _json(args, {"kind": args.kind, "id": args.id, "path": str(path), "bytes": size}):
        return
    print(f"wrote {path}" + (f" ({size} bytes)" if size is not None else ""))


def cmd_import(args: argparse.Namespace) -> None:
    if not os.path.exists(args.bundle) and "://" not in args.bundle:
        raise CliError(f"no bundle at {args.bundle!r}")
    with _open(args.workspace, must_exist=False) as store:
        chain_id = store.import_bundle(args.bundle)
        chain = store.get_chain(chain_id)
    if _json(args, {"chain_id": chain_id, "run_id": chain["run_id"], "pipeline_id": chain["pipeline_id"], "bundle": args.bundle}):
        return
    print(f"imported chain {chain_id} from {args.bundle} (run {chain['run_id']}); "
          f"`nirslake predict {chain_id} --input X.csv` predicts with it")


def cmd_predict(args: argparse.Namespace) -> None:
    import numpy as np

    from .. import predict

    X = _read_matrix(args.input)
    if not os.path.isfile(args.model) and (args.model.endswith(".n4a") or os.sep in args.model):
        raise CliError(f"no bundle at {args.model!r}")
    if os.path.isfile(args.model) or "://" in args.model:
        y = predict(args.model, X)
        source = args.model
    else:
        with _open(args.workspace) as store:
            if store.get_chain(args.model) is None:
                raise CliError(f"{args.model!r} is neither a bundle file nor a chain id of {args.workspace!r}")
            y = predict(store, X, chain_id=args.model)
        source = f"chain {args.model}"
    y = np.asarray(y)
    if args.output:
        if args.output.endswith(".npy"):
            np.save(args.output, y)
        else:
            np.savetxt(args.output, y.reshape(len(y), -1), delimiter=",", fmt="%.10g")
    if _json(args, {"source": source, "n": int(len(y)), "predictions": y.tolist(), "output": args.output}):
        return
    if args.output:
        print(f"{len(y)} predictions by {source} written to {args.output}")
    else:
        for value in y.reshape(len(y), -1):
            print(",".join(f"{v:.10g}" for v in value))


def _read_matrix(path: str):
    """X from ``.npy`` or a numeric CSV (a header line, if any, is skipped): one row per sample."""
    import numpy as np

    if not os.path.exists(path):
        raise CliError(f"no input file {path!r}")
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1
    try:
        return np.atleast_2d(np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2))
    except ValueError as exc:
        raise CliError(f"{path} is not a numeric CSV (one sample per line, comma-separated): {exc}") from None


def cmd_delete(args: argparse.Namespace) -> None:
    with _open(args.workspace) as store:
        run = store.get_run(args.id)
        prediction = None if run is not None else store.get_prediction(args.id)
        if run is None and prediction is None:
            raise CliError(f"no run or prediction {args.id!r} in this workspace (`nirslake runs`, `nirslake predictions`)")
        kind = "run" if run is not None else "prediction"
        if sys.stdin.isatty() and not args.yes:
            label = f"run {args.id} ({run['name']})" if run else f"prediction {args.id}"
            if input(f"delete {label} and everything under it? [y/N] ").strip().lower() not in ("y", "yes"):
                raise CliError("not deleted")
        count = store.delete_run(args.id) if run is not None else int(store.delete_prediction(args.id))
    if _json(args, {"kind": kind, "id": args.id, "deleted_records": count}):
        return
    print(f"deleted {kind} {args.id}: {count} record(s) hidden from every reader; "
          "`nirslake vacuum` reclaims their space (at once with --grace 0)")


# --------------------------------------------------------------------------- maintenance


def cmd_gc(args: argparse.Namespace) -> None:
    with _open(args.workspace, grace_seconds=args.grace) as store:
        removed = store.gc_artifacts()
    if _json(args, {"artifacts_removed": removed, "grace_seconds": args.grace}):
        return
    print(f"removed {removed} artifact(s) that no live chain holds (grace {args.grace:g} s)")


def cmd_vacuum(args: argparse.Namespace) -> None:
    from ..api.lifecycle import running_runs
    from ..store import DEFAULT_GRACE_SECONDS

    with _open(args.workspace, grace_seconds=args.grace) as store:
        if args.grace < DEFAULT_GRACE_SECONDS and not args.force:
            busy = [r for r in running_runs(store) if r["alive"] is not False]
            if busy:
                raise CliError(
                    f"{len(busy)} run(s) are being written (e.g. {busy[0]['run_id']}): a grace shorter than the "
                    "default may delete files their writers and readers still use; wait for them, or --force"
                )
        before = _lake_bytes(store.storage)
        removed = store.gc_artifacts()
        store.vacuum()
        after = _lake_bytes(store.storage)
    if _json(args, {"bytes_before": before, "bytes_after": after, "artifacts_removed": removed, "grace_seconds": args.grace}):
        return
    print(f"vacuumed: {before / 1024:.1f} KiB -> {after / 1024:.1f} KiB of tables and objects; "
          f"{removed} artifact(s) removed; files hidden less than {args.grace:g} s ago are kept")


def _lake_bytes(storage) -> int:
    return sum(sum(storage.list_sizes(folder).values()) for folder in ("tables", "objects"))


def cmd_compact(args: argparse.Namespace) -> None:
    with _open(args.workspace) as store:
        result = store.compact(target_file_mb=args.target_mb, tables=args.table or None, progress=Progress("compact") if not args.json else None)
    if _json(args, {"files_replaced": result.files_replaced, "files_written": result.files_written,
                    "bytes_before": result.bytes_before, "bytes_after": result.bytes_after, "tables": result.tables}):
        return
    if result.files_replaced == 0:
        print("nothing to compact: no partition has two or more small files")
    else:
        print(
            f"compacted {result.files_replaced} files into {result.files_written} "
            f"({result.bytes_before / 1048576:.1f} MiB -> {result.bytes_after / 1048576:.1f} MiB); "
            "the replaced files are deleted by `nirslake check --repair` or vacuum once the grace period is over"
        )


def cmd_checkpoint(args: argparse.Namespace) -> None:
    with _open(args.workspace) as store:
        result = store.checkpoint()
    import dataclasses

    if _json(args, {**dataclasses.asdict(result), "summary": result.summary()}):
        return
    print(result.summary())


def cmd_check(args: argparse.Namespace) -> int:
    with _open(args.workspace, grace_seconds=args.grace_seconds) as store:
        report = store.check(repair=args.repair, progress=None if args.json else Progress("check"))
    code = EXIT_OK if report.ok else EXIT_FAILED
    if _json(args, {"ok": report.ok, "files_checked": report.files_checked, "artifacts_checked": report.artifacts_checked,
                    "problems": report.problems, "left_running": report.left_running, "leftovers": {k: len(v) for k, v in report.leftovers.items()},
                    "removed": report.removed}):
        return code
    print(report.summary())
    return code


def cmd_mark_failed(args: argparse.Namespace) -> int:
    from ..api.lifecycle import describe, running_runs

    with _open(args.workspace) as store:
        try:
            marked = store.mark_failed(args.run or None, force=args.force)
        except KeyError as exc:
            raise CliError(exc.args[0]) from None
        still = running_runs(store)
    if _json(args, {"marked_failed": marked, "still_running": still}):
        return EXIT_OK
    for run_id in marked:
        print(f"marked failed: run {run_id}")
    if not marked:
        print("no run left running by a writer that is gone")
    for run in still:
        print(f"  still running: {describe(run)}")
    return EXIT_OK


# --------------------------------------------------------------------------- serve, plot, sync


def cmd_serve(args: argparse.Namespace) -> None:
    _open(args.workspace).close()  # the clear error for a missing workspace
    try:
        from ..web import serve
    except ImportError as exc:
        raise CliError(str(exc)) from None

    def announce(line: str) -> None:
        if args.json:
            from ..api.jsonable import dumps

            print(dumps({"message": line}), flush=True)
        else:
            print(line, flush=True)

    serve(args.workspace, host=args.host, port=args.port, allow_delete=args.allow_delete, announce=announce)


def cmd_plot(args: argparse.Namespace) -> None:
    try:
        from .. import plots
    except ImportError as exc:
        raise CliError(str(exc)) from None
    with _open(args.workspace) as store:
        try:
            fig = plots.figure(store, args.kind, prediction_id=args.prediction, chain_id=args.chain,
                               dataset_name=args.dataset, partition=args.partition, n=args.n)
        except KeyError as exc:
            raise CliError(exc.args[0]) from None
    path = plots.save(fig, args.output)
    if _json(args, {"kind": args.kind, "path": str(path), "bytes": os.path.getsize(path)}):
        return
    print(f"wrote {path}")


def cmd_push(args: argparse.Namespace) -> int:
    return _sync(args, args.local, args.remote, "pushed")


def cmd_pull(args: argparse.Namespace) -> int:
    return _sync(args, args.remote, args.local, "pulled")


def _sync(args: argparse.Namespace, source: str, target: str, verb: str) -> int:
    from ..api.sync import progress_printer, sync

    result = sync(source, target, progress=None if args.json else progress_printer(verb))
    code = EXIT_OK if result.ok else EXIT_FAILED
    if _json(args, {"ok": result.ok, "files_copied": result.files_copied, "bytes_copied": result.bytes_copied,
                    "files_skipped": result.files_skipped, "conflicts": result.conflicts, "held_back": result.held_back,
                    "vanished": result.vanished, "missing_bytes": result.missing_bytes}):
        return code
    print(result.summary(verb))
    return code


# --------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="nirslake",
        description="nirslake: ML experiment results as an open lake (Parquet + DuckDB + polars).",
        epilog="Exit codes: 0 done; 1 a failure, or problems found (check); 2 a usage error (bad argument, "
               "unknown id, no workspace); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"nirslake {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_text: str, workspace: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if workspace:
            p.add_argument("--workspace", "-w", default=DEFAULT_WORKSPACE, help="workspace folder or URL (default: ./lake or $NIRSLAKE_WORKSPACE)")
        p.add_argument("--json", action="store_true", help="print the result as JSON (NaN and infinities as null)")
        p.set_defaults(func=func, csv=False)
        return p

    def listed(p: argparse.ArgumentParser, limit: int | None = 50) -> None:
        p.add_argument("--csv", action="store_true", help="print the rows as CSV")
        p.add_argument("--limit", type=_count, default=limit, help=f"rows to show (default {limit or 'all'})")
        p.add_argument("--offset", type=_count, default=0, help="rows to skip first (default 0)")

    p = add("demo", cmd_demo, "run a realistic NIRS model sweep on synthetic spectra into the workspace")
    p.add_argument("--quick", action="store_true", help="a small sweep that finishes in seconds")

    p = add("runs", cmd_runs, "list runs, newest first (store.list_runs)")
    p.add_argument("--status", choices=["running", "completed", "failed"])
    p.add_argument("--dataset", help="only runs over this dataset")
    listed(p)

    p = add("pipelines", cmd_pipelines, "list pipelines, newest first (store.list_pipelines)")
    p.add_argument("--run", metavar="RUN_ID", help="only this run's")
    p.add_argument("--dataset", help="only this dataset's")
    p.add_argument("--status", choices=["running", "completed", "failed"])
    listed(p)

    p = add("chains", cmd_chains, "list chains, oldest first (store.list_chains)")
    p.add_argument("--run", metavar="RUN_ID")
    p.add_argument("--pipeline", metavar="PIPELINE_ID")
    p.add_argument("--dataset")
    listed(p)

    p = add("predictions", cmd_predictions, "list predictions without their arrays (store.query_predictions)")
    p.add_argument("--dataset", help="dataset name (%% makes it a LIKE pattern)")
    p.add_argument("--partition", help="train, val or test")
    p.add_argument("--model-class")
    p.add_argument("--fold", metavar="FOLD_ID")
    p.add_argument("--pipeline", metavar="PIPELINE_ID")
    p.add_argument("--run", metavar="RUN_ID")
    listed(p)

    p = add("show", cmd_show, "show one run, pipeline, chain or prediction (a prediction with its arrays summarised)")
    p.add_argument("id", metavar="ID")
    p.add_argument("--arrays", action="store_true", help="a prediction's arrays in full, not summarised")

    def ranking(p: argparse.ArgumentParser, n: int) -> None:
        p.add_argument("-n", type=int, default=n, help=f"how many chains per dataset (default {n})")
        p.add_argument("--dataset", help="only this dataset")

    p = add("top", cmd_top, "the best chains by their mean score over folds, per dataset (--per-fold: single predictions)")
    ranking(p, 5)
    p.add_argument("--metric", default="val_score",
                   help="score column (default val_score, ranked in the direction of the rows' metric), "
                        "or a metric of the predictions' scores: r2, rpd, rmse ...")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--descending", action="store_true", help="highest first, whatever the metric")
    order.add_argument("--ascending", action="store_true", help="lowest first, whatever the metric")
    p.add_argument("--partition", default="val", help="train, val or test (default val)")
    p.add_argument("--by", default="dataset_name", help="rank within each value of this column (default dataset_name)")
    p.add_argument("--per-fold", action="store_true", help="rank single predictions (folds), as store.top_predictions does")
    listed(p, limit=None)

    p = add("leaderboard", cmd_leaderboard, "the leaderboard: best chains per dataset by mean validation score (store.leaderboard)")
    ranking(p, 5)
    listed(p, limit=None)

    p = add("compare", cmd_compare, "compare two runs chain by chain (cookbook query compare_runs)")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    listed(p, limit=None)

    p = add("sql", cmd_sql, "run a SQL query, or a named query of the cookbook, against the lake's DuckDB views")
    p.add_argument("query", nargs="?", help='e.g. "SELECT * FROM leaderboard WHERE rank <= 3"')
    p.add_argument("--query", dest="named", metavar="NAME", help="run the named query sql/queries/NAME.sql instead")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="set a named query's variable (repeatable)")
    p.add_argument("--list-queries", action="store_true", help="list the named queries and their parameters")
    listed(p, limit=200)

    add("catalog", cmd_catalog, "rebuild <workspace>/catalog.duckdb (views over the lake)")

    p = add("shell", cmd_shell, "open the DuckDB shell with views over the workspace (local or s3://, through httpfs)")
    p.add_argument("location", nargs="?", help="the workspace (default: --workspace)")
    p.add_argument("-c", metavar="SQL", help="run this SQL and exit instead of opening the prompt")
    p.add_argument("--print-init", action="store_true", help="print the init SQL (httpfs, S3 secret, views) and exit")

    p = add("export", cmd_export, "write a run (YAML), a pipeline's config (JSON), a chain (.n4a bundle) or predictions (Parquet)")
    p.add_argument("kind", choices=["run", "pipeline", "chain", "predictions"])
    p.add_argument("id", nargs="?", metavar="ID", help="the run, pipeline or chain (predictions take filters)")
    p.add_argument("-o", "--output", required=True, metavar="PATH")
    p.add_argument("--dataset", help="predictions: only this dataset")
    p.add_argument("--partition", help="predictions: only this partition")
    p.add_argument("--run", metavar="RUN_ID", help="predictions: only this run's")

    p = add("import", cmd_import, "add a .n4a bundle's chain and artifacts to the workspace (store.import_bundle)")
    p.add_argument("bundle", metavar="BUNDLE")

    p = add("predict", cmd_predict, "predict with a bundle file or a chain of the workspace (nirslake.predict)")
    p.add_argument("model", metavar="BUNDLE_OR_CHAIN_ID")
    p.add_argument("--input", "-i", required=True, metavar="X.csv|X.npy", help="one sample per row: numeric CSV (a header is skipped) or .npy")
    p.add_argument("-o", "--output", metavar="Y.csv|Y.npy", help="write the predictions here instead of printing them")

    p = add("delete", cmd_delete, "delete a run (and everything under it) or one prediction (store.delete_run, delete_prediction)")
    p.add_argument("id", metavar="ID")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask (never asked when stdin is not a terminal)")

    p = add("gc", cmd_gc, "remove artifacts that no live chain holds (store.gc_artifacts)")
    p.add_argument("--grace", type=float, default=3600, metavar="SECONDS",
                   help="keep artifacts recorded this recently: another writer may be about to use them (default 3600)")

    p = add("vacuum", cmd_vacuum, "reclaim the space of deleted and superseded rows and artifacts (gc_artifacts, then vacuum)")
    p.add_argument("--grace", type=float, default=3600, metavar="SECONDS",
                   help="keep what was hidden this recently, for readers that listed it (default 3600; "
                        "0 reclaims at once, refused while a run is being written)")
    p.add_argument("--force", action="store_true", help="a short grace even while runs are being written")

    p = add("compact", cmd_compact, "merge each partition's small files into larger ones (safe while others read and write)")
    p.add_argument("--target-mb", type=float, default=128, help="size of the merged files in MiB (default 128)")
    p.add_argument("--table", action="append", help="only this table (repeatable; default: every table)")

    add("checkpoint", cmd_checkpoint, "write _current/manifest.parquet: the files holding exactly the current rows, for engines without nirslake")

    p = add("check", cmd_check, "verify data files, artifact hashes, parent links and runs left running; list (and --repair) leftovers")
    p.add_argument("--repair", action="store_true", help="delete leftovers older than the grace period; problems are only reported")
    p.add_argument(
        "--grace-seconds", type=float, default=3600,
        help="leftovers younger than this may belong to a running writer and are kept (default 3600)",
    )

    p = add("mark-failed", cmd_mark_failed, "record 'failed' for runs left running by a writer that is gone (store.mark_failed)")
    p.add_argument("run", nargs="*", metavar="RUN_ID", help="these runs (default: every run whose writer is proven gone)")
    p.add_argument("--force", action="store_true", help="mark the named runs even when their writer may still run")

    p = add("serve", cmd_serve, "serve the JSON API and the dashboard over the workspace (docs/web.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 takes a free one)")
    p.add_argument("--allow-delete", action="store_true", help="enable DELETE /api/runs/{id}; read-only without it")

    p = add("plot", cmd_plot, "draw a picture of the sweep as PNG or SVG")
    p.add_argument("kind", choices=["predicted", "residuals", "fold-scores", "leaderboard"],
                   help="predicted vs observed, residuals, fold-score spread per chain, or the leaderboard as bars")
    p.add_argument("--prediction", metavar="ID", help="one prediction (predicted, residuals)")
    p.add_argument("--chain", metavar="ID", help="a chain, its folds coloured (predicted, residuals)")
    p.add_argument("--dataset", help="the dataset (fold-scores, leaderboard; needed when there are several)")
    p.add_argument("--partition", default="val", help="the chain's partition to draw (default val)")
    p.add_argument("-n", type=int, default=10, help="how many leading chains (fold-scores, leaderboard; default 10)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write: FILE.png or FILE.svg")

    where = "a workspace folder or URL (s3://bucket/prefix)"
    for name, source, target, func in (("push", "LOCAL", "REMOTE", cmd_push), ("pull", "REMOTE", "LOCAL", cmd_pull)):
        p = add(name, func, f"copy to {target} the data files and objects of {source} it lacks (never deletes)", workspace=False)
        p.description = (f"Copy to {target} the data files and objects of {source} it lacks; never "
                         "deletes. Safe to interrupt and run again. See docs/sync.md.")
        p.add_argument(source.lower(), metavar=source, help=f"the source: {where}")
        p.add_argument(target.lower(), metavar=target, help=f"the target, created when missing: {where}")
    return parser


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding program): its own handling stays
        pass
    with warnings.catch_warnings():
        # For a person: one line per warning (a command may open the store twice), no source line.
        warnings.simplefilter("once")
        warnings.showwarning = print_warning
        try:
            code = args.func(args)
        except KeyboardInterrupt:
            print("\nnirslake: interrupted; what was written before stays, and a run it was writing is marked failed",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        except Terminated:
            print("nirslake: terminated (SIGTERM); what was written before stays, and a run it was writing is marked failed",
                  file=sys.stderr)
            return EXIT_TERMINATED
        except (CliError, ValueError, TypeError, KeyError, FileNotFoundError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"nirslake: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        except BrokenPipeError:  # `nirslake sql ... | head`: the reader has what it wanted
            try:
                sys.stdout = open(os.devnull, "w")
            except OSError:
                pass
            return EXIT_OK
        except Exception as exc:  # noqa: BLE001 - one line for people; NIRSLAKE_DEBUG=1 shows the traceback
            if os.environ.get("NIRSLAKE_DEBUG"):
                raise
            print(f"nirslake: failed: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    return code or 0
