"""Pictures of a sweep (matplotlib, the Agg canvas, no pyplot state): predicted vs observed,
residuals, fold-score spread per chain and the leaderboard, as PNG or SVG.

Each picture reads the store through its public API only; ``nirslake plot`` and the web
dashboard both draw through ``figure()`` and ``render()``, so they show the same pictures.
"""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

try:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError as exc:  # an optional extra: say how to get it
    raise ImportError("nirslake's plots need matplotlib: pip install 'nirslake[plot]'") from exc

from .query import lower_is_better

KINDS = ("predicted", "residuals", "fold-scores", "leaderboard")
FORMATS = ("png", "svg")
# SVG ids are salted with a random value and both formats stamp a date unless told otherwise:
# fixed, the same picture gives the same bytes (from the CLI and from the web app alike).
_STABLE = {"svg.hashsalt": "nirslake", "svg.fonttype": "path"}
_METADATA = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None}}
# matplotlib does not promise thread safety; the web app renders from a thread pool.
_RENDER_LOCK = threading.Lock()


def figure(store, kind: str, *, prediction_id: str | None = None, chain_id: str | None = None,
           dataset_name: str | None = None, partition: str = "val", n: int = 10) -> Figure:
    """The picture ``kind`` (one of ``KINDS``): ``predicted`` and ``residuals`` need a
    ``prediction_id`` or a ``chain_id``; ``fold-scores`` and ``leaderboard`` take a dataset (the
    only one when the workspace holds one) and the number ``n`` of leading chains."""
    if kind in ("predicted", "residuals"):
        points = _points(store, prediction_id, chain_id, partition)
        return predicted_vs_observed(points) if kind == "predicted" else residuals(points)
    if prediction_id is not None or chain_id is not None:
        raise ValueError(f"the {kind} plot shows the chains of a dataset: give a dataset_name, not a prediction or chain")
    if kind == "fold-scores":
        return fold_scores(store, dataset_name, n)
    if kind == "leaderboard":
        return leaderboard(store, dataset_name, n)
    raise ValueError(f"unknown plot {kind!r}: choose one of {', '.join(KINDS)}")


def render(fig: Figure, format: str = "png") -> bytes:
    """The figure as PNG or SVG bytes."""
    if format not in FORMATS:
        raise ValueError(f"unknown image format {format!r}: choose one of {', '.join(FORMATS)}")
    out = io.BytesIO()
    with _RENDER_LOCK, matplotlib.rc_context(_STABLE):
        FigureCanvasAgg(fig)
        fig.savefig(out, format=format, metadata=_METADATA[format], dpi=100)
    return out.getvalue()


def save(fig: Figure, path: str | Path) -> Path:
    """Write the figure to ``path``; ``.png`` or ``.svg`` picks the format."""
    target = Path(path)
    format = target.suffix.lower().lstrip(".")
    if format not in FORMATS:
        raise ValueError(f"{str(path)!r}: the file name must end in .png or .svg")
    data = render(fig, format)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


# --------------------------------------------------------------------------- data


class _Points:
    """The arrays of one prediction, or of each fold of a chain, with labels for the picture."""

    def __init__(self, title: str, groups: list[tuple[str, np.ndarray, np.ndarray]]):
        self.title = title
        self.groups = groups  # (label, y_true, y_pred)


def _points(store, prediction_id: str | None, chain_id: str | None, partition: str) -> _Points:
    if (prediction_id is None) == (chain_id is None):
        raise ValueError("give a prediction_id or a chain_id (one of them)")
    if prediction_id is not None:
        row = store.get_prediction(prediction_id, load_arrays=True)
        if row is None:
            raise KeyError(f"unknown prediction_id {prediction_id!r}")
        if row["y_true"] is None:
            raise ValueError(f"prediction {prediction_id} has no arrays (y_true, y_pred) to plot")
        title = f"{row['dataset_name']} · {row['model_name']} · {row['preprocessings']} · fold {row['fold_id']} · {row['partition']}"
        return _Points(title, [(f"fold {row['fold_id']}", _flat(row["y_true"]), _flat(row["y_pred"]))])
    chain = store.get_chain(chain_id)
    if chain is None:
        raise KeyError(f"unknown chain_id {chain_id!r}")
    rows = _chain_predictions(store, chain, partition)
    if rows.height == 0:
        raise ValueError(f"chain {chain_id} has no {partition!r} predictions")
    groups = []
    for row in rows.sort("fold_id").iter_rows(named=True):
        full = store.get_prediction(row["prediction_id"], load_arrays=True)
        if full is not None and full["y_true"] is not None:
            groups.append((f"fold {row['fold_id']}", _flat(full["y_true"]), _flat(full["y_pred"])))
    if not groups:
        raise ValueError(f"chain {chain_id} has no arrays (y_true, y_pred) to plot for {partition!r}")
    first = rows.row(0, named=True)
    title = f"{first['dataset_name']} · {first['model_name']} · {first['preprocessings']} · {partition}, folds coloured"
    return _Points(title, groups)


def _chain_predictions(store, chain: dict, partition: str) -> pl.DataFrame:
    """The chain's predictions of one partition (one per fold)."""
    frame = store.query_predictions(pipeline_id=chain["pipeline_id"], partition=partition)
    return frame.filter(pl.col("chain_id") == chain["chain_id"])


def _flat(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=float).reshape(len(values), -1)[:, 0]


def _board(store, dataset_name: str | None, n: int) -> tuple[str, pl.DataFrame]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    board = store.leaderboard(n)
    datasets = sorted(set(board["dataset_name"].to_list()))
    if not datasets:
        raise ValueError("the workspace holds no validation predictions to rank")
    if dataset_name is None:
        if len(datasets) > 1:
            raise ValueError(f"the workspace holds several datasets: choose one of {', '.join(datasets)}")
        dataset_name = datasets[0]
    if dataset_name not in datasets:
        raise ValueError(f"no ranked chains for dataset {dataset_name!r}: choose one of {', '.join(datasets)}")
    return dataset_name, board.filter(pl.col("dataset_name") == dataset_name).sort("rank")


def _chain_label(row: dict) -> str:
    return f"{row['rank']}. {row['model_name']} | {row['preprocessings']}"


def _direction(metric: str) -> str:
    return "lower is better" if lower_is_better(metric) else "higher is better"


# --------------------------------------------------------------------------- pictures


def predicted_vs_observed(points: _Points) -> Figure:
    fig = Figure(figsize=(6, 6), layout="constrained")
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["tab10"]
    everything = np.concatenate([np.concatenate([t, p]) for _, t, p in points.groups])
    finite = everything[np.isfinite(everything)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    pad = (high - low) * 0.05 or 1.0
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="0.5", linestyle="--", linewidth=1, label="y = x")
    for i, (label, y_true, y_pred) in enumerate(points.groups):
        ax.scatter(y_true, y_pred, s=22, alpha=0.8, color=colours(i % 10), label=f"{label} ({_scores(y_true, y_pred)})")
    y_true = np.concatenate([t for _, t, _ in points.groups])
    y_pred = np.concatenate([p for _, _, p in points.groups])
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("observed (y_true)")
    ax.set_ylabel("predicted (y_pred)")
    ax.set_title(f"Predicted vs observed: {_scores(y_true, y_pred)}, n = {len(y_true)}", fontsize=10)
    fig.suptitle(points.title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def residuals(points: _Points) -> Figure:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["tab10"]
    for i, (label, y_true, y_pred) in enumerate(points.groups):
        ax.scatter(y_true, y_pred - y_true, s=22, alpha=0.8, color=colours(i % 10), label=label)
    ax.axhline(0, color="0.5", linestyle="--", linewidth=1)
    ax.set_xlabel("observed (y_true)")
    ax.set_ylabel("residual (y_pred - y_true)")
    y_true = np.concatenate([t for _, t, _ in points.groups])
    y_pred = np.concatenate([p for _, _, p in points.groups])
    ax.set_title(f"Residuals: {_scores(y_true, y_pred)}, n = {len(y_true)}", fontsize=10)
    fig.suptitle(points.title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def fold_scores(store, dataset_name: str | None = None, n: int = 10) -> Figure:
    """Each leading chain's validation score on every fold (dots), their mean (bar) and range."""
    dataset_name, board = _board(store, dataset_name, n)
    folds = store.query_predictions(dataset_name=dataset_name, partition="val")
    folds = folds.filter(pl.col("chain_id").is_in(board["chain_id"].to_list()))
    metric = board["metric"][0] or "score"
    fig = Figure(figsize=(8, 1.2 + 0.45 * board.height), layout="constrained")
    ax = fig.add_subplot()
    labels = []
    for y, row in enumerate(board.iter_rows(named=True)):
        scores = folds.filter(pl.col("chain_id") == row["chain_id"])["val_score"].drop_nulls().to_numpy()
        scores = scores[np.isfinite(scores)]
        labels.append(_chain_label(row))
        if scores.size:
            ax.hlines(y, scores.min(), scores.max(), color="0.6", linewidth=2)
            ax.scatter(scores, np.full(scores.size, y), s=28, color="tab:blue", zorder=3)
            ax.scatter([scores.mean()], [y], marker="|", s=300, color="tab:red", zorder=4)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()  # rank 1 on top
    ax.set_xlabel(f"validation {metric} per fold ({_direction(metric)}); red: mean over folds")
    ax.set_title(f"Fold scores of the best {board.height} chains: {dataset_name}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def leaderboard(store, dataset_name: str | None = None, n: int = 10) -> Figure:
    """The leading chains' mean validation score over folds as bars, the std over folds as error bars."""
    dataset_name, board = _board(store, dataset_name, n)
    metric = board["metric"][0] or "score"
    means = np.array([math.nan if v is None else v for v in board["val_score_mean"].to_list()], dtype=float)
    stds = np.array([0.0 if v is None or not math.isfinite(v) else v for v in board["val_score_std"].to_list()], dtype=float)
    fig = Figure(figsize=(8, 1.2 + 0.45 * board.height), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(board.height)
    ax.barh(y, np.nan_to_num(means, nan=0.0, posinf=0.0, neginf=0.0), xerr=stds, color="tab:blue", alpha=0.8,
            error_kw={"ecolor": "0.3", "capsize": 3})
    for i, (value, std) in enumerate(zip(means, stds)):
        at = value + std if math.isfinite(value) else 0.0
        ax.text(at, i, f"  {value:.4g}" if math.isfinite(value) else " n/a", va="center", ha="left", fontsize=8)
    ax.margins(x=0.12)  # room for the numbers at the bars' ends
    ax.set_yticks(y, [_chain_label(r) for r in board.iter_rows(named=True)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"mean validation {metric} over folds ({_direction(metric)}); bars: std over folds")
    ax.set_title(f"Leaderboard: {dataset_name}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> str:
    ok = np.isfinite(y_true) & np.isfinite(y_pred)
    if not ok.any():
        return "no finite values"
    err = y_pred[ok] - y_true[ok]
    rmse = float(np.sqrt(np.mean(err**2)))
    spread = float(np.sum((y_true[ok] - y_true[ok].mean()) ** 2))
    r2 = f"{1 - float(np.sum(err**2)) / spread:.3f}" if spread > 0 else "n/a"
    return f"RMSE {rmse:.4g}, R² {r2}"
