"""The lake's tables: their Arrow schemas, keys and partitioning (docs/lake-spec.md, section Tables).

Change a schema only by adding nullable columns at the end: old files still read, with nulls.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")
F64_LIST = pa.list_(pa.float64())

# Bumped whenever a schema or a view changes; the catalog is rebuilt when it differs.
FORMAT_VERSION = 3  # 2: prediction_arrays.sample_ids, and the score views (sql/views/50_scores.sql)
# 3: the nullable columns nirs4all 1.4.10 gives beyond the seed API (docs/nirs4all.md)


@dataclass(frozen=True)
class TableDef:
    name: str
    key: str
    schema: pa.Schema
    # Column whose highest value per key marks the current row (lake spec §5.1); None: keys are unique.
    version_column: str | None = None
    # Column whose value names the hive partition folder (``dataset=<encoded>``).
    partition_by: str | None = None
    # Large rows (arrays) get row groups of about this many bytes in memory, so key lookups read
    # little (spec §3); None: one per file.
    row_group_bytes: int | None = None

    @property
    def dir(self) -> str:
        return f"tables/{self.name}"


RUNS = TableDef(
    "runs",
    "run_id",
    pa.schema(
        [
            ("run_id", pa.string()),
            ("name", pa.string()),
            ("config", pa.string()),  # JSON
            ("datasets", pa.string()),  # JSON
            ("status", pa.string()),
            ("created_at", TS),
            ("completed_at", TS),
            ("summary", pa.string()),  # JSON
            ("error", pa.string()),
            ("_version", pa.int64()),
        ]
    ),
    version_column="_version",
)

PIPELINES = TableDef(
    "pipelines",
    "pipeline_id",
    pa.schema(
        [
            ("pipeline_id", pa.string()),
            ("run_id", pa.string()),
            ("name", pa.string()),
            ("expanded_config", pa.string()),  # JSON
            ("generator_choices", pa.string()),  # JSON
            ("dataset_name", pa.string()),
            ("dataset_hash", pa.string()),
            ("status", pa.string()),
            ("created_at", TS),
            ("completed_at", TS),
            ("best_val", pa.float64()),
            ("best_test", pa.float64()),
            ("metric", pa.string()),
            ("duration_ms", pa.int64()),
            ("error", pa.string()),
            ("_version", pa.int64()),
            ("original_template", pa.string()),  # JSON; format 3
        ]
    ),
    version_column="_version",
)

CHAINS = TableDef(
    "chains",
    "chain_id",
    pa.schema(
        [
            ("chain_id", pa.string()),
            ("pipeline_id", pa.string()),
            ("run_id", pa.string()),
            ("steps", pa.string()),  # JSON
            ("model_step_idx", pa.int64()),
            ("model_class", pa.string()),
            ("preprocessings", pa.string()),
            ("fold_strategy", pa.string()),
            ("fold_artifacts", pa.string()),  # JSON
            ("shared_artifacts", pa.string()),  # JSON
            ("branch_path", pa.string()),  # JSON
            ("source_index", pa.int64()),
            ("artifact_ids", pa.list_(pa.string())),  # every artifact the chain holds
            ("created_at", TS),
            # format 3: what nirs4all 1.4.10 records with a chain
            ("dataset_name", pa.string()),
            ("relation_replay_manifest", pa.string()),  # JSON
            ("relation_replay_version", pa.string()),
            ("relation_replay_fingerprint", pa.string()),
        ]
    ),
)

PREDICTIONS = TableDef(
    "predictions",
    "prediction_id",
    pa.schema(
        [
            ("prediction_id", pa.string()),
            ("pipeline_id", pa.string()),
            ("chain_id", pa.string()),
            ("run_id", pa.string()),
            ("dataset_name", pa.string()),
            ("model_name", pa.string()),
            ("model_class", pa.string()),
            ("fold_id", pa.string()),
            ("partition", pa.string()),
            ("val_score", pa.float64()),
            ("test_score", pa.float64()),
            ("train_score", pa.float64()),
            ("metric", pa.string()),
            ("task_type", pa.string()),
            ("n_samples", pa.int64()),
            ("n_features", pa.int64()),
            ("scores", pa.string()),  # JSON
            ("best_params", pa.string()),  # JSON
            ("branch_id", pa.int64()),
            ("branch_name", pa.string()),
            ("exclusion_count", pa.int64()),
            ("exclusion_rate", pa.float64()),
            ("preprocessings", pa.string()),
            ("created_at", TS),
            # format 3: nirs4all 1.4.10's refit context and lineage fields
            ("refit_context", pa.string()),
            ("prediction_scope", pa.string()),
            ("prediction_level", pa.string()),
            ("evaluation_scope", pa.string()),
            ("reduction_role", pa.string()),
            ("reduction_id", pa.string()),
            ("physical_sample_id", pa.string()),
            ("origin_sample_id", pa.string()),
            ("derived_unit_id", pa.string()),
            ("unit_level", pa.string()),
            ("unit_id", pa.string()),
            ("row_id", pa.string()),
            ("sample_influence_weight", pa.float64()),
        ]
    ),
    version_column="created_at",
    partition_by="dataset_name",
)

PREDICTION_ARRAYS = TableDef(
    "prediction_arrays",
    "prediction_id",
    pa.schema(
        [
            ("prediction_id", pa.string()),
            ("run_id", pa.string()),
            ("dataset_name", pa.string()),
            ("y_true", F64_LIST),
            ("y_pred", F64_LIST),
            ("y_proba", pa.list_(F64_LIST)),  # one inner list per sample: keeps the 2-D shape
            ("sample_indices", pa.list_(pa.int64())),
            ("weights", F64_LIST),
            ("_version", pa.int64()),
            # y_proba's width, which its inner lists cannot give when there are no samples.
            ("y_proba_classes", pa.int64()),
            # The sample each row measured, when samples are measured several times (docs/scores.md).
            ("sample_ids", pa.list_(pa.string())),
            # format 3: what nirs4all 1.4.10's array store keeps beyond these (docs/nirs4all.md):
            # shapes of multi-dimensional arrays (the arrays above hold them flattened / 2-D),
            # encoded class labels, the X and spectra matrices, per-sample and result metadata (JSON).
            ("y_true_shape", pa.list_(pa.int64())),
            ("y_pred_shape", pa.list_(pa.int64())),
            ("y_proba_shape", pa.list_(pa.int64())),
            ("y_true_labels", pa.string()),
            ("y_pred_labels", pa.string()),
            ("X", F64_LIST),
            ("X_shape", pa.list_(pa.int64())),
            ("spectra", F64_LIST),
            ("spectra_shape", pa.list_(pa.int64())),
            ("sample_metadata", pa.string()),  # JSON
            ("result_metadata", pa.string()),  # JSON
        ]
    ),
    version_column="_version",
    partition_by="dataset_name",
    row_group_bytes=128 * 1024,
)

ARTIFACTS = TableDef(
    "artifacts",
    "artifact_id",
    pa.schema(
        [
            ("artifact_id", pa.string()),
            ("content_hash", pa.string()),
            ("path", pa.string()),  # workspace-relative, or absolute for registered files
            ("operator_class", pa.string()),
            ("artifact_type", pa.string()),
            ("format", pa.string()),
            ("size_bytes", pa.int64()),
            ("created_at", TS),
        ]
    ),
    version_column="created_at",
)

LOGS = TableDef(
    "logs",
    "log_id",
    pa.schema(
        [
            ("log_id", pa.string()),
            ("pipeline_id", pa.string()),
            ("run_id", pa.string()),
            ("step_idx", pa.int64()),
            ("operator_class", pa.string()),
            ("event", pa.string()),
            ("duration_ms", pa.float64()),
            ("message", pa.string()),
            ("details", pa.string()),  # JSON
            ("level", pa.string()),
            ("created_at", TS),
            ("_version", pa.int64()),  # orders events logged within one clock tick
        ]
    ),
)

# Append-only deletion records: a row hides the entity (and, for runs, everything under it).
DELETIONS = TableDef(
    "deletions",
    "entity_id",
    pa.schema(
        [
            ("kind", pa.string()),  # run | pipeline | prediction | artifact
            ("entity_id", pa.string()),
            ("deleted_at", TS),
        ]
    ),
)

# Compaction commits: a row makes ``added`` files visible and hides ``removed`` ones, at once.
COMMITS = TableDef(
    "commits",
    "commit_id",
    pa.schema(
        [
            ("commit_id", pa.string()),
            ("table_name", pa.string()),
            ("added", pa.list_(pa.string())),
            ("removed", pa.list_(pa.string())),
            ("created_at", TS),
        ]
    ),
)

TABLES: dict[str, TableDef] = {
    t.name: t
    for t in (RUNS, PIPELINES, CHAINS, PREDICTIONS, PREDICTION_ARRAYS, ARTIFACTS, LOGS, DELETIONS, COMMITS)
}
