"""Runs left ``running`` by a writer that is gone, and marking them failed.

A run is *left running* when its status is ``running`` and the process that began it (named by
its marker, ``lake.liveness``) is proven gone: on the writer's host, that pid no longer runs the
same process. ``check`` reports such runs as problems; ``mark_failed`` records them ``failed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lake import liveness

if TYPE_CHECKING:
    from ..store import WorkspaceStore


def running_runs(store: WorkspaceStore) -> list[dict]:
    """Every run whose status is ``running``, newest first, with its writer and whether that
    writer is ``alive`` (True), ``gone`` (False) or cannot be told from here (None)."""
    found = []
    for run in store.list_runs(status="running", limit=None).rows(named=True):
        writer = liveness.run_writer(store.storage, run["run_id"])
        found.append({
            "run_id": run["run_id"], "name": run["name"], "created_at": run["created_at"],
            "writer_host": writer.host if writer else None, "writer_pid": writer.pid if writer else None,
            "alive": liveness.is_alive(writer) if writer else None,
        })
    return found


def left_running(store: WorkspaceStore) -> list[dict]:
    """The ``running`` runs whose writer is proven gone."""
    return [run for run in running_runs(store) if run["alive"] is False]


def describe(run: dict) -> str:
    if run["writer_pid"] is None:
        return f"run {run['run_id']} ({run['name']}) is 'running' and names no writer process"
    state = {False: "is gone", True: "still runs", None: "ran on another host"}[run["alive"]]
    return (f"run {run['run_id']} ({run['name']}) is 'running' but its writer, process {run['writer_pid']} "
            f"on {run['writer_host']}, {state}")


def mark_failed(store: WorkspaceStore, run_ids: list[str] | None = None, force: bool = False) -> list[str]:
    """Record ``failed`` for runs left running; returns the ids marked.

    Without ``run_ids``: every run left running (its writer proven gone). With ``run_ids``: those
    runs, each of which must be ``running``; one whose writer still runs, or cannot be told from
    here, is refused (``ValueError``) unless ``force``: marking a live run failed would hide the
    results it is still writing under a wrong status.
    """
    if run_ids is None:
        chosen = left_running(store)
    else:
        running = {run["run_id"]: run for run in running_runs(store)}
        chosen = []
        for run_id in run_ids:
            run = running.get(run_id)
            if run is None:
                got = store.get_run(run_id)
                if got is None:
                    raise KeyError(f"unknown run_id {run_id!r}")
                raise ValueError(f"run {run_id} is {got['status']!r}, not 'running': nothing to mark")
            if run["alive"] is not False and not force:
                raise ValueError(describe(run) + ": not proven gone, so it is left as it is (force=True marks it anyway)")
            chosen.append(run)
    for run in chosen:
        reason = ("its writer process was gone" if run["alive"] is False else "marked failed by hand")
        where = f" (process {run['writer_pid']} on {run['writer_host']})" if run["writer_pid"] is not None else ""
        store.fail_run(run["run_id"], f"left running: {reason}{where}; marked failed by mark_failed")
    return [run["run_id"] for run in chosen]
