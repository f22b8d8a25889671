"""Remote reads by range (issue 11): a remote file's footer comes from its tail, and an array
lookup fetches only the row groups that can hold its id. The answers must be those of reading
whole files; the requests are counted, as they are the cost on a real object store."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nirslake import WorkspaceStore
from nirslake.lake import schema as S
from nirslake.lake import tables
from nirslake.lake.storage import Storage
from nirslake.lake.tables import FileCache


def sweep(workspace: str, pipelines: int = 12, samples: int = 300) -> dict[str, np.ndarray]:
    saved = {}
    with WorkspaceStore(workspace) as store:
        run = store.begin_run("r", {}, [{"name": "corn"}, {"name": "wheat"}])
        for p in range(pipelines):
            dataset = ("corn", "wheat")[p % 2]
            pipe = store.begin_pipeline(run, f"p{p}", {}, {}, dataset, "h")
            chain = store.save_chain(pipe, [], 0, "PLS", "SNV", "KFold", {}, {})
            for k in range(15):
                pid = store.save_prediction(
                    pipe, chain, dataset, "PLS", "PLS", str(k % 5), "val", float(k), 0.0, 0.0, "rmse", "regression",
                    samples, 5, {}, {}, None, None, 0, 0.0, "SNV",
                )
                y = np.random.default_rng(p * 100 + k).normal(size=samples)
                store.save_prediction_arrays(pid, y, y * 2, np.full((samples, 2), 0.5) if k == 3 else None)
                saved[pid] = y
            store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 5)
    return saved


class Requests:
    """Counts the object-store calls a Storage makes (each is one request, a ranged GET per span)."""

    def __init__(self, storage: Storage, monkeypatch):
        self.gets = 0
        self.bytes = 0
        fs = storage.fs
        cat_file, cat_ranges = fs.cat_file, fs.cat_ranges

        def counted_cat_file(path, *a, **k):
            data = cat_file(path, *a, **k)
            self.gets += 1
            self.bytes += len(data)
            return data

        def counted_cat_ranges(paths, starts, ends, **k):
            data = cat_ranges(paths, starts, ends, **k)
            self.gets += len(paths)
            self.bytes += sum(len(d) for d in data if isinstance(d, bytes))
            return data

        monkeypatch.setattr(fs, "cat_file", counted_cat_file)
        monkeypatch.setattr(fs, "cat_ranges", counted_cat_ranges)


def arrays_files(storage: Storage) -> list[str]:
    return tables.with_rows(storage.list_files(S.PREDICTION_ARRAYS.dir))


def test_a_remote_footer_read_from_the_tail_is_the_whole_files_footer(s3_workspace, monkeypatch):
    sweep(s3_workspace, pipelines=4)
    storage = Storage(s3_workspace)
    for guess in (tables.FOOTER_GUESS, 64):  # 64 bytes: the footer is larger, a second GET fetches it
        monkeypatch.setattr(tables, "FOOTER_GUESS", guess)
        for rel in arrays_files(storage) + tables.with_rows(storage.list_files(S.PREDICTIONS.dir)):
            counted = Requests(storage, monkeypatch)
            footer = FileCache().metadata(storage, rel)
            gets, fetched = counted.gets, counted.bytes
            data = storage.read_bytes(rel)
            assert footer.equals(pq.read_metadata(pa.BufferReader(data))), rel
            assert gets == (1 if guess > 1000 else 2)
            if guess < 1000:  # the second GET asks for the footer alone
                assert fetched < guess + footer.serialized_size + 8 + 1


def test_a_remote_row_group_read_by_range_equals_the_whole_file_read(s3_workspace):
    sweep(s3_workspace, pipelines=4)
    storage = Storage(s3_workspace)
    for rel in arrays_files(storage):
        meta = FileCache().metadata(storage, rel)
        whole = pq.ParquetFile(pa.BufferReader(storage.read_bytes(rel)))
        groups = list(range(meta.num_row_groups))
        for chosen in ([0], [groups[-1]], groups[1:3], groups, []):
            assert tables._read_row_groups(storage, rel, meta, chosen).equals(whole.read_row_groups(chosen)), (rel, chosen)


def test_a_remote_array_lookup_fetches_one_range_once_the_footer_is_known(s3_workspace, tmp_path, monkeypatch):
    # Written locally (one publication at close: files of many row groups, as a sweep's are),
    # then copied to the bucket; a store on S3 publishes at every durability point instead.
    local = str(tmp_path / "ws")
    saved = sweep(local)
    storage = Storage(s3_workspace)
    storage.fs.put(local.rstrip("/") + "/", storage.path(), recursive=True)
    assert max(FileCache().metadata(storage, rel).num_row_groups for rel in arrays_files(storage)) > 2
    local_copy = {}
    with WorkspaceStore(s3_workspace) as store:
        ids = sorted(saved)[::17]
        for pid in ids:  # the first lookups read the footers
            store.get_prediction(pid, load_arrays=True)
        counted = Requests(store.storage, monkeypatch)
        for pid in ids:
            row = store.get_prediction(pid, load_arrays=True)
            np.testing.assert_array_equal(row["y_true"], saved[pid])
            np.testing.assert_array_equal(row["y_pred"], saved[pid] * 2)
            local_copy[pid] = row
        # One GET per lookup: the row group's range (the predictions files are cached, and
        # listings are LISTs, not counted here); no more bytes than its largest row group.
        assert counted.gets == len(ids)
        fetched = counted.bytes
        largest_group = max(
            end - start
            for rel in arrays_files(store.storage)
            for g in range(FileCache().metadata(store.storage, rel).num_row_groups)
            for start, end in tables.row_group_spans(FileCache().metadata(store.storage, rel), [g])
        )
        smallest_file = min(store.storage.size(rel) for rel in arrays_files(store.storage))
        assert fetched <= len(ids) * largest_group < len(ids) * smallest_file
    with WorkspaceStore(s3_workspace) as reopened:  # cold: the footers are read again
        for pid in ids:
            row = reopened.get_prediction(pid, load_arrays=True)
            for key, value in row.items():
                if isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(value, local_copy[pid][key])
                else:
                    assert value == local_copy[pid][key], key


def test_a_lookup_after_a_remote_ranking_fetches_no_predictions_file_again(s3_workspace, monkeypatch):
    """Issue 11: the files a top-k decoded (polars) serve the lookups after it (pyarrow) without a
    second GET each; the rows are those a fresh store reads from the files."""
    saved = sweep(s3_workspace, pipelines=4, samples=20)
    ids = sorted(saved)[::7]
    with WorkspaceStore(s3_workspace) as store:
        store.top_predictions(5, group_by="dataset_name")
        counted = Requests(store.storage, monkeypatch)
        served = {pid: store.get_prediction(pid) for pid in ids}
        assert counted.gets == 0, "the predictions files were fetched again"
        monkeypatch.undo()
    with WorkspaceStore(s3_workspace) as fresh:
        assert served == {pid: fresh.get_prediction(pid) for pid in ids}
        assert all(row is not None for row in served.values())


def test_a_truncated_remote_file_is_named(s3_workspace):
    sweep(s3_workspace, pipelines=2)
    storage = Storage(s3_workspace)
    rel = arrays_files(storage)[0]
    storage.publish(rel, storage.read_bytes(rel)[:-20], overwrite=True)  # the tail is gone
    with pytest.raises(tables.CorruptFileError, match=rel):
        FileCache().metadata(storage, rel)
