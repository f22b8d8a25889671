"""The write path's shortcuts (issue 11) give the files the plain path gives: a writer publishes
its journal from the batches it appended rather than reading the segment back; a table splits by
partition without copying batches of one dataset; large publications encode partitions on
several threads; measured columns are written without a dictionary.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nirslake import WorkspaceStore
from nirslake.lake import schema as S
from nirslake.lake import tables
from nirslake.lake.storage import Storage


def sweep_into(store: WorkspaceStore, datasets=("corn", "wheat", "soy"), pipelines=6) -> None:
    """Pipelines on several datasets with every kind of array (missing ones, y_proba, weights),
    an explicit id, NaN and missing scores, unicode, a run re-read from the lake."""
    run = store.begin_run("r\u00e9", {"a": [1, 2]}, [{"name": d} for d in datasets])
    for p in range(pipelines):
        dataset = datasets[p % len(datasets)]
        pipe = store.begin_pipeline(run, f"p{p}", {"n": p}, {}, dataset, "h")
        artifact = store.save_artifact({"p": p}, "PLS", "model", "pickle")
        chain = store.save_chain(pipe, [{"artifact_id": artifact}], 0, "PLS", "SNV", "KFold", {"0": artifact}, {})
        for k in range(4):
            pid = store.save_prediction(
                pipe, chain, dataset, "PLS", "PLS", str(k), ("val", "test")[k % 2],
                None if k == 3 else float(k), float("nan"), 0.5, "rmse", "regression", 5, 3,
                {"val": {"rmse": k}}, {"\u00e9": p}, None, None, 0, 0.0, "SNV",
                f"explicit-{p}-{k}" if k == 0 else None,
            )
            y = np.arange(5.0) + p + k
            proba = np.full((5, 3), 1 / 3) if k == 1 else None
            weights = None if k else np.ones(5)
            store.save_prediction_arrays(pid, y, y + 1, proba, np.arange(5) if k == 2 else None, weights)
        store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 10)
    store.complete_run(run, {"done": True})


def files_of(workspace: str) -> dict[str, pa.Table]:
    storage = Storage(workspace)
    return {
        rel: pq.read_table(storage.path(rel))
        for rel in storage.list_files("tables")
        if not tables.is_schema_file(rel)
    }


def test_publishing_from_the_appended_batches_writes_what_reading_the_segment_back_writes(tmp_path):
    """The same journal segment published two ways: by its writer, from the batches it appended,
    and, in a copy of the workspace taken before, by recovery, which reads the file. Names
    derive from the segment, so both must give the same files, byte for byte in content."""
    mine, copy = str(tmp_path / "mine"), str(tmp_path / "copy")
    store = WorkspaceStore(mine, flush_bytes=2**40, flush_rows=10**9, flush_seconds=10**6)
    sweep_into(store)
    [segment] = store.storage.list_files("_journal", suffix=".wal")
    shutil.copytree(mine, copy)
    assert store._writer.journal.appended(segment)  # the writer kept the batches it appended
    store.close()  # publishes from memory
    with WorkspaceStore(copy):  # a crashed writer's segment: recovery reads it
        pass
    ours, recovered = files_of(mine), files_of(copy)
    assert set(ours) == set(recovered) and len(ours) >= 10
    for rel, table in ours.items():
        assert table.equals(recovered[rel]), rel
    assert not Storage(mine).list_files("_journal", suffix=".wal")


def test_a_failed_append_is_not_published_from_memory(tmp_path, monkeypatch):
    """A batch whose append failed is not in the segment: the writer must not publish it from
    memory either (it stays buffered and goes into the next batch)."""
    import os

    store = WorkspaceStore(str(tmp_path / "ws"), flush_bytes=2**40, flush_rows=10**9, flush_seconds=10**6)
    run = store.begin_run("r", {}, [{"name": "corn"}])
    store.flush()
    store.begin_pipeline(run, "p", {}, {}, "corn", "h")
    real = os.writev

    def full_disk(fd, pieces):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", full_disk)
    with pytest.raises(OSError):
        store._writer.commit()
    monkeypatch.setattr(os, "writev", real)
    for rel in store._writer.journal.segments:
        assert all(name != "pipelines:open" for name, _ in store._writer.journal.appended(rel) or [])
    store.close()
    with WorkspaceStore(str(tmp_path / "ws")) as reader:
        assert reader.list_pipelines().height == 1  # published once, by the retry


def test_splitting_by_partition_keeps_every_row_in_order():
    """Batches of one value are taken whole, mixed ones filtered: the parts are what filtering
    the whole table gives, in first-seen order, with nulls as their own part."""
    rng = np.random.default_rng(2)
    batches = []
    for i in range(30):
        if i % 3:  # one dataset per batch, as a durability point's rows usually are
            values = [["a", "b", None][i % 3]] * int(rng.integers(1, 6))
        else:
            values = rng.choice(["a", "b", "c\u00e9"], int(rng.integers(0, 6))).tolist()
        batches.append(pa.record_batch({"d": pa.array(values, pa.string()), "i": pa.array(range(len(values)), pa.int64())}))
    table = pa.Table.from_batches(batches)
    parts = tables.split_by_value(table, "d")
    seen = list(dict.fromkeys(table.column("d").to_pylist()))
    assert [value for value, _ in parts] == seen
    for value, part in parts:
        mask = [v == value for v in table.column("d").to_pylist()]
        assert part.combine_chunks().equals(table.filter(pa.array(mask)).combine_chunks())
    assert sum(part.num_rows for _, part in parts) == table.num_rows


def test_a_large_publication_encoded_on_several_threads_writes_the_files_one_thread_writes(tmp_path, monkeypatch):
    mine, single = str(tmp_path / "threads"), str(tmp_path / "single")
    rows = 3000
    rng = np.random.default_rng(4)
    arrays = pa.table({
        "prediction_id": [f"id{i:05d}" for i in range(rows)],
        "run_id": ["r"] * rows,
        "dataset_name": [("corn", "wheat", "soy")[i % 3] for i in range(rows)],
        "y_true": pa.array([rng.normal(size=400) for _ in range(rows)], S.F64_LIST),
        "_version": pa.array(range(rows), pa.int64()),
    })
    assert arrays.nbytes >= tables.PARALLEL_BYTES  # the threaded path is taken
    seed = (123, "segment")
    for workspace in (mine, single):
        WorkspaceStore(workspace).close()
    threaded = tables.write_table(Storage(mine), S.PREDICTION_ARRAYS, arrays, seed=seed)
    monkeypatch.setattr(tables, "PARALLEL_BYTES", 2**62)
    plain = tables.write_table(Storage(single), S.PREDICTION_ARRAYS, arrays, seed=seed)
    assert threaded == plain and len(plain) == 3
    for rel in plain:
        assert pq.read_table(Storage(mine).path(rel)).equals(pq.read_table(Storage(single).path(rel)))


def test_measured_columns_are_written_without_a_dictionary_or_per_sample_statistics_and_read_back_the_same():
    rng = np.random.default_rng(9)
    table = pa.table({
        "prediction_id": ["a", "b", "c"],
        "val_score": [0.1, None, 0.3],
        "y_true": pa.array([rng.normal(size=50), None, []], S.F64_LIST),
        "y_proba": pa.array([[[0.5, 0.5]] * 3, None, []], pa.list_(S.F64_LIST)),
        "sample_indices": pa.array([np.arange(50), None, []], pa.list_(pa.int64())),
    })
    data = tables.to_parquet_bytes(table, 2)
    dictionary, statistics = tables.encoded_columns(table.schema)
    assert "y_true.list.element" not in statistics and "val_score" in statistics and "prediction_id" in statistics
    meta = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert "RLE_DICTIONARY" not in encodings["y_true.list.element"]
    assert "RLE_DICTIONARY" not in encodings["y_proba.list.element.list.element"]
    assert "RLE_DICTIONARY" not in encodings["val_score"]
    assert "RLE_DICTIONARY" in encodings["prediction_id"] and "RLE_DICTIONARY" in encodings["sample_indices.list.element"]
    stats = {meta.column(i).path_in_schema: meta.column(i).statistics for i in range(meta.num_columns)}
    assert stats["y_true.list.element"] is None and stats["y_proba.list.element.list.element"] is None
    assert stats["prediction_id"].has_min_max and stats["val_score"].has_min_max
    assert pq.read_table(io.BytesIO(data)).equals(table)
