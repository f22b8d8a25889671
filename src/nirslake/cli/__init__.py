"""The ``nirslake`` command: a thin shell over the Python API, one command per store method.

Each command opens a ``WorkspaceStore``, calls one method and prints its result through ``output``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from typing import Sequence

from .output import print_frame, print_warning

DEFAULT_WORKSPACE = os.environ.get("NIRSLAKE_WORKSPACE", "lake")
VIEWS = ("runs", "pipelines", "chains", "predictions", "prediction_arrays", "artifacts", "logs",
         "predictions_with_run", "chain_summary", "leaderboard", "prediction_scores", "prediction_scores_long",
         "array_scores", "sample_scores")


class CliError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _open(workspace: str, must_exist: bool = True):
    from ..lake.storage import Storage
    from ..store import WorkspaceStore

    if must_exist and not Storage(workspace).exists("tables"):
        raise CliError(
            f"no nirslake workspace at {workspace!r}: create one with `nirslake demo --workspace {workspace}` "
            "or point --workspace (or NIRSLAKE_WORKSPACE) at an existing one"
        )
    return WorkspaceStore(workspace)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    result = run_demo(args.workspace, quick=args.quick, progress=print)
    with _open(args.workspace) as store:
        board = store.leaderboard(3).select(
            "dataset_name", "rank", "model_name", "preprocessings", "metric", "val_score_mean", "val_score_std", "test_score_mean", "n_folds"
        )
        print_frame(board, "\nLeaderboard: best 3 chains per dataset by mean validation score over folds")
        n = store.sql("SELECT count(*) AS n FROM predictions").item()
    catalog = os.path.join(os.path.abspath(args.workspace), "catalog.duckdb")
    print(
        f"\n{result['n_pipelines']} pipelines, {result['n_predictions']} predictions written in "
        f"{result['elapsed_s']:.1f} s; the workspace now holds {n} predictions."
    )
    print("Explore it in the DuckDB shell (from any folder):")
    print(f"  {_duckdb_cli()} -readonly {shlex.quote(catalog)} -c \"SELECT * FROM leaderboard WHERE rank <= 3\"")


def _duckdb_cli() -> str:
    """The DuckDB shell installed with nirslake (duckdb-cli), or plain ``duckdb`` when it is on PATH."""
    import shutil

    beside = os.path.join(os.path.dirname(sys.executable), "duckdb")
    if shutil.which("duckdb") == beside or not os.path.exists(beside):
        return "duckdb"
    return beside


def cmd_runs(args: argparse.Namespace) -> None:
    with _open(args.workspace) as store:
        frame = store.list_runs(status=args.status, dataset=args.dataset, limit=args.limit)
    print_frame(frame.select("run_id", "name", "status", "created_at", "completed_at"))


def cmd_top(args: argparse.Namespace) -> None:
    from ..lake.schema import PREDICTIONS

    with _open(args.workspace) as store:
        # A score column keeps its default (lower is better); a metric of the scores dicts
        # (r2, rpd, bias ...) ranks in its own direction unless a flag says otherwise.
        ascending = False if args.descending else True if args.ascending else None
        if ascending is None and args.metric in PREDICTIONS.schema.names:
            ascending = True
        try:
            frame = store.top_predictions(
                args.n, metric=args.metric, ascending=ascending, partition=args.partition,
                dataset_name=args.dataset, group_by=args.by,
            )
        except ValueError as exc:
            raise CliError(str(exc)) from None
    columns = [c for c in ("rank", "dataset_name", "model_name", "preprocessings", "fold_id", "partition", args.metric, "prediction_id") if c in frame.columns]
    print_frame(frame.select(list(dict.fromkeys(columns))))


def cmd_sql(args: argparse.Namespace) -> None:
    import duckdb

    from ..query import cookbook

    if args.list_queries:
        for name in cookbook.query_names():
            query = cookbook.named_query(name)
            takes = f" [parameters: {', '.join(query.parameters)}]" if query.parameters else ""
            print(f"{name}: {query.description}{takes}")
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
    print_frame(frame)


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise CliError(f"--param takes NAME=VALUE, got {text!r}")
    return name, value


def cmd_serve(args: argparse.Namespace) -> None:
    _open(args.workspace).close()  # the clear error for a missing workspace
    try:
        from ..web import serve
    except ImportError as exc:
        raise CliError(str(exc)) from None
    serve(args.workspace, host=args.host, port=args.port, allow_delete=args.allow_delete,
          announce=lambda line: print(line, flush=True))


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
    print(f"wrote {plots.save(fig, args.output)}")


def cmd_catalog(args: argparse.Namespace) -> None:
    with _open(args.workspace) as store:
        path = store.rebuild_catalog()
    print(f"catalog rebuilt: {path}")
    print(f"open it with: {_duckdb_cli()} -readonly {shlex.quote(path)}")


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
        command = [_duckdb_cli(), "-init", init_file]
        if args.c:
            command += ["-c", args.c]
        try:
            return subprocess.run(command).returncode
        except FileNotFoundError:
            raise CliError("the DuckDB shell was not found: pip install duckdb-cli (it comes with nirslake)") from None


def cmd_compact(args: argparse.Namespace) -> None:
    with _open(args.workspace) as store:
        result = store.compact(target_file_mb=args.target_mb, tables=args.table or None, progress=print)
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
    print(result.summary())


def cmd_check(args: argparse.Namespace) -> int:
    from ..store import WorkspaceStore

    _open(args.workspace).close()  # the clear error for a missing workspace
    with WorkspaceStore(args.workspace, grace_seconds=args.grace_seconds) as store:
        report = store.check(repair=args.repair, progress=print)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_push(args: argparse.Namespace) -> int:
    return _sync(args.local, args.remote, "pushed")


def cmd_pull(args: argparse.Namespace) -> int:
    return _sync(args.remote, args.local, "pulled")


def _sync(source: str, target: str, verb: str) -> int:
    from ..api.sync import progress_printer, sync

    result = sync(source, target, progress=progress_printer(verb))
    print(result.summary(verb))
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nirslake",
        description="nirslake: ML experiment results as an open lake (Parquet + DuckDB + polars).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--workspace", "-w", default=DEFAULT_WORKSPACE, help="workspace folder or URL (default: ./lake or $NIRSLAKE_WORKSPACE)")
        p.set_defaults(func=func)
        return p

    p = add("demo", cmd_demo, "run a realistic NIRS model sweep on synthetic spectra into the workspace")
    p.add_argument("--quick", action="store_true", help="a small sweep that finishes in seconds")

    p = add("runs", cmd_runs, "list runs, newest first")
    p.add_argument("--status", choices=["running", "completed", "failed"])
    p.add_argument("--dataset", help="only runs over this dataset")
    p.add_argument("--limit", type=int, default=100)

    p = add("top", cmd_top, "the best predictions by a score column")
    p.add_argument("-n", type=int, default=10, help="how many rows (per group with --by)")
    p.add_argument("--metric", default="val_score",
                   help="score column (default val_score), or a metric of the predictions' scores: r2, rpd, rmse ...")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--descending", action="store_true",
                       help="higher is better; default: lower is better for score columns, the metric's own direction otherwise")
    order.add_argument("--ascending", action="store_true", help="lower is better")
    p.add_argument("--partition", default="val", help="train, val or test (default val)")
    p.add_argument("--dataset", help="only this dataset")
    p.add_argument("--by", default="dataset_name", help="rank within each value of this column (default dataset_name)")

    p = add("sql", cmd_sql, "run a SQL query, or a named query of the cookbook, against the lake's DuckDB views")
    p.add_argument("query", nargs="?", help='e.g. "SELECT * FROM leaderboard WHERE rank <= 3"')
    p.add_argument("--query", dest="named", metavar="NAME", help="run the named query sql/queries/NAME.sql instead")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="set a named query's variable (repeatable)")
    p.add_argument("--list-queries", action="store_true", help="list the named queries and their parameters")

    add("catalog", cmd_catalog, "rebuild <workspace>/catalog.duckdb (views over the lake)")

    p = add("shell", cmd_shell, "open the DuckDB shell with views over the workspace (local or s3://, through httpfs)")
    p.add_argument("location", nargs="?", help="the workspace (default: --workspace)")
    p.add_argument("-c", metavar="SQL", help="run this SQL and exit instead of opening the prompt")
    p.add_argument("--print-init", action="store_true", help="print the init SQL (httpfs, S3 secret, views) and exit")

    p = add("compact", cmd_compact, "merge each partition's small files into larger ones (safe while others read and write)")
    p.add_argument("--target-mb", type=float, default=128, help="size of the merged files in MiB (default 128)")
    p.add_argument("--table", action="append", help="only this table (repeatable; default: every table)")

    add("checkpoint", cmd_checkpoint, "write _current/manifest.parquet: the files holding exactly the current rows, for engines without nirslake")

    p = add("check", cmd_check, "verify data files, artifact hashes and parent links; list (and --repair) leftovers")
    p.add_argument("--repair", action="store_true", help="delete leftovers older than the grace period; problems are only reported")
    p.add_argument(
        "--grace-seconds", type=float, default=3600,
        help="leftovers younger than this may belong to a running writer and are kept (default 3600)",
    )

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
        p = sub.add_parser(name, help=f"copy to {target} the data files and objects of {source} it lacks (never deletes)",
                           description=f"Copy to {target} the data files and objects of {source} it lacks; never "
                           "deletes. Safe to interrupt and run again. See docs/sync.md.")
        p.add_argument(source.lower(), metavar=source, help=f"the source: {where}")
        p.add_argument(target.lower(), metavar=target, help=f"the target, created when missing: {where}")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        # For a person: one line per warning (a command may open the store twice), no source line.
        warnings.simplefilter("once")
        warnings.showwarning = print_warning
        try:
            code = args.func(args)
        except (CliError, ValueError) as exc:
            print(f"nirslake: error: {exc}", file=sys.stderr)
            return 2
    return code or 0

