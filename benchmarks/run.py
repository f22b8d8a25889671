"""nirslake against its peer (nirs4all 1.4.10's WorkspaceStore), side by side in one invocation.

    pip install -e ".[bench]"          # nirslake, plus nirs4all==1.4.10 as the peer
    python benchmarks/run.py           # D=4 datasets x P=400 pipelines x 15 = 24,000 predictions
    python benchmarks/run.py --smoke   # tiny sizes: checks the suite runs and prints (CI)

Every workload runs in its own fresh Python process, one after the other; the table compares them
as ratios (peer / nirslake: above 1 means nirslake is better). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from datetime import date

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from workloads import Sweep, floor, queries, startup, sweep, sweep_facade  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    size = Sweep(**json.loads(args.size))
    if args.worker == "sweep":
        result = sweep(args.store, args.workspace, size)
    elif args.worker == "queries":
        result = queries(args.store, args.workspace, size)
    elif args.worker == "startup":
        result = startup(args.store, args.workspace, repeat=3 if args.smoke else 5)
    elif args.worker == "facade":
        result = sweep_facade(args.store, args.workspace, size)
    else:
        result = floor(args.workspace, size)
    print("RESULT " + json.dumps(result))


def spawn(task: str, store: str, workspace: str, size: Sweep, smoke: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", task, "--store", store,
           "--workspace", workspace, "--size", json.dumps(asdict(size))] + (["--smoke"] if smoke else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark worker {task}/{store} failed:\n{done.stdout}\n{done.stderr}")
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def peer_available() -> bool:
    check = subprocess.run([sys.executable, "-c", "import nirs4all.pipeline.storage.workspace_store"], capture_output=True)
    return check.returncode == 0


def versions() -> dict:
    out = {}
    for name in ("nirslake", "nirs4all", "duckdb", "polars", "pyarrow", "numpy"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing package is reported as such
            out[name] = "not installed"
    return out


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}/s"


def fmt_s(x: float) -> str:
    return f"{x * 1e3:,.1f} ms" if x < 1 else f"{x:,.2f} s"


def ratio(peer: float | None, ours: float, higher_is_better: bool = False) -> str:
    if peer is None:
        return "-"
    value = ours / peer if higher_is_better else peer / ours
    return f"{value:,.1f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["sweep", "queries", "startup", "facade", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--store", default="nirslake", help=argparse.SUPPRESS)
    parser.add_argument("--workspace", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--datasets", type=int, default=4)
    parser.add_argument("--pipelines", type=int, default=400, help="pipelines per dataset")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--scale", type=int, default=10, help="nirslake alone at this multiple of the pipelines (0: skip)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI: must run and print, not meet targets")
    parser.add_argument("--no-peer", action="store_true", help="skip the peer even when nirs4all is installed")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    if args.smoke:
        args.datasets, args.pipelines, args.samples, args.scale = 2, 10, 50, 2
    size = Sweep(args.datasets, args.pipelines, args.samples)
    with_peer = not args.no_peer and peer_available()
    if not with_peer and not args.no_peer:
        print("note: nirs4all is not installed (pip install -e '.[bench]'); running nirslake alone", file=sys.stderr)

    root = tempfile.mkdtemp(prefix="nirslake-bench-")
    results: dict = {}
    try:
        stores = ["peer", "nirslake"] if with_peer else ["nirslake"]
        for store in stores:
            ws = os.path.join(root, store)
            print(f"[{store}] sweep of {size.predictions:,} predictions ...", file=sys.stderr, flush=True)
            results[store] = spawn("sweep", store, ws, size)
            print(f"[{store}] fresh processes: import, top-10 ...", file=sys.stderr, flush=True)
            results[store] |= spawn("startup", store, ws, size, smoke=args.smoke)
            print(f"[{store}] queries ...", file=sys.stderr, flush=True)
            results[store] |= spawn("queries", store, ws, size)
            shutil.rmtree(ws, ignore_errors=True)
            print(f"[{store}] sweep through the Predictions facade ...", file=sys.stderr, flush=True)
            results[store] |= spawn("facade", store, ws + "-facade", size)
            shutil.rmtree(ws + "-facade", ignore_errors=True)
        print("[floor] pyarrow alone ...", file=sys.stderr, flush=True)
        results["floor"] = spawn("floor", "nirslake", os.path.join(root, "floor"), size)
        if args.scale:
            big = Sweep(size.datasets, size.pipelines * args.scale, size.samples)
            ws = os.path.join(root, "scale")
            print(f"[nirslake] scale: sweep of {big.predictions:,} predictions ...", file=sys.stderr, flush=True)
            results["scale"] = spawn("sweep", "nirslake", ws, big)
            results["scale"] |= spawn("queries", "nirslake", ws, big)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    table = render(results, size, args.scale)
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(table + "\n")


def render(results: dict, size: Sweep, scale: int) -> str:
    ours, peer, fl = results["nirslake"], results.get("peer"), results["floor"]

    def p(key):
        return None if peer is None else peer[key]

    rows = [
        ("ingest rate (incl. close)", fmt_rate(p("ingest_rate")) if peer else "-", fmt_rate(ours["ingest_rate"]),
         ratio(p("ingest_rate"), ours["ingest_rate"], higher_is_better=True), ">= 50x"),
        ("ingest through the Predictions facade (flush per pipeline)", fmt_rate(p("facade_ingest_rate")) if peer else "-",
         fmt_rate(ours["facade_ingest_rate"]), ratio(p("facade_ingest_rate"), ours["facade_ingest_rate"], higher_is_better=True), ""),
        ("top-10 per dataset", fmt_s(p("top10_s")) if peer else "-", fmt_s(ours["top10_s"]), ratio(p("top10_s"), ours["top10_s"]), ">= 5x"),
        ("top-10 per dataset, first call", fmt_s(p("top10_first_s")) if peer else "-", fmt_s(ours["top10_first_s"]),
         ratio(p("top10_first_s"), ours["top10_first_s"]), ""),
        ("query_predictions(dataset, val)", fmt_s(p("query_s")) if peer else "-", fmt_s(ours["query_s"]), ratio(p("query_s"), ours["query_s"]), ""),
        ("arrays of 20 predictions", fmt_s(p("arrays20_s")) if peer else "-", fmt_s(ours["arrays20_s"]), ratio(p("arrays20_s"), ours["arrays20_s"]), ">= 20x"),
        ("arrays of 20, first call", fmt_s(p("arrays20_first_s")) if peer else "-", fmt_s(ours["arrays20_first_s"]),
         ratio(p("arrays20_first_s"), ours["arrays20_first_s"]), ""),
        ("fold aggregation per chain", fmt_s(p("fold_agg_s")) if peer else "-", fmt_s(ours["fold_agg_s"]), ratio(p("fold_agg_s"), ours["fold_agg_s"]), ""),
        ("delete_run", fmt_s(p("delete_run_s")) if peer else "-", fmt_s(ours["delete_run_s"]), ratio(p("delete_run_s"), ours["delete_run_s"]), ">= 10x"),
        ("disk per prediction", f"{p('bytes_per_prediction'):,.0f} B" if peer else "-", f"{ours['bytes_per_prediction']:,.0f} B",
         ratio(p("bytes_per_prediction"), ours["bytes_per_prediction"]), "<= peer"),
        ("peak memory of ingest (RSS)", f"{p('peak_rss_mb'):,.0f} MB" if peer else "-", f"{ours['peak_rss_mb']:,.0f} MB",
         ratio(p("peak_rss_mb"), ours["peak_rss_mb"]), ""),
    ]
    lines = [
        f"nirslake benchmark, {date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"sweep: {size.datasets} datasets x {size.pipelines} pipelines x 15 predictions = {size.predictions:,}, {size.samples} samples each",
        "",
        "| workload | peer (nirs4all) | nirslake | peer / nirslake | target |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    shell = ours.get("duckdb_shell_top_s")
    lines += [
        "",
        "| fresh process (median of 5) | peer (nirs4all) | nirslake | peer / nirslake | DuckDB shell |",
        "|---|---|---|---|---|",
        f"| python -c pass (the interpreter alone) | {fmt_s(p('python_s')) if peer else '-'} | {fmt_s(ours['python_s'])} | | |",
        f"| import the store | {fmt_s(p('import_s')) if peer else '-'} | {fmt_s(ours['import_s'])} | {ratio(p('import_s'), ours['import_s'])} | |",
        f"| top-10 per dataset, whole process (`nirslake top`; the peer: a script) | {fmt_s(p('cli_top_s')) if peer else '-'} "
        f"| {fmt_s(ours['cli_top_s'])} | {ratio(p('cli_top_s'), ours['cli_top_s'])} | {fmt_s(shell) if shell else 'no duckdb CLI'} |",
    ]
    lines += [
        "",
        "| nirslake: writing predictions with arrays | rate | against the per-call API | target |",
        "|---|---|---|---|",
        f"| per call (`save_prediction` + `save_prediction_arrays`) | {fmt_rate(ours['ingest_rate'])} | 1.00x | |",
        f"| `Predictions` facade, one `flush` per pipeline | {fmt_rate(ours['facade_ingest_rate'])} | "
        f"{ours['facade_ingest_rate'] / ours['ingest_rate']:.2f}x | > 1x |",
    ]
    lines += [
        "",
        "| floor: pyarrow alone, same arrays | rate | nirslake ingest as share of it | target |",
        "|---|---|---|---|",
        f"| one zstd file | {fmt_rate(fl['one_file_rate'])} | {ours['ingest_rate'] / fl['one_file_rate']:.0%} | >= 40% |",
        f"| one file per pipeline | {fmt_rate(fl['per_pipeline_rate'])} | {ours['ingest_rate'] / fl['per_pipeline_rate']:.0%} | |",
    ]
    if "scale" in results:
        big = results["scale"]
        lines += [
            "",
            f"| scale: nirslake at {scale}x ({big['predictions']:,} predictions) | 1x | {scale}x | {scale}x / 1x | target |",
            "|---|---|---|---|---|",
            f"| ingest rate | {fmt_rate(ours['ingest_rate'])} | {fmt_rate(big['ingest_rate'])} | {big['ingest_rate'] / ours['ingest_rate']:.0%} | >= 80% |",
            f"| peak memory of ingest (RSS) | {ours['peak_rss_mb']:,.0f} MB | {big['peak_rss_mb']:,.0f} MB | {big['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x | bounded |",
            f"| top-10 per dataset | {fmt_s(ours['top10_s'])} | {fmt_s(big['top10_s'])} | {big['top10_s'] / ours['top10_s']:.1f}x | |",
            f"| arrays of 20 predictions | {fmt_s(ours['arrays20_s'])} | {fmt_s(big['arrays20_s'])} | {big['arrays20_s'] / ours['arrays20_s']:.1f}x | |",
            f"| delete_run | {fmt_s(ours['delete_run_s'])} | {fmt_s(big['delete_run_s'])} | {big['delete_run_s'] / ours['delete_run_s']:.1f}x | |",
            f"| disk per prediction | {ours['bytes_per_prediction']:,.0f} B | {big['bytes_per_prediction']:,.0f} B | | |",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
