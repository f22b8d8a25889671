"""Runs, pipelines, chains and step logs through the WorkspaceStore facade."""

from __future__ import annotations

from datetime import datetime

import polars as pl
import pytest

CONFIG = {"cv": {"n_splits": 5, "shuffle": True}, "metric": "rmse", "seed": 42}
DATASETS = [{"name": "corn_m5", "path": "data/corn_m5.csv", "n_samples": 80}]


def _is_utc_datetime(value) -> bool:
    return isinstance(value, datetime) and value.utcoffset() is not None and value.utcoffset().total_seconds() == 0


# --------------------------------------------------------------------------- runs


def test_begin_run_creates_a_running_run(store):
    run_id = store.begin_run("protein_sweep", CONFIG, DATASETS)

    assert isinstance(run_id, str) and run_id
    run = store.get_run(run_id)
    assert run["run_id"] == run_id
    assert run["name"] == "protein_sweep"
    assert run["config"] == CONFIG
    assert run["datasets"] == DATASETS
    assert run["status"] == "running"
    assert _is_utc_datetime(run["created_at"])
    assert run["completed_at"] is None
    assert run["summary"] is None
    assert run["error"] is None


def test_begin_run_gives_a_new_id_each_time(store):
    ids = {store.begin_run("sweep", CONFIG, DATASETS) for _ in range(5)}
    assert len(ids) == 5


def test_run_config_can_be_any_json_value(store):
    run_id = store.begin_run("listed", ["snv", {"pls": [5, 10]}], [])
    run = store.get_run(run_id)
    assert run["config"] == ["snv", {"pls": [5, 10]}]
    assert run["datasets"] == []


def test_complete_run_sets_status_summary_and_completed_at(store):
    run_id = store.begin_run("protein_sweep", CONFIG, DATASETS)
    summary = {"total_pipelines": 4, "best": {"pipeline": "snv_pls10", "rmse": 0.41}}

    assert store.complete_run(run_id, summary) is None

    run = store.get_run(run_id)
    assert run["status"] == "completed"
    assert run["summary"] == summary
    assert _is_utc_datetime(run["completed_at"])
    assert run["completed_at"] >= run["created_at"]
    assert run["error"] is None


def test_fail_run_keeps_the_error(store):
    run_id = store.begin_run("protein_sweep", CONFIG, DATASETS)

    store.fail_run(run_id, "ValueError: X has 0 samples")

    run = store.get_run(run_id)
    assert run["status"] == "failed"
    assert run["error"] == "ValueError: X has 0 samples"
    assert _is_utc_datetime(run["completed_at"])


def test_get_run_unknown_id_is_none(store):
    store.begin_run("protein_sweep", CONFIG, DATASETS)
    assert store.get_run("no-such-run") is None


@pytest.mark.parametrize("method", ["complete_run", "fail_run"])
def test_finishing_an_unknown_run_raises_key_error(store, method):
    argument = {"complete_run": {"total": 0}, "fail_run": "boom"}[method]
    with pytest.raises(KeyError):
        getattr(store, method)("no-such-run", argument)


def test_list_runs_is_newest_first(store):
    ids = [store.begin_run(f"run_{i}", CONFIG, DATASETS) for i in range(3)]

    runs = store.list_runs()

    assert isinstance(runs, pl.DataFrame)
    assert runs["run_id"].to_list() == list(reversed(ids))
    assert runs["name"].to_list() == ["run_2", "run_1", "run_0"]


def test_list_runs_filters_by_status(store):
    done = store.begin_run("done", CONFIG, DATASETS)
    failed = store.begin_run("failed", CONFIG, DATASETS)
    running = store.begin_run("running", CONFIG, DATASETS)
    store.complete_run(done, {})
    store.fail_run(failed, "out of memory")

    assert store.list_runs(status="completed")["run_id"].to_list() == [done]
    assert store.list_runs(status="failed")["run_id"].to_list() == [failed]
    assert store.list_runs(status="running")["run_id"].to_list() == [running]


def test_list_runs_filters_by_dataset_name(store):
    corn = store.begin_run("corn", CONFIG, [{"name": "corn_m5", "path": "a.csv"}])
    both = store.begin_run(
        "both", CONFIG, [{"name": "wheat_protein", "path": "b.csv"}, {"name": "corn_m5", "path": "a.csv"}]
    )
    store.begin_run("wheat", CONFIG, [{"name": "wheat_protein", "path": "b.csv"}])

    assert set(store.list_runs(dataset="corn_m5")["run_id"].to_list()) == {corn, both}
    assert store.list_runs(dataset="soil_carbon").height == 0


def test_list_runs_pages_with_limit_and_offset(store):
    ids = [store.begin_run(f"run_{i}", CONFIG, DATASETS) for i in range(5)]
    newest_first = list(reversed(ids))

    assert store.list_runs(limit=2)["run_id"].to_list() == newest_first[:2]
    assert store.list_runs(limit=2, offset=2)["run_id"].to_list() == newest_first[2:4]
    assert store.list_runs(limit=100, offset=4)["run_id"].to_list() == newest_first[4:]


def test_list_runs_positional_arguments(store):
    a = store.begin_run("a", CONFIG, [{"name": "corn_m5"}])
    store.begin_run("b", CONFIG, [{"name": "wheat"}])
    store.complete_run(a, {})

    # status, dataset, limit, offset
    assert store.list_runs("completed", "corn_m5", 10, 0)["run_id"].to_list() == [a]


# --------------------------------------------------------------------------- pipelines


def _begin_pipeline(store, run_id, name="snv_pls10", dataset_name="corn_m5"):
    return store.begin_pipeline(
        run_id,
        name,
        [{"class": "SNV"}, {"class": "PLSRegression", "params": {"n_components": 10}}],
        {"n_components": 10},
        dataset_name,
        "sha256:0f3a",
    )


def test_begin_pipeline_creates_a_running_pipeline(store):
    run_id = store.begin_run("protein_sweep", CONFIG, DATASETS)

    pipeline_id = _begin_pipeline(store, run_id)

    assert isinstance(pipeline_id, str) and pipeline_id
    pipeline = store.get_pipeline(pipeline_id)
    assert pipeline["pipeline_id"] == pipeline_id
    assert pipeline["run_id"] == run_id
    assert pipeline["name"] == "snv_pls10"
    assert pipeline["expanded_config"] == [
        {"class": "SNV"},
        {"class": "PLSRegression", "params": {"n_components": 10}},
    ]
    assert pipeline["generator_choices"] == {"n_components": 10}
    assert pipeline["dataset_name"] == "corn_m5"
    assert pipeline["dataset_hash"] == "sha256:0f3a"
    assert pipeline["status"] == "running"
    assert _is_utc_datetime(pipeline["created_at"])
    assert pipeline["completed_at"] is None
    assert pipeline["best_val"] is None
    assert pipeline["error"] is None


def test_complete_pipeline_records_best_scores(store):
    run_id = store.begin_run("protein_sweep", CONFIG, DATASETS)
    pipeline_id = _begin_pipeline(store, run_id)

    assert store.complete_pipeline(pipeline_id, 0.41, 0.47, "rmse", 1530) is None

    pipeline = store.get_pipeline(pipeline_id)
    assert pipeline["status"] == "completed"
    assert pipeline["best_val"] == pytest.approx(0.41)
    assert pipeline["best_test"] == pytest.approx(0.47)
    assert pipeline["metric"] == "rmse"
    assert pipeline["duration_ms"] == 1530
    assert pipeline["completed_at"] is not None


def test_fail_pipeline_keeps_the_error(store):
    run_id = store.begin_run("protein_sweep", CONFIG, DATASETS)
    pipeline_id = _begin_pipeline(store, run_id)

    store.fail_pipeline(pipeline_id, "LinAlgError: SVD did not converge")

    pipeline = store.get_pipeline(pipeline_id)
    assert pipeline["status"] == "failed"
    assert pipeline["error"] == "LinAlgError: SVD did not converge"


def test_get_pipeline_unknown_id_is_none(store, make_pipeline):
    make_pipeline(store)
    assert store.get_pipeline("no-such-pipeline") is None


def test_finishing_an_unknown_pipeline_raises_key_error(store):
    with pytest.raises(KeyError):
        store.complete_pipeline("no-such-pipeline", 0.4, 0.5, "rmse", 10)
    with pytest.raises(KeyError):
        store.fail_pipeline("no-such-pipeline", "boom")


def test_list_pipelines_of_a_run_newest_first(store):
    run_a = store.begin_run("a", CONFIG, DATASETS)
    run_b = store.begin_run("b", CONFIG, DATASETS)
    first = _begin_pipeline(store, run_a, "first")
    second = _begin_pipeline(store, run_a, "second")
    other = _begin_pipeline(store, run_b, "other")

    of_a = store.list_pipelines(run_id=run_a)
    assert isinstance(of_a, pl.DataFrame)
    assert of_a["pipeline_id"].to_list() == [second, first]
    assert store.list_pipelines()["pipeline_id"].to_list() == [other, second, first]


def test_list_pipelines_filters_by_dataset_name(store):
    run_id = store.begin_run("a", CONFIG, DATASETS)
    corn = _begin_pipeline(store, run_id, dataset_name="corn_m5")
    _begin_pipeline(store, run_id, dataset_name="wheat_protein")

    assert store.list_pipelines(dataset_name="corn_m5")["pipeline_id"].to_list() == [corn]
    assert store.list_pipelines(run_id, "wheat_protein").height == 1
    assert store.list_pipelines(dataset_name="soil").height == 0


# --------------------------------------------------------------------------- chains

STEPS = [
    {"step_idx": 0, "operator_class": "StandardScaler", "params": {}, "artifact_id": "a-scaler", "stateless": False},
    {"step_idx": 1, "operator_class": "SavitzkyGolay", "params": {"window": 11}, "artifact_id": None, "stateless": True},
    {"step_idx": 2, "operator_class": "Ridge", "params": {"alpha": 1.0}, "artifact_id": None, "stateless": False},
]


def test_save_chain_and_get_it_back_decoded(store, make_pipeline):
    ids = make_pipeline(store)

    chain_id = store.save_chain(
        ids.pipeline_id,
        STEPS,
        2,
        "Ridge",
        "StandardScaler>SavitzkyGolay",
        "KFold(2)",
        {"fold_0": "a-ridge-0", "fold_1": "a-ridge-1"},
        {"0": ["a-scaler"]},
        [0, 1],
        3,
    )

    assert isinstance(chain_id, str) and chain_id
    chain = store.get_chain(chain_id)
    assert chain["chain_id"] == chain_id
    assert chain["pipeline_id"] == ids.pipeline_id
    assert chain["steps"] == STEPS
    assert chain["model_step_idx"] == 2
    assert chain["model_class"] == "Ridge"
    assert chain["preprocessings"] == "StandardScaler>SavitzkyGolay"
    assert chain["fold_strategy"] == "KFold(2)"
    assert chain["fold_artifacts"] == {"fold_0": "a-ridge-0", "fold_1": "a-ridge-1"}
    assert chain["shared_artifacts"] == {"0": ["a-scaler"]}
    assert chain["branch_path"] == [0, 1]
    assert chain["source_index"] == 3


def test_save_chain_branch_path_and_source_index_default_to_none(store, make_pipeline):
    ids = make_pipeline(store)
    chain_id = store.save_chain(ids.pipeline_id, STEPS, 2, "Ridge", "", "KFold(2)", {}, {})

    chain = store.get_chain(chain_id)
    assert chain["branch_path"] is None
    assert chain["source_index"] is None
    assert chain["fold_artifacts"] == {}


def test_save_chain_for_unknown_pipeline_raises_key_error(store):
    with pytest.raises(KeyError):
        store.save_chain("no-such-pipeline", STEPS, 2, "Ridge", "", "KFold(2)", {}, {})


def test_get_chain_unknown_id_is_none(store, make_pipeline):
    make_pipeline(store)
    assert store.get_chain("no-such-chain") is None


def test_get_chains_for_pipeline_lists_only_its_chains(store, make_pipeline):
    ids = make_pipeline(store)
    other = make_pipeline(store, dataset_name="wheat_protein")
    second = store.save_chain(ids.pipeline_id, STEPS, 2, "Ridge", "", "KFold(2)", {}, {})

    chains = store.get_chains_for_pipeline(ids.pipeline_id)

    assert isinstance(chains, pl.DataFrame)
    assert set(chains["chain_id"].to_list()) == {ids.chain_id, second}
    assert other.chain_id not in chains["chain_id"].to_list()
    assert store.get_chains_for_pipeline("no-such-pipeline").height == 0


# --------------------------------------------------------------------------- logs


def test_pipeline_log_is_ordered_by_step_then_time(store, make_pipeline):
    ids = make_pipeline(store)
    store.log_step(ids.pipeline_id, 1, "PLSRegression", "start")
    store.log_step(ids.pipeline_id, 0, "SNV", "start")
    store.log_step(ids.pipeline_id, 0, "SNV", "end", duration_ms=12.5)
    store.log_step(
        ids.pipeline_id, 1, "PLSRegression", "end", 240.0, "fitted 2 folds", {"n_folds": 2}, "info"
    )

    log = store.get_pipeline_log(ids.pipeline_id)

    assert isinstance(log, pl.DataFrame)
    assert list(zip(log["step_idx"].to_list(), log["event"].to_list())) == [
        (0, "start"),
        (0, "end"),
        (1, "start"),
        (1, "end"),
    ]
    last = log.row(3, named=True)
    assert last["operator_class"] == "PLSRegression"
    assert last["duration_ms"] == pytest.approx(240.0)
    assert last["message"] == "fitted 2 folds"
    assert last["level"] == "info"
    assert log.row(0, named=True)["level"] == "info"


def test_log_step_for_unknown_pipeline_raises_key_error(store):
    with pytest.raises(KeyError):
        store.log_step("no-such-pipeline", 0, "SNV", "start")


def test_pipeline_log_of_unknown_pipeline_is_empty(store, make_pipeline):
    ids = make_pipeline(store)
    store.log_step(ids.pipeline_id, 0, "SNV", "start")
    assert store.get_pipeline_log("no-such-pipeline").height == 0


def test_run_log_summary_has_one_row_per_pipeline(store, make_pipeline):
    ids = make_pipeline(store)
    second = store.begin_pipeline(ids.run_id, "msc_pls5", [{"class": "MSC"}], {}, "corn_m5", "sha256:0f3a")
    store.log_step(ids.pipeline_id, 0, "SNV", "start")
    store.log_step(ids.pipeline_id, 0, "SNV", "end", duration_ms=10.0)
    store.log_step(ids.pipeline_id, 1, "PLSRegression", "warning", message="ill-conditioned", level="warning")
    store.log_step(ids.pipeline_id, 1, "PLSRegression", "end", duration_ms=90.0)
    store.log_step(second, 0, "MSC", "start")
    store.log_step(second, 0, "MSC", "error", message="NaN in X", level="error")
    other_run = make_pipeline(store, run_name="other")
    store.log_step(other_run.pipeline_id, 0, "SNV", "end", duration_ms=5.0)

    summary = store.get_run_log_summary(ids.run_id)

    assert isinstance(summary, pl.DataFrame)
    assert summary.height == 2
    rows = {row["pipeline_id"]: row for row in summary.iter_rows(named=True)}
    assert rows[ids.pipeline_id]["log_count"] == 4
    assert rows[ids.pipeline_id]["total_duration_ms"] == pytest.approx(100.0)
    assert rows[ids.pipeline_id]["warning_count"] == 1
    assert rows[ids.pipeline_id]["error_count"] == 0
    assert rows[second]["log_count"] == 2
    assert rows[second]["warning_count"] == 0
    assert rows[second]["error_count"] == 1


def test_run_log_summary_of_unknown_run_is_empty(store, make_pipeline):
    make_pipeline(store)
    assert store.get_run_log_summary("no-such-run").height == 0
