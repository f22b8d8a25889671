"""Exports of stored records to files a person or another tool opens: a run as YAML, a pipeline's
config as JSON, predictions as one Parquet file (a chain's ``.n4a`` bundle: ``bundles``).

The store reads the records; these functions only write them out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl

from .jsonable import plain



def with_suffix(output_path: str | os.PathLike, suffix: str) -> Path:
    path = Path(output_path)
    return path if path.suffix else path.with_suffix(suffix)


def export_pipeline_config(pipeline: dict, output_path: str | os.PathLike) -> Path:
    """The pipeline's expanded config as JSON (``.json`` added when the path has no suffix)."""
    target = with_suffix(output_path, ".json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(pipeline["expanded_config"], indent=2), encoding="utf-8")
    return target


def export_run(run: dict, pipelines: list[dict], chains: list[dict], output_path: str | os.PathLike) -> Path:
    """The run, its pipelines and each pipeline's chains (all decoded) as YAML (``.yaml`` added when no suffix)."""
    import yaml

    by_pipeline: dict[str, list] = {}
    for chain in chains:
        by_pipeline.setdefault(chain["pipeline_id"], []).append(chain)
    for p in pipelines:
        p["chains"] = by_pipeline.get(p["pipeline_id"], [])
    document = plain({"run": run, "pipelines": pipelines})
    target = with_suffix(output_path, ".yaml")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return target


def export_predictions_parquet(frame: pl.DataFrame, output_path: str | os.PathLike) -> Path:
    """``frame`` written as one Parquet file (also when empty)."""
    target = Path(output_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(target)
    return target
