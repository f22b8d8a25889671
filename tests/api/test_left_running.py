"""Runs left ``running`` by a writer that died: ``check`` reports them (and only them),
``mark_failed`` records them failed; a live writer's run and a reused pid are told apart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from nirslake import WorkspaceStore
from nirslake.lake import liveness

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")

# Begins a run, makes it durable, says so, then waits to be killed.
WRITER = textwrap.dedent("""
    import sys, time
    from nirslake import WorkspaceStore
    store = WorkspaceStore(sys.argv[1])
    run_id = store.begin_run("doomed", {}, [{"name": "ds"}])
    store.flush()
    print(run_id, flush=True)
    time.sleep(120)
""")


def start_writer(workspace: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, workspace], stdout=subprocess.PIPE, text=True, env=env)
    return proc, proc.stdout.readline().strip()


@pytest.fixture
def killed_run(local_workspace):
    proc, run_id = start_writer(local_workspace)
    with WorkspaceStore(local_workspace) as store:
        # While the writer lives its run is being written: no problem.
        assert store.get_run(run_id)["status"] == "running"
        assert store.left_running() == []
        assert store.check().ok
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return local_workspace, run_id


def test_check_reports_a_run_whose_writer_was_killed_and_mark_failed_records_it(killed_run):
    workspace, run_id = killed_run
    with WorkspaceStore(workspace) as store:
        report = store.check()
        assert not report.ok
        assert report.problems == [], "the data is sound"
        assert len(report.left_running) == 1 and run_id in report.left_running[0] and "is gone" in report.left_running[0]
        assert "problem: run " + run_id in report.summary()
        assert [r["run_id"] for r in store.left_running()] == [run_id]

        assert store.mark_failed() == [run_id]
        run = store.get_run(run_id)
        assert run["status"] == "failed" and "writer process was gone" in run["error"]
        assert store.check().ok and store.left_running() == []
        assert store.mark_failed() == []  # nothing left to mark


def test_a_live_writers_run_is_refused_unless_forced(local_workspace):
    with WorkspaceStore(local_workspace) as store:
        run_id = store.begin_run("alive", {}, [{"name": "ds"}])
        store.flush()
        assert store.left_running() == []
        assert store.check().ok
        with pytest.raises(ValueError, match="not proven gone"):
            store.mark_failed([run_id])
        assert store.get_run(run_id)["status"] == "running"
        assert store.mark_failed([run_id], force=True) == [run_id]
        assert store.get_run(run_id)["status"] == "failed"
        with pytest.raises(ValueError, match="'failed', not 'running'"):
            store.mark_failed([run_id])
        with pytest.raises(KeyError):
            store.mark_failed(["0" * 32])


def test_a_reused_pid_is_not_taken_for_the_writer(local_workspace):
    """The marker names our own pid but another process start: that writer is gone."""
    with WorkspaceStore(local_workspace) as store:
        run_id = store.begin_run("old", {}, [{"name": "ds"}])
        store.flush()
        me = liveness.this_writer()
        if me.started is None:
            pytest.skip("no /proc here: process start times are unknown, a reused pid cannot be told")
        liveness.record_writer(store.storage, run_id, liveness.Writer(me.host, me.pid, me.started + "0"))
        assert [r["run_id"] for r in store.left_running()] == [run_id]


def test_a_writer_on_another_host_is_not_judged(local_workspace):
    with WorkspaceStore(local_workspace) as store:
        run_id = store.begin_run("elsewhere", {}, [{"name": "ds"}])
        store.flush()
        liveness.record_writer(store.storage, run_id, liveness.Writer("another-host", 1, None))
        assert store.left_running() == [] and store.check().ok
        with pytest.raises(ValueError, match="ran on another host"):
            store.mark_failed([run_id])


def test_the_marker_names_this_process(local_workspace):
    with WorkspaceStore(local_workspace) as store:
        run_id = store.begin_run("mine", {}, [{"name": "ds"}])
        found = json.loads(store.storage.read_bytes(liveness.marker(run_id)))
    assert found["pid"] == os.getpid() and found["run_id"] == run_id
