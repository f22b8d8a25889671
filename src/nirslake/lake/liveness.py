"""Who writes a run: a small marker per run naming its writer process (host, pid, and the
process's start time, so a reused pid is not taken for the writer), and whether that process is
still alive (lake spec §12).

A run's status says ``running`` until its writer records ``completed`` or ``failed``; a writer
killed before that (SIGKILL, a lost machine, an unhandled signal) leaves it ``running`` for ever.
The marker lets ``check`` tell such a run from one still being written: on the writer's own host
the process is looked up; from another host nothing can be proven, and the run counts as alive.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

from .storage import Storage

WRITERS_DIR = "_writers"


@dataclass(frozen=True)
class Writer:
    """The process that began a run."""

    host: str
    pid: int
    started: str | None  # the process's start time as the kernel tells it (Linux), None elsewhere

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}"


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), with
    the boot id: the two tell one process from a later one given the same pid. None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count from after it.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie has exited: only its exit status waits to be collected
        return "exited"
    return f"{boot}:{fields[19]}"


def this_writer() -> Writer:
    return Writer(socket.gethostname(), os.getpid(), _process_start(os.getpid()))


def marker(run_id: str) -> str:
    return f"{WRITERS_DIR}/{run_id}.json"


def record_writer(storage: Storage, run_id: str, writer: Writer | None = None) -> None:
    """Write the marker naming the process that writes ``run_id`` (before its records are published)."""
    writer = writer or this_writer()
    data = json.dumps({"run_id": run_id, "host": writer.host, "pid": writer.pid, "started": writer.started})
    storage.publish(marker(run_id), data.encode(), overwrite=True)


def run_writer(storage: Storage, run_id: str) -> Writer | None:
    """The process that began ``run_id``, or None when no marker names it (a run written before
    markers existed, or by another tool)."""
    try:
        found = json.loads(storage.read_bytes(marker(run_id)))
        return Writer(str(found["host"]), int(found["pid"]), found.get("started"))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def is_alive(writer: Writer) -> bool | None:
    """True when the writer process still runs, False when it is proven gone, None when this
    host cannot tell (the writer ran on another host)."""
    if writer.host != socket.gethostname():
        return None
    try:
        os.kill(writer.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds the pid: not ours, unless the start time says so
        pass
    if writer.started is None:
        return _process_start(writer.pid) != "exited"  # the pid exists and no start time was kept to tell it apart: taken for alive
    current = _process_start(writer.pid)
    if current is None:
        return os.path.exists(f"/proc/{writer.pid}") if os.path.isdir("/proc") else True
    return current == writer.started
