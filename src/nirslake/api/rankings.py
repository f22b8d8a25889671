"""Rankings a person asks for: chains by their mean score over folds (what ``nirslake top``
shows by default), the direction taken from the metric and named, and what a filter could have
matched when it matched nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from ..query import top_k, with_scores
from ..query import scores as sc
from . import validation as V

if TYPE_CHECKING:
    from ..store import WorkspaceStore

# A chain's rows as the chain_summary view groups them (a chain holds one model per dataset).
CHAIN_KEYS = ("chain_id", "dataset_name", "model_name")
CHAIN_COLUMNS = ("preprocessings", "pipeline_id", "run_id")
WORDS = {"min": "lower is better", "max": "higher is better", "zero": "closest to zero is best"}


@dataclass(frozen=True)
class Ranking:
    """A ranked frame and what it was ranked by."""

    frame: pl.DataFrame
    score: str  # the column ranked (val_score_mean, r2_mean, val_score ...)
    metric: str  # the metric the values are of (rmse, r2 ...)
    direction: str  # "min", "max" or "zero"; "asc"/"desc" when the caller forced an order
    level: str  # "chain" (mean over folds) or "prediction" (single folds)
    partition: str

    def describe(self) -> str:
        order = WORDS.get(self.direction, {"asc": "lowest first (as asked)", "desc": "highest first (as asked)"}.get(self.direction, ""))
        what = (f"mean {self.metric} over folds per chain" if self.level == "chain"
                else f"{self.metric} of single folds")
        return f"ranked by {what} on the {self.partition} partition (column {self.score}; {order})"


def _direction_metric(frame: pl.DataFrame, metric: str, numeric: set[str]) -> str:
    """The metric whose direction ranks ``metric``: itself for a metric of the scores; for a
    score column (val_score ...), the rows' ``metric``, which must be one."""
    if metric not in numeric:
        return metric
    named = frame["metric"].drop_nulls().unique().to_list() if "metric" in frame.columns else []
    if len(named) > 1:
        raise ValueError(f"these predictions mix metrics {sorted(named)}: rank by one of them (--metric NAME) "
                         "or pass a direction (--ascending / --descending)")
    return named[0] if named else metric


def top_chains(
    store: WorkspaceStore,
    n: int,
    metric: str = "val_score",
    ascending: bool | None = None,
    partition: str = "val",
    dataset_name: str | None = None,
    group_by: str | None = "dataset_name",
) -> Ranking:
    """The best ``n`` chains (of each ``group_by`` group) by the mean of ``metric`` over their
    folds in ``partition``: a score column (``val_score`` ...) or a metric of the scores (``r2`` ...).
    ``ascending=None`` ranks in the metric's own direction; the result names it."""
    numeric = V.top_predictions_args(n, metric, ascending, group_by)
    if group_by is not None and group_by not in (*CHAIN_KEYS, *CHAIN_COLUMNS, "model_class", "metric"):
        raise ValueError(f"chains are ranked within one of {', '.join((*CHAIN_KEYS, *CHAIN_COLUMNS))}, not {group_by!r}")
    frame = store.query_predictions(partition=partition, dataset_name=dataset_name)
    if metric not in numeric:
        frame = with_scores(frame, [metric]).collect()
        if frame.height and frame[metric].is_null().all():
            raise ValueError(f"no prediction here has a {metric!r} score: rank by a score column "
                             f"({', '.join(sorted(numeric))}) or a metric their scores hold")
    named = _direction_metric(frame, metric, numeric)
    score = f"{metric}_mean"
    chains = (
        frame.group_by(list(CHAIN_KEYS), maintain_order=True)
        .agg(
            *[pl.col(c).first() for c in (*CHAIN_COLUMNS, "model_class", "metric")],
            pl.col(metric).mean().alias(score),
            pl.col(metric).std().alias(f"{metric}_std"),
            pl.col(metric).min().alias(f"{metric}_min"),
            pl.col(metric).max().alias(f"{metric}_max"),
            pl.col(metric).count().alias("n_folds"),
        )
    )
    ranked = top_k(chains, min(int(n), V.MAX_ROWS), score=score, by=group_by, ascending=ascending, metric=named)
    columns = ["rank", *CHAIN_KEYS, "preprocessings", "metric", score, f"{metric}_std",
               f"{metric}_min", f"{metric}_max", "n_folds", "pipeline_id", "run_id"]
    ranked = ranked.select(list(dict.fromkeys(columns)))
    direction = sc.direction(named) if ascending is None else ("asc" if ascending else "desc")
    return Ranking(ranked, score, named, direction, "chain", partition)


def top_predictions(store: WorkspaceStore, n: int, metric: str = "val_score", ascending: bool | None = None,
                    partition: str = "val", dataset_name: str | None = None,
                    group_by: str | None = "dataset_name") -> Ranking:
    """``store.top_predictions`` (single folds) with what it was ranked by."""
    frame = store.top_predictions(n, metric=metric, ascending=ascending, partition=partition,
                                  dataset_name=dataset_name, group_by=group_by)
    numeric = V.top_predictions_args(n, metric, ascending, group_by)
    named = _direction_metric(frame, metric, numeric) if frame.height else metric
    direction = sc.direction(named) if ascending is None else ("asc" if ascending else "desc")
    return Ranking(frame, metric, named, direction, "prediction", partition)


def present(store: WorkspaceStore) -> dict[str, list[str]]:
    """The dataset names and partitions the workspace's predictions hold: what a filter may name."""
    frame = store.query_predictions().select("dataset_name", "partition")
    return {column: sorted(frame[column].drop_nulls().unique().to_list()) for column in frame.columns}


def nothing_matched(store: WorkspaceStore, **filters: str | None) -> str | None:
    """When a filter names a value the workspace does not hold, a sentence saying what it holds."""
    held = present(store)
    if not held["dataset_name"]:
        return "this workspace holds no predictions yet"
    wrong = []
    for column, value in filters.items():
        if value is not None and column in held and "%" not in value and value not in held[column]:
            wrong.append(f"no {column.replace('_name', '')} {value!r} here; it holds: {', '.join(held[column])}")
    return "; ".join(wrong) or None


