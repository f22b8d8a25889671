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
from .maintenance import leftovers
from .storage import Storage
from .tables import FileCache, take_snapshot


@dataclass
class CheckReport:
    """The outcome of :meth:`nirslake.WorkspaceStore.check`."""

    files_checked: int = 0
    artifacts_checked: int = 0
    problems: list[str] = field(default_factory=list)
    leftovers: dict[str, list[str]] = field(default_factory=dict)  # kind -> workspace-relative paths
    removed: int = 0  # leftovers deleted by repair

    @property
    def ok(self) -> bool:
        """True when no problem was found (leftovers are not problems)."""
        return not self.problems

    def summary(self) -> str:
        lines = [
            f"{self.files_checked} data files and {self.artifacts_checked} artifacts checked: "
            + ("no problem found" if self.ok else f"{len(self.problems)} problem(s)")
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        for kind, rels in self.leftovers.items():
            if rels:
                lines.append(f"  leftover {kind}: {len(rels)} file(s)")
        if self.removed:
            lines.append(f"  repair removed {self.removed} leftover file(s)")
        return "\n".join(lines)


def check_workspace(
    storage: Storage,
    cache: FileCache,
    frame: Callable[[S.TableDef], pl.DataFrame],
    cutoff_us: int,
    repair: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    """Check every visible data file, every artifact and every parent link; see the module doc.

    ``frame(tdef)`` returns a table's current rows (read rules applied); ``cutoff_us`` is the
    end of the grace period: leftovers newer than that may still be in use and are kept.
    """
    say = progress or (lambda _msg: None)
    report = CheckReport()
    snap = take_snapshot(storage, cache)
    for rel in damaged_segments(storage):  # its whole batches are published; the rest may be lost
        report.problems.append(f"journal segment {rel} is damaged: records in it may be lost (lake spec §6)")
    broken_tables: set[str] = set()
    for name, rels in sorted(snap.files.items()):
        for rel in rels:
            report.files_checked += 1
            try:
                with storage.open_arrow(rel) as fh:
                    pq.read_table(fh)  # every page decoded: a torn or corrupt file fails here
            except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
                report.problems.append(f"data file {rel} does not open: {type(exc).__name__}: {exc}")
                broken_tables.add(name)
    say(f"{report.files_checked} data files read")

    tables: dict[str, pl.DataFrame] = {}
    for tdef in (S.RUNS, S.PIPELINES, S.CHAINS, S.PREDICTIONS, S.ARTIFACTS):
        if tdef.name in broken_tables:
            continue  # already reported; its rows cannot be trusted for the links below
        tables[tdef.name] = frame(tdef)
    _check_links(tables, report)
    referenced = _check_artifacts(storage, tables.get("artifacts"), report)
    say(f"{report.artifacts_checked} artifacts verified against their sha256")

    found = leftovers(storage, cache, cutoff_us)
    if "artifacts" not in broken_tables:
        found["unreferenced objects"] = [
            rel
            for rel in storage.list_files(art.OBJECTS_DIR, suffix="")
            if posixpath.basename(rel) not in referenced and (storage.modified_us(rel) or 0) < cutoff_us
        ]
    report.leftovers = found
    if repair:
        for kind, rels in found.items():
            for rel in rels:
                # An object saved again since the listing (a writer re-using it) has a fresh mtime.
                if kind == "unreferenced objects" and (storage.modified_us(rel) or 0) >= cutoff_us:
                    continue
                report.removed += storage.delete(rel)
        cache.forget(rel for rels in found.values() for rel in rels)
    return report


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
    return referenced
