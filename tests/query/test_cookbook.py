"""Every query of sql/cookbook.sql runs against a demo workspace and returns rows."""

from __future__ import annotations

import pytest

from nirslake.query.catalog import sql_dir
from nirslake.cli.demo import run_demo
from nirslake import WorkspaceStore


def cookbook_queries() -> list[str]:
    text = (sql_dir() / "cookbook.sql").read_text(encoding="utf-8")
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


def test_cookbook_is_shipped_and_not_empty():
    assert len(cookbook_queries()) >= 5


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    ws = str(tmp_path_factory.mktemp("cookbook") / "ws")
    run_demo(ws, quick=True)
    store = WorkspaceStore(ws)
    yield store
    store.close()


@pytest.mark.parametrize("index", range(len(cookbook_queries())))
def test_cookbook_query_runs(demo_store, index):
    frame = demo_store.sql(cookbook_queries()[index])
    assert frame.height > 0, cookbook_queries()[index]
