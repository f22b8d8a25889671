"""Shared fixtures: a fresh workspace, a store opened on it, and a run -> pipeline -> chain helper.

Every test gets its workspace from the ``workspace`` fixture only, so the whole suite can later
run against other backends (local folder, S3) by parametrising that one fixture.
"""

from __future__ import annotations

import math
import os
import shutil
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest

from nirslake import WorkspaceStore


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real local S3 endpoint: moto's server on 127.0.0.1 (as s3fs's own tests use), for the session.

    The AWS variables point every client at it (boto, s3fs, DuckDB's httpfs secret, subprocesses).
    """
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": "",
}


def new_bucket(endpoint: str) -> str:
    import s3fs

    name = f"nirslake-{uuid.uuid4().hex[:16]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture
def s3_workspace(s3_endpoint) -> str:
    """A fresh workspace URL in a new bucket of the local S3 endpoint."""
    return f"s3://{new_bucket(s3_endpoint)}/ws"


@pytest.fixture
def local_workspace(tmp_path) -> str:
    """A fresh local workspace, for tests about local files themselves (paths, journals, fsync)."""
    return str(tmp_path / "ws")


# The store's own suite runs on both backends; the other modules test local files themselves
# (journals, paths, SIGKILLs, the demo) or S3 explicitly (test_remote.py, test_sync.py).
BOTH_BACKENDS = re.compile(r"test_store_\w+|test_query|test_api_surface")


def pytest_generate_tests(metafunc):
    if "workspace" in metafunc.fixturenames and BOTH_BACKENDS.fullmatch(metafunc.module.__name__.rsplit(".", 1)[-1]):
        metafunc.parametrize("workspace", ["local", "s3"], indirect=True)


@pytest.fixture
def workspace(request, tmp_path) -> str:
    """Where a fresh, not yet created workspace lives: a local folder, or ``s3://`` on the local
    endpoint for the store suite's second run (see ``BOTH_BACKENDS``)."""
    if getattr(request, "param", "local") == "local":
        return str(tmp_path / "ws")
    return request.getfixturevalue("s3_workspace")


@pytest.fixture
def store(workspace):
    """A store opened on the fresh workspace, closed after the test."""
    # grace_seconds=0 so gc_artifacts and vacuum act at once; test_store_artifacts checks the default.
    s = WorkspaceStore(workspace, grace_seconds=0)
    yield s
    s.close()


@dataclass(frozen=True)
class PipelineIds:
    run_id: str
    pipeline_id: str
    chain_id: str


def create_pipeline(store, dataset_name: str = "corn_m5", run_name: str = "protein_sweep") -> PipelineIds:
    """Begin a run and a pipeline on ``dataset_name`` and save a SNV -> PLS chain without artifacts."""
    run_id = store.begin_run(
        run_name,
        {"cv": {"n_splits": 2}, "metric": "rmse"},
        [{"name": dataset_name, "path": f"data/{dataset_name}.csv"}],
    )
    pipeline_id = store.begin_pipeline(
        run_id,
        "snv_pls10",
        [{"class": "SNV"}, {"class": "PLSRegression", "params": {"n_components": 10}}],
        {"n_components": 10},
        dataset_name,
        "sha256:0f3a",
    )
    chain_id = store.save_chain(
        pipeline_id,
        [
            {"step_idx": 0, "operator_class": "SNV", "params": {}, "artifact_id": None, "stateless": True},
            {
                "step_idx": 1,
                "operator_class": "PLSRegression",
                "params": {"n_components": 10},
                "artifact_id": None,
                "stateless": False,
            },
        ],
        1,
        "PLSRegression",
        "SNV",
        "KFold(2)",
        {},
        {},
    )
    return PipelineIds(run_id, pipeline_id, chain_id)


@pytest.fixture
def make_pipeline():
    """``make_pipeline(store, dataset_name=..., run_name=...) -> PipelineIds``."""
    return create_pipeline


def record_prediction(
    store,
    ids: PipelineIds,
    *,
    dataset_name: str = "corn_m5",
    model_name: str = "PLS_10",
    model_class: str = "PLSRegression",
    fold_id: str = "0",
    partition: str = "val",
    val_score: float | None = 0.42,
    test_score: float | None = 0.45,
    train_score: float | None = 0.30,
    metric: str = "rmse",
    task_type: str = "regression",
    n_samples: int = 40,
    n_features: int = 200,
    scores: dict | None = None,
    best_params: dict | None = None,
    branch_id: int | None = None,
    branch_name: str | None = None,
    exclusion_count: int = 0,
    exclusion_rate: float = 0.0,
    preprocessings: str = "SNV",
    prediction_id: str | None = None,
) -> str:
    """Save one prediction of ``ids``' chain, passing every argument positionally as callers do."""
    if scores is None:
        scores = {partition: {metric: val_score}}
    return store.save_prediction(
        ids.pipeline_id,
        ids.chain_id,
        dataset_name,
        model_name,
        model_class,
        fold_id,
        partition,
        val_score,
        test_score,
        train_score,
        metric,
        task_type,
        n_samples,
        n_features,
        scores,
        best_params if best_params is not None else {},
        branch_id,
        branch_name,
        exclusion_count,
        exclusion_rate,
        preprocessings,
        prediction_id,
    )


@pytest.fixture
def add_prediction():
    """``add_prediction(store, ids, **fields) -> prediction_id`` with realistic defaults."""
    return record_prediction


def read_url(path) -> bytes:
    """The bytes at a local path or URL (an artifact's path on any backend)."""
    with fsspec.open(str(path), "rb") as fh:
        return fh.read()


def write_url(path, data: bytes) -> None:
    with fsspec.open(str(path), "wb") as fh:
        fh.write(data)


def remove_url(path) -> None:
    fs, root = fsspec.core.url_to_fs(str(path))
    fs.rm_file(root)


def let_object_times_pass(workspace: str) -> None:
    """On an object store, wait until objects saved so far look older than now.

    Object stores keep modification times in whole seconds and nirslake reads each as the end
    of its second (lake spec §7), so with ``grace_seconds=0`` an object saved in the current
    second still counts as "just saved" and gc keeps it. Waiting for the next second makes the
    outcome of a gc test independent of where in a second the test happened to run.
    """
    if "://" in workspace:
        now = time.time()
        time.sleep(math.ceil(now) - now + 0.02)


# One local Spark session for every test that reads the lake with Spark (tests/query/test_spark.py,
# tests/lake/test_engines.py): the JVM starts once per test run.
@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    """A local Spark session for the whole test session (the JVM starts once, ~10 s)."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Spark needs a Java runtime (17 or later): no `java` on PATH and no JAVA_HOME")
    from pyspark.sql import SparkSession

    saved = os.environ.get("SPARK_LOCAL_IP")
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"  # no lookup of the host's address, no network
    session = (
        SparkSession.builder.master("local[2]")
        .appName("nirslake-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "512m")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.warehouse.dir", str(tmp_path_factory.mktemp("spark-warehouse")))
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()
        if saved is None:
            os.environ.pop("SPARK_LOCAL_IP", None)
        else:
            os.environ["SPARK_LOCAL_IP"] = saved


def run_doc_page(page: str, folder) -> None:
    """Run a docs/ page's Python blocks in order, in one namespace, inside ``folder``: the page works as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / page).read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{page} lost its examples"
    namespace: dict = {}
    here = os.getcwd()
    os.chdir(folder)
    try:
        for block in blocks:
            exec(compile(block, page, "exec"), namespace)
    finally:
        os.chdir(here)
