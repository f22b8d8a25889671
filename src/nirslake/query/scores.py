"""Prediction scores: the chemometrics metrics computed from ``y_true``/``y_pred``, the direction
each one ranks in, and per-sample aggregation of repeated measurements (docs/scores.md).

The definitions here are the reference: the polars helpers (``nirslake.query``) and the SQL views
(``sql/views/50_scores.sql``) compute the same numbers, and tests hold all three to hand-computed values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

REGRESSION_METRICS = ("rmse", "mse", "mae", "r2", "bias", "sep", "rpd", "rpiq")
CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "f1")
METRICS = REGRESSION_METRICS + CLASSIFICATION_METRICS

# Which way is better. Errors: lower. Fit and ratios: higher. A bias is signed: the best is the
# one closest to zero, so it ranks by its absolute value.
LOWER_IS_BETTER = frozenset({"rmse", "mse", "mae", "mape", "rmsecv", "sep", "log_loss", "logloss", "loss", "max_error", "median_ae"})
CLOSEST_TO_ZERO = frozenset({"bias"})
HIGHER_IS_BETTER = frozenset(
    {"r2", "rpd", "rpiq", "accuracy", "balanced_accuracy", "f1", "f1_macro", "f1_micro", "precision", "recall",
     "roc_auc", "auc", "pearson_r", "spearman_r", "explained_variance", "matthews_corrcoef", "mcc", "cohen_kappa"}
)

# How repeated measurements of one sample become one prediction (docs/scores.md, "Repetitions").
AGGREGATIONS = ("mean", "median", "vote")


def direction(metric: str) -> str:
    """``"min"``, ``"max"`` or ``"zero"`` (closest to zero is best) for ``metric``.

    Names not listed rank higher-is-better, as ``nirslake.query.top_k`` always has (scikit-learn's
    ``neg_*`` scorers are negated errors, so higher is better for them too).
    """
    name = metric.lower()
    if name in CLOSEST_TO_ZERO:
        return "zero"
    return "min" if name in LOWER_IS_BETTER else "max"


def rank_key(metric: str, value: float | None, ascending: bool | None = None) -> float:
    """A key that sorts best first (ascending) for ``value`` of ``metric``; missing and NaN
    values sort last. ``ascending`` given overrides the metric's direction."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.inf
    value = float(value)
    if ascending is not None:
        return value if ascending else -value
    way = direction(metric)
    if way == "zero":
        return abs(value)
    return value if way == "min" else -value


def is_classification(task_type: str | None) -> bool:
    return task_type is not None and "classif" in task_type.lower()


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return math.nan if numerator == 0 else math.inf
    return numerator / denominator


def regression_scores(y_true: Any, y_pred: Any) -> dict[str, float]:
    """RMSE, MSE, MAE, R², bias, SEP, RPD and RPIQ of one prediction (docs/scores.md).

    With ``e = y_pred - y_true`` over ``n`` samples: bias = mean(e); SEP = sqrt(sum((e - bias)^2) /
    (n - 1)); RPD = SD(y_true) / SEP (SD with n - 1); RPIQ = (Q3 - Q1)(y_true) / SEP (quartiles by
    linear interpolation). Undefined values (one sample, constant y_true) are NaN.
    """
    y, p = _pair(y_true, y_pred)
    n = len(y)
    if n == 0:
        return {m: math.nan for m in REGRESSION_METRICS}
    e = p - y
    mse = float(np.mean(e * e))
    bias = float(np.mean(e))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    sep = float(np.sqrt(np.sum((e - bias) ** 2) / (n - 1))) if n > 1 else math.nan
    sd = float(np.std(y, ddof=1)) if n > 1 else math.nan
    q1, q3 = np.percentile(y, [25.0, 75.0])
    return {
        "rmse": math.sqrt(mse),
        "mse": mse,
        "mae": float(np.mean(np.abs(e))),
        "r2": 1.0 - float(np.sum(e * e)) / ss_tot if ss_tot > 0 else math.nan,
        "bias": bias,
        "sep": sep,
        "rpd": _ratio(sd, sep) if n > 1 else math.nan,
        "rpiq": _ratio(float(q3 - q1), sep) if n > 1 else math.nan,
    }


def classification_scores(y_true: Any, y_pred: Any) -> dict[str, float]:
    """Accuracy, balanced accuracy and (support-weighted) F1 of predicted labels (docs/scores.md).

    Classes are those of ``y_true``: balanced accuracy is the mean recall over them, F1 the mean of
    each class's 2TP / (2TP + FP + FN) weighted by its count in ``y_true``.
    """
    y, p = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"y_true and y_pred have different lengths: {len(y)} and {len(p)}")
    if len(y) == 0:
        return {m: math.nan for m in CLASSIFICATION_METRICS}
    classes, support = np.unique(y, return_counts=True)
    recalls, f1s = [], []
    for label in classes:
        tp = float(np.sum((y == label) & (p == label)))
        fp = float(np.sum((y != label) & (p == label)))
        fn = float(np.sum((y == label) & (p != label)))
        recalls.append(tp / (tp + fn))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": float(np.mean(y == p)),
        "balanced_accuracy": float(np.mean(recalls)),
        "f1": float(np.sum(np.asarray(f1s) * support) / len(y)),
    }


def compute(y_true: Any, y_pred: Any, task_type: str | None = "regression") -> dict[str, float]:
    """The metric set of the task: classification when ``task_type`` names it, else regression."""
    if is_classification(task_type):
        return classification_scores(y_true, y_pred)
    return regression_scores(y_true, y_pred)


def per_sample(
    sample_ids: Any, y_true: Any, y_pred: Any, method: str = "mean"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Repeated measurements folded to one row per sample: ``(ids, y_true, y_pred)``, ids sorted.

    ``method``: ``mean`` or ``median`` of each sample's predictions (its ``y_true`` is the mean of
    its rows, equal when the repeats agree), or ``vote`` for labels (the most frequent, ties to the
    smallest, for both ``y_true`` and ``y_pred``).
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}: use one of {', '.join(AGGREGATIONS)}")
    ids = np.asarray(sample_ids).reshape(-1)
    yt, yp = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if not len(ids) == len(yt) == len(yp):
        raise ValueError(f"sample ids, y_true and y_pred must have one length each: got {len(ids)}, {len(yt)} and {len(yp)}")
    keys, inverse = np.unique(ids.astype(str), return_inverse=True)
    if method == "vote":
        return keys, _vote(inverse, yt, len(keys)), _vote(inverse, yp, len(keys))
    yt, yp = yt.astype(np.float64), yp.astype(np.float64)
    counts = np.bincount(inverse, minlength=len(keys))
    true_mean = np.bincount(inverse, weights=yt, minlength=len(keys)) / counts
    if method == "mean":
        pred = np.bincount(inverse, weights=yp, minlength=len(keys)) / counts
    else:
        order = np.argsort(inverse, kind="stable")
        groups = np.split(yp[order], np.cumsum(counts)[:-1])
        pred = np.array([np.median(g) for g in groups], dtype=np.float64)
    return keys, true_mean, pred


def _vote(inverse: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    out = []
    for group in range(n):
        labels, counts = np.unique(values[inverse == group], return_counts=True)
        out.append(labels[np.argmax(counts)])  # np.unique sorts: ties go to the smallest label
    return np.asarray(out)


def sample_scores(
    sample_ids: Any, y_true: Any, y_pred: Any, task_type: str | None = "regression", method: str | None = None
) -> dict[str, float]:
    """The metric set after folding repetitions per sample (``method`` defaults to ``mean``, or
    ``vote`` for classification)."""
    method = method or ("vote" if is_classification(task_type) else "mean")
    _, yt, yp = per_sample(sample_ids, y_true, y_pred, method)
    return compute(yt, yp, task_type)


def score_of(scores: Mapping | None, partition: str, metric: str) -> float | None:
    """``scores[partition][metric]`` as a float, or None when absent (the ``scores`` dict layout
    of a prediction: one dict of metrics per partition)."""
    if not isinstance(scores, Mapping):
        return None
    values = scores.get(partition)
    if not isinstance(values, Mapping):
        return None
    value = values.get(metric)
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def metrics_in(scores_dicts: Iterable[Mapping | None], partition: str) -> set[str]:
    """Every metric name any of ``scores_dicts`` holds for ``partition``."""
    found: set[str] = set()
    for scores in scores_dicts:
        values = scores.get(partition) if isinstance(scores, Mapping) else None
        if isinstance(values, Mapping):
            found.update(str(k) for k in values)
    return found


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"y_true and y_pred have different lengths: {len(y)} and {len(p)}")
    return y, p

