"""nirs4all 1.4.10 on nirslake: real ``nirs4all.run`` sweeps on both engines, with nirs4all's own
store and with ``install()``, compared as a user sees them (statuses and counts, ``top(5)``,
``cv_best_score``, the reload's ``top(3)``, ``predict(chain_id=...)`` for every chain, the exported
bundle's predictions); then the store surface nirs4all calls, call by call.

Each engine runs once per store for the module (tiny data), in a tmp folder, offline.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

nirs4all = pytest.importorskip("nirs4all", reason="the nirs4all extra (pip install nirslake[nirs4all]) is not installed")

from nirslake.integrations import nirs4all as integ  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"
ENGINES = ("default", "legacy")
FIELDS = ("model_name", "model_classname", "fold_id", "partition", "val_score", "test_score", "train_score",
          "metric", "task_type", "n_samples", "n_features", "preprocessings", "branch_id", "refit_context")


def dataset():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(48, 12))
    y = X[:, :3].sum(1) + rng.normal(scale=0.1, size=48)
    return X, y


def pipeline():
    from sklearn.cross_decomposition import PLSRegression
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import StandardScaler

    return [StandardScaler(), KFold(3), PLSRegression(2)]


def seen(prediction) -> dict:
    """What a user reads off one ranked prediction (ids aside: each run draws its own)."""
    out = {k: prediction.get(k) for k in FIELDS}
    for k in ("y_true", "y_pred"):
        value = prediction.get(k)
        out[k] = None if value is None else np.asarray(value).tolist()
    return out


def counts(store) -> dict:
    runs = store.list_runs()
    pipelines = store.list_pipelines()
    chains = sum(store.get_chains_for_pipeline(pid).height for pid in pipelines["pipeline_id"].to_list())
    return {
        "run_status": sorted(runs["status"].to_list()),
        "runs": runs.height,
        "pipeline_status": sorted(pipelines["status"].to_list()),
        "pipelines": pipelines.height,
        "chains": chains,
        "predictions": store.query_predictions().height,
    }


def chain_ids(store) -> dict[tuple, str]:
    """Every chain by what it is (its pipeline's name, model, preprocessing, fold strategy and
    folds): ids differ between runs, and nirs4all's timestamps (to the second) cannot order them."""
    out = {}
    for pipeline in store.list_pipelines().iter_rows(named=True):
        for chain in store.get_chains_for_pipeline(pipeline["pipeline_id"]).iter_rows(named=True):
            folds = chain["fold_artifacts"]
            folds = json.loads(folds) if isinstance(folds, str) else folds
            key = (pipeline["name"], chain["model_class"], chain["preprocessings"], chain["fold_strategy"], tuple(sorted(folds or {})))
            assert key not in out
            out[key] = chain["chain_id"]
    return out


def observe(engine: str, ws: Path) -> dict:
    """Run the sweep into ``ws`` and look at it as a user would."""
    from nirs4all.data.predictions import Predictions
    from nirs4all.pipeline.storage.workspace_store import WorkspaceStore  # nirs4all's, or nirslake's once installed

    X, y = dataset()
    kw = {} if engine == "default" else {"engine": "legacy"}
    result = nirs4all.run(pipeline(), (X, y), workspace_path=str(ws), verbose=0, **kw)
    obs = {
        "top5": [seen(p) for p in result.top(5)],
        "cv_best_score": result.cv_best_score,
        "reload_top3": [seen(p) for p in Predictions.from_workspace(ws).top(3)],
    }
    with WorkspaceStore(ws) as store:
        obs["store_class"] = type(store).__name__
        obs.update(counts(store))
        chains = chain_ids(store)
    obs["chain_predictions"] = {
        key: np.asarray(nirs4all.predict(chain_id=c, data=X[:6], workspace_path=str(ws), verbose=0, **kw).y_pred).tolist()
        for key, c in chains.items()
    }
    bundle = result.export(str(ws.parent / f"{ws.name}.n4a"))
    obs["bundle_prediction"] = np.asarray(nirs4all.predict(model=str(bundle), data=X[:6], verbose=0, **kw).y_pred).tolist()
    obs["ws"] = ws
    return obs


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Each engine run once on nirs4all's own store and once on the lake (``install()``)."""
    root = tmp_path_factory.mktemp("nirs4all")
    cwd = os.getcwd()
    os.chdir(root)  # nirs4all writes nothing outside the tmp folder
    out = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for engine in ENGINES:
                integ.uninstall()
                out[engine, "nirs4all"] = observe(engine, root / f"native_{engine}")
                undo = integ.install()
                try:
                    out[engine, "lake"] = observe(engine, root / f"lake_{engine}")
                finally:
                    undo()
    finally:
        os.chdir(cwd)
        integ.uninstall()
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_the_lake_run_is_on_the_lake(sweeps, engine):
    assert sweeps[engine, "nirs4all"]["store_class"] == "WorkspaceStore"
    assert sweeps[engine, "lake"]["store_class"] == "Nirs4allStore"


@pytest.mark.parametrize("engine", ENGINES)
def test_status_and_counts_equal(sweeps, engine):
    native, lake = sweeps[engine, "nirs4all"], sweeps[engine, "lake"]
    keys = ("run_status", "runs", "pipeline_status", "pipelines", "chains", "predictions")
    assert {k: lake[k] for k in keys} == {k: native[k] for k in keys}
    assert native["run_status"] == ["completed"] and native["predictions"] > 0 and native["chains"] > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_top5_and_cv_best_score_equal(sweeps, engine):
    native, lake = sweeps[engine, "nirs4all"], sweeps[engine, "lake"]
    assert len(native["top5"]) == 5
    assert lake["top5"] == native["top5"]
    assert lake["cv_best_score"] == native["cv_best_score"] is not None


@pytest.mark.parametrize("engine", ENGINES)
def test_reload_top3_equal(sweeps, engine):
    native, lake = sweeps[engine, "nirs4all"], sweeps[engine, "lake"]
    assert len(native["reload_top3"]) == 3 and native["reload_top3"][0]["y_pred"]
    assert lake["reload_top3"] == native["reload_top3"]


@pytest.mark.parametrize("engine", ENGINES)
def test_predict_every_chain_equal(sweeps, engine):
    native, lake = sweeps[engine, "nirs4all"], sweeps[engine, "lake"]
    assert native["chain_predictions"] and all(len(p) == 6 for p in native["chain_predictions"].values())
    assert lake["chain_predictions"].keys() == native["chain_predictions"].keys()
    for key, values in native["chain_predictions"].items():
        np.testing.assert_allclose(lake["chain_predictions"][key], values, rtol=1e-12, atol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_exported_bundle_predicts_equal(sweeps, engine):
    native, lake = sweeps[engine, "nirs4all"], sweeps[engine, "lake"]
    assert len(native["bundle_prediction"]) == 6
    np.testing.assert_allclose(lake["bundle_prediction"], native["bundle_prediction"], rtol=1e-12, atol=0)


def _time_kinds(value) -> dict:
    """Each time of a read's result: a frame's Datetime dtypes, a dict's datetime zones."""
    if isinstance(value, pl.DataFrame):
        return {n: (t.time_unit, t.time_zone) for n, t in value.schema.items() if isinstance(t, pl.Datetime)}
    return {k: getattr(v, "tzinfo", "not a time") for k, v in value.items() if k.endswith("_at") and v is not None}


@pytest.mark.parametrize("engine", ENGINES)
def test_times_are_naive_utc_as_in_nirs4alls_store(sweeps, engine):
    """nirs4all's store gives its times naive (UTC); the lake's reads through nirs4all give the
    same kind, and the same instants as the lake's own UTC-aware ones."""
    import datetime as dt

    from nirs4all.pipeline.storage.workspace_store import WorkspaceStore as Native

    from nirslake.store import WorkspaceStore as Lake

    def reads(store) -> dict:
        run = store.list_runs()["run_id"][0]
        pipeline = store.list_pipelines()["pipeline_id"][0]
        chain = store.get_chains_for_pipeline(pipeline)["chain_id"][0]
        prediction = store.query_predictions()["prediction_id"][0]
        return {
            "get_run": store.get_run(run), "list_runs": store.list_runs(), "get_pipeline": store.get_pipeline(pipeline),
            "list_pipelines": store.list_pipelines(), "get_chains_for_pipeline": store.get_chains_for_pipeline(pipeline),
            "get_chain": store.get_chain(chain), "query_predictions": store.query_predictions(),
            "get_prediction": store.get_prediction(prediction),
        }

    with Native(sweeps[engine, "nirs4all"]["ws"]) as native, integ.Nirs4allStore(sweeps[engine, "lake"]["ws"]) as lake:
        theirs, ours = reads(native), reads(lake)
        for call, value in theirs.items():
            kinds = _time_kinds(value)
            assert kinds and set(kinds.values()) <= {("us", None), None}, (call, kinds)
            mine = _time_kinds(ours[call])
            assert mine and {k: kinds.get(k) for k in mine} == mine, (call, mine, kinds)
        run = ours["get_run"]["run_id"]
        aware = Lake.get_run(lake, run)["created_at"]
        assert aware.tzinfo is not None and ours["get_run"]["created_at"] == aware.astimezone(dt.timezone.utc).replace(tzinfo=None)


# ---------------------------------------------------------------------- nothing nirs4all gives is dropped
@pytest.fixture
def installed():
    undo = integ.install()
    yield
    undo()


def test_the_fields_nirs4all_adds_round_trip(sweeps):
    """Pipelines keep ``original_template``, chains their dataset, predictions ``refit_context``:
    read back from the lake as nirs4all's own store gives them."""
    from nirs4all.pipeline.storage.workspace_store import WorkspaceStore as Native

    templates = []
    for engine in ENGINES:
        with Native(sweeps[engine, "nirs4all"]["ws"]) as native, integ.Nirs4allStore(sweeps[engine, "lake"]["ws"]) as lake:
            def templates_by_name(store):
                return {p["name"]: store.get_pipeline(p["pipeline_id"])["original_template"] for p in store.list_pipelines().iter_rows(named=True)}

            n_templates, l_templates = templates_by_name(native), templates_by_name(lake)
            assert l_templates == n_templates and len(n_templates) > 0
            templates += list(l_templates.values())

            def contexts(store):
                return sorted(map(str, store.query_predictions().select("fold_id", "partition", "refit_context").rows()))

            assert contexts(lake) == contexts(native)
            assert any("None)" not in c for c in contexts(lake))
            n_chains = native._fetch_pl("SELECT dataset_name FROM chains")["dataset_name"].to_list()
            assert sorted(lake.query_chain_summaries()["dataset_name"].to_list()) == sorted(n_chains)
    assert any(t is not None for t in templates)


def _records(ids: list[str], dataset_name: str) -> list[dict]:
    """Array records of every kind nirs4all hands over: multi-output targets, class labels, 1-D
    and 2-D probabilities, X and spectra matrices, weights of another length, metadata."""
    rng = np.random.default_rng(3)
    n = 5
    return [
        {  # regression, multi-output target, X and spectra, weights of another length, metadata
            "prediction_id": ids[0], "dataset_name": dataset_name, "model_name": "PLS", "fold_id": "0",
            "partition": "val", "metric": "rmse", "val_score": 0.5, "task_type": "regression",
            "y_true": rng.normal(size=(n, 2)), "y_pred": rng.normal(size=(n, 2)),
            "X": rng.normal(size=(n, 4)), "spectra": rng.normal(size=(n, 3, 2)),
            "sample_indices": np.arange(n), "weights": rng.random(3),
            "sample_metadata": {"site": ["a", "b", "c", "d", "e"], "n": np.int64(5)},
            "result_metadata": {"note": "kept", "score": np.float64(1.5)},
        },
        {  # classification with string labels and 2-D probabilities
            "prediction_id": ids[1], "dataset_name": dataset_name, "model_name": "RF", "fold_id": "1",
            "partition": "test", "metric": "accuracy", "val_score": 0.8, "task_type": "classification",
            "y_true": np.array(["a", "b", "a", "c", "b"]), "y_pred": np.array(["a", "b", "b", "c", "b"]),
            "y_proba": rng.random((n, 3)), "sample_indices": np.arange(n) + 10,
        },
        {  # regression, column-vector target, 1-D probabilities, nothing else
            "prediction_id": ids[2], "dataset_name": dataset_name, "model_name": "SVR", "fold_id": "final",
            "partition": "val", "metric": "rmse", "val_score": None, "task_type": "regression",
            "y_true": rng.normal(size=(n, 1)), "y_pred": rng.normal(size=n), "y_proba": rng.random(n),
        },
    ]


def _same(a, b) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray) or isinstance(b[key], np.ndarray):
            assert a[key] is not None and b[key] is not None, key
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def _lake_with_predictions(ws: Path, n: int = 3, **fields) -> tuple[integ.Nirs4allStore, str, list[str]]:
    store = integ.Nirs4allStore(ws)
    run = store.begin_run("r", {"a": 1}, [{"name": "ds"}])
    pipe = store.begin_pipeline(run, "p", {"steps": []}, [], "ds", "h", original_template={"t": 1})
    chain = store.save_chain(pipe, [], 0, "m", "", "per_fold", {}, {}, dataset_name="ds")
    ids = [
        store.save_prediction(pipe, chain, "ds", f"m{i}", "cls", str(i), "val", 0.1 * i, None, None, "rmse", "regression",
                              5, 4, {}, {}, None, None, 0, 0.0, **fields)
        for i in range(n)
    ]
    return store, pipe, ids


def test_arrays_round_trip_as_nirs4alls_array_store(tmp_path):
    """Every field of every kind of record comes back from the lake exactly as nirs4all's own
    ``ArrayStore`` gives it back (shapes, dtypes, labels, weights of any length, metadata)."""
    from nirs4all.pipeline.storage.array_store import ArrayStore

    store, _, ids = _lake_with_predictions(tmp_path / "lake")
    records = _records(ids, "ds")
    native = ArrayStore(tmp_path / "native")
    assert native.save_batch(records) == store.array_store.save_batch(records) == 3
    store.close()
    expected = native.load_batch(ids, dataset_name="ds")
    with integ.Nirs4allStore(tmp_path / "lake") as reopened:
        got = reopened.array_store.load_batch(ids, dataset_name="ds")
        assert got.keys() == expected.keys() == set(ids)
        for pid in ids:
            _same(got[pid], expected[pid])
        assert reopened.array_store.load_single(ids[1], "ds")["y_true"].tolist() == ["a", "b", "a", "c", "b"]
        assert reopened.array_store.load_batch(ids[:1])[ids[0]]["weights"].shape == (3,)  # no dataset: every partition


def test_load_batch_reads_each_dataset_once(tmp_path, monkeypatch):
    """A reload of many predictions is one read of the partition, not one per prediction."""
    store, _, ids = _lake_with_predictions(tmp_path / "lake", n=40)
    store.array_store.save_batch([{**_records([pid] * 3, "ds")[2], "prediction_id": pid} for pid in ids])
    store.close()
    with integ.Nirs4allStore(tmp_path / "lake") as reopened:
        calls = []
        real_table = type(reopened._reads).table
        monkeypatch.setattr(type(reopened._reads), "table", lambda self, *a, **k: calls.append(a) or real_table(self, *a, **k))
        got = reopened.array_store.load_batch(ids, dataset_name="ds")
    assert len(got) == 40 and len(calls) == 1


def _decoded_files(monkeypatch) -> list[str]:
    """The data files decoded from here on (each decoding round's files, in order)."""
    from nirslake.lake import tables

    seen: list[str] = []
    real = tables._decode_frames
    monkeypatch.setattr(tables, "_decode_frames", lambda storage, rels, *a: seen.extend(rels) or real(storage, rels, *a))
    return seen


def test_a_reload_query_decodes_what_the_reload_reads_next_in_one_round(tmp_path, monkeypatch):
    """``query_predictions`` of a whole dataset is how ``Predictions.from_workspace`` begins: the
    run, pipelines, chains and (a small local partition) arrays are decoded with the predictions,
    in one round, and the reads that follow decode nothing. A filtered query decodes no arrays,
    nor does one whose arrays exceed the bound; the answers are the same either way."""
    store, pipe, ids = _lake_with_predictions(tmp_path / "lake", n=3)
    store.array_store.save_batch(_records(ids, "ds"))
    store.close()
    answers = []
    for bound, query in ((integ.Nirs4allStore.PREFETCH_ARRAY_BYTES, {"dataset_name": "ds"}),
                         (integ.Nirs4allStore.PREFETCH_ARRAY_BYTES, {"dataset_name": "ds", "fold_id": "1"}),
                         (0, {"dataset_name": "ds"})):
        monkeypatch.setattr(integ.Nirs4allStore, "PREFETCH_ARRAY_BYTES", bound)
        with integ.Nirs4allStore(tmp_path / "lake") as reopened:
            decoded = _decoded_files(monkeypatch)
            frame = reopened.query_predictions(**query)
            first = list(decoded)
            arrays = reopened.array_store.load_batch(frame["prediction_id"].to_list(), dataset_name="ds")
            pipeline, chains = reopened.get_pipeline(pipe), reopened.get_chains_for_pipeline(pipe)
            run = reopened.get_run(pipeline["run_id"])
            answers.append((frame.height, sorted(arrays), pipeline["name"], chains.height, run["name"]))
            later = decoded[len(first):]
        tables_first = {rel.split("/")[1] for rel in first}
        assert {"predictions", "runs", "pipelines", "chains"} <= tables_first, first
        if bound and len(query) == 1:
            assert "prediction_arrays" in tables_first and later == []  # nothing left to decode
        else:
            assert "prediction_arrays" not in tables_first
            assert {rel.split("/")[1] for rel in later} == {"prediction_arrays"}
    assert answers[0] == answers[2] == (3, sorted(ids), "p", 1, "r")
    assert answers[1][0] == 1 and answers[1][2:] == answers[0][2:]


def test_chains_of_each_pipeline_in_creation_order_when_saved_interleaved(tmp_path):
    """The chains index keeps each pipeline's chains together, in creation order, whatever order
    pipelines' chains were saved in; a frame handed out is the caller's (changing it changes no
    later answer)."""
    a = integ.Nirs4allStore(tmp_path)
    run = a.begin_run("r", {}, [{"name": "ds"}])
    pipes = [a.begin_pipeline(run, f"p{i}", {}, [], "ds", "h") for i in range(3)]
    saved: dict[str, list[str]] = {p: [] for p in pipes}
    for k in range(4):
        for p in reversed(pipes):
            saved[p].append(a.save_chain(p, [], k, f"m{k}", "", "per_fold", {}, {}, dataset_name="ds"))
    a.close()
    with integ.Nirs4allStore(tmp_path) as b:
        for p in pipes:
            chains = b.get_chains_for_pipeline(p)
            assert chains["chain_id"].to_list() == saved[p] and set(chains["pipeline_id"]) == {p}
            chains.insert_column(0, pl.Series("extra", [1] * chains.height))
            chains[0, "chain_id"] = "changed"
            assert b.get_chains_for_pipeline(p)["chain_id"].to_list() == saved[p]
        assert b.get_chains_for_pipeline("none").columns == b.get_chains_for_pipeline(pipes[0]).columns


def test_flat_lists_read_every_chunk_of_a_column():
    """A column of several chunks (a file's row groups; one of them a slice) with null rows gives
    each row's values, as the row's own writable array."""
    from nirslake.integrations.nirs4all_arrays import _flat_lists

    rows = [[1.0, 2.0], None, [], [3.5], [4.0, 5.0, 6.0], None, [7.0]]
    whole = pa.array(rows, pa.large_list(pa.float64()))
    chunked = pa.chunked_array([whole.slice(0, 2), whole.slice(2, 3), pa.array(rows[5:], pa.large_list(pa.float64()))])
    got = _flat_lists(chunked, np.float64)
    assert [None if g is None else g.tolist() for g in got] == rows
    got[0][0] = 99.0
    assert whole[0].as_py() == [1.0, 2.0] and _flat_lists(chunked, np.int32)[4].dtype == np.int32


def test_load_batch_shares_nothing_between_predictions(tmp_path):
    """Predictions with the same metadata text (a fold's samples) get dicts equal to a fresh
    decode each, sharing no dict or list: nirs4all adds keys to one without touching the others."""
    store, _, ids = _lake_with_predictions(tmp_path / "lake", n=3)
    meta = {"site": ["a", "b"], "nested": {"ids": [1, 2], "rows": [[1], [2]]}}
    store.array_store.save_batch([{**_records([pid] * 3, "ds")[0], "prediction_id": pid, "sample_metadata": meta,
                                   "result_metadata": {"k": [1]}} for pid in ids])
    store.close()
    with integ.Nirs4allStore(tmp_path / "lake") as reopened:
        got = reopened.array_store.load_batch(ids, dataset_name="ds")
    first, *others = (got[pid] for pid in ids)
    first["sample_metadata"]["added"] = 1
    first["sample_metadata"]["site"].append("c")
    first["sample_metadata"]["nested"]["rows"][0].append(9)
    first["result_metadata"]["k"].append(2)
    first["y_true"][0, 0] = 1e9  # arrays are each prediction's own, writable
    for other in others:
        assert other["sample_metadata"] == meta and other["result_metadata"] == {"k": [1]}
        assert other["y_true"][0, 0] != 1e9


def test_get_run_is_the_stores_and_sees_another_writer(tmp_path):
    """``get_run`` (served from the runs table read whole) gives what the lake store's lookup
    gives, and a new version another store writes afterwards, at once."""
    from nirslake.store import WorkspaceStore

    reader = integ.Nirs4allStore(tmp_path)
    writer = integ.Nirs4allStore(tmp_path)
    run = writer.begin_run("r", {"a": 1}, [{"name": "ds", "aggregate": "x"}])
    writer.flush()
    lake_row = integ.naive_utc(WorkspaceStore.get_run(reader, run))  # the lake's times, as nirs4all's kind
    assert reader.get_run(run) == lake_row and reader.get_run(run)["status"] == "running"
    writer.complete_run(run, {"best": 1})
    got = reader.get_run(run)
    assert got["status"] == "completed" and got["summary"] == {"best": 1}
    assert got == integ.naive_utc(WorkspaceStore.get_run(reader, run))
    assert reader.get_run("no-such-run") is None
    writer.close()
    reader.close()


def test_lineage_fields_and_refit_context_round_trip(tmp_path):
    lineage = {name: f"{name}-1" for name in integ.LINEAGE_FIELDS}
    store, _, ids = _lake_with_predictions(tmp_path, n=1, refit_context="standalone", sample_influence_weight=0.25, **lineage)
    store.flush()
    row = store.get_prediction(ids[0])
    assert row["refit_context"] == "standalone" and row["sample_influence_weight"] == 0.25
    assert {name: row[name] for name in integ.LINEAGE_FIELDS} == lineage
    frame = store.sql("SELECT refit_context, unit_id FROM predictions")
    assert frame.rows() == [("standalone", "unit_id-1")]  # the SQL front end sees them too
    store.close()


def test_a_natural_key_saved_again_replaces_the_prediction(tmp_path):
    """nirs4all replaces a prediction saved again under the same (pipeline, chain, fold,
    partition, model, branch): one row, the latest scores."""
    store, pipe, ids = _lake_with_predictions(tmp_path, n=1)
    chain = store.get_chains_for_pipeline(pipe)["chain_id"][0]
    again = store.save_prediction(pipe, chain, "ds", "m0", "cls", "0", "val", 9.0, None, None, "rmse", "regression",
                                  5, 4, {}, {}, None, None, 0, 0.0)
    assert again == ids[0]
    rows = store.query_predictions()
    assert rows.height == 1 and rows["val_score"].to_list() == [9.0]
    store.close()


def test_transaction_holds_then_writes_at_once(tmp_path):
    store, pipe, _ = _lake_with_predictions(tmp_path / "ws", n=0)
    store.flush()
    other = integ.Nirs4allStore(tmp_path / "ws")
    with store.transaction():
        chain = store.save_chain(pipe, [], 0, "m2", "", "per_fold", {}, {})
        with store.transaction():  # joins the outer one
            store.save_prediction(pipe, chain, "ds", "m", "cls", "0", "val", 1.0, None, None, "rmse", "regression",
                                  5, 4, {}, {}, None, None, 0, 0.0)
        digest = store.save_artifact({"w": 1}, "Op", "model", "joblib")
        assert store.get_artifact_path(digest).is_file()  # a read inside sees the store's own held record
        assert other.query_predictions().height == 0  # nothing published before the end
    assert other.query_predictions().height == 1
    assert other.get_chain(chain)["model_class"] == "m2"
    other.close()
    store.close()


def test_transaction_rolls_back_on_error(tmp_path):
    store, pipe, _ = _lake_with_predictions(tmp_path, n=0)
    store.flush()
    before = store.query_predictions().height
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction():
            chain = store.save_chain(pipe, [], 0, "m2", "", "per_fold", {}, {})
            store.save_prediction(pipe, chain, "ds", "m", "cls", "0", "val", 1.0, None, None, "rmse", "regression",
                                  5, 4, {}, {}, None, None, 0, 0.0)
            raise RuntimeError("boom")
    store.flush()
    assert store.query_predictions().height == before
    assert store.get_chain(chain) is None
    with pytest.raises(KeyError):  # the rolled-back chain is not a parent either
        store.save_prediction(pipe, chain, "ds", "m", "cls", "0", "val", 1.0, None, None, "rmse", "regression",
                              5, 4, {}, {}, None, None, 0, 0.0)
    store.close()


def test_registered_artifacts_follow_nirs4alls_conventions(tmp_path):
    """Paths relative to ``<workspace>/artifacts``, ``sha256:`` hashes: loadable and verified."""
    import hashlib

    import joblib

    store, _, _ = _lake_with_predictions(tmp_path, n=0)
    target = tmp_path / "artifacts" / "ab" / "model_x.joblib"
    target.parent.mkdir(parents=True)
    joblib.dump({"coef": [1, 2]}, target)
    digest = "sha256:" + hashlib.sha256(target.read_bytes()).hexdigest()
    args = ("run$x:0", "ab/model_x.joblib", digest, "Op", "model", "joblib", target.stat().st_size)
    for bad in ("sha256:zz", "sha256:" + "A" * 64, "", None):  # refused at the call, nothing recorded
        with pytest.raises((ValueError, TypeError), match="content_hash"):
            store.register_existing_artifact("run$x:0", "ab/model_x.joblib", bad, "Op", "model", "joblib", 1)
    assert store.register_existing_artifact(*args) == "run$x:0"
    assert store.register_existing_artifact(*args) == "run$x:0"  # idempotent
    assert store.get_artifact_path("run$x:0") == target
    assert store.load_artifact("run$x:0") == {"coef": [1, 2]}
    with pytest.raises(ValueError, match="collision"):
        store.register_existing_artifact("run$x:0", "ab/model_x.joblib", "sha256:" + "0" * 64, "Op", "model", "joblib", 1)
    target.write_bytes(b"tampered")
    from nirslake import ArtifactIntegrityError

    with pytest.raises(ArtifactIntegrityError):
        store.load_artifact("run$x:0")
    store.close()


def test_open_readonly_refuses_writes(tmp_path):
    store, _, _ = _lake_with_predictions(tmp_path, n=1)
    store.close()
    with integ.Nirs4allStore.open_readonly(tmp_path) as ro:
        assert ro.query_predictions().height == 1
        with pytest.raises(RuntimeError, match="read-only"):
            ro.begin_run("x", {}, [])
        with pytest.raises(RuntimeError, match="read-only"):
            ro.save_artifact({"a": 1}, "Op", "model", "joblib")
        with pytest.raises(RuntimeError, match="read-only"):
            ro.array_store.save_batch(_records(["p"] * 3, "ds")[:1])


def test_chain_summaries_come_from_the_predictions(tmp_path):
    store, pipe, ids = _lake_with_predictions(tmp_path, n=3)
    chain = store.get_chains_for_pipeline(pipe)["chain_id"][0]
    store.bulk_update_chain_summaries([chain])
    with pytest.raises(KeyError):
        store.bulk_update_chain_summaries(["no-such-chain"])
    summary = store.query_chain_summaries().row(0, named=True)
    # folds "1" and "2" (and "0") are CV folds of partition val: scores 0.0, 0.1, 0.2
    assert summary["chain_id"] == chain and summary["cv_fold_count"] == 3
    assert summary["cv_val_score"] == pytest.approx(0.1)
    assert store.count_chain_summaries(dataset_name="ds") == 1 and store.count_chain_summaries(dataset_name="other") == 0
    store.close()


def test_fetch_pl_answers_nirs4alls_pipeline_order_only(tmp_path):
    store, pipe, _ = _lake_with_predictions(tmp_path, n=0)
    run = store.get_pipeline(pipe)["run_id"]
    second = store.begin_pipeline(run, "q", {}, [], "ds", "h")
    frame = store._fetch_pl("SELECT rowid AS _rowid, * FROM pipelines WHERE run_id = ? ORDER BY rowid ASC", [run])
    assert frame["pipeline_id"].to_list() == [pipe, second] and frame["_rowid"].to_list() == [1, 2]
    with pytest.raises(NotImplementedError, match="SQLite"):
        store._fetch_pl("SELECT * FROM chains")
    store.close()


# ---------------------------------------------------------------------- install() and the readers
def test_install_is_idempotent_and_undone():
    from nirs4all.data.predictions import Predictions
    from nirs4all.pipeline.execution import orchestrator
    from nirs4all.pipeline.storage import workspace_store

    native = workspace_store.WorkspaceStore
    assert native is not integ.Nirs4allStore
    undo = integ.install()
    try:
        assert integ.install() is undo  # a second call changes nothing
        assert workspace_store.WorkspaceStore is orchestrator.WorkspaceStore is integ.Nirs4allStore
        assert Predictions._store_backend is integ.Nirs4allStore
    finally:
        undo()
    assert workspace_store.WorkspaceStore is orchestrator.WorkspaceStore is native
    assert Predictions._store_backend is native
    undo()  # undoing twice is harmless


def test_install_before_nirs4all_is_imported(tmp_path):
    """In a fresh process: install() first, nirs4all imported after, a run lands in the lake."""
    code = (
        "import nirslake.integrations.nirs4all as integ, sys; integ.install()\n"
        "assert 'nirs4all.pipeline.execution.orchestrator' not in sys.modules or True\n"
        "import numpy as np, nirs4all\n"
        "from nirs4all.pipeline.execution.orchestrator import WorkspaceStore\n"
        "from nirs4all.pipeline.dagml.workspace_projection import WorkspaceStore as W2\n"
        "assert WorkspaceStore is W2 is integ.Nirs4allStore\n"
        "from sklearn.cross_decomposition import PLSRegression\n"
        "from sklearn.model_selection import KFold\n"
        "rng = np.random.default_rng(0); X = rng.normal(size=(30, 6)); y = X[:, 0] + 0.1 * rng.normal(size=30)\n"
        "nirs4all.run([KFold(3), PLSRegression(2)], (X, y), workspace_path='ws', verbose=0)\n"
        "from nirslake import WorkspaceStore as L\n"
        "s = L('ws'); print(s.query_predictions().height, s.list_runs()['status'].to_list()); s.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    count, status = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) > 0 and status == "['completed']"
    assert not (tmp_path / "ws" / "store.sqlite").exists() and (tmp_path / "ws" / "tables").is_dir()


def test_prediction_export_reads_the_lake(sweeps):
    """nirs4all's prediction array export gives the same Parquet on the lake as on its own store."""
    from nirs4all.pipeline.storage import prediction_export

    native = prediction_export.export_prediction_arrays(str(sweeps["legacy", "nirs4all"]["ws"]), {"format": "zip"})
    undo = integ.install()
    try:
        lake = prediction_export.export_prediction_arrays(str(sweeps["legacy", "lake"]["ws"]), {"format": "zip"})
    finally:
        undo()

    def frames(result):
        archive = zipfile.ZipFile(io.BytesIO(base64.b64decode(result["content_base64"])))
        return {name: pl.read_parquet(io.BytesIO(archive.read(name))) for name in archive.namelist()}

    n, l = frames(native), frames(lake)
    assert n.keys() == l.keys() and n
    for name in n:
        order = ["fold_id", "partition", "val_score"]
        a, b = n[name].drop("prediction_id").sort(order), l[name].drop("prediction_id").sort(order)
        assert a.height > 0 and a.columns == b.columns
        assert a.equals(b)


def test_model_catalogue_reads_the_lake(sweeps, installed):
    from nirs4all.pipeline.storage import model_catalogue

    entries = model_catalogue.read_model_catalogue(str(sweeps["default", "lake"]["ws"]))
    assert len(entries) == sweeps["default", "lake"]["chains"]
    assert all(e["chain"]["chain_id"] == e["summary"]["chain_id"] for e in entries)
    assert entries[0]["summary"]["cv_val_score"] is not None


# ---------------------------------------------------------------------- many machines, one lake
def _worker(ws: Path, engine: str, name: str, out: Path, start: Path | None, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, str(Path(__file__).resolve().parents[1] / "_nirs4all_worker.py"), str(ws), engine, name, str(out)]
    return subprocess.Popen(args + ([str(start)] if start else []), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def _two_sweeps(tmp_path: Path, shared: Path | str, engines: tuple[str, str]) -> None:
    """Two workers sweep ``shared`` at once (``engines``: one each); afterwards every prediction
    of both is there, as each worker wrote it alone into a local workspace of its own."""
    from nirslake import WorkspaceStore

    names = [f"sweep-{i}-{e}" for i, e in enumerate(engines)]
    alone = {}
    for name, engine in zip(names, engines):  # each sweep alone, for what it must give
        out = tmp_path / f"alone_{name}.json"
        _finish(_worker(tmp_path / f"alone_{name}", engine, name, out, None, tmp_path))
        alone[name] = [p[:5] for p in json.loads(out.read_text())["predictions"]]
        assert alone[name]
    start = tmp_path / "go"
    procs = [_worker(shared, e, n, tmp_path / f"shared_{n}.json", start, tmp_path) for n, e in zip(names, engines)]
    start.touch()
    for proc in procs:
        _finish(proc)
    with WorkspaceStore(shared) as store:
        runs = store.list_runs()
        assert runs.height == 2 and runs["status"].to_list() == ["completed"] * 2
        everything = store.query_predictions()
        for name in names:
            reported = json.loads((tmp_path / f"shared_{name}.json").read_text())
            run_id = runs.filter(pl.col("name").str.starts_with(name))["run_id"].item()
            rows = everything.filter(pl.col("run_id") == run_id)
            got = sorted([r["fold_id"], r["partition"], r["model_name"], r["preprocessings"], r["val_score"]] for r in rows.iter_rows(named=True))
            assert got == alone[name]  # every prediction, with the score it has when run alone
            assert sorted(rows["prediction_id"].to_list()) == sorted(p[5] for p in reported["predictions"])
        assert everything.height == sum(len(v) for v in alone.values())
        problems = store.check().problems
    # The legacy engine records every variant's artifacts but writes only the winner's bytes (its
    # own store holds the same records without files): the concurrent runs add no other problem.
    expected = 0
    for name in names:
        with WorkspaceStore(tmp_path / f"alone_{name}") as alone_store:
            expected += len(alone_store.check().problems)
    assert len(problems) == expected and all("its bytes are missing" in p for p in problems)


@pytest.mark.slow
def test_two_processes_sweep_into_one_workspace(tmp_path):
    """A default-engine sweep and a legacy-engine sweep write one local workspace at once."""
    _two_sweeps(tmp_path, tmp_path / "shared", ("default", "legacy"))


@pytest.mark.slow
def test_two_processes_sweep_into_one_s3_workspace(tmp_path, s3_workspace):
    """Two default-engine sweeps write one workspace on S3 (moto on 127.0.0.1) at once. The
    legacy engine cannot: its artifact registry writes fitted models with ``pathlib`` under
    ``<workspace>/artifacts`` (docs/nirs4all.md)."""
    _two_sweeps(tmp_path, s3_workspace, ("default", "default"))


def test_nirs4alls_artifact_registry_keeps_the_lakes_files(sweeps, installed):
    """nirs4all's registry protects the files its store's records name before deleting orphans;
    it reads them from ``store.sqlite``. On the lake it must count the lake's records instead."""
    from nirs4all.pipeline.storage.artifacts.artifact_registry import ArtifactRegistry

    ws = sweeps["legacy", "lake"]["ws"]
    files = {p.relative_to(ws / "artifacts").as_posix() for p in (ws / "artifacts").rglob("*.joblib")}
    assert files
    registry = ArtifactRegistry(ws, dataset="x")
    assert files <= registry._scan_all_manifest_references()
    integ.uninstall()  # nirs4all's own scan: the lake's files look like orphans
    assert not files & registry._scan_all_manifest_references()


def test_files_of_the_previous_format_still_read(tmp_path):
    """Data files written before format 3 (without its columns) read, with nulls there."""
    import pyarrow.parquet as pq

    store, _, ids = _lake_with_predictions(tmp_path, n=2, refit_context="standalone")
    store.close()
    from nirslake.lake import schema as S

    new = {"refit_context", "sample_influence_weight", *integ.LINEAGE_FIELDS}
    rewritten = 0
    for path in (tmp_path / "tables" / "predictions").rglob("part-*.parquet"):
        table = pq.read_table(path)
        if table.num_rows:
            pq.write_table(table.drop([c for c in table.column_names if c in new]), path)
            rewritten += 1
    assert rewritten and set(S.PREDICTIONS.schema.names) > new
    with integ.Nirs4allStore(tmp_path) as reopened:
        rows = reopened.query_predictions()
        assert sorted(rows["prediction_id"].to_list()) == sorted(ids)
        assert rows["refit_context"].to_list() == [None, None]
        assert reopened.sql("SELECT count(*) AS n, count(refit_context) AS r FROM predictions").rows() == [(2, 0)]


def test_projects_are_refused_by_name(tmp_path):
    store, _, _ = _lake_with_predictions(tmp_path, n=2)
    assert store.query_predictions(task_type="regression").height == 2
    assert store.query_predictions(task_type="classification").height == 0
    for call in (lambda: store.get_or_create_project("p"), lambda: store.set_run_project("r", "p"), lambda: store.list_runs(project_id="p")):
        with pytest.raises(NotImplementedError, match="projects"):
            call()
    store.close()


def test_urls_nirs4all_folded_are_unfolded():
    """nirs4all passes workspaces through ``Path``, which makes ``s3://b/ws`` into ``s3:/b/ws``."""
    assert integ.workspace_url(Path("s3://bucket/ws")) == "s3://bucket/ws"
    assert integ.workspace_url("gs:/bucket/a/b") == "gs://bucket/a/b"
    assert integ.workspace_url("s3://bucket/ws") == "s3://bucket/ws"
    local = Path("/tmp/some/ws")
    assert integ.workspace_url(local) is local


def test_live_objects_are_kept_as_nirs4all_keeps_them(tmp_path):
    """Configs, best params and log details may hold live objects: stored as their ``str()``, as
    nirs4all's own store does (``json.dumps(default=str)``)."""
    from sklearn.cross_decomposition import PLSRegression

    model = PLSRegression(3)
    store, pipe, _ = _lake_with_predictions(tmp_path, n=0)
    chain = store.get_chains_for_pipeline(pipe)["chain_id"][0]
    pid = store.save_prediction(pipe, chain, "ds", "m", "cls", "0", "val", 1.0, None, None, "rmse", "regression",
                                5, 4, {"val": {"rmse": 1.0}}, {"model": model, "n": 3}, None, None, 0, 0.0)
    store.log_step(pipe, 0, "Op", "end", details={"model": model})
    run = store.begin_run("r2", {"pipeline": [model]}, [{"name": "ds"}])
    store.flush()
    assert store.get_prediction(pid)["best_params"] == {"model": str(model), "n": 3}
    assert store.get_run(run)["config"] == {"pipeline": [str(model)]}
    assert json.loads(store.get_pipeline_log(pipe)["details"][0]) == {"model": str(model)}
    store.close()


def test_indexed_reads_see_another_stores_writes_at_once(tmp_path):
    """get_pipeline / get_chains_for_pipeline answer from an index, rebuilt when the files change:
    what another store published is seen by the next call."""
    a, pipe, _ = _lake_with_predictions(tmp_path, n=0)
    a.flush()
    b = integ.Nirs4allStore(tmp_path)
    time.sleep(0.2)  # the folders' times settle: the index then stands without a listing
    for _ in range(2):
        assert b.get_pipeline(pipe)["original_template"] == {"t": 1}
        assert b.get_chains_for_pipeline(pipe).height == 1
    assert b._indexes["pipelines"][2] is not None  # vouched for by settled folder times
    run = a.get_pipeline(pipe)["run_id"]
    second = a.begin_pipeline(run, "q", {}, [], "ds", "h")
    chain = a.save_chain(second, [], 0, "m", "", "per_fold", {}, {})
    a.flush()
    assert b.get_pipeline(second)["name"] == "q"
    assert b.get_chains_for_pipeline(second)["chain_id"].to_list() == [chain]
    assert b.get_pipeline("no-such") is None and b.get_chains_for_pipeline("no-such").height == 0
    a.close()
    b.close()
