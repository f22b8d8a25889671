"""``check``: verify a workspace against the lake spec, report what is wrong and what is left over.

Problems are things a reader would trip on: a data file that does not open, an artifact whose
bytes are gone or do not match their hash, a record whose parent (run, pipeline, chain,
artifact) is missing. They are reported, never "repaired": fixing them would mean guessing or
dropping data. Leftovers are bytes no reader needs (staging files of crashed writers, files a
compaction replaced, output of a compaction that never committed, objects no artifact record
names); ``repair`` deletes those that are older than the grace period.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Callable

import polars as pl
import pyarrow.parquet as pq

from . import artifacts as art
from . import schema as S
from .journal import damaged_segments
from .maintenance import leftovers, remove_leftovers
from .storage import Storage
from .tables import FileCache, Snapshot, take_snapshot


@dataclass
class CheckReport:
    """The outcome of :meth:`nirslake.WorkspaceStore.check`."""

    files_checked: int = 0
    artifacts_checked: int = 0
    problems: list[str] = field(default_factory=list)
    leftovers: dict[str, list[str]] = field(default_factory=dict)  # kind -> workspace-relative paths
    removed: int = 0  # leftovers deleted by repair
    # Runs still 'running' whose writer process is gone (lake spec §12), one line each: problems
    # of the runs' status, kept apart from the data's.
    left_running: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found and no run was left running (leftovers are not problems)."""
        return not self.problems and not self.left_running

    def summary(self) -> str:
        lines = [
            f"{self.files_checked} data files and {self.artifacts_checked} artifacts checked: "
            + ("no problem found" if self.ok else f"{len(self.problems) + len(self.left_running)} problem(s)")
        ]
        lines += [f"  problem: {p}" for p in [*self.problems, *self.left_running]]
        for kind, rels in self.leftovers.items():
            if rels:
                lines.append(f"  leftover {kind}: {len(rels)} file(s)")
        if self.removed:
            lines.append(f"  repair removed {self.removed} leftover file(s)")
        return "\n".join(lines)


def check_workspace(
    storage: Storage,
    cache: FileCache,
    frame: Callable[[S.TableDef, Snapshot], pl.DataFrame],
    cutoff_us: int,
    repair: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    """Check every visible data file, every artifact and every parent link; see the module doc.

    ``frame(tdef, snap)`` returns a table's current rows (read rules applied) in the listing
    ``snap``; ``cutoff_us`` is the end of the grace period: leftovers newer than that may still
    be in use and are kept. Each file is read on its own: a damaged one is reported by name and
    the check goes on with the rest.
    """
    say = progress or (lambda _msg: None)
    report = CheckReport()
    # What writers made durable but not yet published names objects too. Read before the
    # lake's listing: a segment published in between is then seen in one or the other.
    pending_held, pending_paths = art.unpublished_references(storage)
    # One listing for every table: parents and children from different moments would show
    # children whose parents "do not exist" while writers publish.
    snap, listing_error = _snapshot(storage, cache)
    damaged: set[str] = set()
    for rel in damaged_segments(storage):  # its whole batches are published; the rest may be lost
        report.problems.append(f"journal segment {rel} is damaged: records in it may be lost (lake spec §6)")
    for name, rels in sorted(snap.files.items()):
        for rel in rels:
            report.files_checked += 1
            try:
                with storage.open_arrow(rel) as fh:
                    pq.read_table(fh)  # every page decoded: a torn or corrupt file fails here
            except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
                report.problems.append(f"data file {rel} does not open: {_one_line(exc)}")
                damaged.add(rel)
    say(f"{report.files_checked} data files read")
    broken_tables = {rel.split("/", 2)[1] for rel in damaged}
    if listing_error is not None and not damaged:
        report.problems.append(f"the compaction commits do not read: {_one_line(listing_error)}")
    commits_sound = listing_error is None and S.COMMITS.name not in broken_tables
    tables: dict[str, pl.DataFrame] = {}
    if commits_sound and S.DELETIONS.name not in broken_tables:
        sound = Snapshot({name: [r for r in rels if r not in damaged] for name, rels in snap.files.items()})
        for tdef in (S.RUNS, S.PIPELINES, S.CHAINS, S.PREDICTIONS, S.ARTIFACTS):
            if tdef.name not in broken_tables:  # a damaged table's rows cannot be trusted for the links
                tables[tdef.name] = frame(tdef, sound)
    else:
        # They decide which files and rows count: a link or artifact finding would be a guess.
        report.problems.append(
            "parent links and artifacts not checked: the damaged commits or deletions file decides which "
            "rows count; restore it from a copy of the workspace and check again"
        )
    _check_links(tables, report)
    referenced = _check_artifacts(storage, tables.get("artifacts"), report)
    say(f"{report.artifacts_checked} artifacts verified against their sha256")

    # Which files a compaction replaced is the commits' to say: without them, nothing is a leftover.
    found = leftovers(storage, cache, cutoff_us) if commits_sound else {}
    if "artifacts" in tables:
        referenced |= pending_held | {posixpath.basename(path) for path in pending_paths}
        found["unreferenced objects"] = [
            rel
            for rel in storage.list_files(art.OBJECTS_DIR, suffix="")
            if posixpath.basename(rel) not in referenced and (storage.modified_us(rel) or 0) < cutoff_us
        ]
    report.leftovers = found
    if repair:
        objects = found.get("unreferenced objects", [])
        # Lake files go the purge's way: uncommitted compaction output is claimed first (§4).
        report.removed += remove_leftovers(storage, cache, {k: v for k, v in found.items() if k != "unreferenced objects"})
        for rel in objects:
            # An object saved again since the listing (a writer re-using it) is kept (§7).
            report.removed += art.remove_object(storage, rel, cutoff_us)
    return report


def _snapshot(storage: Storage, cache: FileCache) -> tuple[Snapshot, Exception | None]:
    """The lake's listing; when the commits do not read, every file under ``tables/`` (so the
    data-file pass still names the damaged ones) and the error."""
    try:
        return take_snapshot(storage, cache), None
    except Exception as exc:  # noqa: BLE001 - reported; the files are read one by one next
        files: dict[str, list[str]] = {}
        for rel in storage.list_files("tables"):
            files.setdefault(rel.split("/", 2)[1], []).append(rel)
        return Snapshot(files), exc


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _ids(frame: pl.DataFrame | None, column: str) -> set | None:
    return None if frame is None else set(frame[column].drop_nulls().to_list())


def _check_links(tables: dict[str, pl.DataFrame], report: CheckReport) -> None:
    """Every record's parents exist: run <- pipeline <- chain <- prediction, chain -> artifacts."""
    runs = _ids(tables.get("runs"), "run_id")
    pipelines = _ids(tables.get("pipelines"), "pipeline_id")
    chains = _ids(tables.get("chains"), "chain_id")
    artifacts = _ids(tables.get("artifacts"), "artifact_id")
    links = [
        ("pipelines", "pipeline_id", "run_id", runs, "run"),
        ("chains", "chain_id", "pipeline_id", pipelines, "pipeline"),
        ("predictions", "prediction_id", "run_id", runs, "run"),
        ("predictions", "prediction_id", "pipeline_id", pipelines, "pipeline"),
        ("predictions", "prediction_id", "chain_id", chains, "chain"),
    ]
    for table, key, column, parents, kind in links:
        child = tables.get(table)
        if child is None or parents is None:
            continue
        missing = child.filter(pl.col(column).is_not_null() & ~pl.col(column).is_in(list(parents)))
        for row in missing.select(key, column).head(20).iter_rows():
            report.problems.append(f"{table} {row[0]} names {kind} {row[1]}, which does not exist")
        if missing.height > 20:
            report.problems.append(f"... and {missing.height - 20} more {table} with a missing {kind}")
    chain_rows = tables.get("chains")
    if chain_rows is not None and tables.get("pipelines") is not None:
        # Only live chains hold artifacts (lake spec §7): gc rightly collects a failed pipeline's.
        failed = tables["pipelines"].filter(pl.col("status") == "failed")["pipeline_id"].to_list()
        chain_rows = chain_rows.filter(~pl.col("pipeline_id").is_in(failed))
    if chain_rows is not None and artifacts is not None:
        held = chain_rows.select("chain_id", "artifact_ids").explode("artifact_ids").drop_nulls()
        for chain_id, artifact_id in held.filter(~pl.col("artifact_ids").is_in(list(artifacts))).iter_rows():
            report.problems.append(f"chain {chain_id} holds artifact {artifact_id}, which has no record")


def _check_artifacts(storage: Storage, rows: pl.DataFrame | None, report: CheckReport) -> set[str]:
    """Re-hash every artifact's bytes; returns the object names the records point at."""
    referenced: set[str] = set()
    if rows is None:
        return referenced
    for row in rows.select("artifact_id", "path", "content_hash").iter_rows(named=True):
        path = row["path"]
        if not art.is_external(path):
            referenced.add(posixpath.basename(path))
        report.artifacts_checked += 1
        try:
            art.read_verified(storage, path, row["content_hash"])
        except FileNotFoundError:
            report.problems.append(f"artifact {row['artifact_id']}: its bytes are missing at {path}")
        except art.ArtifactIntegrityError as exc:
            report.problems.append(f"artifact {row['artifact_id']}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one unreadable object must not end the check
            report.problems.append(f"artifact {row['artifact_id']}: its bytes at {path} do not read: {_one_line(exc)}")
    return referenced
