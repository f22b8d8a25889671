"""The per-process journal: durability points append framed records to a local, append-only file.

Publishing Parquet at every durability point would write several small files per pipeline;
instead each writer appends to its own journal and publishes the lake files in bulk (spec §6).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
import socket
import struct
import uuid
import zlib
from typing import Iterator

import pyarrow as pa

from .storage import Storage, arrow_owned
from .tables import CLOCK

JOURNAL_DIR = "_journal"
SUFFIX = ".wal"
_MAGIC = b"NLJ2"
_LEGACY_MAGIC = b"NLJ1"  # segments of format 1 had no end-of-batch frames: each frame stood alone
_HEADER = struct.Struct("<4sIQI")  # magic, name length, payload length, crc32 of payload
_END = "~end"  # the frame that closes one durability point's batch (no table has this name)


def _frame(name: str, records: pa.Table | dict[str, list]) -> bytes:
    """One frame: an Arrow IPC stream (dense arrays), or JSON columns (small metadata records,
    several times cheaper to encode per durability point than building Arrow columns)."""
    if isinstance(records, pa.Table):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, records.schema) as stream:
            stream.write_table(records)
        payload = b"A" + sink.getvalue().to_pybytes()
    else:
        payload = b"J" + json.dumps(records, separators=(",", ":"), default=_to_json).encode()
    key = name.encode()
    return _HEADER.pack(_MAGIC, len(key), len(payload), zlib.crc32(payload)) + key + payload


def _to_json(value: object) -> object:
    """Timestamps travel as µs since the epoch, the unit of every lake timestamp column."""
    if isinstance(value, datetime):
        return round(value.timestamp() * 1_000_000)
    raise TypeError(f"{type(value).__name__} cannot be journaled")


def read_frames(data: bytes) -> Iterator[tuple[str, pa.Table | dict[str, list]]]:
    """The frames of every whole batch of a journal segment.

    One durability point appends one batch: its frames, then an end frame. A crash mid-append
    can leave a torn or corrupt tail, or whole frames of a batch without its end frame; neither
    is yielded, since that durability point never returned. A torn tail ends the segment.
    """
    view = memoryview(data)  # slices without copying: a segment can be tens of MiB
    offset = 0
    batch: list[tuple[str, memoryview]] = []
    while offset + _HEADER.size <= len(data):
        magic, key_len, size, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        end = start + key_len + size
        if magic not in (_MAGIC, _LEGACY_MAGIC) or end > len(data):
            return
        payload = view[start + key_len : end]
        if zlib.crc32(payload) != crc:
            return
        name = bytes(view[start : start + key_len]).decode()
        offset = end
        if name == _END:
            yield from (_decode(n, p) for n, p in batch)
            batch = []
        elif magic == _LEGACY_MAGIC:
            yield _decode(name, payload)
        else:
            batch.append((name, payload))


def _decode(name: str, payload: memoryview) -> tuple[str, pa.Table | dict[str, list]]:
    if payload[:1] == b"A":
        return name, pa.ipc.open_stream(arrow_owned(payload[1:])).read_all()
    return name, json.loads(bytes(payload[1:]))


class Journal:
    """Append-only segments ``_journal/<host>~<pid>~<uuid>~<opened µs, 14 hex>.wal`` of one writer.

    A segment is never rewritten: once published to the lake it is deleted, and the next
    durability point starts a new one.
    """

    def __init__(self, storage: Storage):
        if not storage.is_local:
            raise ValueError("journals are kept on local workspaces only")
        self.storage = storage
        self.owner = f"{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:12]}"
        self._fh = None
        self.current: str | None = None
        self.bytes = 0
        self.opened_us = 0

    def append(self, frames: list[tuple[str, pa.Table | dict[str, list]]]) -> None:
        """Make ``frames`` durable: written (and fsynced when asked) before this returns."""
        if not frames:
            return
        if self._fh is None:
            self.opened_us = CLOCK.now_us()
            self.current = f"{JOURNAL_DIR}/{self.owner}~{self.opened_us:014x}{SUFFIX}"
            self._fh = self.storage.open_append(self.current)  # fsyncs its folder with fsync on
        # The end frame last: a batch cut short by a crash (a write() can be partial) is ignored
        # whole on recovery, so a durability point is all or nothing.
        data = b"".join(_frame(name, table) for name, table in frames) + _frame(_END, {})
        self._fh.write(data)
        self._fh.flush()  # into the OS: survives a crash of this process
        if self.storage.fsync:
            os.fsync(self._fh.fileno())  # onto the disk: survives a crash of the machine
        self.bytes += len(data)

    def seal(self) -> str | None:
        """Close the current segment and return it (None when empty); the next append starts another."""
        if self._fh is None:
            return None
        self._fh.close()
        self._fh = None
        rel, self.current = self.current, None
        self.bytes = 0
        return rel


def segment_stamp(rel: str) -> int:
    """The µs stamp a segment was opened at (its name's last field); its lake files carry it."""
    return int(os.path.basename(rel)[: -len(SUFFIX)].rsplit("~", 1)[1], 16)


def orphaned_segments(storage: Storage) -> list[str]:
    """Segments whose writer process is gone (same host, pid no longer running)."""
    if not storage.is_local:
        return []
    host = socket.gethostname()
    found = []
    for rel in storage.list_files(JOURNAL_DIR, suffix=SUFFIX):
        parts = os.path.basename(rel).split("~")
        if len(parts) == 4 and parts[0] == host and parts[1].isdigit() and not _alive(int(parts[1])):
            found.append(rel)
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unpublished_frames(storage: Storage) -> Iterator[tuple[str, pa.Table | dict[str, list]]]:
    """The durable, not yet published records of every writer's segments (gc and check count
    what they reference). A segment published and deleted meanwhile is skipped: its records are
    in the lake by then."""
    if not storage.is_local:
        return
    for rel in storage.list_files(JOURNAL_DIR, suffix=SUFFIX):
        try:
            data = storage.read_bytes(rel)
        except FileNotFoundError:
            continue
        yield from read_frames(data)
