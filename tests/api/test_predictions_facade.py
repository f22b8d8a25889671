"""The Predictions facade, call by call: add_prediction buffers, flush writes one batch (or
nothing, without a store), top / get_best / filter_predictions rank and filter the rows in memory,
to_polars hands them to the polars helpers, from_store loads stored ones back."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

import nirslake.query as q
from conftest import run_doc_page
from nirslake import Predictions, WorkspaceStore
from nirslake.query import scores as sc

RNG = np.random.default_rng(5)
TRUTH = RNG.normal(20.0, 3.0, 30)


def noisy(scale: float, shift: float = 0.0) -> np.ndarray:
    return TRUTH + np.random.default_rng(int(scale * 100)).normal(shift, scale, TRUTH.size)


@pytest.fixture
def pipeline(tmp_path):
    store = WorkspaceStore(str(tmp_path / "ws"))
    run = store.begin_run("sweep", {}, [{"name": "corn"}])
    pipe = store.begin_pipeline(run, "snv_pls", {}, {}, "corn", "h")
    chain = store.save_chain(pipe, [], 0, "PLSRegression", "SNV", "KFold(3)", {}, {})
    yield store, pipe, chain
    store.close()


def add_folds(facade: Predictions, model: str, scale: float, **extra) -> list[str]:
    """Three folds of val and test rows for ``model``, with scores dicts and arrays."""
    ids = []
    for fold in range(3):
        for partition in ("val", "test"):
            pred = noisy(scale + 0.01 * fold)
            metrics = sc.regression_scores(TRUTH, pred)
            ids.append(facade.add_prediction(
                "corn", model_name=model, model_classname="PLSRegression", fold_id=fold, partition=partition,
                y_true=TRUTH, y_pred=pred, sample_indices=np.arange(30), metric="rmse",
                **{f"{partition}_score": metrics["rmse"]}, scores={partition: metrics}, n_samples=30, n_features=100, **extra,
            ))
    return ids


def test_add_prediction_buffers_and_returns_the_id_it_is_stored_under(pipeline):
    store, pipe, chain = pipeline
    facade = Predictions(store)
    pid = facade.add_prediction("corn", model_name="pls", model_classname="PLSRegression", fold_id=0, partition="val",
                                y_true=TRUTH, y_pred=noisy(0.5), val_score=0.5, metric="rmse", weights=np.ones(30))
    assert len(pid) == 32 and facade.num_predictions == 1 and len(facade) == 1
    assert store.query_predictions().height == 0  # buffered, not written
    facade.flush(pipe, chain)
    stored = store.get_prediction(pid, load_arrays=True)
    assert (stored["model_name"], stored["model_class"], stored["fold_id"], stored["chain_id"]) == ("pls", "PLSRegression", "0", chain)
    np.testing.assert_array_equal(stored["y_pred"], noisy(0.5))
    np.testing.assert_array_equal(stored["weights"], np.ones(30))


def test_flush_without_a_store_keeps_every_row():
    facade = Predictions()
    add_folds(facade, "pls", 0.5)
    facade.flush("any-pipeline", "any-chain")
    assert facade.num_predictions == 6
    assert not any(row["flushed"] for row in facade.filter_predictions())
    assert facade.get_best("rmse")["model_name"] == "pls"  # ranking works without a store


def test_flush_writes_the_buffer_in_one_batch_once(pipeline, monkeypatch):
    store, pipe, chain = pipeline
    facade = Predictions(store)
    ids = add_folds(facade, "pls", 0.5, sample_ids=[f"s{i // 2}" for i in range(30)])
    batches, per_call = [], []
    monkeypatch.setattr(store, "save_predictions", lambda records, real=store.save_predictions: batches.append(len(records)) or real(records))
    monkeypatch.setattr(store, "save_prediction", lambda *a, **k: per_call.append(a))
    facade.flush(pipe, chain)
    assert batches == [6] and per_call == []
    assert sorted(store.query_predictions()["prediction_id"].to_list()) == sorted(ids)
    facade.flush(pipe, chain)  # nothing new: nothing written
    add_folds(facade, "ridge", 0.9)
    facade.flush(pipe, chain)
    assert batches == [6, 6]
    assert store.query_predictions().height == 12
    row = store.get_prediction(ids[0], load_arrays=True)
    assert row["sample_ids"].tolist() == [f"s{i // 2}" for i in range(30)]
    assert row["scores"]["val"]["rpd"] == pytest.approx(sc.regression_scores(TRUTH, noisy(0.5))["rpd"])
    with WorkspaceStore(str(store.workspace_path)) as other:  # durable: another store reads it
        assert other.query_predictions().height == 12


def test_flush_takes_each_rows_pipeline_uid_when_none_is_given(pipeline):
    store, pipe, _ = pipeline
    facade = Predictions(store)
    pid = facade.add_prediction("corn", pipeline_uid=pipe, model_name="pls", partition="val", val_score=0.3)
    facade.flush()
    assert store.get_prediction(pid)["pipeline_id"] == pipe
    orphan = Predictions(store)
    orphan.add_prediction("corn", model_name="lost", fold_id=1, partition="val")
    with pytest.raises(ValueError, match=r"\(lost, fold 1\) has no pipeline: pass flush\(pipeline_id=...\)"):
        orphan.flush()


def test_a_refused_row_fails_the_whole_flush_and_writes_nothing(pipeline):
    store, pipe, chain = pipeline
    facade = Predictions(store)
    add_folds(facade, "pls", 0.5)
    facade.add_prediction("corn", model_name="bad", partition="val", y_true=[1.0, 2.0], y_pred=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="record 6: prediction arrays have mismatched lengths"):
        facade.flush(pipe, chain)
    assert store.query_predictions().height == 0
    assert not any(row["flushed"] for row in facade.filter_predictions())
    with pytest.raises(KeyError, match="record 0"):
        facade.flush("no-such-pipeline", chain)
    assert store.query_predictions().height == 0


def test_top_ranks_by_the_partition_score_column_by_default():
    facade = Predictions()
    add_folds(facade, "good", 0.3)
    add_folds(facade, "bad", 1.5)
    top = facade.top(2)
    assert [r["model_name"] for r in top] == ["good", "good"]  # metric rmse: lower first
    assert [r["rank"] for r in top] == [1, 2] and top[0]["rank_score"] <= top[1]["rank_score"]
    assert all(r["partition"] == "val" for r in top)
    assert top[0]["rank_score"] == pytest.approx(min(sc.regression_scores(TRUTH, noisy(0.3 + 0.01 * k))["rmse"] for k in range(3)))
    worst = facade.top(1, ascending=False)
    assert worst[0]["model_name"] == "bad"
    assert [r["partition"] for r in facade.top(3, rank_partition="test")] == ["test"] * 3


def test_top_ranks_r2_and_rpd_higher_first_from_the_scores_dicts():
    facade = Predictions()
    for name, scale in (("mid", 0.8), ("best", 0.2), ("worst", 2.0)):
        add_folds(facade, name, scale)
    for metric in ("r2", "rpd", "rpiq"):
        top = facade.top(3, metric)
        assert [r["model_name"] for r in top] == ["best"] * 3, metric
        assert top[0]["rank_score"] >= top[1]["rank_score"] >= top[2]["rank_score"]
        assert top[0]["rank_metric"] == metric
    assert facade.top(1, "r2", ascending=True)[0]["model_name"] == "worst"
    assert facade.get_best("rpd")["model_name"] == "best"
    assert facade.get_best("sep")["model_name"] == "best"


def test_top_computes_a_metric_the_scores_lack_from_the_arrays():
    facade = Predictions()
    facade.add_prediction("corn", model_name="a", partition="val", y_true=TRUTH, y_pred=noisy(0.4), metric="rmse")
    facade.add_prediction("corn", model_name="b", partition="val", y_true=TRUTH, y_pred=noisy(0.1), metric="rmse")
    facade.add_prediction("corn", model_name="c", partition="val", metric="rmse")  # no arrays, no score: left out
    top = facade.top(5, "rpd")
    assert [r["model_name"] for r in top] == ["b", "a"]
    assert top[0]["rank_score"] == pytest.approx(sc.regression_scores(TRUTH, noisy(0.1))["rpd"])
    bias = facade.top(5, "bias")
    assert [r["model_name"] for r in bias] == sorted("ab", key=lambda m: abs(sc.regression_scores(TRUTH, noisy(0.4 if m == "a" else 0.1))["bias"]))


def test_top_per_group_and_display_metrics():
    facade = Predictions()
    add_folds(facade, "pls", 0.3)
    add_folds(facade, "ridge", 0.6)
    per_model = facade.top(1, "rmse", group_by="model_name")
    assert sorted(r["model_name"] for r in per_model) == ["pls", "ridge"] and all(r["rank"] == 1 for r in per_model)
    shown = facade.top(1, "rmse", display_metrics=["r2", "rmse"], display_partition="val")
    assert shown[0]["display_scores"]["r2"] == pytest.approx(shown[0]["scores"]["val"]["r2"])
    assert facade.top(2, "rmse", model_name="ridge")[0]["model_name"] == "ridge"
    assert facade.top(0) == [] and Predictions().top(5) == []
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        facade.top(-1)


def test_top_by_repetition_ranks_on_scores_recomputed_per_sample():
    """A: noisy rows that average out per sample. B: the same error on every repeat. Per row B
    wins; folded per sample (mean) A wins, as its errors cancel."""
    ids = np.repeat([f"S{i}" for i in range(10)], 3)
    truth = np.repeat(np.linspace(10, 20, 10), 3)
    cancelling = truth + np.tile([-1.0, 0.0, 1.0], 10)
    steady = truth + 0.6
    facade = Predictions()
    facade.add_prediction("corn", model_name="A", partition="val", y_true=truth, y_pred=cancelling, sample_ids=ids, metric="rmse")
    facade.add_prediction("corn", model_name="B", partition="val", y_true=truth, y_pred=steady, metric="rmse",
                          metadata={"Sample_ID": ids.tolist()})
    assert [r["model_name"] for r in facade.top(2, "rmse")] == ["B", "A"]
    facade.set_repetition_column("Sample_ID")
    per_sample = facade.top(2, "rmse", by_repetition=True)
    assert [r["model_name"] for r in per_sample] == ["A", "B"]
    assert per_sample[0]["rank_score"] == pytest.approx(0.0, abs=1e-12)
    assert per_sample[1]["rank_score"] == pytest.approx(0.6)
    median = facade.top(1, "rmse", by_repetition=True, repetition_method="median")
    assert median[0]["model_name"] == "A"
    with pytest.warns(UserWarning, match="has no sample ids"):
        by_column = facade.top(2, "rmse", by_repetition="Sample_ID")  # A has no such metadata: its rows as they are
    assert [r["model_name"] for r in by_column] == ["B", "A"]


def test_flush_stores_the_repetition_column_as_sample_ids(pipeline):
    store, pipe, chain = pipeline
    facade = Predictions(store)
    facade.set_repetition_column("Sample_ID")
    pid = facade.add_prediction("corn", model_name="pls", partition="val", y_true=[1.0, 1.0, 2.0], y_pred=[1.1, 0.9, 2.2],
                                metadata={"Sample_ID": ["a", "a", "b"]})
    facade.flush(pipe, chain)
    assert store.get_prediction(pid, load_arrays=True)["sample_ids"].tolist() == ["a", "a", "b"]
    assert facade.repetition_column == "Sample_ID"


def test_filter_predictions():
    facade = Predictions()
    add_folds(facade, "pls", 0.3, config_name="cfg_a")
    facade.add_prediction("corn", model_name="lda", partition="val", task_type="multiclass_classification", y_true=[0, 1], y_pred=[0, 0])
    assert len(facade.filter_predictions(partition="val")) == 4
    assert len(facade.filter_predictions(model_name="pls", fold_id=1)) == 2
    assert len(facade.filter_predictions(config_name="cfg_a", partition="test")) == 3
    assert [r["model_name"] for r in facade.filter_predictions(task_type="classification")] == ["lda"]
    assert len(facade.filter_predictions(task_type="regression")) == 6
    light = facade.filter_predictions(model_name="lda", load_arrays=False)[0]
    assert "y_true" not in light and light["model_name"] == "lda"
    assert facade.filter_predictions(model_classname="PLSRegression", partition="val", fold_id="0")[0]["fold_id"] == "0"
    with pytest.raises(ValueError, match="unknown filter"):
        facade.filter_predictions(colour="red")
    pid = facade.filter_predictions(model_name="lda")[0]["id"]
    assert facade.get_prediction_by_id(pid)["model_name"] == "lda"
    assert facade.get_prediction_by_id("nope") is None


def test_get_best_falls_back_to_the_test_partition():
    facade = Predictions()
    assert facade.get_best() is None
    facade.add_prediction("corn", model_name="only_test", partition="test", test_score=0.7, metric="rmse")
    assert facade.get_best()["model_name"] == "only_test"
    facade.add_prediction("corn", model_name="val_one", partition="val", val_score=0.9, metric="rmse")
    assert facade.get_best()["model_name"] == "val_one"


def test_to_polars_feeds_the_polars_helpers():
    facade = Predictions()
    add_folds(facade, "pls", 0.3)
    add_folds(facade, "ridge", 0.6)
    frame = facade.to_polars()
    assert frame.height == 12
    assert {"prediction_id", "dataset_name", "model_class", "partition", "val_score", "scores", "y_true", "y_pred"} <= set(frame.columns)
    assert frame.schema["y_pred"] == pl.List(pl.Float64)
    ranked = q.top_k(q.with_scores(frame.filter(pl.col("partition") == "val")), 1, score="r2", by="model_name")
    assert ranked["model_name"].to_list() == ["pls", "ridge"]
    computed = {r["prediction_id"]: r for r in q.scores_from_arrays(frame).iter_rows(named=True)}
    for row in facade.filter_predictions():
        assert computed[row["id"]]["rpd"] == pytest.approx(row["scores"][row["partition"]]["rpd"], rel=1e-9)
    assert "y_true" not in facade.to_polars(load_arrays=False).columns
    assert Predictions().to_polars().height == 0


def test_from_store_loads_rows_and_arrays_for_ranking(pipeline):
    store, pipe, chain = pipeline
    writer = Predictions(store)
    add_folds(writer, "pls", 0.3)
    add_folds(writer, "ridge", 0.6)
    writer.flush(pipe, chain)
    loaded = Predictions.from_store(store, dataset_name="corn")
    assert loaded.num_predictions == 12 and all(r["flushed"] for r in loaded.filter_predictions())
    assert [r["id"] for r in loaded.top(3, "r2")] == [r["id"] for r in writer.top(3, "r2")]
    np.testing.assert_array_equal(loaded.get_prediction_by_id(writer.top(1)[0]["id"])["y_pred"], writer.top(1)[0]["y_pred"])
    loaded.flush(pipe, chain)  # written already: nothing written again
    assert store.query_predictions().height == 12
    assert math.isfinite(loaded.top(1, "rpiq")[0]["rank_score"])


def test_the_predictions_page_runs_as_written(tmp_path):
    run_doc_page("predictions.md", tmp_path)


def test_save_predictions_names_the_bad_record_and_keeps_nothing(pipeline):
    store, pipe, chain = pipeline
    good = {"pipeline_id": pipe, "chain_id": chain, "dataset_name": "corn", "partition": "val", "y_true": [1.0], "y_pred": [2.0]}
    cases = [
        ({**good, "colour": "red"}, TypeError, "record 1: unknown field(s) ['colour']"),
        ({k: v for k, v in good.items() if k != "chain_id"}, TypeError, "record 1: missing field(s) ['chain_id']"),
        ("not a record", TypeError, "record 1: a record must be a mapping"),
        ({**good, "val_score": "high"}, TypeError, "record 1: val_score"),
        ({**good, "sample_ids": [1.5]}, TypeError, "record 1: sample_ids must hold strings or whole numbers"),
        ({**good, "prediction_id": "p1"}, ValueError, "record 2: prediction_id 'p1' is in this batch under two datasets"),
    ]
    for bad, error, message in cases:
        batch = [good, bad] if "two datasets" not in message else [good, {**good, "prediction_id": "p1"}, {**good, "prediction_id": "p1", "dataset_name": "wheat"}]
        with pytest.raises(error) as raised:
            store.save_predictions(batch)
        assert message in str(raised.value), str(raised.value)
    assert store.query_predictions().height == 0
    ids = store.save_predictions([good, {**good, "sample_ids": ["a"]}])
    assert store.get_prediction(ids[1], load_arrays=True)["sample_ids"].tolist() == ["a"]
