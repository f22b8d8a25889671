"""The getting-started page works as written: its console commands and Python run in order."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BIN = Path(sys.executable).parent


def blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)


def test_getting_started_runs_as_written(tmp_path, monkeypatch):
    page = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    steps = [(lang, body) for lang, body in blocks(page) if lang in ("console", "python")]
    assert len(steps) >= 4, "the page lost its examples"
    if not (BIN / "duckdb").exists():
        pytest.skip("the DuckDB shell (pip package duckdb-cli) is not installed beside this Python")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.chdir(tmp_path)
    outputs = []
    for lang, body in steps:
        if lang == "console":
            for line in body.splitlines():
                if not line.startswith("$ "):
                    continue
                argv = shlex.split(line[2:])
                done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
                outputs.append(done.stdout)
        else:
            exec(compile(body, "getting-started.md", "exec"), {})
    text = "\n".join(outputs)
    # The demo's datasets show up in what the commands printed, and the export was written.
    assert "wheat_protein" in text and "corn_moisture" in text
    assert (tmp_path / "best_chain.n4a").is_file()
