"""Issue 9: what a durability point acknowledged survives forks, other PID namespaces, other
hosts, a torn append, a flipped bit, a failed PUT and concurrent recoverers (lake spec §6)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import nirslake.query as q
from nirslake import WorkspaceStore
from nirslake.lake.journal import DAMAGED_SUFFIX, JOURNAL_DIR, damaged_segments

# Shared by the child scripts: one pipeline of `n` predictions, completed (a durability point
# that does not publish while flush_seconds has not passed).
PIPELINE = textwrap.dedent(
    """
    def predictions(store, run, tag, n=1, samples=0):
        pipe = store.begin_pipeline(run, f"p{tag}", {}, {}, "wheat", "h")
        for k in range(n):
            pid = store.save_prediction(pipe, None, "wheat", "m", "M", k, "val", 0.1, 0.2, 0.3, "rmse", "regression",
                                        1, 1, {}, {}, None, None, 0, 0.0, prediction_id=f"{tag}-{k}")
            if samples:
                store.save_prediction_arrays(pid, [float(tag)] * samples, [float(k)] * samples)
        return pipe

    def pipeline(store, run, tag, n=1, samples=0):
        pipe = predictions(store, run, tag, n, samples)
        store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 1)
        return pipe
    """
)


def _run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-c", PIPELINE + textwrap.dedent(script), *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _start(script: str, *args: str, prefix: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*(prefix or []), sys.executable, "-c", PIPELINE + textwrap.dedent(script), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _visible_predictions(workspace: str) -> int:
    with WorkspaceStore(workspace) as store:
        return store.query_predictions().height


def _segments(workspace: str, suffix: str = ".wal") -> list[Path]:
    return sorted(Path(workspace, JOURNAL_DIR).glob(f"*{suffix}"))


FORK_AFTER_OPEN = """
import atexit, multiprocessing, os, sys
from nirslake import WorkspaceStore

store = WorkspaceStore(sys.argv[1], flush_seconds=3600)
run = store.begin_run("r", {}, [])
pipeline(store, run, 0)  # acknowledged, in the parent's journal

def read_in_child():
    store.query_predictions()

child = multiprocessing.get_context("fork").Process(target=read_in_child)
child.start(); child.join()
assert child.exitcode == 0
pid = os.fork()
if pid == 0:
    store.query_predictions()
    atexit._run_exitfuncs()  # the exit hooks, the inherited store's among them, as at a normal exit
    os._exit(0)  # (a full interpreter exit aborts in pyarrow's C++ teardown after a fork)
os.waitpid(pid, 0)
for tag in range(1, 11):
    pipeline(store, run, tag)  # 10 more acknowledged
store.close()
print("closed")
"""


def test_a_forked_child_leaves_the_parents_journal_alone(local_workspace):
    """Issue 9 scenario 1: a process opens a store, acknowledges a pipeline, then forks twice
    (multiprocessing's fork, and a raw os.fork whose child runs the exit hooks); each child only reads
    through the inherited store. Then the parent acknowledges 10 more pipelines and closes: all
    11 survive, close() does not raise, and no process prints an exit message."""
    done = _run(FORK_AFTER_OPEN, local_workspace)
    assert done.stdout == "closed\n" and done.stderr == ""
    assert _visible_predictions(local_workspace) == 11
    assert _segments(local_workspace) == []


LIVE_WRITER = """
import sys
from nirslake import WorkspaceStore

store = WorkspaceStore(sys.argv[1], flush_seconds=3600)
run = store.begin_run("r", {}, [])
for tag in range(20):
    pipeline(store, run, tag)
print("acknowledged", flush=True)
sys.stdin.readline()
for tag in range(20, 40):
    pipeline(store, run, tag)
store.close()
print("closed", flush=True)
"""

OPEN_AND_CLOSE = """
import sys
from nirslake import WorkspaceStore
WorkspaceStore(sys.argv[1]).close()
print("opened", flush=True)
"""


def test_a_live_writer_in_another_pid_namespace_is_not_taken_for_dead(local_workspace):
    """Issue 9 scenario 2: one host name, two PID namespaces (host-network containers). A writer
    acknowledges 20 pipelines and keeps running; a store opened in a new PID namespace
    (`unshare --pid --fork`, where the writer's pid does not exist) must leave its segment alone.
    The writer then acknowledges 20 more and closes: all 40 are visible."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid is refused here: {probe.stderr.strip()}")
    WorkspaceStore(local_workspace).close()
    writer = _start(LIVE_WRITER, local_workspace)
    try:
        assert writer.stdout.readline() == "acknowledged\n", writer.stderr.read()
        other = subprocess.run(
            ["unshare", "--pid", "--fork", sys.executable, "-c", OPEN_AND_CLOSE, local_workspace],
            capture_output=True, text=True, timeout=120,
        )
        assert other.stdout == "opened\n", other.stderr
        assert len(_segments(local_workspace)) == 1  # the live writer's, untouched
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.stdout.readline() == "closed\n", writer.stderr.read()
        assert writer.wait(timeout=60) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert _visible_predictions(local_workspace) == 40


TORN_APPEND = """
import errno, glob, os, resource, signal, sys
from nirslake import WorkspaceStore

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
store = WorkspaceStore(sys.argv[1], flush_seconds=3600)
run = store.begin_run("r", {}, [])
pipeline(store, run, 0, n=10, samples=500)
[segment] = glob.glob(os.path.join(sys.argv[1], "_journal", "*.wal"))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
# Room for part of the next batch only: its append is a short write, then EFBIG.
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(segment) + 300, hard))
pipe = predictions(store, run, 1, n=10, samples=500)
try:
    store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 1)
except OSError as exc:
    assert exc.errno == errno.EFBIG, exc
else:
    raise AssertionError("the append under the file size limit did not fail")
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again: the retry
store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 1)
for tag in range(2, 6):
    pipeline(store, run, tag, n=10, samples=500)
if sys.argv[2] == "close":
    store.close()
else:
    os._exit(0)  # a crash: the next store opened publishes the journal
"""


@pytest.mark.parametrize("end", ["close", "crash"])
def test_a_torn_journal_append_then_a_retry_loses_nothing(local_workspace, end):
    """Issue 9 scenario 3: a durability point's journal append is cut short by a real short write
    (RLIMIT_FSIZE, as on a full disk) and raises; its retry returns. 6 pipelines of 10
    predictions with arrays were acknowledged: all 60 are visible after close() or after a crash and reopen,
    none twice."""
    WorkspaceStore(local_workspace).close()
    _run(TORN_APPEND, local_workspace, end)
    with WorkspaceStore(local_workspace) as store:
        ids = store.query_predictions()["prediction_id"].to_list()
        assert sorted(ids) == sorted(f"{tag}-{k}" for tag in range(6) for k in range(10))
        assert store.get_prediction("3-4", load_arrays=True)["y_true"].tolist() == [3.0] * 500
        assert damaged_segments(store.storage) == []
    for table in ("predictions", "prediction_arrays"):  # published once each, not again by the retry
        assert q.scan(local_workspace, table).collect().height == 60


OTHER_HOST_WRITER = """
import socket, sys
socket.gethostname = lambda: sys.argv[2]  # this process runs on another node
from nirslake import WorkspaceStore

store = WorkspaceStore(sys.argv[1], flush_seconds=3600)
run = store.begin_run("r", {}, [])
pipe = pipeline(store, run, 0, n=5)
print("acknowledged", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("host", ["node-b", "pod~7"])
def test_a_writer_that_crashed_on_another_host_is_published(local_workspace, host):
    """Issue 9 scenario 4: a writer on another host (or one whose host name holds `~`)
    acknowledges 5 predictions and is SIGKILLed. The next store opened here publishes its segment:
    5 of 5 visible, nothing left unpublished in the journal, and `check` is clean."""
    WorkspaceStore(local_workspace).close()
    writer = _start(OTHER_HOST_WRITER, local_workspace, host)
    assert writer.stdout.readline() == "acknowledged\n", writer.stderr.read()
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert [p.name.split("~")[0] for p in _segments(local_workspace)] == [host.split("~")[0]]
    with WorkspaceStore(local_workspace) as store:
        assert store.query_predictions().height == 5
        assert _segments(local_workspace) == []
        report = store.check()
        assert report.ok, report.summary()


TEN_BATCHES = """
import glob, os, sys
from nirslake import WorkspaceStore

store = WorkspaceStore(sys.argv[1], flush_seconds=3600)
run = store.begin_run("r", {}, [])
sizes = []
for tag in range(10):
    pipeline(store, run, tag)
    [segment] = glob.glob(os.path.join(sys.argv[1], "_journal", "*.wal"))
    sizes.append(os.path.getsize(segment))
print(segment)
print(*sizes)
os._exit(0)  # crash: nothing published
"""


def test_a_flipped_bit_in_a_crashed_writers_journal_hides_only_its_own_batch(local_workspace):
    """Issue 9 scenario 9: a crashed writer acknowledged 10 pipelines, one batch each; one bit of
    its journal flips inside the third batch. The next open publishes the 9 whole batches, keeps
    the segment (renamed, not deleted) and `check` reports it by name."""
    WorkspaceStore(local_workspace).close()
    segment, sizes = _run(TEN_BATCHES, local_workspace).stdout.splitlines()
    sizes = [int(s) for s in sizes.split()]
    data = bytearray(Path(segment).read_bytes())
    data[(sizes[1] + sizes[2]) // 2] ^= 0x10
    Path(segment).write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="is damaged"):
        store = WorkspaceStore(local_workspace)
    with store:
        ids = store.query_predictions()["prediction_id"].to_list()
        assert sorted(ids) == sorted(f"{tag}-0" for tag in range(10) if tag != 2)
        kept = f"{JOURNAL_DIR}/{Path(segment).name[: -len('.wal')]}{DAMAGED_SUFFIX}"
        assert damaged_segments(store.storage) == [kept]
        assert Path(local_workspace, kept).read_bytes() == bytes(data)
        report = store.check()
        assert not report.ok and any(kept in problem for problem in report.problems), report.summary()
    with WorkspaceStore(local_workspace) as again:  # kept, not published again
        assert again.query_predictions().height == 9


def test_a_failed_put_inside_a_durability_point_publishes_nothing_twice(s3_workspace, monkeypatch):
    """Issue 9 scenario 11: on S3 (no journal), one PUT of a durability point fails after others
    landed; the retry must land the rest under the same names: 1 chain and 2 log rows, not 2 and 4."""
    store = WorkspaceStore(s3_workspace)
    run = store.begin_run("r", {}, [])
    pipe = store.begin_pipeline(run, "p", {}, {}, "wheat", "h")
    store.save_chain(pipe, [], 0, "PLS", "", "kfold", {}, {})
    store.log_step(pipe, 0, "PLS", "start")
    store.log_step(pipe, 0, "PLS", "end")
    fs = store.storage.fs
    real_pipe = fs.pipe_file
    failed = []

    def put_once_failing(path, data, **kw):
        if "/tables/logs/" in path and not failed:
            failed.append(path)
            raise OSError("503 Slow Down")
        return real_pipe(path, data, **kw)

    monkeypatch.setattr(fs, "pipe_file", put_once_failing)
    with pytest.raises(OSError, match="Slow Down"):
        store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 1)
    store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 1)  # the retry
    monkeypatch.undo()
    store.close()
    assert failed
    assert q.scan(s3_workspace, "chains").collect().height == 1
    assert q.scan(s3_workspace, "logs").collect().height == 2
    with WorkspaceStore(s3_workspace) as reader:
        assert reader.get_pipeline(pipe)["status"] == "completed"
        assert reader.check().ok


CRASHED_WRITER = """
import os, sys
from nirslake import WorkspaceStore

store = WorkspaceStore(sys.argv[1], flush_seconds=3600)
run = store.begin_run("r", {}, [])
for tag in range(5):
    pipeline(store, run, tag, n=4)
os._exit(0)
"""

RECOVERER = """
import sys, time
from nirslake.lake.storage import Storage

real_read = Storage.read_bytes

def paused_read(self, rel):
    if rel.endswith(".wal"):
        time.sleep(float(sys.argv[3]))  # the others have listed the orphan too by now
    return real_read(self, rel)

Storage.read_bytes = paused_read
from nirslake import WorkspaceStore

time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all three open at once
with WorkspaceStore(sys.argv[1]) as store:
    pass
print("opened", flush=True)
"""


def test_three_processes_recovering_one_orphan_at_once_do_not_crash(local_workspace):
    """Issue 9 scenario 20: three processes open one workspace at the same moment, each finding
    the same orphaned segment (a crashed writer's 20 acknowledged predictions); reading it is
    paused 0, 0.5 and 1 s. All three open cleanly; the 20 are published once."""
    WorkspaceStore(local_workspace).close()
    _run(CRASHED_WRITER, local_workspace)
    assert len(_segments(local_workspace)) == 1
    start = f"{time.time() + 4:.3f}"
    procs = [_start(RECOVERER, local_workspace, start, pause) for pause in ("0", "0.5", "1")]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out == "opened\n", err[-3000:]
    with WorkspaceStore(local_workspace) as store:
        assert store.query_predictions().height == 20
    assert q.scan(local_workspace, "predictions").collect().height == 20
    assert _segments(local_workspace) == []


def test_two_stores_in_one_process_read_what_either_acknowledged(local_workspace):
    """Issue 9 scenario 26: two stores on one workspace in one process (as the client framework
    opens them). What one acknowledged (`fail_run`, a durability point that stays in its journal)
    is what the other reads at once."""
    first = WorkspaceStore(local_workspace, flush_seconds=3600)
    second = WorkspaceStore(local_workspace, flush_seconds=3600)
    assert second.list_runs().height == 0
    run = first.begin_run("r", {}, [])
    first.fail_run(run, "out of memory")
    got = second.get_run(run)
    assert got is not None and got["status"] == "failed" and got["error"] == "out of memory"
    assert second.list_runs()["status"].to_list() == ["failed"]
    assert second.sql("SELECT status FROM runs")["status"].to_list() == ["failed"]
    first.close()
    second.close()


LEFT_OPEN_FAILING = """
import sys
import nirslake.lake.writer
from nirslake import WorkspaceStore

store = WorkspaceStore(sys.argv[1], flush_seconds=3600)
run = store.begin_run("r", {}, [])
pipeline(store, run, 0)  # acknowledged
predictions(store, run, 1)  # buffered only

def full_disk(*args, **kwargs):
    raise OSError("disk full")

nirslake.lake.writer.publish_frames = full_disk
if sys.argv[2] == "append":
    nirslake.lake.writer.Journal.append = full_disk
"""


@pytest.mark.parametrize("fails", ["publish", "append"])
def test_the_exit_message_says_what_was_lost_and_what_the_journal_keeps(local_workspace, fails):
    """Issue 9 scenario 1 (its exit message): a store left open at exit whose publication fails
    says what it really did: records it could not make durable are lost, and the journal keeps
    the acknowledged ones, which the next store opened publishes."""
    done = _run(LEFT_OPEN_FAILING, local_workspace, fails)
    kept = "what it made durable stays in _journal/ and the next store opened on the workspace publishes it"
    lost = "2 records not yet made durable are lost; " if fails == "append" else ""
    assert done.stderr == f"nirslake: could not publish WorkspaceStore({local_workspace!r}) ({lost}{kept}): disk full\n"
    with WorkspaceStore(local_workspace) as store:
        assert sorted(store.query_predictions()["prediction_id"]) == (["0-0"] if fails == "append" else ["0-0", "1-0"])


FORK_WHILE_A_THREAD_HOLDS_THE_STORE = """
import os, signal, sys, threading
from nirslake import WorkspaceStore

store = WorkspaceStore(sys.argv[1])
holding, release = threading.Event(), threading.Event()

def busy():
    with store._lock:  # a saver or a gc of the parent, mid-call at the fork
        holding.set()
        release.wait()

threading.Thread(target=busy, daemon=True).start()
holding.wait()
pid = os.fork()
if pid == 0:
    signal.alarm(10)  # a child stuck on the parent's lock dies of SIGALRM instead of returning 0
    with WorkspaceStore(sys.argv[1]) as other:
        pass
    run = store.begin_run("child", {}, [])
    store.fail_run(run, "done")
    os._exit(0 if store.get_run(run)["status"] == "failed" else 3)
_, status = os.waitpid(pid, 0)
release.set()
store.close()
print(os.waitstatus_to_exitcode(status))
"""


def test_a_child_forked_while_a_thread_holds_the_store_can_use_it(local_workspace):
    """A fork while another thread of the parent is inside a store call: the child's copy of the
    store must not wait forever for a lock whose holder does not exist in the child."""
    done = _run(FORK_WHILE_A_THREAD_HOLDS_THE_STORE, local_workspace, timeout=60)
    assert done.stdout.split() == ["0"], done.stdout + done.stderr


def test_a_segment_that_could_not_be_created_is_not_published(local_workspace, monkeypatch):
    """A durability point whose new segment cannot be created (disk full, no descriptor left)
    raises; it must not leave a segment name behind that every later read, through any store of
    the process, fails to publish. The records stay buffered and the retry makes them durable."""
    with WorkspaceStore(local_workspace) as writer, WorkspaceStore(local_workspace) as reader:
        run = writer.begin_run("r", {}, [])
        real = writer.storage.open_append

        def no_space(rel):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(writer.storage, "open_append", no_space)
        with pytest.raises(OSError, match="No space left"):
            writer.fail_run(run, "stopped")
        assert reader.list_runs().height == 0  # nothing durable yet, and no error
        monkeypatch.setattr(writer.storage, "open_append", real)
        writer.fail_run(run, "stopped again")
        assert reader.get_run(run)["status"] == "failed"
