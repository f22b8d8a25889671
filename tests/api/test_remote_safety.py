"""SQL on an S3 workspace while other processes write to it (issue 9, scenario 19), and the CLI's
answer to a bucket that does not exist (scenario 24). Against moto's S3 server (tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from conftest import create_pipeline, record_prediction

from nirslake import WorkspaceStore
from nirslake.query import catalog

# A writer that saves a pipeline of 3 predictions and publishes them (flush), about three times
# a second until the stop file appears: every flush adds files to tables/ that readers have to
# see whole, all through the readers' rounds however long these take.
WRITER = textwrap.dedent(
    """
    import os, sys, time
    from nirslake import WorkspaceStore

    workspace, worker, stop_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = WorkspaceStore(workspace)
    run = store.begin_run(f"writer {worker}", {}, [{"name": "corn"}])
    i = 0
    while not os.path.exists(stop_file) and i < 1000:
        pipe = store.begin_pipeline(run, f"w{worker}p{i}", {}, {}, "corn", "h")
        chain = store.save_chain(pipe, [], 0, "PLS", "SNV", "kfold", {}, {})
        for k in range(3):
            store.save_prediction(pipe, chain, "corn", "PLS", "PLS", k, "val", k / 10, 0.2, 0.3, "rmse",
                                  "regression", 8, 10, {}, {}, None, None, 0, 0.0)
        store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 1)
        store.flush()
        time.sleep(0.3)
        i += 1
    store.close()
    """
)


@pytest.mark.parametrize("reader", ["httpfs", "fsspec"])
def test_a_connection_sees_whole_the_files_another_client_adds_after_it_listed(s3_workspace, reader, monkeypatch):
    """Issue 9 scenario 19 (made deterministic): a DuckDB connection over an S3 workspace lists
    the predictions (its views are bound), another client publishes one more prediction, then the
    same connection queries again. The new file must be read (5 -> 6 rows), not fail: on fsspec's
    listing cache it showed in the new glob and was "missing" on open (FileNotFoundError), because
    s3fs keeps the first listing of a folder and answers info() from it. Both readers: DuckDB's
    httpfs, and fsspec where the httpfs package is not installed."""
    if reader == "fsspec":
        monkeypatch.setattr(catalog, "packaged_httpfs", lambda: None, raising=False)
    with WorkspaceStore(s3_workspace) as writer, WorkspaceStore(s3_workspace) as other:
        ids = create_pipeline(writer)
        for _ in range(5):
            record_prediction(writer, ids)
            writer.flush()
        con = catalog.connect(writer.storage)
        try:
            assert con.execute("SELECT count(*) FROM predictions").fetchone()[0] == 5
            record_prediction(other, ids)
            other.flush()
            assert con.execute("SELECT count(*) FROM predictions").fetchone()[0] == 6
        finally:
            con.close()
        assert catalog.reads_through_httpfs(writer.storage) == (reader == "httpfs")


@pytest.mark.slow
def test_sql_and_catalog_builds_while_two_processes_write_one_s3_workspace(s3_workspace, tmp_path):
    """Issue 9 scenario 19: two writer processes publish into one S3 workspace while this process
    runs ``store.sql()`` and rebuilds the catalog (what every writer's open does) over and over.
    Every query and build must succeed, and the prediction count may only grow: a file that a
    glob returns is read, never reported missing. (Slow: 15 s of writes; the test above is the
    fast, deterministic form, and the one that also runs the fsspec reader.)"""
    with WorkspaceStore(s3_workspace) as store:
        stop = tmp_path / "stop"
        writers = [
            subprocess.Popen([sys.executable, "-c", WRITER, s3_workspace, str(w), str(stop)],
                             stderr=subprocess.PIPE, text=True)
            for w in range(2)
        ]
        counts, errors, rounds = [], [], 0
        try:
            deadline = time.monotonic() + 15
            while rounds < 3 or (rounds < 30 and time.monotonic() < deadline):  # 3 to 30 rounds
                rounds += 1
                try:
                    counts.append(store.sql("SELECT count(*) AS n FROM predictions")["n"][0])
                    store.rebuild_catalog()
                except Exception as exc:  # every failure is collected and shown, not just the first
                    errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        finally:
            stop.touch()
            stderr = [w.communicate(timeout=120)[1] for w in writers]
        assert [w.returncode for w in writers] == [0, 0], stderr
        assert errors == []
        assert len(counts) >= 3 and counts == sorted(counts) and counts[-1] > counts[0]
        final = store.sql("SELECT count(*) AS n FROM predictions")["n"][0]
        assert final == store.query_predictions().height >= counts[-1]


def test_push_and_demo_into_a_missing_bucket_exit_2_naming_the_bucket(s3_endpoint, tmp_path):
    """Issue 9 scenario 24 (the S3 part): ``nirslake push`` to, and ``nirslake demo -w`` in, a bucket
    that does not exist print one line naming the bucket and what to do, and exit with 2 (docs/sync.md),
    not a traceback."""
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    local = tmp_path / "lake"
    WorkspaceStore(local).close()
    env = {**os.environ}
    for command in (["push", str(local), f"s3://{bucket}/ws"], ["demo", "--quick", "-w", f"s3://{bucket}/x"],
                    ["pull", f"s3://{bucket}/ws", str(tmp_path / "copy")]):
        done = subprocess.run([sys.executable, "-m", "nirslake.cli", *command], capture_output=True, text=True,
                              timeout=120, env=env)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nirslake: error: "), done.stderr
        assert f"the bucket {bucket!r} of s3://{bucket}/" in lines[0], lines[0]
        assert "does not exist: create it first" in lines[0], lines[0]


def test_without_a_configured_region_duckdb_is_given_the_buckets_own(s3_workspace, monkeypatch, tmp_path):
    """DuckDB's S3 client does not follow S3's redirect to a bucket's region as boto does: with no
    region in the options, the environment or the AWS config, the secret carries the region S3
    reports for the bucket, so ``store.sql`` reads where the store writes."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    with WorkspaceStore(s3_workspace) as store:
        ids = create_pipeline(store)
        record_prediction(store, ids)
        assert "REGION 'us-east-1'" in catalog.shell_init_sql(store.storage)
        assert store.sql("SELECT count(*) AS n FROM predictions")["n"][0] == 1
