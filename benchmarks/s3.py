"""The sweep on an S3 workspace against the same sweep on a local folder, with S3 request counts.

    pip install -e ".[bench,s3,test]"   # moto's S3 server comes with the test extra
    python benchmarks/s3.py             # D=2 datasets x P=50 pipelines x 15 = 1,500 predictions
    python benchmarks/s3.py --smoke     # tiny: checks it runs and prints (CI)

The S3 endpoint is moto's server on 127.0.0.1 (the one the tests use), so the times show the
cost of the requests nirslake makes, not a real network's latency; the request counts hold for
any S3. Each workload runs in its own fresh process (benchmarks/run.py's worker): local first,
then S3, then S3 read with the listing lease (``listing_ttl_seconds``) on a copy of its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
import tempfile
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run import fmt_rate, fmt_s, spawn
from workloads import Sweep

# werkzeug colours some status lines (206, 404, ...) with ANSI codes inside the quotes.
LEASE_SECONDS = 2.0  # the third column: WorkspaceStore(listing_ttl_seconds=...)
REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|HEAD|POST|DELETE) (\S+)')


class RequestCounter(logging.Handler):
    """Counts the requests moto's server logs (werkzeug, one line per request), by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        match = REQUEST.search(record.getMessage())
        if match:
            method, path = match.groups()
            kind = "LIST" if method == "GET" and "list-type=" in path else method
            self.counts[kind] += 1


def start_endpoint() -> str:
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    return endpoint


PROJECTED_REQUEST_S = 0.020  # a request's latency on a real object store, for the projection
PROJECTED_BYTES_PER_S = 100e6  # and its bandwidth


class ClientRequests:
    """Counts, in the worker's own S3 client, each request by kind and the bytes it moved (the
    response's length for reads, the body's for writes): botocore's events see every call."""

    def __init__(self, fs) -> None:
        self.kinds: Counter = Counter()
        self.bytes = 0
        self.places: Counter = Counter()  # what the GETs read: a table, the catalog, _current ...
        client = fs.s3
        client.meta.events.register("before-parameter-build.s3", self._params)
        client.meta.events.register("before-call.s3", self._before)
        client.meta.events.register("after-call.s3", self._after)

    def _params(self, params=None, model=None, **_kw) -> None:
        if model is not None and model.name == "GetObject" and params and "Key" in params:
            parts = params["Key"].split("/")
            place = parts[parts.index("tables") + 1] if "tables" in parts[:-1] else parts[-2] if len(parts) > 2 else parts[-1]
            self.places[place + (" (range)" if params.get("Range") else "")] += 1

    def _before(self, model=None, params=None, **_kw) -> None:
        body = (params or {}).get("body")
        if isinstance(body, (bytes, bytearray, memoryview)):
            self.bytes += len(body)

    def _after(self, http_response=None, model=None, **_kw) -> None:
        name = {"GetObject": "GET", "PutObject": "PUT", "HeadObject": "HEAD", "ListObjectsV2": "LIST",
                "DeleteObject": "DELETE", "DeleteObjects": "DELETE"}.get(model.name, model.name)
        self.kinds[name] += 1
        if name == "GET":
            self.bytes += int(http_response.headers.get("content-length", 0) or 0)

    def take(self) -> tuple[dict, int, dict]:
        taken = (dict(self.kinds), self.bytes, dict(self.places))
        self.kinds, self.bytes, self.places = Counter(), 0, Counter()
        return taken


def operations_worker(workspace: str, size: Sweep) -> dict:
    """One fresh process on the S3 workspace: each read, first and again, with its requests."""
    import time

    import numpy as np

    from workloads import open_store

    from nirslake.lake.storage import Storage

    # The store's filesystem is fsspec's cached instance for these options: counting on it from
    # before the store exists counts the requests of opening it too.
    counter = ClientRequests(Storage(workspace).fs)
    counter.take()
    out: dict = {}

    def measure(label, fn):
        t0 = time.perf_counter()
        value = fn()
        elapsed = time.perf_counter() - t0
        kinds, moved, places = counter.take()
        out[label] = {"requests": kinds, "bytes": moved, "s": elapsed, "read": places}
        return value

    store = measure("open", lambda: open_store("nirslake", workspace))
    measure("top-10 per dataset, first call", lambda: store.top_predictions(10, group_by="dataset_name"))
    measure("top-10 per dataset, again", lambda: store.top_predictions(10, group_by="dataset_name"))
    measure("query_predictions(dataset, val)", lambda: store.query_predictions(dataset_name="dataset_0", partition="val"))
    ids = store.query_predictions(dataset_name=f"dataset_{size.datasets - 1}")["prediction_id"].to_list()
    counter.take()
    chosen = [ids[i] for i in np.random.default_rng(3).choice(len(ids), size=min(21, len(ids)), replace=False)]
    measure("get_prediction, no arrays", lambda: store.get_prediction(chosen[0]))
    measure("get_prediction with arrays, first (reads the footer)", lambda: store.get_prediction(chosen[0], load_arrays=True))
    measure("get_prediction with arrays, footer known", lambda: store.get_prediction(chosen[1], load_arrays=True))
    measure("arrays of 20 predictions", lambda: [store.get_prediction(pid, load_arrays=True) for pid in chosen[1:]])
    run_id = store.list_runs()["run_id"][0]
    counter.take()
    measure("delete_run", lambda: store.delete_run(run_id))
    store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=int, default=2)
    parser.add_argument("--pipelines", type=int, default=50, help="pipelines per dataset")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    args = parser.parse_args()
    size = Sweep(1, 4, 50) if args.smoke else Sweep(args.datasets, args.pipelines, args.samples)

    counter = RequestCounter()
    logging.getLogger("werkzeug").addHandler(counter)
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    logging.getLogger("werkzeug").propagate = False
    start_endpoint()
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")

    results = {}
    with tempfile.TemporaryDirectory(prefix="nirslake-s3-bench-") as tmp:
        backends = (("local", os.path.join(tmp, "ws"), 0), ("s3", "s3://bench/ws", 0),
                    ("s3_lease", "s3://bench/ws-lease", LEASE_SECONDS))
        for backend, workspace, ttl in backends:
            before = Counter(counter.counts)
            ingest = spawn("sweep", "nirslake", workspace, size)
            after_ingest = Counter(counter.counts)
            os.environ["NIRSLAKE_BENCH_LISTING_TTL"] = str(ttl)  # read by the worker's open_store
            try:
                reads = spawn("queries", "nirslake", workspace, size)
            finally:
                del os.environ["NIRSLAKE_BENCH_LISTING_TTL"]
            results[backend] = {
                "ingest": ingest,
                "queries": reads,
                "ingest_requests": after_ingest - before,
                "query_requests": Counter(counter.counts) - after_ingest,
            }
        # Per operation, in fresh processes: a sweep written on S3 (a file per table per
        # durability point), and a local sweep copied to the bucket (a few large files).
        spawn("sweep", "nirslake", "s3://bench/ws-ops", size)
        spawn("sweep", "nirslake", "s3://bench/ws-ops-lease", size)  # the last read of each is delete_run
        local_sweep = os.path.join(tmp, "ws-copied")
        spawn("sweep", "nirslake", local_sweep, size)
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).put(local_sweep + "/", "bench/ws-copied", recursive=True)
        operations = {layout: operations_spawn(url, size, ttl) for layout, url, ttl in
                      (("written on S3", "s3://bench/ws-ops", 0), ("copied from a local sweep", "s3://bench/ws-copied", 0),
                       (f"written on S3, listing lease {LEASE_SECONDS:g} s", "s3://bench/ws-ops-lease", LEASE_SECONDS))}
    print(render(results, size))
    print()
    print(render_operations(operations))


def operations_spawn(workspace: str, size: Sweep, ttl: float = 0) -> dict:
    import json
    import subprocess
    from dataclasses import asdict

    cmd = [sys.executable, os.path.abspath(__file__), "--operations-worker", workspace, json.dumps(asdict(size))]
    env = {**os.environ, "NIRSLAKE_BENCH_LISTING_TTL": str(ttl)}  # read by the worker's open_store
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"operations worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def render_operations(operations: dict) -> str:
    """Requests and bytes of each read, and what they would take at 20 ms a request and 100 MB/s
    (one request after another: reads of many files send up to 64 at once, so less)."""
    lines = [
        f"| operation (fresh process) | layout | GET | LIST | HEAD | other | bytes | projected "
        f"({PROJECTED_REQUEST_S * 1e3:g} ms/request, {PROJECTED_BYTES_PER_S / 1e6:g} MB/s) | measured (moto) | GETs of |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layout, ops in operations.items():
        for label, op in ops.items():
            kinds = dict(op["requests"])
            gets, lists, heads = kinds.pop("GET", 0), kinds.pop("LIST", 0), kinds.pop("HEAD", 0)
            other = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "0"
            total = gets + lists + heads + sum(kinds.values())
            projected = total * PROJECTED_REQUEST_S + op["bytes"] / PROJECTED_BYTES_PER_S
            reads = ", ".join(f"{name} {n}" for name, n in sorted(op.get("read", {}).items())) or "-"
            lines.append(f"| {label} | {layout} | {gets} | {lists} | {heads} | {other} | {op['bytes']:,} | "
                         f"{fmt_s(projected)} | {fmt_s(op['s'])} | {reads} |")
    return "\n".join(lines)


def render(results: dict, size: Sweep) -> str:
    local, s3, leased = results["local"], results["s3"], results["s3_lease"]

    def row(label, key, fmt, higher_is_better=False):
        a, b, c = (r["ingest" if key == "ingest_rate" else "queries"][key] for r in (local, s3, leased))
        ratio = (a / b if higher_is_better else b / a) if a and b else float("nan")
        return f"| {label} | {fmt(a)} | {fmt(b)} | {ratio:.1f}x slower | {fmt(c)} |"

    lines = [
        f"S3 (moto on 127.0.0.1) vs local: {size.datasets} datasets x {size.pipelines} pipelines x 15 = "
        f"{size.predictions:,} predictions, {size.samples} samples",
        "",
        f"| workload | local | s3 | s3 against local | s3, listing lease {LEASE_SECONDS:g} s |",
        "|---|---|---|---|---|",
        row("ingest rate (incl. close)", "ingest_rate", fmt_rate, True),
    ]
    for key, label in (("top10_s", "top-10 per dataset"), ("top10_first_s", "top-10, first call"),
                       ("arrays20_s", "arrays of 20 predictions"), ("arrays20_first_s", "arrays of 20, first call"),
                       ("delete_run_s", "delete_run")):
        lines.append(row(label, key, fmt_s))
    lines += [
        "",
        "| S3 requests | ingest | queries (incl. delete_run) | per pipeline (ingest) | queries, with the lease |",
        "|---|---|---|---|---|",
    ]
    for kind in ("PUT", "GET", "HEAD", "LIST", "DELETE", "POST"):
        n_in, n_q = s3["ingest_requests"].get(kind, 0), s3["query_requests"].get(kind, 0)
        n_lease = leased["query_requests"].get(kind, 0)
        if n_in or n_q or n_lease:
            lines.append(f"| {kind} | {n_in:,} | {n_q:,} | {n_in / size.total_pipelines:.1f} | {n_lease:,} |")
    total_in = sum(s3["ingest_requests"].values())
    lines.append(f"| all | {total_in:,} | {sum(s3['query_requests'].values()):,} | {total_in / size.total_pipelines:.1f} "
                 f"| {sum(leased['query_requests'].values()):,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--operations-worker" in sys.argv:
        import json

        _, _, workspace, size_json = sys.argv
        print("RESULT " + json.dumps(operations_worker(workspace, Sweep(**json.loads(size_json)))))
    elif "--worker" in sys.argv:
        from run import main as run_main

        run_main()
    else:
        main()
