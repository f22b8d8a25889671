"""Paths and bytes of a workspace: every read, write, listing and delete goes through here.

A workspace is a local folder or any fsspec URL; nothing above this module knows which.
"""

from __future__ import annotations

import fcntl
import functools
import os
import posixpath
import uuid
from collections.abc import Iterable
from typing import Any

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

STAGING_DIR = "_staging"
LISTING_CACHE_OFF = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


# Location -> [count of publishes and deletes made by this process there] (``Storage.generation``).
_CHANGES: dict[str, list[int]] = {}


class Storage:
    """An fsspec filesystem rooted at a workspace, with publish-once writes.

    ``publish`` is the only way data files enter the lake: the bytes are written under
    ``_staging/`` (outside every globbed tree), made durable, then moved into place, so a
    reader sees either no file or the whole file. On object stores a PUT is already atomic,
    so the object is written straight to its final key.
    """

    def __init__(self, workspace: str | os.PathLike, storage_options: dict | None = None, fsync: bool = False):
        url = os.fspath(workspace)
        options = dict(storage_options or {})
        if fsspec.core.split_protocol(url)[0] in LISTING_CACHE_OFF:
            # Other machines add files at any time: a cached listing would hide them (and a
            # cached modification time would mislead gc), so every listing asks the store.
            options.setdefault("use_listings_cache", False)
        self.fs, root = fsspec.core.url_to_fs(url, **options)
        self.storage_options = dict(storage_options or {})
        # Without fsync a published file survives a crash of the process (it is in the OS);
        # with it, also a crash of the machine.
        self.fsync = fsync
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            root = os.path.abspath(root)
        self.root = root.rstrip("/") or "/"
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.protocol = "file" if self.is_local else protocol
        # Counts this process's publishes and deletes at this location, through any Storage of it
        # (one process reads what any of its stores wrote, lake spec §6): a listing taken at an
        # older count may miss what this process itself changed (the store's listing lease checks it).
        self._changes = _CHANGES.setdefault(self.url(), [0])

    @property
    def generation(self) -> int:
        return self._changes[0]

    def query_fs(self):
        """A filesystem for one DuckDB connection (where httpfs does not read the workspace): its
        own instance, whose listings are kept for the connection, so DuckDB's many size/info
        calls per file are not each a request, but never trusted to say that a file is absent:
        another process may have published it after the listing, and a later glob returned it."""
        if self.is_local:
            return self.fs
        options = {**self.storage_options, "use_listings_cache": True, "skip_instance_cache": True}
        return _listings_never_deny(type(self.fs))(**options)

    # -- paths ---------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path of a workspace-relative location."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def url(self, *parts: str) -> str:
        """A URL that engines outside fsspec (DuckDB, polars) understand."""
        full = self.path(*parts)
        return full if self.is_local else f"{self.protocol}://{full}"

    def relative(self, full_path: str) -> str:
        full_path = full_path.split("://", 1)[-1]
        prefix = self.root if self.root.endswith("/") else self.root + "/"
        if full_path.startswith(prefix):  # the common case, without relpath's cost per file
            return full_path[len(prefix) :]
        return posixpath.relpath(full_path, self.root)

    # -- reading -------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        """A file's bytes: one GET on object stores (see ``_get``)."""
        return self._get(self.path(rel))

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """The bytes of several files; on object stores fetched concurrently (one GET each, in
        flight together), which is what makes a first read of many small files bearable there.
        A file removed meanwhile raises ``FileNotFoundError``, as ``read_bytes`` does."""
        if self.is_local or len(rels) < 2:
            return {rel: self.read_bytes(rel) for rel in rels}
        paths = [self.path(rel) for rel in rels]
        # An open-ended range (bytes=0-) is a plain GET: without it s3fs first asks the size
        # (a HEAD per file) to decide whether to split the download.
        fetched = self.fs.cat_ranges(paths, [0] * len(paths), [None] * len(paths), on_error="return")
        out = {}
        for rel, path, data in zip(rels, paths, fetched):
            if isinstance(data, FileNotFoundError):
                raise data
            out[rel] = data if isinstance(data, bytes) else self._get(path)
        return out

    def read_tail(self, rel: str, length: int) -> bytes:
        """The last ``length`` bytes of a file, or all of it when shorter: one GET with a suffix
        range on object stores (no HEAD for the size)."""
        if self.is_local:
            with open(self.path(rel), "rb") as fh:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - length))
                return fh.read()
        return self.fs.cat_file(self.path(rel), start=-length)

    def read_ranges(self, rel: str, spans: list[tuple[int, int]]) -> list[bytes]:
        """Bytes ``[start, end)`` of a file for each span: one ranged GET each on object stores,
        in flight together."""
        if self.is_local:
            with open(self.path(rel), "rb") as fh:
                out = []
                for start, end in spans:
                    fh.seek(start)
                    out.append(fh.read(end - start))
                return out
        path = self.path(rel)
        fetched = self.fs.cat_ranges([path] * len(spans), [s for s, _ in spans], [e for _, e in spans], on_error="return")
        for data in fetched:
            if isinstance(data, BaseException):
                raise data
        return fetched

    def _get(self, path: str) -> bytes:
        if self.is_local:
            return self.fs.cat_file(path)
        try:
            return self.fs.cat_file(path, start=0)
        except FileNotFoundError:
            raise
        except OSError:
            # An empty object has no byte 0 (HTTP 416): ask for it without a range.
            return self.fs.cat_file(path)

    def open(self, rel: str, mode: str = "rb") -> Any:
        return self.fs.open(self.path(rel), mode)

    def open_arrow(self, rel: str) -> pa.NativeFile:
        """A file for pyarrow readers, never backed by Python objects.

        pyarrow reading through a Python file object (or from Python ``bytes``) leaves buffers
        that its I/O threads may release during interpreter shutdown, which aborts the process
        ("terminate called without an active exception", apache/arrow#34314). Local files are
        opened natively; remote ones are read into Arrow-owned memory.
        """
        if self.is_local:
            return pa.OSFile(self.path(rel))
        return pa.BufferReader(arrow_owned(self.read_bytes(rel)))

    def list_files(self, rel_dir: str, suffix: str = ".parquet") -> list[str]:
        """Workspace-relative paths of every file below ``rel_dir`` ending in ``suffix``.

        Missing folders list as empty: a table nobody wrote to yet has no files.
        """
        base = self.path(rel_dir)
        if self.is_local:
            found: list[str] = []
            _scan_local(base, rel_dir.strip("/"), suffix, found)
            return found
        try:
            files = self.fs.find(base)
        except FileNotFoundError:
            return []
        return sorted(self.relative(f) for f in files if f.endswith(suffix))

    def modified_us(self, rel: str) -> int | None:
        """Last modification time in µs since the epoch, or None when the file is gone."""
        try:
            if self.is_local:
                return os.stat(self.path(rel)).st_mtime_ns // 1000
            return _remote_stamp_us(self.fs.modified(self.path(rel)))
        except FileNotFoundError:
            return None

    def list_modified(self, rel_dir: str) -> dict[str, int]:
        """Workspace-relative path -> ``modified_us`` of every file below ``rel_dir``: one
        listing on object stores instead of one HEAD request per file."""
        if self.is_local:
            found = {}
            for rel in self.list_files(rel_dir, suffix=""):
                stamp = self.modified_us(rel)
                if stamp is not None:
                    found[rel] = stamp
            return found
        try:
            listing = self.fs.find(self.path(rel_dir), detail=True)
        except FileNotFoundError:
            return {}
        found = {}
        for path, info in listing.items():
            if info.get("type", "file") == "directory":
                continue
            rel = self.relative(path)
            stamp = info.get("LastModified") or info.get("mtime")
            found[rel] = _remote_stamp_us(stamp) if stamp is not None else self.modified_us(rel)
        return {rel: stamp for rel, stamp in found.items() if stamp is not None}

    def list_sizes(self, rel_dir: str, suffix: str = "") -> dict[str, int]:
        """Workspace-relative path -> size of every file below ``rel_dir`` ending in ``suffix``.

        One listing with sizes on object stores (no request per file); a stat per file locally.
        """
        if self.is_local:
            found = {}
            for rel in self.list_files(rel_dir, suffix=suffix):
                try:
                    found[rel] = os.stat(self.path(rel)).st_size
                except FileNotFoundError:  # removed since the listing (vacuum, gc): not there
                    pass
            return found
        try:
            listing = self.fs.find(self.path(rel_dir), detail=True)
        except FileNotFoundError:
            return {}
        return {
            self.relative(path): int(info.get("size") or 0)
            for path, info in sorted(listing.items())
            if info.get("type", "file") != "directory" and path.endswith(suffix)
        }

    def holds_files(self) -> bool:
        """True when anything at all lies under the workspace's location."""
        try:
            return bool(self.fs.ls(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return False

    @functools.cached_property
    def bucket_region(self) -> str | None:
        """The region S3 reports for the workspace's bucket (``x-amz-bucket-region`` of a HEAD of
        the bucket, asked once per instance), or None when it does not say or is not S3."""
        if self.protocol not in ("s3", "s3a"):
            return None
        try:
            reply = self.fs.call_s3("head_bucket", Bucket=self.root.split("/", 1)[0])
        except Exception:  # not reachable or not allowed: the read itself will say why
            return None
        return reply.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")

    def check_bucket(self) -> None:
        """Raise ``ValueError`` naming the bucket when the workspace is on S3 and its bucket does
        not exist: the commands that create a workspace say so before writing anything.

        Only a HEAD of the bucket that answers 404 counts: a bucket this client may not HEAD
        (403) or cannot reach is left for the operation itself to report.
        """
        if self.protocol not in ("s3", "s3a"):
            return
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise ValueError(
                f"the bucket {bucket!r} of {self.url()} does not exist: create it first "
                f"(e.g. `aws s3 mb s3://{bucket}`), or check the bucket name and the endpoint (AWS_ENDPOINT_URL)"
            ) from None
        except Exception:
            return

    def size(self, rel: str) -> int:
        """Size in bytes (a ``stat`` locally, a HEAD request on object stores)."""
        if self.is_local:
            return os.stat(self.path(rel)).st_size
        return int(self.fs.size(self.path(rel)))

    # -- writing -------------------------------------------------------------
    def touch(self, rel: str) -> None:
        """Refresh a local file's modification time (used to mark an object as in use)."""
        os.utime(self.path(rel))

    def publish(
        self, rel: str, data: bytes, overwrite: bool = False, exists_ok: bool = False, exclusive: bool = False
    ) -> None:
        """Make ``data`` appear at ``rel`` whole or not at all, and durable once this returns.

        Durable means: surviving a crash of this process, or of the machine with ``fsync``.
        ``exclusive`` makes it a put-if-absent that claims the name: ``FileExistsError`` when
        the name is taken (another process claimed it first). A backend without conditional
        writes cannot tell, and refuses with ``ValueError``.
        """
        target = self.path(rel)
        self._changes[0] += 1
        if not self.is_local:
            if overwrite:
                self.fs.pipe_file(target, data)
                return
            try:
                # One PUT with If-None-Match: * (s3fs): nothing already there is ever replaced.
                self.fs.pipe_file(target, data, mode="create")
            except FileExistsError:
                # Data files have unique names; only files whose bytes are the same by
                # construction (an object named by its hash, a table's schema file) may
                # already be there, written by another machine: keep that one.
                if not exists_ok:
                    raise
            except TypeError:
                if exclusive:
                    raise ValueError(
                        f"{self.protocol}:// has no conditional writes (put-if-absent), which a compaction "
                        "commit needs to claim its place in order (lake spec §4): compact on a local or S3 workspace"
                    ) from None
                # A backend without conditional writes: names are unique, so a plain put is safe.
                self.fs.pipe_file(target, data)
            return
        staging_dir = self.path(STAGING_DIR)
        os.makedirs(staging_dir, exist_ok=True)
        tmp = os.path.join(staging_dir, f"{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        target_dir = os.path.dirname(target)
        os.makedirs(target_dir, exist_ok=True)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                # link() fails when the target exists: a content-addressed object written
                # by two processes at once stays the first one's, byte for byte.
                os.link(tmp, target)
            except FileExistsError:
                if exclusive:
                    raise
            finally:
                os.unlink(tmp)
        if self.fsync:
            _fsync_dir(target_dir)

    def move(self, rel: str, to_rel: str, replace: bool = True) -> None:
        """Rename a local file atomically; ``replace=False`` keeps an existing target (FileExistsError)."""
        if not self.is_local:
            raise ValueError("atomic moves are made on local workspaces only")
        self._changes[0] += 1
        target = self.path(to_rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if replace:
            os.rename(self.path(rel), target)
        else:
            os.link(self.path(rel), target)  # link() never replaces: a writer's new copy stays
            os.unlink(self.path(rel))

    def open_append(self, rel: str) -> int:
        """A new local file at ``rel`` opened for appending (a journal segment), its folder
        created when missing; returns the descriptor.

        The descriptor holds ``flock(LOCK_EX)`` on the file from before its name appears (it is
        created under a name no one lists, locked, then renamed), so whoever finds the file can
        tell by ``lock_file`` whether its writer still runs. The lock lasts while the descriptor
        is open; it needs a local filesystem (network filesystems emulate or drop flock).
        """
        if not self.is_local:
            raise ValueError("append-only files are kept on local workspaces only")
        path = self.path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        hidden = f"{path}.{uuid.uuid4().hex}.tmp"
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(hidden, path)
        except BaseException:
            os.close(fd)
            _unlink_quietly(hidden)
            raise
        if self.fsync:
            _fsync_dir(os.path.dirname(path))  # the new file's name must survive a machine crash too
        return fd

    def lock_file(self, rel: str) -> int | None:
        """A descriptor holding ``flock(LOCK_EX)`` on the local file at ``rel``, or None when its
        lock is held elsewhere, the file is gone (then or while the lock was taken), or the
        filesystem refuses the lock: a writer not proven gone is taken for alive."""
        path = self.path(rel)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held, now = os.fstat(fd), os.stat(path)
            if held.st_nlink and (held.st_ino, held.st_dev) == (now.st_ino, now.st_dev):
                return fd
        except OSError:  # held (EWOULDBLOCK), gone, or no flock here (NFS's emulation: EBADF)
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def delete(self, rel: str) -> bool:
        self._changes[0] += 1
        try:
            self.fs.rm_file(self.path(rel))
            return True
        except FileNotFoundError:
            return False

    def delete_many(self, rels: Iterable[str]) -> int:
        return sum(self.delete(r) for r in rels)


@functools.cache
def _listings_never_deny(fs_class: type) -> type:
    """``fs_class`` whose cached listings answer only for the files they hold. fsspec answers
    "no such file" for any file missing from its parent's cached listing, and s3fs never
    replaces a listing it holds, so a file published after the first listing of its folder, and
    returned by a later glob, failed to open (FileNotFoundError); here that question goes to
    the store instead."""

    class ListingsNeverDeny(fs_class):
        def _ls_from_cache(self, path):
            try:
                return super()._ls_from_cache(path)
            except FileNotFoundError:
                return None

    ListingsNeverDeny.__name__ = ListingsNeverDeny.__qualname__ = f"ListingsNeverDeny{fs_class.__name__}"
    return ListingsNeverDeny


def _remote_stamp_us(value) -> int:
    """An object store's modification time in µs. They keep whole seconds: report the end of
    that second, so a "modified since" test (gc's grace period) errs towards keeping."""
    seconds = value.timestamp() if hasattr(value, "timestamp") else float(value)
    return int(seconds) * 1_000_000 + 999_999


def arrow_owned(data: bytes) -> pa.Buffer:
    """A copy of ``data`` in Arrow's memory pool (see ``Storage.open_arrow`` for why)."""
    buf = pa.allocate_buffer(len(data))
    writer = pa.FixedSizeBufferWriter(buf)
    writer.write(data)
    writer.close()
    return buf


def _scan_local(path: str, rel: str, suffix: str, out: list[str]) -> None:
    """Depth-first, names sorted: the same order as sorting the relative paths."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _scan_local(entry.path, f"{rel}/{entry.name}", suffix, out)
        elif entry.name.endswith(suffix):
            out.append(f"{rel}/{entry.name}")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
