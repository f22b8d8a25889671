"""The journal (lake spec §6): durable at once, published in bulk, recovered after a crash."""

from __future__ import annotations

import os
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import nirslake.query as q
from nirslake import WorkspaceStore
from nirslake.lake.journal import JOURNAL_DIR, Journal, SegmentScan, encode_batch, read_frames
from nirslake.lake.storage import Storage
from nirslake.lake.writer import publish_segment, recover_orphans


def _one_pipeline(store: WorkspaceStore, n: int = 3) -> str:
    run = store.begin_run("r", {}, [])
    pipe = store.begin_pipeline(run, "p", {}, {}, "wheat", "h")
    for fold in range(n):
        pid = store.save_prediction(pipe, None, "wheat", "m", "M", fold, "val", 0.1, 0.2, 0.3, "rmse", "regression",
                                    4, 2, {}, {}, None, None, 0, 0.0)
        store.save_prediction_arrays(pid, [1.0, 2.0, 3.0, 4.0], [1.1, 2.1, 2.9, 4.2])
    store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 7)
    return pipe


def test_frames_round_trip_and_a_torn_tail_is_ignored(workspace):
    journal = Journal(Storage(workspace))
    journal.append([("predictions", [{"prediction_id": "a"}]), ("prediction_arrays", pa.table({"x": [1.0, 2.0]}))])
    journal.append([("logs", [{"log_id": "l1"}])])
    path = Storage(workspace).path(journal.seal())
    data = open(path, "rb").read()
    frames = list(read_frames(data + data[:25]))  # a crash in the middle of a third append
    assert [name for name, _ in frames] == ["predictions", "prediction_arrays", "logs"]
    assert frames[1][1].column("x").to_pylist() == [1.0, 2.0]
    corrupt = bytearray(data)
    corrupt[-2] ^= 0xFF  # a flipped byte in the last frame's payload fails its checksum
    assert [name for name, _ in read_frames(bytes(corrupt))] == ["predictions", "prediction_arrays"]


def test_a_batch_cut_between_two_of_its_frames_is_ignored_whole(workspace):
    """A durability point is all or nothing: a crash can cut a write() between two whole frames."""
    storage = Storage(workspace)
    journal = Journal(storage)
    journal.append([("pipelines", [{"pipeline_id": "p", "status": "running"}])])
    first = os.path.getsize(storage.path(journal.current))
    journal.append([("predictions", [{"prediction_id": "a"}]), ("pipelines", [{"pipeline_id": "p", "status": "completed"}])])
    data = open(storage.path(journal.seal()), "rb").read()
    whole = [name for name, _ in read_frames(data)]
    assert whole == ["pipelines", "predictions", "pipelines"]
    for cut in range(first, len(data)):  # every cut inside the second batch, frame boundaries included
        assert [name for name, _ in read_frames(data[:cut])] == ["pipelines"], cut


def test_a_durability_point_is_in_the_journal_until_published(workspace):
    with WorkspaceStore(workspace) as store:
        _one_pipeline(store)
        assert q.scan(workspace, "predictions").collect().height == 0  # not published yet
        assert len(os.listdir(os.path.join(workspace, JOURNAL_DIR))) == 1
        store.flush()
        assert q.scan(workspace, "predictions").collect().height == 3
        assert os.listdir(os.path.join(workspace, JOURNAL_DIR)) == []


def test_a_writer_publishes_by_age_without_being_asked(workspace):
    with WorkspaceStore(workspace, flush_seconds=0) as store:
        _one_pipeline(store)
        assert q.scan(workspace, "predictions").collect().height == 3


def test_a_writer_publishes_by_size(workspace):
    with WorkspaceStore(workspace, flush_bytes=1) as store:
        _one_pipeline(store)
        assert q.scan(workspace, "prediction_arrays").collect().height == 3


def test_publishing_a_segment_twice_adds_nothing(workspace):
    store = WorkspaceStore(workspace)
    _one_pipeline(store)
    segment = store._writer.journal.seal()
    data = Storage(workspace).read_bytes(segment)
    publish_segment(Storage(workspace), segment)
    Storage(workspace).publish(segment, data)  # as if a crash came before the delete
    publish_segment(Storage(workspace), segment)
    assert q.scan(workspace, "predictions").collect().height == 3
    assert q.scan(workspace, "prediction_arrays").collect().height == 3
    store._writer.journal.release(segment)
    store.close()


def test_a_segment_is_recovered_once_no_one_holds_its_lock(workspace):
    """Liveness is the writer's lock on its segment, whatever host or pid its name shows."""
    store = WorkspaceStore(workspace)
    run = store.begin_run("live", {}, [])
    store.fail_run(run, "boom")  # durable in the live store's journal
    storage = Storage(workspace)
    [live] = os.listdir(storage.path(JOURNAL_DIR))
    gone = f"{JOURNAL_DIR}/elsewhere~1~abc~00000000000001.wal"
    storage.publish(gone, storage.read_bytes(f"{JOURNAL_DIR}/{live}"))  # a copy no process holds
    assert recover_orphans(storage) == []
    assert os.listdir(storage.path(JOURNAL_DIR)) == [live]
    assert set(q.scan(workspace, "runs").collect()["run_id"]) == {run}
    store.close()


def test_a_failed_append_that_cannot_be_cut_off_leaves_its_segment_for_publication(local_workspace, monkeypatch):
    """Disk full mid-append and the cut-off fails too: that segment is sealed with its torn tail
    (ignored, not damage) and the retry starts a new one; both are published, nothing twice."""
    store = WorkspaceStore(local_workspace, flush_seconds=3600)
    first = store.begin_run("first", {}, [])
    store.fail_run(first, "a")  # one whole batch in the segment
    real_write = os.writev

    def torn(fd, pieces):
        os.write(fd, bytes(pieces[0])[:10])
        raise OSError(28, "No space left on device")

    def refused(fd, length):
        raise OSError(5, "Input/output error")

    second = store.begin_run("second", {}, [])
    monkeypatch.setattr(os, "writev", torn)
    monkeypatch.setattr(os, "ftruncate", refused)
    with pytest.raises(OSError, match="No space left"):
        store.fail_run(second, "b")
    monkeypatch.undo()
    assert os.writev is real_write
    store.fail_run(second, "b")  # the retry, into a new segment
    assert len(os.listdir(os.path.join(local_workspace, JOURNAL_DIR))) == 2
    store.close()
    assert os.listdir(os.path.join(local_workspace, JOURNAL_DIR)) == []
    # The lake's files, not the resolved copies a checkpoint wrote beside them (lake spec §11).
    rows = pq.read_table(os.path.join(local_workspace, "tables", "runs"), ignore_prefixes=[".", "_", "current-"]).to_pylist()
    # each run's open and failed rows, plus the failed row the retry added: the torn batch never landed
    assert sorted(r["name"] for r in rows) == ["first", "first", "second", "second", "second"]
    with WorkspaceStore(local_workspace) as reader:
        assert {r: reader.get_run(r)["status"] for r in (first, second)} == {first: "failed", second: "failed"}


def _batch_bytes(*names: str) -> bytes:
    return b"".join(bytes(piece) for piece in encode_batch([(name, {"x": [name]}) for name in names]))


def test_damage_hides_only_its_own_batch_and_is_told_apart_from_a_torn_tail():
    batches = [_batch_bytes("a"), _batch_bytes("b", "c"), _batch_bytes("d")]
    data = b"".join(batches)
    flipped = bytearray(data)
    flipped[len(batches[0]) + 30] ^= 1  # inside the second batch's payload
    scan = SegmentScan(bytes(flipped))
    assert [name for name, _ in scan.frames()] == ["a", "d"]
    assert scan.damage == [f"bytes {len(batches[0])}-{len(batches[0]) + len(batches[1])} unreadable"]
    length_flipped = bytearray(data)
    length_flipped[len(data) - len(batches[2]) + 5] ^= 1  # the last frame's payload length
    scan = SegmentScan(bytes(length_flipped))
    assert [name for name, _ in scan.frames()] == ["a", "b", "c"] and len(scan.damage) == 1
    torn = SegmentScan(data + batches[0][:-1])  # an append cut short: not damage
    assert [name for name, _ in torn.frames()] == ["a", "b", "c", "d"] and torn.damage == []


def test_segments_of_the_older_format_are_still_read():
    def frame(name: str, payload: bytes, magic: bytes = b"NLJ2") -> bytes:
        key = name.encode()
        return struct.pack("<4sIQI", magic, len(key), len(payload), zlib.crc32(payload)) + key + payload

    end = frame("~end", b"J{}")
    data = frame("logs", b'J{"x":[1]}') + end + frame("logs", b'J{"x":[2]}') + end + frame("logs", b'J{"x":[3]}')
    assert [records for _, records in read_frames(data)] == [{"x": [1]}, {"x": [2]}]  # the last batch had no end
    broken = bytearray(data)
    broken[-3] ^= 1
    scan = SegmentScan(bytes(broken) + end)
    assert len(list(scan.frames())) == 2 and scan.damage
