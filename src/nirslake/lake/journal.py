"""The per-process journal: durability points append framed batches to a local, append-only file.

Publishing Parquet at every durability point would write several small files per pipeline;
instead each writer appends to its own journal and publishes the lake files in bulk (spec §6).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import uuid
import warnings
import zlib
from datetime import datetime
from typing import Iterator

import pyarrow as pa

from .storage import Storage, arrow_owned
from .tables import CLOCK

JOURNAL_DIR = "_journal"
SUFFIX = ".wal"
DAMAGED_SUFFIX = ".damaged"  # a crashed writer's segment with damage inside: published, kept, reported
_MAGIC = b"NLJ3"
_HEAD = struct.Struct("<4sQI")  # magic, payload length, crc32 of the payload
_HEAD_CRC = struct.Struct("<I")  # crc32 of the head: a flipped bit in a length is seen, not followed
_HEADER_SIZE = _HEAD.size + _HEAD_CRC.size
_RECORD = struct.Struct("<HQ")  # one table's records inside a batch: name length, body length
# Segments written by earlier versions: NLJ2 frames (one per table) closed by an end frame per
# batch; NLJ1 frames each stood alone. Read so that their crashed writers' records are published.
_LEGACY_MAGICS = (b"NLJ2", b"NLJ1")
_LEGACY_HEADER = struct.Struct("<4sIQI")  # magic, name length, payload length, crc32 of payload
_LEGACY_END = "~end"

Frames = list[tuple[str, "pa.Table | dict[str, list]"]]


def encode_batch(frames: Frames) -> list:
    """One durability point as ONE frame: a head, its crc, then each table's records.

    A single crc covers the whole batch, so a batch is whole or not at all by construction.
    Returns the pieces (written with one ``writev``) rather than joining them: arrays can be
    tens of MiB.
    """
    pieces: list = []
    crc = size = 0
    for name, records in frames:
        body = _encode(records)
        key = name.encode()
        record = _RECORD.pack(len(key), len(body)) + key
        for piece in (record, body):
            crc = zlib.crc32(piece, crc)
            size += len(piece)
            pieces.append(piece)
    head = _HEAD.pack(_MAGIC, size, crc)
    return [head + _HEAD_CRC.pack(zlib.crc32(head)), *pieces]


def _encode(records: pa.Table | dict[str, list]) -> bytes | pa.Buffer:
    """An Arrow IPC stream (dense arrays), or JSON columns (small metadata records, several
    times cheaper to encode per durability point than building Arrow columns)."""
    if isinstance(records, pa.Table):
        sink = pa.BufferOutputStream()
        sink.write(b"A")
        with pa.ipc.new_stream(sink, records.schema) as stream:
            stream.write_table(records)
        return sink.getvalue()
    return b"J" + json.dumps(records, separators=(",", ":"), default=_to_json).encode()


def _to_json(value: object) -> object:
    """Timestamps travel as µs since the epoch, the unit of every lake timestamp column."""
    if isinstance(value, datetime):
        return round(value.timestamp() * 1_000_000)
    raise TypeError(f"{type(value).__name__} cannot be journaled")


def _decode(name: str, body: memoryview) -> tuple[str, pa.Table | dict[str, list]]:
    if body[:1] == b"A":
        return name, pa.ipc.open_stream(arrow_owned(body[1:])).read_all()
    return name, json.loads(bytes(body[1:]))


class SegmentScan:
    """What a segment holds: its whole batches, and the byte ranges that could not be read.

    A torn tail (the last append cut short by a crash, which never returned) is not damage;
    anything else unreadable is: some acknowledged batch may be in it.
    """

    def __init__(self, data: bytes):
        self.batches: list[list[tuple[str, memoryview]]] = []
        self.damage: list[str] = []
        self._view = memoryview(data)  # slices without copying: a segment can be tens of MiB
        if data[:4] in _LEGACY_MAGICS:
            self._scan_legacy(data)
        else:
            self._scan(data)

    def frames(self, names: frozenset[str] | None = None) -> Iterator[tuple[str, pa.Table | dict[str, list]]]:
        """The decoded records, of the tables in ``names`` only when given (the rest is not decoded)."""
        for batch in self.batches:
            for name, body in batch:
                if names is None or name in names:
                    yield _decode(name, body)

    def _scan(self, data: bytes) -> None:
        """Frame by frame; after an unreadable stretch, on from the next frame that checks out,
        so damage in one place never hides the batches after it."""
        offset, bad_from, end_of_data = 0, None, len(data)
        while offset < end_of_data:
            batch, next_offset = self._frame_at(data, offset)
            if batch is None and next_offset is None:  # a torn tail: the last append, cut short
                break
            if batch is None:
                bad_from = offset if bad_from is None else bad_from
                found = data.find(_MAGIC, offset + 1)
                offset = end_of_data if found < 0 else found
                continue
            if bad_from is not None:
                self.damage.append(f"bytes {bad_from}-{offset} unreadable")
                bad_from = None
            self.batches.append(batch)
            offset = next_offset
        if bad_from is not None:
            self.damage.append(f"bytes {bad_from}-{offset} unreadable")

    def _frame_at(self, data: bytes, offset: int) -> tuple[list | None, int | None]:
        """(batch, end) of the frame at ``offset``; (None, None) for a torn tail; (None, 0) when
        the bytes there are not a readable frame."""
        if len(data) - offset < _HEADER_SIZE:
            return None, None
        head = self._view[offset : offset + _HEAD.size]
        magic, size, crc = _HEAD.unpack_from(data, offset)
        (head_crc,) = _HEAD_CRC.unpack_from(data, offset + _HEAD.size)
        if magic != _MAGIC or zlib.crc32(head) != head_crc:
            return None, 0
        start, end = offset + _HEADER_SIZE, offset + _HEADER_SIZE + size
        if end > len(data):
            return None, None  # a whole head whose payload was never all written
        payload = self._view[start:end]
        if zlib.crc32(payload) != crc:
            return None, 0
        batch, at = [], 0
        while at < size:
            key_len, body_len = _RECORD.unpack_from(payload, at)
            at += _RECORD.size
            name = bytes(payload[at : at + key_len]).decode()
            batch.append((name, payload[at + key_len : at + key_len + body_len]))
            at += key_len + body_len
        return batch, end

    def _scan_legacy(self, data: bytes) -> None:
        """Whole batches up to the first frame that does not read; what follows it is damage,
        unless it is a torn tail."""
        offset, batch = 0, []
        while offset + _LEGACY_HEADER.size <= len(data):
            magic, key_len, size, crc = _LEGACY_HEADER.unpack_from(data, offset)
            start = offset + _LEGACY_HEADER.size
            end = start + key_len + size
            if end > len(data):
                return  # torn tail
            payload = self._view[start + key_len : end]
            if magic not in _LEGACY_MAGICS or zlib.crc32(payload) != crc:
                self.damage.append(f"bytes {offset}-{len(data)} unreadable (older journal format)")
                return
            name = bytes(self._view[start : start + key_len]).decode()
            offset = end
            if name == _LEGACY_END:
                self.batches.append(batch)
                batch = []
            elif magic == b"NLJ1":
                self.batches.append([(name, payload)])
            else:
                batch.append((name, payload))


def read_frames(data: bytes) -> Iterator[tuple[str, pa.Table | dict[str, list]]]:
    """The records of every whole batch of a journal segment, in order."""
    return SegmentScan(data).frames()


def read_segment(data: bytes) -> tuple[Frames, list[str]]:
    """The decoded records of every whole batch, and the damage found; holds no reference to
    ``data``, so a publication does not keep the segment's bytes in memory beside its records."""
    scan = SegmentScan(data)
    return list(scan.frames()), scan.damage


class Journal:
    """Append-only segments ``_journal/<host>~<pid>~<uuid>~<opened µs, 14 hex>.wal`` of one writer.

    The host and pid in the name are for people; liveness is the lock: the writer holds
    ``flock(LOCK_EX)`` on each of its segments from before its name appears until it was
    published and deleted, so a recoverer that gets the lock knows the writer is gone.
    A segment is never rewritten, except that a failed append is cut off again.
    """

    def __init__(self, storage: Storage):
        if not storage.is_local:
            raise ValueError("journals are kept on local workspaces only")
        self.storage = storage
        self.owner = _new_owner()
        self._fd: int | None = None
        self._sealed: dict[str, int] = {}  # sealed segments (oldest first), locked until released
        self.current: str | None = None
        self.bytes = 0
        self.opened_us = 0
        # The batches appended to each segment, as given: publishing them needs no re-reading
        # and decoding of what this process just wrote (bounded, as the segment is, by the
        # writer's flush size). Recovery of a crashed writer's segment reads the file.
        self._batches: dict[str, list[Frames]] = {}

    def append(self, frames: Frames) -> None:
        """Make ``frames`` durable as one batch: written (and fsynced when asked) before this returns.

        A failed write (disk full, file too large) is cut off again, so the retry's batch follows
        the last whole one; when even that fails, this segment is sealed as it is (its torn tail
        is ignored) and the retry starts a new one.
        """
        if not frames:
            return
        pieces = encode_batch(frames)
        if self._fd is None:
            self.opened_us = CLOCK.now_us()
            rel = f"{JOURNAL_DIR}/{self.owner}~{self.opened_us:014x}{SUFFIX}"
            # Named as current only once it exists: a failed open (disk full, no descriptor left)
            # must not leave a segment to publish that was never created.
            self._fd = self.storage.open_append(rel)  # locked before its name appears
            self.current = rel
            self.bytes = 0
        total = sum(len(p) for p in pieces)
        try:
            written = os.writev(self._fd, pieces)
            if written < total:  # a short write: the rest, or the error that stopped it
                rest = memoryview(b"".join(pieces))
                while written < total:
                    written += os.write(self._fd, rest[written:])
            if self.storage.fsync:
                os.fsync(self._fd)  # onto the disk: survives a crash of the machine
        except BaseException:
            try:
                os.ftruncate(self._fd, self.bytes)
            except OSError:
                self.seal()
            raise
        self.bytes += total
        self._batches.setdefault(self.current, []).append(frames)

    def appended(self, rel: str) -> Frames | None:
        """The records of every batch this journal appended to ``rel``, in order (None when it
        did not write it): what reading the segment back would give, without the reading."""
        batches = self._batches.get(rel)
        return None if batches is None else [frame for batch in batches for frame in batch]

    def seal(self) -> str | None:
        """Stop appending to the current segment and return it (None when there is none); the
        next append starts another. Its lock stays held until ``release``."""
        if self._fd is None:
            return None
        rel, self.current = self.current, None
        self._sealed[rel], self._fd = self._fd, None
        self.bytes = 0
        return rel

    @property
    def segments(self) -> list[str]:
        """Segments holding records not yet published: the sealed ones, oldest first, then the current one."""
        return [*self._sealed, *([self.current] if self.current else [])]

    def release(self, rel: str) -> None:
        """Unlock a sealed segment once it is published and deleted."""
        fd = self._sealed.pop(rel, None)
        self._batches.pop(rel, None)
        if fd is not None:
            os.close(fd)

    def forget(self) -> None:
        """In a forked child: drop the parent's segments without unlocking them (the lock belongs
        to the open file the parent shares) and take a journal identity of our own."""
        for fd in [self._fd, *self._sealed.values()]:
            if fd is not None:
                os.close(fd)  # the parent's descriptor stays open, so its lock stays held
        self.owner = _new_owner()
        self._fd, self._sealed, self.current, self.bytes = None, {}, None, 0
        self._batches = {}


def _new_owner() -> str:
    return f"{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:12]}"


def segment_stamp(rel: str) -> int:
    """The µs stamp a segment was opened at (its name's last field); its lake files carry it."""
    return int(os.path.basename(rel).rsplit(".", 1)[0].rsplit("~", 1)[1], 16)


def keep_damaged(storage: Storage, rel: str, damage: list[str]) -> str:
    """Set a damaged segment aside (its whole batches are published): renamed, so no one
    publishes it again, and never deleted, since the damage may hide acknowledged records."""
    kept = rel[: -len(SUFFIX)] + DAMAGED_SUFFIX
    os.replace(storage.path(rel), storage.path(kept))
    warnings.warn(
        f"nirslake: journal segment {rel} is damaged ({'; '.join(damage)}); its whole batches are published "
        f"and the file is kept as {kept} for inspection: `nirslake check` reports it until you delete it",
        stacklevel=2,
    )
    return kept


def damaged_segments(storage: Storage) -> list[str]:
    """Journal segments kept because damage inside them may hold acknowledged records: their
    whole batches are published; the file stays for inspection until someone deletes it."""
    if not storage.is_local:
        return []
    return storage.list_files(JOURNAL_DIR, suffix=DAMAGED_SUFFIX)


def unpublished_frames(
    storage: Storage, names: frozenset[str] | None = None
) -> Iterator[tuple[str, pa.Table | dict[str, list]]]:
    """(table key, records) of every whole batch in every segment under ``_journal/`` now: live
    writers', crashed writers' and damaged ones; of the keys in ``names`` only, when given (gc
    needs no arrays decoded). Read only; a segment that is published and deleted while this runs
    is skipped. Keys are ``writer.FLUSH_ORDER`` names."""
    if not storage.is_local:
        return
    for suffix in (SUFFIX, DAMAGED_SUFFIX):
        for rel in storage.list_files(JOURNAL_DIR, suffix=suffix):
            try:
                data = storage.read_bytes(rel)
            except FileNotFoundError:
                continue
            yield from SegmentScan(data).frames(names)
