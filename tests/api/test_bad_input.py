"""Bad calls fail clearly and lose nothing stored (docs/bad-input.md).

``CASES`` is the one list of bad calls: each names what it does, the call, what it raises (or the
documented value it returns) and a fragment of the message. docs/bad-input.md shows the same
list as a table, and a test below keeps the two equal. After every case the lake still holds
exactly what it held before, and the store still works.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nirslake import WorkspaceStore
from nirslake.lake.tables import encode_partition_value
from nirslake.api.validation import MAX_ARRAY_VALUES, MAX_JSON_CHARS, MAX_NAME_CHARS

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-input.md"
UNKNOWN = "0" * 32
OR_TRUE = "x' OR 1=1 --"
DROP = "; DROP VIEW predictions; --"


@dataclass
class Lake:
    """A small workspace holding one of everything, and the ids to aim bad calls at."""

    store: WorkspaceStore
    run: str
    pipe: str
    chain: str
    other_chain: str  # a chain of another pipeline
    pred: str
    artifact: str


def save(c: Lake, **changed: Any) -> str:
    """``save_prediction`` of ``c.pipe`` with good values, except those ``changed``."""
    args = {
        "pipeline_id": c.pipe, "chain_id": c.chain, "dataset_name": "wheat", "model_name": "PLS_10",
        "model_class": "PLSRegression", "fold_id": "0", "partition": "val", "val_score": 0.4, "test_score": 0.5,
        "train_score": 0.3, "metric": "rmse", "task_type": "regression", "n_samples": 3, "n_features": 2,
        "scores": {"val": {"rmse": 0.4}}, "best_params": {}, "branch_id": None, "branch_name": None,
        "exclusion_count": 0, "exclusion_rate": 0.0,
    }  # fmt: skip
    return c.store.save_prediction(**(args | changed))


def big(*shape: int) -> np.ndarray:
    """An array of ``shape`` that takes no memory: a read-only view of one zero."""
    return np.broadcast_to(0.0, shape)


@dataclass(frozen=True)
class Case:
    description: str  # markdown, as in the doc's table
    call: Callable[[Lake], Any]
    expected: type[Exception] | str  # an exception, or what is returned: "None", "False", "0", "no rows"
    fragment: str = ""  # part of the exception's message


CASES = [
    # ---- unknown ids: writes raise KeyError, reads return the documented None / False / 0 / no rows
    Case("`complete_run` of an unknown run", lambda c: c.store.complete_run(UNKNOWN, {}), KeyError, "unknown run_id"),
    Case("`fail_run` of an unknown run", lambda c: c.store.fail_run(UNKNOWN, "boom"), KeyError, "unknown run_id"),
    Case("`get_run` of an unknown run", lambda c: c.store.get_run(UNKNOWN), "None"),
    Case("`begin_pipeline` in an unknown run", lambda c: c.store.begin_pipeline(UNKNOWN, "p", {}, {}, "wheat", "h"), KeyError, "unknown run_id"),
    Case("`complete_pipeline` of an unknown pipeline", lambda c: c.store.complete_pipeline(UNKNOWN, 0.1, 0.2, "rmse", 5), KeyError, "unknown pipeline_id"),
    Case("`fail_pipeline` of an unknown pipeline", lambda c: c.store.fail_pipeline(UNKNOWN, "boom"), KeyError, "unknown pipeline_id"),
    Case("`get_pipeline` of an unknown pipeline", lambda c: c.store.get_pipeline(UNKNOWN), "None"),
    Case("`save_chain` of an unknown pipeline", lambda c: c.store.save_chain(UNKNOWN, [], 0, "M", "", "kfold", {}, {}), KeyError, "unknown pipeline_id"),
    Case("`get_chain` of an unknown chain", lambda c: c.store.get_chain(UNKNOWN), "None"),
    Case("`get_chains_for_pipeline` of an unknown pipeline", lambda c: c.store.get_chains_for_pipeline(UNKNOWN), "no rows"),
    Case("`save_prediction` of an unknown pipeline", lambda c: save(c, pipeline_id=UNKNOWN), KeyError, "unknown pipeline_id"),
    Case("`save_prediction` with an unknown chain", lambda c: save(c, chain_id=UNKNOWN), KeyError, "unknown chain_id"),
    Case("`save_prediction` with another pipeline's chain", lambda c: save(c, chain_id=c.other_chain), ValueError, "belongs to pipeline"),
    Case("`save_prediction_arrays` of an unknown prediction", lambda c: c.store.save_prediction_arrays(UNKNOWN, [1.0], [1.0]), KeyError, "unknown prediction_id"),
    Case("`get_prediction` of an unknown prediction", lambda c: c.store.get_prediction(UNKNOWN, load_arrays=True), "None"),
    Case("`delete_prediction` of an unknown prediction", lambda c: c.store.delete_prediction(UNKNOWN), "False"),
    Case("`load_artifact` of an unknown artifact", lambda c: c.store.load_artifact(UNKNOWN), KeyError, "unknown artifact_id"),
    Case("`get_artifact_path` of an unknown artifact", lambda c: c.store.get_artifact_path(UNKNOWN), KeyError, "unknown artifact_id"),
    Case("`log_step` of an unknown pipeline", lambda c: c.store.log_step(UNKNOWN, 0, "SNV", "end"), KeyError, "unknown pipeline_id"),
    Case("`get_pipeline_log` of an unknown pipeline", lambda c: c.store.get_pipeline_log(UNKNOWN), "no rows"),
    Case("`get_run_log_summary` of an unknown run", lambda c: c.store.get_run_log_summary(UNKNOWN), "no rows"),
    Case("`export_chain` of an unknown chain", lambda c: c.store.export_chain(UNKNOWN, c.store.workspace_path / "x"), KeyError, "unknown chain_id"),
    Case("`export_pipeline_config` of an unknown pipeline", lambda c: c.store.export_pipeline_config(UNKNOWN, c.store.workspace_path / "x"), KeyError, "unknown pipeline_id"),
    Case("`export_run` of an unknown run", lambda c: c.store.export_run(UNKNOWN, c.store.workspace_path / "x"), KeyError, "unknown run_id"),
    Case("`replay_chain` of an unknown chain", lambda c: c.store.replay_chain(UNKNOWN, [[0.0, 1.0]]), KeyError, "unknown chain_id"),
    Case("`delete_run` of an unknown run", lambda c: c.store.delete_run(UNKNOWN), "0"),
    # ---- wrong types
    Case("an id that is a dict (`get_run`)", lambda c: c.store.get_run({"run_id": c.run}), TypeError, "run_id must be a string, got dict"),
    Case("an id that is a number (`get_prediction`)", lambda c: c.store.get_prediction(42), TypeError, "prediction_id must be a string, got int"),
    Case("an id that is None (`delete_run`)", lambda c: c.store.delete_run(None), TypeError, "run_id must be a string, got NoneType"),
    Case("an id that is a list (`load_artifact`)", lambda c: c.store.load_artifact([c.artifact]), TypeError, "artifact_id must be a string, got list"),
    Case("a run name that is a dict", lambda c: c.store.begin_run({"name": "r"}, {}, []), TypeError, "name must be a string, got dict"),
    Case("`datasets` that is a string, not a list", lambda c: c.store.begin_run("r", {}, "wheat"), TypeError, "datasets must be a list of dicts, got str"),
    Case("`datasets` that is a dict, not a list", lambda c: c.store.begin_run("r", {}, {"name": "wheat"}), TypeError, "datasets must be a list of dicts, got dict"),
    Case("a config holding an object JSON cannot write", lambda c: c.store.begin_run("r", {"model": object()}, []), TypeError, "config must be JSON-serialisable"),
    Case("a config that contains itself", lambda c: c.store.begin_run("r", _circular(), []), TypeError, "config must be JSON-serialisable: Circular reference"),
    Case("a score that is a string", lambda c: save(c, val_score="0.4"), TypeError, "val_score must be a number or None, got '0.4'"),
    Case("a `best_val` that is a string", lambda c: c.store.complete_pipeline(c.pipe, "good", 0.2, "rmse", 5), TypeError, "best_val must be a number or None"),
    Case("a dataset name that is a dict", lambda c: save(c, dataset_name={"name": "wheat"}), TypeError, "dataset_name must be a string, got dict"),
    Case("a dataset name that is None", lambda c: c.store.begin_pipeline(c.run, "p", {}, {}, None, "h"), TypeError, "dataset_name must be a string, got NoneType"),
    Case("a fold id that is a dict", lambda c: save(c, fold_id={"fold": 0}), TypeError, "fold_id must be a string or an integer, got dict"),
    Case("`scores` that is a list", lambda c: save(c, scores=[0.4]), TypeError, "scores must be a dict or None, got list"),
    Case("`n_samples` that is not whole", lambda c: save(c, n_samples=2.5), TypeError, "n_samples must be an integer or None"),
    Case("`n_samples` beyond 64 bits", lambda c: save(c, n_samples=2**70), ValueError, "n_samples is out of range for a 64-bit integer"),
    Case("`step_idx` that is a string", lambda c: c.store.log_step(c.pipe, "first", "SNV", "end"), TypeError, "step_idx must be an integer or None"),
    Case("an empty `prediction_id`", lambda c: save(c, prediction_id=""), ValueError, "prediction_id must not be empty"),
    Case("a `prediction_id` already used in another dataset", lambda c: save(c, dataset_name="corn", prediction_id=c.pred), ValueError, "already belongs to dataset 'wheat'"),
    Case("`steps` that is a dict", lambda c: c.store.save_chain(c.pipe, {"0": "SNV"}, 0, "M", "", "kfold", {}, {}), TypeError, "steps must be a list of dicts, got dict"),
    Case("`shared_artifacts` mapping a step to a number", lambda c: c.store.save_chain(c.pipe, [], 0, "M", "", "kfold", {}, {"0": 7}), TypeError, "shared_artifacts must map step indices to lists"),
    Case("a fold artifact id that is not valid Unicode", lambda c: c.store.save_chain(c.pipe, [], 0, "M", "", "kfold", {"fold_0": "m\udcff"}, {}), ValueError, "fold_artifacts['fold_0'] is not valid Unicode text"),
    Case("a step's artifact id that is not valid Unicode", lambda c: c.store.save_chain(c.pipe, [{"artifact_id": "m\udcff"}], 0, "M", "", "kfold", {}, {}), ValueError, "steps[0]['artifact_id'] is not valid Unicode text"),
    Case("a registered artifact path that is not valid Unicode", lambda c: c.store.register_existing_artifact("f" * 64, "/models/m\udcff.pkl", "f" * 64, "M", "model", "pickle", 3), ValueError, "path is not valid Unicode text"),
    Case("a score beyond a 64-bit float (`10**400`)", lambda c: save(c, val_score=10**400), ValueError, "val_score is out of range for a 64-bit float"),
    Case("a `query_predictions` filter that is a dict", lambda c: c.store.query_predictions(dataset_name={"$ne": ""}), TypeError, "dataset_name must be a string, got dict"),
    Case("a `query_predictions` `branch_id` that is a string", lambda c: c.store.query_predictions(branch_id="x"), TypeError, "branch_id must be an integer or None"),
    Case("a `query_predictions` `limit` that is a string", lambda c: c.store.query_predictions(limit="5"), TypeError, "limit must be a non-negative integer or None, got '5'"),
    Case("a negative `list_runs` `offset`", lambda c: c.store.list_runs(offset=-1), ValueError, "offset must be a non-negative integer, got -1"),
    Case("a `list_runs` `status` that is a dict", lambda c: c.store.list_runs(status={"in": ["running"]}), TypeError, "status must be a string, got dict"),
    Case("a `list_pipelines` `run_id` that is a list", lambda c: c.store.list_pipelines(run_id=[c.run]), TypeError, "run_id must be a string, got list"),
    Case("a `top_predictions` `n` that is a string", lambda c: c.store.top_predictions("3"), ValueError, "n must be a non-negative integer, got '3'"),
    Case("a `top_predictions` `ascending` that is a string", lambda c: c.store.top_predictions(3, ascending="no"), TypeError, "ascending must be True or False, got 'no'"),
    Case("an unknown `export_predictions_parquet` filter", lambda c: c.store.export_predictions_parquet(c.store.workspace_path / "x.parquet", model="PLS"), TypeError, "unknown filter(s) ['model']"),
    Case("a dataset name that is not valid Unicode (a lone surrogate)", lambda c: c.store.begin_pipeline(c.run, "p", {}, {}, "wheat\udcff", "h"), ValueError, "dataset_name is not valid Unicode text"),
    Case("an error message that is not valid Unicode", lambda c: c.store.fail_run(c.run, "read \udcff failed"), ValueError, "error is not valid Unicode text"),
    Case("an unknown artifact format", lambda c: c.store.save_artifact([1.0], "M", "model", "yaml"), ValueError, "unknown artifact format 'yaml': use one of 'joblib', 'pickle', 'cloudpickle', 'npz'"),
    Case("an object array saved as `npz`", lambda c: c.store.save_artifact(np.array([print], dtype=object), "M", "model", "npz"), TypeError, "the 'npz' format refuses object arrays"),
    Case("an `npz` key holding a NUL character", lambda c: c.store.save_artifact({"w\x00a": np.zeros(1)}, "M", "model", "npz"), ValueError, "the 'npz' format cannot store the key 'w\\x00a'"),
    Case("an artifact `operator_class` that is a dict", lambda c: c.store.save_artifact([1.0], {"class": "M"}, "model", "pickle"), TypeError, "operator_class must be a string, got dict"),
    # ---- per-sample arrays
    Case("`y_pred` shorter than `y_true`", lambda c: c.store.save_prediction_arrays(c.pred, [1, 2, 3], [1, 2]), ValueError, "mismatched lengths: y_true=3, y_pred=2"),
    Case("`sample_indices` of another length", lambda c: c.store.save_prediction_arrays(c.pred, [1, 2, 3], [1, 2, 3], sample_indices=[0]), ValueError, "mismatched lengths: y_true=3, y_pred=3, sample_indices=1"),
    Case("`weights` of another length", lambda c: c.store.save_prediction_arrays(c.pred, [1, 2, 3], [1, 2, 3], weights=[1.0]), ValueError, "mismatched lengths: y_true=3, y_pred=3, weights=1"),
    Case("`y_proba` with fewer rows than `y_true`", lambda c: c.store.save_prediction_arrays(c.pred, [1, 2, 3], [1, 2, 3], y_proba=[[0.2, 0.8]]), ValueError, "y_proba=1"),
    Case("`y_proba` with three dimensions", lambda c: c.store.save_prediction_arrays(c.pred, [1], [1], y_proba=np.zeros((1, 2, 2))), ValueError, "y_proba must be 2-D"),
    Case("`y_true` holding words", lambda c: c.store.save_prediction_arrays(c.pred, ["a", "b"], [1, 2]), TypeError, "y_true must hold numbers, got list of dtype <U1"),
    Case("`y_true` holding numbers written as text", lambda c: c.store.save_prediction_arrays(c.pred, ["1.5", "2.5"], [1, 2]), TypeError, "y_true must hold numbers"),
    Case("`y_pred` holding complex numbers", lambda c: c.store.save_prediction_arrays(c.pred, [1, 2], [1 + 1j, 2]), TypeError, "y_pred must hold numbers, got list of dtype complex128"),
    Case("`y_true` that is a dict", lambda c: c.store.save_prediction_arrays(c.pred, {"a": 1.0}, [1.0]), TypeError, "y_true must be a numeric array-like, got dict"),
    Case("`y_true` with rows of different lengths", lambda c: c.store.save_prediction_arrays(c.pred, [[1, 2], [3]], [1, 2]), TypeError, "y_true must be a numeric array-like, got list"),
    Case("`y_true` that is one number", lambda c: c.store.save_prediction_arrays(c.pred, 1.0, 1.0), ValueError, "y_true must be 1-D"),
    Case("`y_pred` that is a masked array", lambda c: c.store.save_prediction_arrays(c.pred, [1, 2], np.ma.masked_array([1.0, 2.0], mask=[0, 1])), TypeError, "y_pred is a masked array, whose mask would be lost: pass y_pred.filled(np.nan)"),
    Case("`sample_indices` that are not whole", lambda c: c.store.save_prediction_arrays(c.pred, [1, 2], [1, 2], sample_indices=[0.5, 1.5]), ValueError, "sample_indices must hold whole numbers that fit 64-bit integers, got 0.5"),
    # ---- oversized payloads
    Case(f"`y_true` of {MAX_ARRAY_VALUES + 1:,} values", lambda c: c.store.save_prediction_arrays(c.pred, big(MAX_ARRAY_VALUES + 1), big(MAX_ARRAY_VALUES + 1)), ValueError, f"y_true is too large: {MAX_ARRAY_VALUES + 1:,} values (the limit is {MAX_ARRAY_VALUES:,})"),
    Case(f"`y_proba` of {MAX_ARRAY_VALUES // 2 + 1:,} x 2 values", lambda c: c.store.save_prediction_arrays(c.pred, [1.0], [1.0], y_proba=big(MAX_ARRAY_VALUES // 2 + 1, 2)), ValueError, f"y_proba is too large: {MAX_ARRAY_VALUES + 2:,} values"),
    Case(f"a config over {MAX_JSON_CHARS:,} characters of JSON", lambda c: c.store.begin_run("r", {"spectra": "x" * MAX_JSON_CHARS}, []), ValueError, f"config is too large: {MAX_JSON_CHARS + 15:,} characters (the limit is {MAX_JSON_CHARS:,})"),
    Case(f"`scores` over {MAX_JSON_CHARS:,} characters of JSON", lambda c: save(c, scores={"val": {"note": "x" * MAX_JSON_CHARS}}), ValueError, "scores is too large"),
    Case(f"a dataset name over {MAX_NAME_CHARS:,} characters", lambda c: save(c, dataset_name="d" * (MAX_NAME_CHARS + 1)), ValueError, f"dataset_name is too large: {MAX_NAME_CHARS + 1:,} characters (the limit is {MAX_NAME_CHARS:,})"),
    Case(f"an error message over {MAX_JSON_CHARS:,} characters", lambda c: c.store.fail_pipeline(c.pipe, "e" * (MAX_JSON_CHARS + 1)), ValueError, "error is too large"),
    # ---- injection: filter values are plain values, ranking columns must be columns
    Case(f'`query_predictions(dataset_name="{OR_TRUE}")`', lambda c: c.store.query_predictions(dataset_name=OR_TRUE), "no rows"),
    Case(f'`query_predictions(model_class="{DROP}")`', lambda c: c.store.query_predictions(model_class=DROP), "no rows"),
    Case(f'`query_predictions(run_id="%{OR_TRUE}")` (a LIKE pattern)', lambda c: c.store.query_predictions(run_id="%" + OR_TRUE), "no rows"),
    Case(f'`list_runs(status="{OR_TRUE}")`', lambda c: c.store.list_runs(status=OR_TRUE), "no rows"),
    Case(f'`list_runs(dataset="{DROP}")`', lambda c: c.store.list_runs(dataset=DROP), "no rows"),
    Case(f'`list_pipelines(run_id="{OR_TRUE}")`', lambda c: c.store.list_pipelines(run_id=OR_TRUE), "no rows"),
    Case(f'`list_pipelines(dataset_name="{DROP}")`', lambda c: c.store.list_pipelines(dataset_name=DROP), "no rows"),
    Case(f'`top_predictions(3, partition="{OR_TRUE}")`', lambda c: c.store.top_predictions(3, partition=OR_TRUE), "no rows"),
    Case(f'`top_predictions(3, dataset_name="{DROP}")`', lambda c: c.store.top_predictions(3, dataset_name=DROP), "no rows"),
    Case(f'`top_predictions(3, metric="val_score{DROP}")`', lambda c: c.store.top_predictions(3, metric="val_score" + DROP), ValueError, "Invalid metric column"),
    Case(f'`top_predictions(3, group_by="{OR_TRUE}")`', lambda c: c.store.top_predictions(3, group_by=OR_TRUE), ValueError, "Invalid group_by column"),
    Case(f'`get_run("{OR_TRUE}")`', lambda c: c.store.get_run(OR_TRUE), "None"),
    Case(f'`leaderboard("1{DROP}")`', lambda c: c.store.leaderboard("1" + DROP), ValueError, "invalid literal for int()"),
]  # fmt: skip


def _circular() -> dict:
    config: dict = {"cv": 5}
    config["self"] = config
    return config


def expected_cell(case: Case) -> str:
    if isinstance(case.expected, str):
        return "returns no rows" if case.expected == "no rows" else f"returns `{case.expected}`"
    return f"`{case.expected.__name__}`"


def table_row(case: Case) -> tuple[str, str, str]:
    return case.description, expected_cell(case), f"`{case.fragment}`" if case.fragment else "—"


def open_lake(workspace: str) -> Lake:
    store = WorkspaceStore(workspace, grace_seconds=0)
    run = store.begin_run("sweep", {"cv": 3}, [{"name": "wheat"}, {"name": "corn"}])
    pipe = store.begin_pipeline(run, "snv_pls", {"n_components": 2}, {}, "wheat", "h1")
    other = store.begin_pipeline(run, "pls", {"n_components": 2}, {}, "corn", "h2")
    artifact = store.save_artifact({"coef": np.ones(2)}, "PLSRegression", "model", "pickle")
    chain = store.save_chain(pipe, [], 0, "PLSRegression", "SNV", "kfold", {"fold_0": artifact}, {})
    other_chain = store.save_chain(other, [], 0, "PLSRegression", "", "kfold", {}, {})
    c = Lake(store, run, pipe, chain, other_chain, "", artifact)
    c.pred = save(c)
    store.save_prediction_arrays(c.pred, [1.0, 2.0, 3.0], [1.1, 2.1, 2.9], sample_indices=[4, 5, 6])
    store.log_step(pipe, 0, "SNV", "end", duration_ms=1.5)
    return c


@pytest.fixture
def lake(workspace):
    c = open_lake(workspace)
    yield c
    c.store.close()


@pytest.fixture(scope="module")
def shared_lake(tmp_path_factory):
    """One lake for every case: each case compares the lake before and after itself, so a case
    that changed it fails on its own, and ~90 cases need not build ~90 workspaces."""
    c = open_lake(str(tmp_path_factory.mktemp("bad-input") / "ws"))
    yield c
    c.store.close()


def stored(c: Lake) -> dict:
    """Everything a bad call must leave as it was, read after publishing (the store still works)."""
    s = c.store
    s.flush()
    views = ("runs", "pipelines", "chains", "predictions", "prediction_arrays", "artifacts", "logs")
    in_duckdb = s.sql("SELECT " + ", ".join(f"(SELECT count(*) FROM {v}) AS {v}" for v in views)).row(0, named=True)
    objects = Path(s.workspace_path, "objects")
    return {
        "runs": s.list_runs(limit=None).select("run_id", "status").rows(),
        "pipelines": s.list_pipelines().select("pipeline_id", "status").rows(),
        "predictions": s.query_predictions()["prediction_id"].to_list(),
        "y_pred": s.get_prediction(c.pred, load_arrays=True)["y_pred"].tolist(),
        "logs": s.get_pipeline_log(c.pipe).height,
        "rows in DuckDB views": in_duckdb,
        "objects": sorted(p.name for p in objects.rglob("*") if p.is_file()),
        "model": s.load_artifact(c.artifact)["coef"].tolist(),
    }


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_a_bad_call_fails_clearly_and_loses_nothing(shared_lake, case):
    lake = shared_lake
    before = stored(lake)
    if isinstance(case.expected, str):
        result = case.call(lake)
        if case.expected == "no rows":
            assert result.height == 0
        else:
            assert result is not True and result == {"None": None, "False": False, "0": 0}[case.expected]
    else:
        with pytest.raises(case.expected) as raised:
            case.call(lake)
        assert case.fragment in str(raised.value)
    assert stored(lake) == before


def test_the_doc_lists_exactly_these_cases():
    text = DOC.read_text(encoding="utf-8")
    header = "| call | raises or returns | message contains |"
    assert header in text, f"docs/bad-input.md lost its table header {header!r}"
    rows = []
    for line in text.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append(tuple(cell.strip() for cell in line.strip()[1:-1].split(" | ")))
    assert all("|" not in cell for case in CASES for cell in table_row(case)), "a cell would break the table"
    assert rows == [table_row(case) for case in CASES], "docs/bad-input.md and CASES differ: regenerate the table"


# --------------------------------------------------------------------------- values that are not bad


NAMES = ["a/b", "../../etc", "..", ".", "", "a=b", "50%", "with space", "naïve 小麦 🌾", "tab\tand\nnewline",
         "nul\x00byte", "back\\slash", "*?[glob]{a,b}", OR_TRUE, DROP, "é" * 300]  # fmt: skip


@pytest.mark.parametrize("name", NAMES, ids=[repr(n)[:30] for n in NAMES])
def test_a_name_round_trips_exactly_and_its_folder_stays_in_the_table(lake, name):
    store = lake.store
    pipe = store.begin_pipeline(lake.run, name, {}, {}, name, "h")
    pid = store.save_prediction(pipe, None, name, name, name, 0, "val", 0.5, 0.1, 0.1, "rmse", "regression",
                                2, 2, {}, {}, None, name, 0, 0.0)  # fmt: skip
    store.save_prediction_arrays(pid, [1.0, 2.0], [1.5, 2.5])
    store.flush()

    row = store.get_prediction(pid, load_arrays=True)
    assert (row["dataset_name"], row["model_name"], row["model_class"], row["branch_name"]) == (name,) * 4
    assert row["y_pred"].tolist() == [1.5, 2.5]
    assert store.query_predictions(dataset_name=name)["prediction_id"].to_list() == [pid]
    assert store.query_predictions(model_class=name)["prediction_id"].to_list() == [pid]
    assert store.top_predictions(5, dataset_name=name)["prediction_id"].to_list() == [pid]
    assert store.list_pipelines(dataset_name=name)["pipeline_id"].to_list() == [pipe]
    query = "SELECT prediction_id, dataset_name, model_name FROM predictions WHERE dataset_name = ?"
    assert store.sql(query, [name]).rows() == [(pid, name, name)]
    assert store.sql("SELECT prediction_id FROM prediction_arrays WHERE dataset_name = ?", [name]).rows() == [(pid,)]
    tables = Path(store.workspace_path, "tables").resolve()
    for path in tables.rglob("*"):
        assert path.resolve().parent.is_relative_to(tables), path


def test_names_like_the_folder_sentinels_get_folders_of_their_own(lake):
    store = lake.store
    names = ("", "__empty__", "__null__")
    pids = {name: save(lake, dataset_name=name, chain_id=None) for name in names}
    store.flush()
    folders = {encode_partition_value(name) for name in names}
    assert len(folders) == len(names), folders
    for name, pid in pids.items():
        assert store.get_prediction(pid)["dataset_name"] == name


def test_an_injection_string_is_stored_and_found_as_a_plain_value(lake):
    pid = save(lake, model_class=DROP, partition=OR_TRUE)
    assert lake.store.query_predictions(model_class=DROP)["prediction_id"].to_list() == [pid]
    assert lake.store.top_predictions(5, partition=OR_TRUE)["prediction_id"].to_list() == [pid]
    assert lake.store.sql("SELECT count(*) AS n FROM predictions")["n"][0] == 2


def test_names_at_the_limit_are_accepted(lake):
    name = "m" * MAX_NAME_CHARS
    pid = save(lake, model_name=name)
    assert lake.store.get_prediction(pid)["model_name"] == name


def test_nan_scores_are_stored_as_null_and_infinities_kept(lake):
    """docs/lake-spec.md §8: NaN ranks last as null; +-inf are kept, in the store and in DuckDB."""
    ids = {
        "nan": save(lake, val_score=float("nan"), test_score=np.float32("nan"), scores={"val": {"rmse": math.nan, "r2": math.inf}}),
        "inf": save(lake, val_score=math.inf, test_score=-math.inf),
        "good": save(lake, val_score=0.1),
    }
    nan, inf = lake.store.get_prediction(ids["nan"]), lake.store.get_prediction(ids["inf"])
    assert nan["val_score"] is None and nan["test_score"] is None
    assert nan["scores"] == {"val": {"rmse": None, "r2": None}}  # JSON has no NaN or infinity
    assert (inf["val_score"], inf["test_score"]) == (math.inf, -math.inf)
    ranked = lake.store.top_predictions(10, dataset_name="wheat")["prediction_id"].to_list()
    assert ranked[0] == ids["good"] and ranked[-2:] == [ids["inf"], ids["nan"]]
    in_sql = dict(lake.store.sql("SELECT prediction_id, val_score FROM predictions").rows())
    assert in_sql[ids["inf"]] == math.inf and in_sql[ids["nan"]] is None
    lake.store.complete_pipeline(lake.pipe, float("nan"), math.inf, "rmse", 5)
    pipeline = lake.store.get_pipeline(lake.pipe)
    assert pipeline["best_val"] is None and pipeline["best_test"] == math.inf


def test_array_limits_are_checked_before_converting(lake, monkeypatch):
    """An oversized array is refused from its shape: nothing is converted or copied first."""
    import nirslake.api.records as records_module

    def never(*args, **kwargs):
        raise AssertionError("the arrays were converted before their size was checked")

    monkeypatch.setattr(records_module, "check_arrays", never)
    with pytest.raises(ValueError, match=re.escape(f"(the limit is {MAX_ARRAY_VALUES:,})")):
        lake.store.save_prediction_arrays(lake.pred, [1.0], big(MAX_ARRAY_VALUES + 1))
