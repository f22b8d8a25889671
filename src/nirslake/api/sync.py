"""Push and pull: copy a workspace to another location, sending only the files the target lacks.

Data files and objects are immutable and uniquely named (lake spec §3, §7), so a file the
target holds under the same name and size is already there: a sync is a set difference of two
listings, like DVC's. The copy follows the lake's publication rules, so readers of the target
stay on a consistent lake throughout, and an interrupted sync is finished by running it again:

- **listing order** (§4): the source's commits are listed first, then its data files, then its
  objects: every commit listed names files the later listing holds, every artifact record listed
  has its object in the objects listing;
- **copy order**: objects, then the data files table by table in the order the writers publish
  them (§6: runs, pipelines, artifacts, chains, predictions, arrays, logs, deletions), then the
  commits last, so no commit arrives before the files it adds and no record before its parent
  (a commit the target lacks, by ``commit_id``, lands there under the target's next number);
- each file is written with the target's ``Storage.publish`` (staging + link locally, one PUT on
  an object store): a file is on the target whole or not at all;
- after each pass every artifact record the target shows must have its object there: a gc on
  the source between the listings leaves a record whose deletion was not listed yet, which
  another pass copies; a record still without bytes after the last pass makes the sync not ok.

Nothing on the target is deleted or rewritten. The target's catalog is never copied: it is
built for the target's own location at the end. When both sides compacted the same files on
their own, the source's compaction commits are held back (two compaction histories cannot be
merged). docs/sync.md explains the choices.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from ..lake import schema as SCHEMA
from ..lake.artifacts import OBJECTS_DIR
from ..lake.checkpoint import COPY_PREFIX
from ..lake.journal import JOURNAL_DIR
from ..lake.journal import SUFFIX as JOURNAL_SUFFIX
from ..lake.schema import COMMITS
from ..lake.storage import Storage
from ..lake.tables import commits_that_count, conform, is_schema_file, land_commit, landing_order
from ..lake.writer import FLUSH_ORDER

# Tables in the order a publication writes them (lake spec §6): parents before children,
# deletions after what they delete. The commits come after all of them (§4).
TABLE_ORDER = tuple(dict.fromkeys(name.split(":")[0] for name in FLUSH_ORDER))

# A listing is retried when files vanished from the source while they were copied (a vacuum or
# gc there): the new listing holds the commit or deletion that explains it.
MAX_PASSES = 3

# ``progress(done, total, bytes_copied)``: called with done=0 once the files to copy are known,
# then after each file copied.
Progress = Callable[[int, int, int], None]


class SyncError(ValueError):
    """A sync that cannot start: the source is not a workspace, the target is something else."""


@dataclass
class SyncResult:
    """What one :func:`sync` did."""

    source: str
    target: str
    files_copied: int = 0
    bytes_copied: int = 0
    files_skipped: int = 0  # already on the target (same name and size)
    # Files the target holds under a source file's name with another size: left untouched.
    conflicts: list[str] = field(default_factory=list)
    # Compaction commits of the source not copied: the target was compacted on its own over the
    # same files, and the two compaction histories cannot be merged (see ``_diverging``).
    held_back: list[str] = field(default_factory=list)
    # Files that vanished from the source during the last pass (a vacuum or gc there).
    vanished: list[str] = field(default_factory=list)
    # "artifact_id at objects/..." of artifact records the target shows without their bytes after
    # the last pass: the source's gc removed the object between the listings and its deletion
    # record had not been listed yet (another pass copies it), or the source itself lacks them.
    missing_bytes: list[str] = field(default_factory=list)
    # Journal segments left on a local source after its crashed writers were published: writers
    # still running (or of another host sharing the folder); their records are not copied.
    live_journals: int = 0
    passes: int = 0

    @property
    def ok(self) -> bool:
        """True when the target now holds every file the source listed."""
        return not self.conflicts and not self.vanished and not self.held_back and not self.missing_bytes

    def summary(self, verb: str = "copied") -> str:
        """A few lines for people, e.g. ``pushed 120 files (3.4 MiB), 880 already there``."""
        if self.files_copied:
            size = human_bytes(self.bytes_copied)
            lines = [f"{verb} {self.files_copied} files ({size}) to {self.target}, {self.files_skipped} already there"]
        else:
            lines = [f"nothing to copy: all {self.files_skipped} files are already at {self.target}"]
        if self.live_journals:
            lines.append(
                f"note: {self.live_journals} journal(s) of writers still running on {self.source} (or on another "
                "machine sharing it) hold records not published yet; those are not copied (run again once they "
                "flush or close)"
            )
        if self.vanished:
            lines.append(
                f"warning: {len(self.vanished)} file(s) vanished from {self.source} while copying "
                "(a vacuum or gc there); run the sync again"
            )
        if self.missing_bytes:
            shown = ", ".join(self.missing_bytes[:5]) + (" ..." if len(self.missing_bytes) > 5 else "")
            lines.append(
                f"error: {len(self.missing_bytes)} artifact record(s) on {self.target} have no bytes there: {shown}; "
                f"run `nirslake check` on {self.source} (a gc or vacuum there may still be running) and sync again"
            )
        if self.held_back:
            lines.append(
                f"error: {len(self.held_back)} compaction commit(s) of {self.source} were held back: {self.target} was "
                "compacted on its own over the same files, and two compaction histories cannot be merged "
                "(the target stays consistent, without those compactions); compact only one side, see docs/sync.md"
            )
        if self.conflicts:
            shown = ", ".join(self.conflicts[:5]) + (" ..." if len(self.conflicts) > 5 else "")
            lines.append(
                f"error: {len(self.conflicts)} file(s) on {self.target} have another size than the source's file of "
                f"the same name and were left untouched: {shown}; run `nirslake check` on both sides, delete "
                "the copy that fails, and sync again"
            )
        return "\n".join(lines)


def sync(
    source: str | os.PathLike,
    target: str | os.PathLike,
    source_options: dict | None = None,
    target_options: dict | None = None,
    progress: Progress | None = None,
    *,
    fsync: bool = False,
) -> SyncResult:
    """Copy to ``target`` every data file and object of ``source`` that ``target`` lacks.

    Either side is a local folder or an fsspec URL (``s3://bucket/prefix``), with its storage
    options. Nothing on the target is deleted or rewritten: files already there (same name and
    size) are skipped, files the target has and the source lacks stay. The target becomes (or
    stays) a workspace: its catalog is built for its own location at the end. An interrupted
    sync leaves whole files only, and running it again copies the rest. With ``fsync`` a
    local target's files are flushed to disk (surviving a machine crash, at a cost per file).

    A local source's crashed writers are published first (opening a store does that, lake spec
    §6); records that a writer still running has not published yet are not copied
    (``SyncResult.live_journals`` counts those writers).
    """
    from ..store import WorkspaceStore

    src = Storage(source, source_options)
    dst = Storage(target, target_options, fsync=fsync)
    _check_locations(src, dst, os.fspath(source), os.fspath(target))
    result = SyncResult(source=src.url(), target=dst.url())

    if src.is_local:
        WorkspaceStore(source, storage_options=source_options).close()  # publishes crashed writers' journals
        result.live_journals = len(src.list_files(JOURNAL_DIR, suffix=JOURNAL_SUFFIX))

    copied: set[str] = set()
    skipped: set[str] = set()
    for _ in range(MAX_PASSES):
        result.passes += 1
        found = _plan(src, dst)
        skipped |= found.present - copied
        result.conflicts = found.conflicts
        result.vanished = []
        plan = found.files
        commits = found.commits
        if commits and _diverging(found.target_commits, commits, found.source_commits):
            result.held_back = list(dict.fromkeys(row["rel"] for row in commits))
            commits = []
        else:
            result.held_back = []
        total = len(plan) + len(commits)
        if progress is not None:
            progress(0, total, result.bytes_copied)
        for done, rel in enumerate(plan, 1):
            try:
                data = src.read_bytes(rel)
            except FileNotFoundError:
                result.vanished.append(rel)
                continue
            dst.publish(rel, data, exists_ok=True)  # a concurrent sync of the same file wrote the same bytes
            copied.add(rel)
            result.files_copied += 1
            result.bytes_copied += len(data)
            if progress is not None:
                progress(done, total, result.bytes_copied)
        # Last: a commit never arrives before the files it adds. Each lands on the target
        # under the target's next number (lake spec §4): it lands there now, after the
        # target's own commits, whatever its number was on the source.
        for done, row in enumerate(commits, len(plan) + 1):
            landed = land_commit(dst, {name: row[name] for name in COMMITS.schema.names})
            result.files_copied += 1
            result.bytes_copied += dst.size(landed)
            if progress is not None:
                progress(done, total, result.bytes_copied)
        # The catalog (and _meta) are made for the target's own location; opening a store builds
        # them, adds any missing schema file, and publishes the target's own crashed writers.
        with WorkspaceStore(target, storage_options=target_options, fsync=fsync) as store:
            result.missing_bytes = _records_without_bytes(store)
            if copied or commits:  # the target's manifest is its own (lake spec §11)
                store._checkpoint_quietly()
        if not result.vanished and not result.missing_bytes:
            break
    result.files_skipped = len(skipped - copied)
    return result


def _records_without_bytes(store) -> list[str]:
    """``"<artifact_id> at <path>"`` of every artifact record the store shows (deletions applied)
    whose object is not in its ``objects/``; registered files outside the workspace are not the
    sync's to copy. Only the artifacts and deletions tables are read."""
    # Records before objects: a writer of the target saves an object before its record, so
    # every record read here has its object in the later listing.
    rows = store._reads.frame(SCHEMA.ARTIFACTS).select("artifact_id", "path").sort("artifact_id").collect()
    objects = set(store.storage.list_sizes(OBJECTS_DIR))
    return [
        f"{artifact_id} at {path}"
        for artifact_id, path in rows.iter_rows()
        if path.startswith(OBJECTS_DIR + "/") and path not in objects
    ]


def _check_locations(src: Storage, dst: Storage, source: str, target: str) -> None:
    src.check_bucket()
    dst.check_bucket()
    if not src.exists("tables"):
        raise SyncError(
            f"no nirslake workspace at {source!r} (it has no tables/ folder): the source of a sync must be a workspace"
        )
    if src.protocol == dst.protocol:
        a, b = src.root.rstrip("/") + "/", dst.root.rstrip("/") + "/"
        if a == b:
            raise SyncError(f"the source and the target are the same workspace ({source!r})")
        if a.startswith(b) or b.startswith(a):
            raise SyncError(f"the source {source!r} and the target {target!r} are inside one another")
    if not dst.exists("tables") and dst.holds_files():
        raise SyncError(
            f"the target {target!r} exists, is not empty and is not a nirslake workspace (it has no tables/ "
            "folder): sync into a new or empty location, or into a workspace"
        )


@dataclass
class _Plan:
    files: list[str]  # objects and data files to copy, in copy order
    commits: list[dict]  # source commits the target lacks (by commit_id), in landing order, after the files
    present: set[str]  # already on the target
    conflicts: list[str]  # on the target with another size
    source_commits: list[dict]
    target_commits: list[dict]


def _plan(src: Storage, dst: Storage) -> _Plan:
    """What to copy, from one listing of each side.

    The source is listed commits first, then data files, then objects (lake spec §4): a commit
    is published after the files it adds and an artifact record after its object, so whatever
    this listing holds, it holds what it depends on. Commits are matched by ``commit_id``, not
    by file name: each side numbers its commits in the order they landed there.
    """
    source_commits = _read_commits(src, src.list_files(COMMITS.dir))
    data = {
        rel: size
        for rel, size in src.list_sizes("tables", ".parquet").items()
        if (_table(rel) != COMMITS.name or is_schema_file(rel))  # the schema file holds no commit
        and not posixpath.basename(rel).startswith(COPY_PREFIX)  # the source's checkpoints' own (§11)
    }
    objects = src.list_sizes(OBJECTS_DIR)
    have = {**dst.list_sizes("tables", ".parquet"), **dst.list_sizes(OBJECTS_DIR)}
    target_commits = _read_commits(dst, dst.list_files(COMMITS.dir))

    present: set[str] = set()
    conflicts: list[str] = []

    def missing(listing: dict[str, int], key) -> list[str]:
        out = []
        for rel in sorted(listing, key=key):
            size = have.get(rel)
            if size is None:
                out.append(rel)
            elif size == listing[rel] or is_schema_file(rel):
                # Each workspace writes its own empty schema file: equal in content, maybe not in bytes.
                present.add(rel)
            else:
                conflicts.append(rel)
        return out

    files = missing(objects, str) + missing(data, _copy_rank)
    on_target = {row["commit_id"] for row in target_commits}
    commits = [row for row in source_commits if row["commit_id"] not in on_target]
    present |= {row["rel"] for row in source_commits if row["commit_id"] in on_target}
    return _Plan(files, commits, present, conflicts, source_commits, target_commits)


def _diverging(target: list[dict], arriving: list[dict], source: list[dict]) -> bool:
    """Would landing the ``arriving`` source commits after the ``target``'s change which
    commits count on either side?

    Adding the source's commits is safe when every commit counts on the target, after they
    landed there, exactly as it counts on its own side: then each row of the lake is in one
    visible file. Otherwise (both sides compacted the same files) a later compaction of the
    source could hide a file the target never shows and add its rows a second time; the
    commits are held back and the target keeps its own view.
    """
    union = counting(target + arriving)
    return any((row["commit_id"] in union) != counted for row, counted in zip(source, _verdicts(source))) or any(
        (row["commit_id"] in union) != counted for row, counted in zip(target, _verdicts(target))
    )


def _read_commits(storage: Storage, rels: list[str]) -> list[dict]:
    """The commit rows of the commit files ``rels``, each with its file as ``rel``, in landing order."""
    rows = []
    for rel in rels:
        with storage.open_arrow(rel) as fh:
            table = pq.read_table(fh)
        rows += [{**row, "rel": rel} for row in conform(table, COMMITS.schema).to_pylist()]
    return sorted(rows, key=lambda row: landing_order(row["rel"], row["commit_id"]))


def _verdicts(commits: list[dict]) -> list[bool]:
    return commits_that_count((row["added"], row["removed"]) for row in commits)


def counting(commits: list[dict]) -> set[str]:
    """The ids of the commits that count among ``commits`` taken in this order (lake spec §4,
    the rule of ``tables.counting_commits``)."""
    return {row["commit_id"] for row, counted in zip(commits, _verdicts(commits)) if counted}


def _table(rel: str) -> str:
    return rel.split("/", 2)[1]


def _copy_rank(rel: str) -> tuple[int, str]:
    """Tables in publication order (§6), tables this version does not know before the deletions."""
    name = _table(rel)
    if name in TABLE_ORDER:
        rank = TABLE_ORDER.index(name)
    elif name == COMMITS.name:  # its schema file: the commits themselves land after everything
        rank = len(TABLE_ORDER)
    else:
        rank = TABLE_ORDER.index("deletions") - 1
    return (2 * rank + (name not in TABLE_ORDER), rel)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def progress_printer(verb: str = "copied", every: int = 100, seconds: float = 5.0,
                     out: Callable[[str], None] = print) -> Progress:
    """A ``progress`` callback printing ``pushed 40 of 120 files (1.1 MiB)`` every ``every`` files
    or ``seconds``, whichever comes first (the final count is left to ``SyncResult.summary``)."""
    last = [time.monotonic()]

    def report(done: int, total: int, nbytes: int) -> None:
        if done == 0 or done == total:
            return
        now = time.monotonic()
        if done % every == 0 or now - last[0] >= seconds:
            last[0] = now
            out(f"{verb} {done} of {total} files ({human_bytes(nbytes)})")

    return report
