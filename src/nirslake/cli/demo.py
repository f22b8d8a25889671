"""The demo job: a realistic NIRS model sweep on synthetic spectra, recorded in a workspace.
Owns the synthetic spectra generator, the NIRS preprocessing transformers and run_demo()."""

from __future__ import annotations

import hashlib
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.cross_decomposition import PLSRegression
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_squared_error, r2_score
from sklearn.model_selection import KFold, train_test_split


class SNV(TransformerMixin, BaseEstimator):
    """Standard normal variate: centre and scale each spectrum by its own mean and std."""

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        X = np.asarray(X, dtype=float)
        std = X.std(axis=1, keepdims=True)
        # A flat spectrum has no scale to remove: leave it centred rather than divide by zero.
        return (X - X.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)


class Derivative(TransformerMixin, BaseEstimator):
    """Finite-difference derivative along the wavelength axis, applied `order` times."""

    def __init__(self, order: int = 1):
        self.order = order

    def fit(self, X, y=None):
        if self.order not in (1, 2):
            raise ValueError(f"Derivative order must be 1 or 2, got {self.order!r}")
        return self

    def transform(self, X):
        X = np.asarray(X, dtype=float)
        for _ in range(self.order):
            X = np.gradient(X, axis=1)
        return X


# Instrument resolutions differ between applications, so the sweep sees several spectrum widths.
DATASETS = [
    ("wheat_protein", 140),
    ("corn_moisture", 350),
    ("soil_carbon", 250),
    ("milk_fat", 200),
    ("tablet_api", 300),
]
PREPROCESSINGS = {
    "raw": (),
    "SNV": (SNV(),),
    "D1": (Derivative(1),),
    "SNV+D1": (SNV(), Derivative(1)),
    "D2": (Derivative(2),),
}
MODELS = {
    "PLS(5)": PLSRegression(n_components=5),
    "PLS(10)": PLSRegression(n_components=10),
    "Ridge(0.001)": Ridge(alpha=0.001),
    "Ridge(1)": Ridge(alpha=1.0),
}
QUICK_PREPROCESSINGS = ["raw", "SNV+D1"]
QUICK_MODELS = ["PLS(5)", "Ridge(1)"]
TEST_SIZE = 0.25


def make_spectra(name: str, n_samples: int, n_wavelengths: int, seed: int):
    """Synthetic NIR absorbance spectra (1100-2500 nm) and a reference value per sample.

    The name fixes the chemistry (band positions, target coefficients) so that a dataset keeps
    its identity across seeds; the seed draws the samples. Returns X, y, wavelengths.
    """
    # crc32, not hash(): str hashes are salted per process and the chemistry must not change.
    chem = np.random.default_rng(zlib.crc32(name.encode()))
    rng = np.random.default_rng(seed)
    wavelengths = np.linspace(1100.0, 2500.0, n_wavelengths)

    n_constituents = 3  # each with two bands (e.g. a first and a second overtone)
    centres = chem.uniform(1200.0, 2400.0, (n_constituents, 2, 1))
    widths = chem.uniform(20.0, 80.0, (n_constituents, 2, 1))
    bands = np.exp(-0.5 * ((wavelengths - centres) / widths) ** 2).sum(axis=1)
    # Real samples are mostly matrix (water, starch, minerals): broad bands every sample shares.
    # Without it SNV would normalise the analyte signal away instead of the scatter.
    matrix_centres = chem.uniform(1200.0, 2400.0, (3, 1))
    matrix_widths = chem.uniform(100.0, 300.0, (3, 1))
    matrix = 1.5 * np.exp(-0.5 * ((wavelengths - matrix_centres) / matrix_widths) ** 2).sum(axis=0)
    coefficients = chem.uniform(-15.0, 50.0, n_constituents)

    concentrations = rng.uniform(0.0, 0.3, (n_samples, n_constituents))
    absorbance = matrix + concentrations @ bands
    # Particle size and packing change path length (multiplicative) and add a tilted baseline:
    # the effects SNV and derivatives exist to remove.
    scatter = rng.lognormal(0.0, 0.1, (n_samples, 1))
    relative_wl = (wavelengths - wavelengths.mean()) / np.ptp(wavelengths)
    baseline = rng.normal(0.0, 0.2, (n_samples, 1)) + rng.normal(0.0, 0.1, (n_samples, 1)) * relative_wl
    X = scatter * absorbance + baseline + rng.normal(0.0, 0.003, absorbance.shape)
    y = 10.0 + concentrations @ coefficients + rng.normal(0.0, 0.1, n_samples)
    return X, y, wavelengths


@dataclass
class _Dataset:
    name: str
    X: np.ndarray
    y: np.ndarray
    wavelengths: np.ndarray
    hash: str
    train_idx: np.ndarray
    test_idx: np.ndarray
    folds: list  # (train, val) positions within train_idx, shared by every pipeline for a fair comparison


def _prepare_dataset(name, n_wavelengths, n_samples, n_folds, seed) -> _Dataset:
    X, y, wavelengths = make_spectra(name, n_samples, n_wavelengths, seed)
    train_idx, test_idx = train_test_split(np.arange(n_samples), test_size=TEST_SIZE, random_state=seed)
    folds = list(KFold(n_folds, shuffle=True, random_state=seed).split(train_idx))
    digest = hashlib.sha256(X.tobytes() + y.tobytes()).hexdigest()[:16]
    return _Dataset(name, X, y, wavelengths, digest, np.sort(train_idx), np.sort(test_idx), folds)


def _class_path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _ms_since(start: float) -> int:
    return round((time.perf_counter() - start) * 1000)


@contextmanager
def _timed_step(store, pipeline_id, step_idx, operator_class, **details):
    store.log_step(pipeline_id, step_idx, operator_class, "start")
    start = time.perf_counter()
    yield
    store.log_step(pipeline_id, step_idx, operator_class, "end", duration_ms=_ms_since(start), details=details or None)


def _run_pipeline(store, run_id, ds: _Dataset, prep_label: str, model_label: str) -> dict[str, Any]:
    """Fit, cross-validate and record one preprocessing x model pipeline; return its outcome."""
    transformers = [clone(t) for t in PREPROCESSINGS[prep_label]]
    model_proto, model_class = MODELS[model_label], _class_path(MODELS[model_label])
    expanded_config = {
        "preprocessing": [{"class": _class_path(t), "params": t.get_params()} for t in transformers],
        "model": {"class": model_class, "params": model_proto.get_params()},
        "split": {"class": "sklearn.model_selection.KFold", "n_splits": len(ds.folds), "test_size": TEST_SIZE},
    }
    generator_choices = [{"preprocessing": prep_label}, {"model": model_label}]
    pipeline_id = store.begin_pipeline(
        run_id, f"{prep_label} | {model_label}", expanded_config, generator_choices, ds.name, ds.hash
    )
    start = time.perf_counter()
    try:
        X_train, X_test = ds.X[ds.train_idx], ds.X[ds.test_idx]
        y_train = ds.y[ds.train_idx]
        steps, shared_artifacts = [], {}
        # Transformers see the whole training set once; folds only refit the model, as in nirs4all.
        for step_idx, transformer in enumerate(transformers):
            operator_class = _class_path(transformer)
            with _timed_step(store, pipeline_id, step_idx, operator_class):
                X_train = transformer.fit_transform(X_train)
                X_test = transformer.transform(X_test)
            artifact_id = store.save_artifact(transformer, operator_class, "transformer", "joblib")
            steps.append({"step_idx": step_idx, "operator_class": operator_class,
                          "params": transformer.get_params(), "artifact_id": artifact_id, "stateless": True})
            shared_artifacts[str(step_idx)] = [artifact_id]

        model_idx = len(transformers)
        fold_models, fold_artifacts = [], {}
        with _timed_step(store, pipeline_id, model_idx, model_class, n_folds=len(ds.folds)):
            for fold, (tr, _) in enumerate(ds.folds):
                model = clone(model_proto).fit(X_train[tr], y_train[tr])
                fold_models.append(model)
                fold_artifacts[f"fold_{fold}"] = store.save_artifact(model, model_class, "model", "joblib")
        # The model step has one artifact per fold, listed in fold_artifacts rather than on the step.
        steps.append({"step_idx": model_idx, "operator_class": model_class,
                      "params": model_proto.get_params(), "artifact_id": None, "stateless": False})
        chain_id = store.save_chain(
            pipeline_id, steps, model_idx, model_class, prep_label, f"KFold({len(ds.folds)})",
            fold_artifacts, shared_artifacts,
        )

        fold_scores = []
        for fold, ((tr, va), model) in enumerate(zip(ds.folds, fold_models)):
            partitions = {
                "train": (X_train[tr], ds.train_idx[tr]),
                "val": (X_train[va], ds.train_idx[va]),
                "test": (X_test, ds.test_idx),
            }
            y_pred = {part: np.ravel(model.predict(X)) for part, (X, _) in partitions.items()}
            scores = {
                part: {"rmse": float(np.sqrt(mean_squared_error(ds.y[idx], y_pred[part]))),
                       "r2": float(r2_score(ds.y[idx], y_pred[part]))}
                for part, (_, idx) in partitions.items()
            }
            fold_scores.append(scores)
            for part, (_, idx) in partitions.items():
                prediction_id = store.save_prediction(
                    pipeline_id, chain_id, ds.name, model_label, model_class, str(fold), part,
                    val_score=scores["val"]["rmse"], test_score=scores["test"]["rmse"],
                    train_score=scores["train"]["rmse"], metric="rmse", task_type="regression",
                    n_samples=len(idx), n_features=ds.X.shape[1], scores=scores, best_params={},
                    branch_id=None, branch_name=None, exclusion_count=0, exclusion_rate=0.0,
                    preprocessings=prep_label,
                )
                store.save_prediction_arrays(prediction_id, ds.y[idx], y_pred[part], sample_indices=idx)

        best = min(fold_scores, key=lambda s: s["val"]["rmse"])
        duration_ms = _ms_since(start)
        store.complete_pipeline(pipeline_id, best["val"]["rmse"], best["test"]["rmse"], "rmse", duration_ms)
    except BaseException as exc:  # Ctrl-C included: an interrupted pipeline must not stay "running"
        store.fail_pipeline(pipeline_id, repr(exc))
        raise
    return {
        "pipeline_id": pipeline_id, "chain_id": chain_id, "best_val": best["val"]["rmse"],
        "mean_val": float(np.mean([s["val"]["rmse"] for s in fold_scores])),
        "best_test": best["test"]["rmse"], "duration_ms": duration_ms,
        "n_predictions": 3 * len(ds.folds), "n_artifacts_saved": len(transformers) + len(fold_models),
    }


def run_demo(
    workspace,
    n_datasets: int = 3,
    n_folds: int = 5,
    n_samples: int = 240,
    quick: bool = False,
    progress: Callable[[str], Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Sweep preprocessings x models over synthetic datasets, recording everything in `workspace`."""
    from nirslake import WorkspaceStore
    from nirslake.lake.storage import Storage

    Storage(workspace).check_bucket()  # before the sweep's minutes of fitting, not after
    if quick:
        n_datasets, n_folds, n_samples = 2, 3, 60
        prep_labels, model_labels = QUICK_PREPROCESSINGS, QUICK_MODELS
    else:
        prep_labels, model_labels = list(PREPROCESSINGS), list(MODELS)
    if not 1 <= n_datasets <= len(DATASETS):
        raise ValueError(f"n_datasets must be between 1 and {len(DATASETS)}, got {n_datasets}")

    started = time.perf_counter()
    datasets = [
        _prepare_dataset(name, n_wl, n_samples, n_folds, seed + i)
        for i, (name, n_wl) in enumerate(DATASETS[:n_datasets])
    ]
    config = {"seed": seed, "n_folds": n_folds, "test_size": TEST_SIZE, "metric": "rmse",
              "preprocessings": prep_labels, "models": model_labels, "quick": quick}
    dataset_infos = [{"name": ds.name, "n_samples": len(ds.y), "n_features": ds.X.shape[1], "hash": ds.hash,
                      "wavelength_range_nm": [float(ds.wavelengths[0]), float(ds.wavelengths[-1])]}
                     for ds in datasets]
    total = len(datasets) * len(prep_labels) * len(model_labels)
    counts = {"n_pipelines": 0, "n_predictions": 0, "n_artifacts_saved": 0}
    best_per_dataset: dict[str, dict[str, Any]] = {}

    store = WorkspaceStore(workspace)
    try:
        run_id = store.begin_run("nirs_demo_sweep", config, dataset_infos)
        try:
            for ds in datasets:
                for prep_label in prep_labels:
                    for model_label in model_labels:
                        outcome = _run_pipeline(store, run_id, ds, prep_label, model_label)
                        counts["n_pipelines"] += 1
                        counts["n_predictions"] += outcome["n_predictions"]
                        counts["n_artifacts_saved"] += outcome["n_artifacts_saved"]
                        if outcome["best_val"] < best_per_dataset.get(ds.name, {}).get("best_val", np.inf):
                            best_per_dataset[ds.name] = {
                                "pipeline": f"{prep_label} | {model_label}",
                                **{k: outcome[k] for k in ("pipeline_id", "chain_id", "best_val", "best_test")},
                            }
                        if progress is not None:
                            # The mean over folds, as the leaderboard ranks; the best fold beside it.
                            progress(f"[{counts['n_pipelines']}/{total}] {ds.name:<14} {prep_label:>6} | "
                                     f"{model_label:<12} val rmse {outcome['mean_val']:.3f} mean over "
                                     f"{len(ds.folds)} folds (best fold {outcome['best_val']:.3f})  "
                                     f"({outcome['duration_ms']} ms)")
            elapsed_s = round(time.perf_counter() - started, 3)
            store.complete_run(run_id, {**counts, "elapsed_s": elapsed_s, "best_per_dataset": best_per_dataset})
        except BaseException as exc:
            store.fail_run(run_id, repr(exc))
            raise
    finally:
        store.close()
    return {"run_id": run_id, **counts, "elapsed_s": elapsed_s}
