"""``nirslake.query.scan`` takes the fsspec options docs/remote.md gives for the store
(``key``, ``secret``, nested ``client_kwargs``), translated for polars, or read through fsspec
when polars has no name for one."""

from __future__ import annotations

import polars as pl

import nirslake.query as q
from nirslake import WorkspaceStore
from nirslake.lake.storage import Storage


def test_scan_takes_nested_client_kwargs_on_s3(s3_workspace, s3_endpoint):
    with WorkspaceStore(s3_workspace) as store:
        run_id = store.begin_run("remote", {}, [{"name": "d"}])
    documented = {"key": "testing", "secret": "testing",
                  "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}
    runs = q.scan(s3_workspace, "runs", storage_options=documented).collect()
    assert runs["run_id"].to_list() == [run_id]
    # An option polars has no name for (verify): read through fsspec instead, same rows.
    other = {**documented, "client_kwargs": {**documented["client_kwargs"], "verify": False}}
    assert q.polars_options(Storage(s3_workspace, other)) is False
    again = q.scan(s3_workspace, "runs", storage_options=other).collect()
    assert again.select("run_id", "status").equals(runs.select("run_id", "status"))
    assert isinstance(again, pl.DataFrame)


def test_fsspec_s3_options_become_polars_names():
    storage = Storage("s3://bucket/ws", {"key": "K", "secret": "S", "token": "T",
                                         "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}})
    assert q.polars_options(storage) == {
        "aws_access_key_id": "K", "aws_secret_access_key": "S", "aws_session_token": "T",
        "aws_endpoint_url": "http://127.0.0.1:9000", "aws_region": "eu-west-1", "aws_allow_http": "true",
    }
    assert q.polars_options(Storage("s3://bucket/ws", {"profile": "lab"})) is False
    assert q.polars_options(Storage("s3://bucket/ws")) is None
