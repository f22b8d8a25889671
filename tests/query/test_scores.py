"""Scores: each metric against values worked out by hand, the same numbers from numpy
(nirslake.query.scores), polars (nirslake.query) and the SQL views, ranking in each metric's direction
(r2 and rpd higher is better) everywhere, rescore, and repetitions folded per sample."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, mean_absolute_error, r2_score

import nirslake.query as q
from conftest import run_doc_page
from nirslake import Predictions, WorkspaceStore
from nirslake.query import scores as sc
from nirslake.cli import main as cli_main

# y_true 1..5 and a prediction off by half a unit here and there (docs/scores.md works it through):
# e = [0.5, 0, -0.5, 0.5, 0.5]
Y_TRUE = [1.0, 2.0, 3.0, 4.0, 5.0]
Y_PRED = [1.5, 2.0, 2.5, 4.5, 5.5]
BY_HAND = {
    "mse": 0.2,  # (4 x 0.25) / 5
    "rmse": math.sqrt(0.2),
    "mae": 0.4,  # (4 x 0.5) / 5
    "r2": 0.9,  # 1 - 1.0 / 10
    "bias": 0.2,  # 1.0 / 5
    "sep": math.sqrt(0.2),  # e - bias = [.3, -.2, -.7, .3, .3]: squares sum to 0.8, / (5 - 1)
    "rpd": math.sqrt(12.5),  # SD = sqrt(10 / 4); / SEP
    "rpiq": math.sqrt(20.0),  # Q3 - Q1 = 4 - 2; / SEP
}
# Three classes; class 0 twice, class 1 three times, class 2 once.
LABELS_TRUE = [0, 0, 1, 1, 1, 2]
LABELS_PRED = [0, 1, 1, 1, 0, 2]
CLASSES_BY_HAND = {
    "accuracy": 4 / 6,
    "balanced_accuracy": (1 / 2 + 2 / 3 + 1) / 3,  # recall per class
    "f1": (0.5 * 2 + (2 / 3) * 3 + 1.0 * 1) / 6,  # F1 per class: 2/4, 4/6, 2/2, weighted by support
}
# Two samples measured three times each: per-sample means agree (both predicted 2), medians do not.
REP_IDS = ["a", "a", "a", "b", "b", "b"]
REP_TRUE = [1.0, 1.0, 1.0, 3.0, 3.0, 3.0]
REP_PRED = [1.0, 1.0, 4.0, 3.0, 3.0, 0.0]


def test_regression_metrics_match_the_hand_computed_values():
    got = sc.regression_scores(Y_TRUE, Y_PRED)
    assert set(got) == set(sc.REGRESSION_METRICS)
    for metric, expected in BY_HAND.items():
        assert got[metric] == pytest.approx(expected, rel=1e-12), metric
    # RMSE splits into the bias and the SEP: rmse^2 = bias^2 + sep^2 (n - 1) / n
    assert got["rmse"] ** 2 == pytest.approx(got["bias"] ** 2 + got["sep"] ** 2 * 4 / 5)


def test_regression_metrics_agree_with_scikit_learn_where_it_has_them():
    rng = np.random.default_rng(7)
    y = rng.normal(10, 2, 50)
    p = y + rng.normal(0.3, 0.5, 50)
    got = sc.regression_scores(y, p)
    assert got["r2"] == pytest.approx(r2_score(y, p), rel=1e-12)
    assert got["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-12)
    assert got["sep"] == pytest.approx(np.std(p - y, ddof=1), rel=1e-12)


def test_classification_metrics_match_the_hand_computed_values():
    got = sc.classification_scores(LABELS_TRUE, LABELS_PRED)
    for metric, expected in CLASSES_BY_HAND.items():
        assert got[metric] == pytest.approx(expected, rel=1e-12), metric
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(LABELS_TRUE, LABELS_PRED))
    assert got["f1"] == pytest.approx(f1_score(LABELS_TRUE, LABELS_PRED, average="weighted"))


def test_undefined_values_are_nan_or_infinite_not_an_error():
    constant = sc.regression_scores([2.0, 2.0, 2.0], [2.0, 2.0, 2.0])
    assert math.isnan(constant["r2"]) and math.isnan(constant["rpd"])  # 0 / 0
    perfect = sc.regression_scores([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert perfect["rpd"] == math.inf and perfect["rmse"] == 0.0
    one = sc.regression_scores([1.0], [2.0])
    assert one["rmse"] == 1.0 and math.isnan(one["sep"])
    with pytest.raises(ValueError, match="different lengths: 2 and 3"):
        sc.regression_scores([1.0, 2.0], [1.0, 2.0, 3.0])


def test_directions():
    assert [sc.direction(m) for m in ("r2", "rpd", "rpiq", "accuracy", "balanced_accuracy", "f1")] == ["max"] * 6
    assert [sc.direction(m) for m in ("rmse", "mse", "mae", "sep", "RMSE")] == ["min"] * 5
    assert sc.direction("bias") == "zero"
    ranked = sorted([0.5, -0.1, None, 0.3, float("nan")], key=lambda v: sc.rank_key("bias", v))
    assert ranked[:3] == [-0.1, 0.3, 0.5]
    assert sorted([0.2, 0.9, None, 0.5], key=lambda v: sc.rank_key("r2", v))[:3] == [0.9, 0.5, 0.2]


def test_repetitions_fold_per_sample_by_mean_median_and_vote():
    ids, yt, yp = sc.per_sample(REP_IDS, REP_TRUE, REP_PRED, "mean")
    assert ids.tolist() == ["a", "b"] and yt.tolist() == [1.0, 3.0] and yp.tolist() == [2.0, 2.0]
    _, _, median = sc.per_sample(REP_IDS, REP_TRUE, REP_PRED, "median")
    assert median.tolist() == [1.0, 3.0]
    assert sc.sample_scores(REP_IDS, REP_TRUE, REP_PRED, method="mean")["rmse"] == pytest.approx(1.0)
    assert sc.sample_scores(REP_IDS, REP_TRUE, REP_PRED, method="median")["rmse"] == 0.0
    assert sc.regression_scores(REP_TRUE, REP_PRED)["rmse"] == pytest.approx(math.sqrt(3.0))  # the rows as they are
    _, truth, votes = sc.per_sample(["s", "s", "s", "t", "t"], [1, 1, 1, 0, 0], [2, 1, 2, 0, 1], "vote")
    assert truth.tolist() == [1, 0] and votes.tolist() == [2, 0]  # t: a 0/1 tie goes to the smaller label
    with pytest.raises(ValueError, match="unknown aggregation 'mode'"):
        sc.per_sample(REP_IDS, REP_TRUE, REP_PRED, "mode")
    with pytest.raises(ValueError, match="one length each"):
        sc.per_sample(REP_IDS[:-1], REP_TRUE, REP_PRED)


# --------------------------------------------------------------------------- in a workspace


@pytest.fixture
def scored(tmp_path):
    """Four regression models and a classifier saved through the facade, with arrays and sample ids;
    the regression models' scores dicts hold the metric set, the classifier's none."""
    ws = str(tmp_path / "ws")
    store = WorkspaceStore(ws)
    run = store.begin_run("scores", {}, [{"name": "wheat"}])
    pipe = store.begin_pipeline(run, "pls", {}, {}, "wheat", "h")
    chain = store.save_chain(pipe, [], 0, "PLSRegression", "SNV", "KFold(4)", {}, {})
    rng = np.random.default_rng(3)
    facade = Predictions(store)
    ids = np.repeat([f"S{i:02d}" for i in range(12)], 3)
    truth = np.repeat(rng.normal(12.0, 2.0, 12), 3)
    expected = {}
    for k, noise in enumerate((0.2, 0.5, 0.9, 1.4)):
        pred = truth + rng.normal(0.1 * k, noise, truth.size)
        name = f"pls_{k}"
        metrics = sc.regression_scores(truth, pred)
        expected[name] = metrics
        facade.add_prediction("wheat", model_name=name, model_classname="PLSRegression", fold_id=k, partition="val",
                              y_true=truth, y_pred=pred, sample_ids=ids, val_score=metrics["rmse"], metric="rmse",
                              scores={"val": metrics})
    facade.add_prediction("wheat", model_name="lda", model_classname="LDA", fold_id=0, partition="val",
                          y_true=LABELS_TRUE, y_pred=LABELS_PRED, sample_ids=["x", "x", "y", "y", "y", "z"],
                          task_type="multiclass_classification", metric="accuracy", val_score=4 / 6)
    facade.flush(pipe, chain)
    yield store, ws, expected, (ids, truth)
    store.close()


def test_top_predictions_ranks_by_any_metric_of_the_scores(scored):
    store, _, expected, _ = scored
    by_r2 = sorted(expected, key=lambda m: -expected[m]["r2"])
    by_rpd = sorted(expected, key=lambda m: -expected[m]["rpd"])
    assert store.top_predictions(4, metric="r2", ascending=None)["model_name"].to_list() == by_r2
    assert store.top_predictions(4, metric="rpd", ascending=None)["model_name"].to_list() == by_rpd
    assert store.top_predictions(4, metric="r2", ascending=False)["model_name"].to_list() == by_r2
    frame = store.top_predictions(2, metric="rpiq", ascending=None)
    assert frame["rpiq"].to_list() == pytest.approx(sorted((e["rpiq"] for e in expected.values()), reverse=True)[:2])
    by_bias = sorted(expected, key=lambda m: abs(expected[m]["bias"]))
    assert store.top_predictions(4, metric="bias", ascending=None)["model_name"].to_list() == by_bias
    with pytest.raises(ValueError, match="^Invalid metric column: 'nope' is neither"):
        store.top_predictions(3, metric="nope")


def test_nirslake_top_metric_r2_ranks_higher_first(scored, capsys):
    store, ws, expected, _ = scored
    store.flush()
    best = max(expected, key=lambda m: expected[m]["r2"])
    worst = min(expected, key=lambda m: expected[m]["r2"])
    assert cli_main(["top", "-w", ws, "-n", "1", "--metric", "r2"]) in (0, None)
    out = capsys.readouterr().out
    assert best in out and worst not in out and "r2" in out
    assert cli_main(["top", "-w", ws, "-n", "1", "--metric", "r2", "--ascending"]) in (0, None)
    assert worst in capsys.readouterr().out


def test_sql_views_give_one_column_per_metric_and_rank_by_them(scored):
    store, _, expected, _ = scored
    wide = store.sql("SELECT model_name, r2, rpd, rmse, sep, bias, rpiq FROM prediction_scores WHERE r2 IS NOT NULL ORDER BY r2 DESC")
    assert wide["model_name"].to_list() == sorted(expected, key=lambda m: -expected[m]["r2"])
    for row in wide.iter_rows(named=True):
        for metric in ("r2", "rpd", "rmse", "sep", "bias", "rpiq"):
            assert row[metric] == pytest.approx(expected[row["model_name"]][metric], rel=1e-12)
    long = store.sql("SELECT model_name, metric, value FROM prediction_scores_long WHERE model_name = 'pls_0'")
    assert dict(zip(long["metric"], long["value"])) == pytest.approx(expected["pls_0"])


def test_scores_from_arrays_agree_in_numpy_polars_and_sql(scored):
    store, ws, expected, _ = scored
    store.flush()
    frame = q.with_arrays(q.scan(ws, "predictions"), q.scan(ws, "prediction_arrays"))
    polars_scores = {r["model_name"]: r for r in q.scores_from_arrays(frame).iter_rows(named=True)}
    sql_scores = {r["model_name"]: r for r in store.sql("SELECT * FROM array_scores").iter_rows(named=True)}
    for name, metrics in expected.items():
        for metric, value in metrics.items():
            assert polars_scores[name][metric] == pytest.approx(value, rel=1e-9), (name, metric)
            assert sql_scores[name][metric] == pytest.approx(value, rel=1e-9), (name, metric)
    for source in (polars_scores, sql_scores):
        for metric, value in CLASSES_BY_HAND.items():
            assert source["lda"][metric] == pytest.approx(value, rel=1e-12)
        assert source["lda"]["rmse"] is None and source["pls_0"]["accuracy"] is None
    assert q.top_k(q.scores_from_arrays(frame).filter(pl.col("r2").is_not_null()), 4, score="r2")["model_name"].to_list() == sorted(
        expected, key=lambda m: -expected[m]["r2"]
    )


def test_repetitions_aggregate_per_sample_in_polars_sql_and_the_facade(scored):
    store, ws, expected, (ids, truth) = scored
    store.flush()
    frame = q.with_arrays(q.scan(ws, "predictions"), q.scan(ws, "prediction_arrays"))
    arrays = {r["model_name"]: r for r in frame.collect().iter_rows(named=True)}
    for method in ("mean", "median"):
        want = {name: sc.sample_scores(ids, truth, arrays[name]["y_pred"], method=method) for name in expected}
        polars_scores = {r["model_name"]: r for r in q.scores_from_arrays(frame, by_sample="sample_ids", method=method).iter_rows(named=True)}
        sql_scores = {r["model_name"]: r for r in store.sql("SELECT * FROM sample_scores WHERE method = ?", [method]).iter_rows(named=True)}
        for name in expected:
            assert polars_scores[name]["n_scored"] == sql_scores[name]["n_scored"] == 12  # samples, not rows
            for metric in sc.REGRESSION_METRICS:
                assert polars_scores[name][metric] == pytest.approx(want[name][metric], rel=1e-9)
                assert sql_scores[name][metric] == pytest.approx(want[name][metric], rel=1e-9)
        ranked = store.sql("SELECT model_name FROM sample_scores WHERE method = ? AND task_type = 'regression' ORDER BY rmse", [method])
        assert ranked["model_name"].to_list() == sorted(expected, key=lambda m: want[m]["rmse"])
        facade = Predictions.from_store(store, dataset_name="wheat")
        top = facade.top(4, "rmse", by_repetition=True, repetition_method=method, task_type="regression")
        assert [r["model_name"] for r in top] == sorted(expected, key=lambda m: want[m]["rmse"])
        assert [r["rank_score"] for r in top] == pytest.approx(sorted(w["rmse"] for w in want.values()))
    votes = store.sql("SELECT accuracy, n_scored FROM sample_scores WHERE method = 'vote'").row(0)
    # x: 0,0 -> 0 (pred 0,1 tie -> 0); y: 1,1,1 -> 1 (pred 1,1,0 -> 1); z: 2 -> 2: all three right
    assert votes == (1.0, 3)


def test_rescore_computes_the_set_from_arrays_and_saves_it_into_scores(tmp_path):
    store = WorkspaceStore(str(tmp_path / "ws"))
    run = store.begin_run("r", {}, [])
    pipe = store.begin_pipeline(run, "p", {}, {}, "corn", "h")
    chain = store.save_chain(pipe, [], 0, "PLS", "", "kfold", {}, {})
    kept = store.save_prediction(pipe, chain, "corn", "pls", "PLS", "0", "val", 0.4, None, None, "rmse", "regression",
                                 5, 10, {"val": {"custom": 7.0, "r2": -1.0}}, {}, None, None, 0, 0.0)
    store.save_prediction_arrays(kept, Y_TRUE, Y_PRED)
    labels = store.save_prediction(pipe, chain, "corn", "lda", "LDA", "0", "test", None, 0.5, None, "accuracy",
                                   "binary_classification", 6, 10, {}, {}, None, None, 0, 0.0)
    store.save_prediction_arrays(labels, LABELS_TRUE, LABELS_PRED)
    store.save_prediction(pipe, chain, "corn", "bare", "PLS", "1", "val", 0.5, None, None, "rmse", "regression", 5, 10, {}, {}, None, None, 0, 0.0)

    result = store.rescore()

    assert sorted(result["prediction_id"].to_list()) == sorted([kept, labels])  # no arrays, no scores
    saved = store.get_prediction(kept, load_arrays=True)
    assert saved["scores"]["val"]["custom"] == 7.0  # kept
    assert saved["scores"]["val"]["r2"] == pytest.approx(0.9)  # replaced by the computed value
    for metric, value in BY_HAND.items():
        assert saved["scores"]["val"][metric] == pytest.approx(value)
    np.testing.assert_allclose(saved["y_pred"], Y_PRED)  # the arrays stay with the re-saved row
    assert store.get_prediction(labels)["scores"]["test"] == pytest.approx(CLASSES_BY_HAND)
    assert store.top_predictions(1, metric="rpd", ascending=None)["rpd"].to_list() == pytest.approx([BY_HAND["rpd"]])
    assert store.query_predictions().height == 3
    dry = store.rescore(save=False, partition="test")
    assert dry["prediction_id"].to_list() == [labels]
    store.close()


def test_with_scores_reads_each_rows_own_partition_and_odd_keys():
    frame = pl.DataFrame({
        "partition": ["val", "test", "it's"],
        "scores": [json.dumps({"val": {"r2": 0.5}, "test": {"r2": 0.1}}), json.dumps({"val": {"r2": 0.9}, "test": {"r2": 0.3}}),
                   json.dumps({"it's": {"r2": 0.7}})],
    })
    got = q.with_scores(frame).collect()
    assert got["r2"].to_list() == [0.5, 0.3, 0.7]


def test_the_scores_page_runs_as_written(tmp_path):
    run_doc_page("scores.md", tmp_path)
