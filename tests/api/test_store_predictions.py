"""Predictions and their dense arrays: save, get, query, rank, delete and export to Parquet."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

RNG = np.random.default_rng(7)


# --------------------------------------------------------------------------- save / get


def test_save_prediction_returns_an_id_and_get_returns_every_field(store, make_pipeline, add_prediction):
    ids = make_pipeline(store)
    scores = {"val": {"rmse": 0.42, "r2": 0.91}, "test": {"rmse": 0.45, "r2": 0.89}}

    prediction_id = add_prediction(
        store,
        ids,
        model_name="PLS_10",
        fold_id="fold_1",
        val_score=0.42,
        test_score=0.45,
        train_score=0.30,
        scores=scores,
        best_params={"n_components": 10},
        branch_id=2,
        branch_name="snv_branch",
        exclusion_count=3,
        exclusion_rate=0.075,
        preprocessings="SNV>SG(11,2)",
    )

    assert isinstance(prediction_id, str) and prediction_id
    p = store.get_prediction(prediction_id)
    assert p["prediction_id"] == prediction_id
    assert p["pipeline_id"] == ids.pipeline_id
    assert p["chain_id"] == ids.chain_id
    assert p["run_id"] == ids.run_id
    assert p["dataset_name"] == "corn_m5"
    assert p["model_name"] == "PLS_10"
    assert p["model_class"] == "PLSRegression"
    assert p["fold_id"] == "fold_1"
    assert p["partition"] == "val"
    assert p["val_score"] == pytest.approx(0.42)
    assert p["test_score"] == pytest.approx(0.45)
    assert p["train_score"] == pytest.approx(0.30)
    assert p["metric"] == "rmse"
    assert p["task_type"] == "regression"
    assert p["n_samples"] == 40
    assert p["n_features"] == 200
    assert p["scores"] == scores
    assert p["best_params"] == {"n_components": 10}
    assert p["branch_id"] == 2
    assert p["branch_name"] == "snv_branch"
    assert p["exclusion_count"] == 3
    assert p["exclusion_rate"] == pytest.approx(0.075)
    assert p["preprocessings"] == "SNV>SG(11,2)"
    assert isinstance(p["created_at"], datetime)


def test_caller_given_prediction_id_is_used(store, make_pipeline, add_prediction):
    ids = make_pipeline(store)
    assert add_prediction(store, ids, prediction_id="pred-corn-fold0") == "pred-corn-fold0"
    assert store.get_prediction("pred-corn-fold0")["fold_id"] == "0"


def test_preprocessings_defaults_to_empty_string(store, make_pipeline):
    ids = make_pipeline(store)
    prediction_id = store.save_prediction(
        ids.pipeline_id, ids.chain_id, "corn_m5", "PLS_10", "PLSRegression", "0", "val",
        0.4, 0.5, 0.3, "rmse", "regression", 40, 200, {}, {}, None, None, 0, 0.0,
    )  # fmt: skip
    assert store.get_prediction(prediction_id)["preprocessings"] == ""


def test_every_save_adds_a_record_even_for_the_same_model_and_fold(store, make_pipeline, add_prediction):
    ids = make_pipeline(store)
    first = add_prediction(store, ids, val_score=0.5)
    second = add_prediction(store, ids, val_score=0.4)

    assert first != second
    assert store.query_predictions(pipeline_id=ids.pipeline_id).height == 2


def test_save_prediction_for_unknown_pipeline_raises_key_error(store, make_pipeline, add_prediction):
    ids = make_pipeline(store)
    ghost = type(ids)(ids.run_id, "no-such-pipeline", ids.chain_id)
    with pytest.raises(KeyError):
        add_prediction(store, ghost)


def test_get_prediction_unknown_id_is_none(store, make_pipeline, add_prediction):
    add_prediction(store, make_pipeline(store))
    assert store.get_prediction("no-such-prediction") is None
    assert store.get_prediction("no-such-prediction", load_arrays=True) is None


# --------------------------------------------------------------------------- arrays


def test_arrays_round_trip_as_numpy_with_their_dtypes_and_shapes(store, make_pipeline, add_prediction):
    ids = make_pipeline(store)
    prediction_id = add_prediction(store, ids, task_type="classification", metric="accuracy")
    y_true = np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2, 0])  # int labels come back as float64
    y_proba = RNG.dirichlet(np.ones(3), size=12)
    y_pred = y_proba.argmax(axis=1).astype(float)
    sample_indices = np.arange(100, 112, dtype=np.int32)
    weights = np.linspace(0.5, 1.5, 12)

    assert store.save_prediction_arrays(prediction_id, y_true, y_pred, y_proba, sample_indices, weights) is None

    p = store.get_prediction(prediction_id, load_arrays=True)
    assert p["y_true"].dtype == np.float64
    np.testing.assert_array_equal(p["y_true"], y_true.astype(np.float64))
    assert p["y_pred"].dtype == np.float64
    np.testing.assert_array_equal(p["y_pred"], y_pred)
    assert p["y_proba"].shape == (12, 3)
    assert p["y_proba"].dtype == np.float64
    np.testing.assert_allclose(p["y_proba"], y_proba)
    assert p["sample_indices"].dtype == np.int64
    np.testing.assert_array_equal(p["sample_indices"], sample_indices)
    np.testing.assert_allclose(p["weights"], weights)
    assert p["model_class"] == "PLSRegression"


def test_absent_arrays_load_as_none(store, make_pipeline, add_prediction):
    ids = make_pipeline(store)
    prediction_id = add_prediction(store, ids)
    y_true = RNG.normal(10, 2, size=30)
    store.save_prediction_arrays(prediction_id, y_true, y_true + RNG.normal(0, 0.3, size=30))

    p = store.get_prediction(prediction_id, load_arrays=True)
    np.testing.assert_allclose(p["y_true"], y_true)
    assert p["y_pred"].shape == (30,)
    assert p["y_proba"] is None
    assert p["sample_indices"] is None
    assert p["weights"] is None


def test_prediction_without_saved_arrays_loads_none_arrays(store, make_pipeline, add_prediction):
    prediction_id = add_prediction(store, make_pipeline(store))
    p = store.get_prediction(prediction_id, load_arrays=True)
    for key in ("y_true", "y_pred", "y_proba", "sample_indices", "weights"):
        assert p[key] is None


def test_arrays_for_unknown_prediction_raise_key_error(store, make_pipeline, add_prediction):
    add_prediction(store, make_pipeline(store))
    with pytest.raises(KeyError):
        store.save_prediction_arrays("no-such-prediction", np.zeros(10), np.zeros(10))


# --------------------------------------------------------------------------- query


@pytest.fixture
def populated(store, make_pipeline, add_prediction):
    """Two pipelines on two datasets with a mix of models, folds, partitions and branches."""
    corn = make_pipeline(store, dataset_name="corn_m5")
    wheat = make_pipeline(store, dataset_name="wheat_protein", run_name="wheat_run")
    made = {
        "corn_pls_val0": add_prediction(store, corn, fold_id="0", partition="val", branch_id=0),
        "corn_pls_val1": add_prediction(store, corn, fold_id="1", partition="val", branch_id=1),
        "corn_pls_test": add_prediction(store, corn, fold_id="avg", partition="test", branch_id=0),
        "corn_mp6_rf_val": add_prediction(
            store, corn, dataset_name="corn_mp6", model_name="RF", model_class="RandomForestRegressor",
            fold_id="0", partition="val", branch_id=1,
        ),
        "wheat_pls_val": add_prediction(
            store, wheat, dataset_name="wheat_protein", model_class="KernelPLSRegression", fold_id="0",
        ),
    }  # fmt: skip
    return corn, wheat, made


def _ids(frame: pl.DataFrame) -> set[str]:
    return set(frame["prediction_id"].to_list())


def test_query_without_filters_returns_everything_but_no_arrays(store, populated):
    _, _, made = populated
    frame = store.query_predictions()
    assert isinstance(frame, pl.DataFrame)
    assert _ids(frame) == set(made.values())
    assert not {"y_true", "y_pred", "y_proba", "sample_indices", "weights"} & set(frame.columns)


def test_query_filters_are_anded(store, populated):
    corn, wheat, made = populated
    assert _ids(store.query_predictions(dataset_name="corn_m5")) == {
        made["corn_pls_val0"], made["corn_pls_val1"], made["corn_pls_test"]
    }
    assert _ids(store.query_predictions(dataset_name="corn_m5", partition="val")) == {
        made["corn_pls_val0"], made["corn_pls_val1"]
    }
    assert _ids(store.query_predictions(dataset_name="corn_m5", partition="val", fold_id="1")) == {
        made["corn_pls_val1"]
    }
    assert _ids(store.query_predictions(model_class="RandomForestRegressor")) == {made["corn_mp6_rf_val"]}
    assert _ids(store.query_predictions(pipeline_id=wheat.pipeline_id)) == {made["wheat_pls_val"]}
    assert _ids(store.query_predictions(run_id=corn.run_id, partition="test")) == {made["corn_pls_test"]}
    assert store.query_predictions(dataset_name="wheat_protein", partition="test").height == 0


def test_query_by_branch_id_including_branch_zero(store, populated):
    _, _, made = populated
    assert _ids(store.query_predictions(branch_id=1)) == {made["corn_pls_val1"], made["corn_mp6_rf_val"]}
    assert _ids(store.query_predictions(branch_id=0)) == {made["corn_pls_val0"], made["corn_pls_test"]}


def test_query_string_filter_with_percent_is_a_like_pattern(store, populated):
    _, _, made = populated
    assert _ids(store.query_predictions(dataset_name="corn%")) == {
        made["corn_pls_val0"], made["corn_pls_val1"], made["corn_pls_test"], made["corn_mp6_rf_val"]
    }
    assert _ids(store.query_predictions(model_class="%PLS%")) == {
        made["corn_pls_val0"], made["corn_pls_val1"], made["corn_pls_test"], made["wheat_pls_val"]
    }
    # Without % the value is matched exactly.
    assert store.query_predictions(dataset_name="corn").height == 0


def test_query_limit_and_offset(store, populated):
    assert store.query_predictions(limit=2).height == 2
    assert store.query_predictions(offset=3).height == 2
    assert store.query_predictions(limit=10, offset=4).height == 1
    first_two = _ids(store.query_predictions(limit=2, offset=0))
    next_three = _ids(store.query_predictions(limit=3, offset=2))
    assert len(first_two | next_three) == 5


def test_query_filter_values_are_data_not_sql(store, populated):
    assert store.query_predictions(dataset_name="x' OR '1'='1").height == 0
    assert store.query_predictions().height == 5


# --------------------------------------------------------------------------- top


@pytest.fixture
def ranked(store, make_pipeline, add_prediction):
    corn = make_pipeline(store)
    wheat = make_pipeline(store, dataset_name="wheat_protein")
    made = {
        "pls_030": add_prediction(store, corn, val_score=0.30, test_score=0.50),
        "pls_010": add_prediction(store, corn, val_score=0.10, test_score=0.70),
        "pls_none": add_prediction(store, corn, val_score=None, test_score=0.20),
        "rf_020": add_prediction(store, corn, model_class="RandomForestRegressor", val_score=0.20, test_score=0.60),
        "rf_050": add_prediction(store, corn, model_class="RandomForestRegressor", val_score=0.50, test_score=0.40),
        "test_partition": add_prediction(store, corn, partition="test", val_score=0.01, test_score=0.01),
        "wheat_005": add_prediction(store, wheat, dataset_name="wheat_protein", val_score=0.05, test_score=0.9),
    }
    return made


def test_top_predictions_best_n_of_val_partition_by_val_score(store, ranked):
    top = store.top_predictions(3)
    assert isinstance(top, pl.DataFrame)
    assert top["prediction_id"].to_list() == [ranked["wheat_005"], ranked["pls_010"], ranked["rf_020"]]
    assert set(top["partition"].to_list()) == {"val"}


def test_top_predictions_descending_puts_nulls_last(store, ranked):
    top = store.top_predictions(7, "val_score", False)
    assert top["prediction_id"].to_list() == [
        ranked["rf_050"], ranked["pls_030"], ranked["rf_020"], ranked["pls_010"], ranked["wheat_005"], ranked["pls_none"]
    ]  # fmt: skip


def test_top_predictions_ascending_puts_nulls_last(store, ranked):
    top = store.top_predictions(10)
    assert top.height == 6
    assert top["prediction_id"].to_list()[-1] == ranked["pls_none"]


def test_top_predictions_by_another_metric_partition_and_dataset(store, ranked):
    by_test = store.top_predictions(1, metric="test_score")
    assert by_test["prediction_id"].to_list() == [ranked["pls_none"]]
    test_partition = store.top_predictions(5, partition="test")
    assert test_partition["prediction_id"].to_list() == [ranked["test_partition"]]
    corn_only = store.top_predictions(1, dataset_name="corn_m5")
    assert corn_only["prediction_id"].to_list() == [ranked["pls_010"]]


def test_top_predictions_group_by_returns_best_n_of_each_group(store, ranked):
    top = store.top_predictions(1, dataset_name="corn_m5", group_by="model_class")
    best = {row["model_class"]: row["prediction_id"] for row in top.iter_rows(named=True)}
    assert top.height == 2
    assert best == {"PLSRegression": ranked["pls_010"], "RandomForestRegressor": ranked["rf_020"]}

    two_each = store.top_predictions(2, "val_score", True, "val", "corn_m5", "model_class")
    assert two_each.height == 4


@pytest.mark.parametrize(
    "metric",
    ["not_a_column", "val_score; DROP TABLE predictions", "val_score DESC --", "1; DELETE FROM predictions", ""],
)
def test_top_predictions_rejects_invalid_metric(store, ranked, metric):
    with pytest.raises(ValueError, match=r"^Invalid metric column"):
        store.top_predictions(3, metric=metric)
    assert store.query_predictions().height == len(ranked)


@pytest.mark.parametrize(
    "group_by", ["not_a_column", "model_class; DROP TABLE predictions", "model_class) --"]
)
def test_top_predictions_rejects_invalid_group_by(store, ranked, group_by):
    with pytest.raises(ValueError, match=r"^Invalid group_by column"):
        store.top_predictions(3, group_by=group_by)
    assert store.query_predictions().height == len(ranked)


# --------------------------------------------------------------------------- delete


def test_delete_prediction_removes_it_and_its_arrays(store, make_pipeline, add_prediction):
    ids = make_pipeline(store)
    doomed = add_prediction(store, ids)
    kept = add_prediction(store, ids)
    store.save_prediction_arrays(doomed, np.ones(10), np.ones(10))

    assert store.delete_prediction(doomed) is True

    assert store.get_prediction(doomed) is None
    assert store.get_prediction(doomed, load_arrays=True) is None
    assert _ids(store.query_predictions()) == {kept}
    assert store.delete_prediction(doomed) is False


def test_delete_unknown_prediction_is_false(store):
    assert store.delete_prediction("no-such-prediction") is False


# --------------------------------------------------------------------------- parquet export


def test_export_predictions_parquet_writes_the_filtered_query(store, populated, tmp_path):
    _, _, made = populated

    out = store.export_predictions_parquet(tmp_path / "corn.parquet", dataset_name="corn_m5", partition="val")

    assert Path(out).exists()
    frame = pl.read_parquet(out)
    assert set(frame["prediction_id"].to_list()) == {made["corn_pls_val0"], made["corn_pls_val1"]}
    assert "val_score" in frame.columns


def test_export_predictions_parquet_without_filters_has_every_row(store, populated, tmp_path):
    out = store.export_predictions_parquet(str(tmp_path / "all.parquet"))
    assert pl.read_parquet(out).height == 5


def test_export_predictions_parquet_writes_a_file_when_empty(store, populated, tmp_path):
    out = store.export_predictions_parquet(tmp_path / "none.parquet", dataset_name="soil_carbon")
    assert Path(out).exists()
    assert pl.read_parquet(out).height == 0
