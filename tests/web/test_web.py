"""The web API through an HTTP client (Starlette's TestClient, the real ASGI app): every endpoint
against the store's own answers, pagination with totals, NaN/inf as null, errors as JSON with a
status code, and the read-only default."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]'")
from fastapi.testclient import TestClient  # noqa: E402

from nirslake import WorkspaceStore
from nirslake.query import cookbook  # noqa: E402
from nirslake.cli.demo import run_demo  # noqa: E402
from nirslake.web import create_app  # noqa: E402


@pytest.fixture(scope="module")
def demo_ws(tmp_path_factory) -> str:
    """Two quick demo runs (different seeds): 2 datasets, 16 pipelines, 144 predictions."""
    ws = str(tmp_path_factory.mktemp("web") / "ws")
    run_demo(ws, quick=True, seed=0)
    run_demo(ws, quick=True, seed=1)
    return ws


@pytest.fixture(scope="module")
def client(demo_ws):
    with TestClient(create_app(demo_ws), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def store(demo_ws):
    with WorkspaceStore(demo_ws) as s:
        yield s


def get(client, path: str, expect: int = 200, **params):
    response = client.get(path, params=params)
    assert response.status_code == expect, response.text
    assert response.headers["content-type"].startswith("application/json")
    return json.loads(response.text)  # strict: Python's parser would take NaN, but the body must not hold one


def ids(items: list[dict], key: str) -> list[str]:
    return [item[key] for item in items]


# --------------------------------------------------------------------------- runs


def test_runs_match_list_runs_newest_first(client, store):
    body = get(client, "/api/runs")
    expected = store.list_runs()
    assert body["total"] == 2 and body["offset"] == 0 and body["limit"] == 50
    assert ids(body["items"], "run_id") == expected["run_id"].to_list()
    first = body["items"][0]
    assert first["config"]["seed"] == 1, "JSON columns are sent decoded, the newest run first"
    assert first["summary"]["n_predictions"] == 72 and first["status"] == "completed"
    assert first["created_at"].startswith(str(expected["created_at"][0].year))


def test_runs_filters_pagination_and_sorting(client, store):
    every = ids(get(client, "/api/runs", limit=10)["items"], "run_id")
    page1 = get(client, "/api/runs", limit=1, offset=0)
    page2 = get(client, "/api/runs", limit=1, offset=1)
    past = get(client, "/api/runs", limit=1, offset=5)
    assert page1["total"] == page2["total"] == past["total"] == 2
    assert ids(page1["items"], "run_id") + ids(page2["items"], "run_id") == every
    assert past["items"] == []
    oldest_first = get(client, "/api/runs", sort="created_at")["items"]
    assert ids(oldest_first, "run_id") == every[::-1]
    assert get(client, "/api/runs", status="failed")["total"] == 0
    assert get(client, "/api/runs", dataset="wheat_protein")["total"] == 2
    assert get(client, "/api/runs", dataset="no_such_dataset")["total"] == 0


def test_one_run_and_unknown_run(client, store):
    run_id = store.list_runs()["run_id"][0]
    body, expected = get(client, f"/api/runs/{run_id}"), store.get_run(run_id)
    assert body["created_at"] == expected["created_at"].isoformat()
    assert body["completed_at"] == expected["completed_at"].isoformat()
    for key in ("run_id", "name", "status", "config", "datasets", "summary", "error"):
        assert body[key] == expected[key], key
    body = get(client, "/api/runs/not-a-run", expect=404)
    assert body == {"error": "no run 'not-a-run' in this workspace", "status": 404}


# --------------------------------------------------------------------------- pipelines and chains


def test_pipelines_match_list_pipelines_with_filters(client, store):
    run_id = store.list_runs()["run_id"][1]
    body = get(client, "/api/pipelines", run_id=run_id, dataset_name="corn_moisture")
    expected = store.list_pipelines(run_id=run_id, dataset_name="corn_moisture")
    assert body["total"] == expected.height == 4
    assert ids(body["items"], "pipeline_id") == expected["pipeline_id"].to_list()
    assert get(client, "/api/pipelines", limit=5)["total"] == 16
    best = get(client, "/api/pipelines", sort="best_val", limit=1)["items"][0]
    assert best["best_val"] == store.list_pipelines()["best_val"].min()
    assert get(client, "/api/pipelines", status="completed")["total"] == 16


def test_one_pipeline_holds_its_chains(client, store):
    pipeline_id = store.list_pipelines()["pipeline_id"][0]
    body = get(client, f"/api/pipelines/{pipeline_id}")
    assert body["pipeline_id"] == pipeline_id
    assert ids(body["chains"], "chain_id") == store.get_chains_for_pipeline(pipeline_id)["chain_id"].to_list()
    assert isinstance(body["chains"][0]["steps"], list)
    assert get(client, "/api/pipelines/nope", expect=404)["status"] == 404


def test_chains_list_filters_and_pages(client, store):
    body = get(client, "/api/chains", limit=3)
    assert body["total"] == 16 and len(body["items"]) == 3
    pipeline_id = store.list_pipelines()["pipeline_id"][0]
    only = get(client, "/api/chains", pipeline_id=pipeline_id)
    assert ids(only["items"], "chain_id") == store.get_chains_for_pipeline(pipeline_id)["chain_id"].to_list()
    run_id = store.list_runs()["run_id"][0]
    assert get(client, "/api/chains", run_id=run_id)["total"] == 8


def test_one_chain_with_fold_scores_and_summary(client, store):
    top = store.leaderboard(1).row(0, named=True)
    body = get(client, f"/api/chains/{top['chain_id']}")
    assert body["chain_id"] == top["chain_id"] and body["fold_strategy"] == "KFold(3)"
    val = [f for f in body["folds"] if f["partition"] == "val"]
    assert sorted(f["fold_id"] for f in val) == ["0", "1", "2"]
    assert {f["partition"] for f in body["folds"]} == {"train", "val", "test"}
    summary = {s["partition"]: s for s in body["summary"]}
    assert math.isclose(summary["val"]["val_score_mean"], top["val_score_mean"])
    assert math.isclose(np.mean([f["val_score"] for f in val]), top["val_score_mean"])
    assert get(client, "/api/chains/nope", expect=404)["error"] == "no chain 'nope' in this workspace"


def test_chain_summaries_and_leaderboard(client, store):
    body = get(client, "/api/chain-summaries", dataset_name="wheat_protein", sort="val_score_mean", limit=100)
    assert body["total"] == 8 and all(i["partition"] == "val" for i in body["items"])
    means = [i["val_score_mean"] for i in body["items"]]
    assert means == sorted(means)
    assert get(client, "/api/chain-summaries", partition="test", limit=1)["total"] == 16

    board = get(client, "/api/leaderboard", n=2)
    expected = store.leaderboard(2).to_dicts()
    assert [(i["dataset_name"], i["rank"], i["chain_id"]) for i in board["items"]] == [
        (e["dataset_name"], e["rank"], e["chain_id"]) for e in expected]
    for item, row in zip(board["items"], expected):  # DuckDB's parallel mean may differ in the last bit
        assert math.isclose(item["val_score_mean"], row["val_score_mean"], rel_tol=1e-12)
    one = get(client, "/api/leaderboard", n=3, dataset_name="corn_moisture")
    assert [i["rank"] for i in one["items"]] == [1, 2, 3] and {i["dataset_name"] for i in one["items"]} == {"corn_moisture"}


def test_datasets(client):
    assert get(client, "/api/datasets")["items"] == [
        {"dataset_name": "corn_moisture", "pipelines": 8, "runs": 2},
        {"dataset_name": "wheat_protein", "pipelines": 8, "runs": 2},
    ]


# --------------------------------------------------------------------------- predictions


def test_predictions_filters_pagination_and_totals(client, store):
    body = get(client, "/api/predictions", limit=10)
    assert body["total"] == 144 and len(body["items"]) == 10
    assert "y_true" not in body["items"][0], "listings carry no arrays"
    val = get(client, "/api/predictions", partition="val", dataset_name="wheat_protein", limit=100)
    assert val["total"] == store.query_predictions(partition="val", dataset_name="wheat_protein").height == 24
    seen = []
    for offset in range(0, 24, 7):  # walk the pages: every row once, in the store's order
        seen += ids(get(client, "/api/predictions", partition="val", dataset_name="wheat_protein", limit=7, offset=offset)["items"], "prediction_id")
    assert seen == store.query_predictions(partition="val", dataset_name="wheat_protein")["prediction_id"].to_list()
    best = get(client, "/api/predictions", partition="val", sort="val_score", limit=1)["items"][0]
    assert best["prediction_id"] == store.top_predictions(1)["prediction_id"][0]
    worst = get(client, "/api/predictions", partition="val", sort="-val_score", limit=1)["items"][0]
    assert worst["val_score"] == store.query_predictions(partition="val")["val_score"].max()
    chain_id = store.leaderboard(1)["chain_id"][0]
    assert get(client, "/api/predictions", chain_id=chain_id)["total"] == 9  # 3 folds x train/val/test
    assert get(client, "/api/predictions", fold_id="0", partition="test", limit=1)["total"] == 16
    assert get(client, "/api/predictions", dataset_name="wheat%", partition="val", limit=1)["total"] == 24


def test_one_prediction_with_its_arrays(client, store):
    pid = store.top_predictions(1)["prediction_id"][0]
    body = get(client, f"/api/predictions/{pid}")
    row = store.get_prediction(pid, load_arrays=True)
    assert body["prediction_id"] == pid and body["scores"] == row["scores"]
    assert body["y_true"] == row["y_true"].tolist() and body["y_pred"] == row["y_pred"].tolist()
    assert body["sample_indices"] == row["sample_indices"].tolist() and body["y_proba"] is None
    bare = get(client, f"/api/predictions/{pid}", arrays="false")
    assert "y_true" not in bare
    assert get(client, "/api/predictions/nope", expect=404)["error"] == "no prediction 'nope' in this workspace"


def test_nan_and_infinities_are_sent_as_null(tmp_path, make_pipeline, add_prediction):
    ws = str(tmp_path / "ws")
    with WorkspaceStore(ws) as store:
        ids_ = make_pipeline(store)
        pid = add_prediction(store, ids_, val_score=math.inf, test_score=math.nan, train_score=-math.inf,
                             scores={"val": {"rmse": math.inf, "r2": math.nan}})
        store.save_prediction_arrays(pid, [1.0, 2.0, 3.0], [1.5, math.nan, math.inf])
        store.complete_run(ids_.run_id, {"best": math.nan})
        stored = store.get_prediction(pid, load_arrays=True)
    assert stored["val_score"] == math.inf and math.isinf(stored["y_pred"][2]), "the store keeps infinities"
    with TestClient(create_app(ws)) as c:
        one = c.get(f"/api/predictions/{pid}")
        listed = c.get("/api/predictions")
        board = c.get("/api/leaderboard")
        summaries = c.get("/api/chain-summaries")
        run = c.get(f"/api/runs/{ids_.run_id}")
    for response in (one, listed, board, summaries, run):
        assert response.status_code == 200, response.text
        assert "NaN" not in response.text and "Infinity" not in response.text
        json.loads(response.text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    body = one.json()
    assert body["val_score"] is None and body["test_score"] is None and body["train_score"] is None
    assert body["y_pred"] == [1.5, None, None] and body["y_true"] == [1.0, 2.0, 3.0]
    assert body["scores"] == {"val": {"rmse": None, "r2": None}}
    assert listed.json()["items"][0]["val_score"] is None
    assert run.json()["summary"] == {"best": None}


# --------------------------------------------------------------------------- compare, cookbook, plots


def test_compare_two_runs(client, store):
    newest, older = store.list_runs()["run_id"].to_list()
    body = get(client, "/api/compare", run_a=older, run_b=newest)
    assert body["run_a"]["run_id"] == older and body["run_b"]["run_id"] == newest
    assert body["total"] == 8  # 2 datasets x 2 models x 2 preprocessings
    expected = cookbook.run_query(store, "compare_runs", run_a=older, run_b=newest)
    assert [i["change"] for i in body["items"]] == expected["change"].to_list()
    for item in body["items"]:  # change > 0 means b is better; rmse: lower is better
        assert math.isclose(item["change"], round(item["val_a"] - item["val_b"], 4), abs_tol=2e-4)
    assert get(client, "/api/compare")["run_a"]["run_id"] == older, "the default compares the two newest runs"
    assert get(client, "/api/compare", run_a="nope", run_b=newest, expect=404)["error"] == "no run 'nope' in this workspace"


def test_named_queries_list_and_run(client, store):
    listed = get(client, "/api/queries")
    assert [q["name"] for q in listed["items"]] == cookbook.query_names()
    assert {"run_a", "run_b"} == set(next(q for q in listed["items"] if q["name"] == "compare_runs")["parameters"])
    body = get(client, "/api/queries/leaderboard", top=1)
    assert body["total"] == 2 and {i["rank"] for i in body["items"]} == {1}
    assert get(client, "/api/queries/leaderboard")["total"] == 6  # default top = 3
    assert "no query named 'nope'" in get(client, "/api/queries/nope", expect=400)["error"]
    assert "no parameter 'tops'" in get(client, "/api/queries/leaderboard", tops=1, expect=400)["error"]
    assert get(client, "/api/queries/leaderboard", top="abc", expect=400)["error"].startswith("the query failed: Conversion Error")


def test_plots_are_images(client, store):
    chain_id = store.leaderboard(1)["chain_id"][0]
    pid = store.top_predictions(1)["prediction_id"][0]
    for path, params in [
        ("predicted.png", {"prediction_id": pid}),
        ("predicted.svg", {"chain_id": chain_id}),
        ("residuals.svg", {"chain_id": chain_id, "partition": "test"}),
        ("fold-scores.png", {"dataset_name": "wheat_protein", "n": 4}),
        ("leaderboard.svg", {"dataset_name": "corn_moisture"}),
    ]:
        response = client.get(f"/api/plots/{path}", params=params)
        assert response.status_code == 200, (path, response.text)
        if path.endswith(".png"):
            assert response.headers["content-type"] == "image/png" and response.content[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert response.headers["content-type"].startswith("image/svg+xml") and b"<svg" in response.content[:1000]
        assert len(response.content) > 5000
    assert "several datasets" in get(client, "/api/plots/leaderboard.png", expect=400)["error"]
    assert get(client, "/api/plots/predicted.png", chain_id="nope", expect=404)["error"] == "unknown chain_id 'nope'"
    assert "KIND.png or KIND.svg" in get(client, "/api/plots/pie.gif", expect=404)["error"]


# --------------------------------------------------------------------------- errors, read-only, delete, schema


def test_errors_are_json_with_their_status(client):
    assert get(client, "/api/runs", limit=0, expect=422)["error"] == "query.limit: Input should be greater than or equal to 1"
    assert get(client, "/api/runs", offset=-1, expect=422)["status"] == 422
    assert get(client, "/api/predictions", branch_id="x", expect=422)["detail"][0]["loc"] == ["query", "branch_id"]
    assert get(client, "/api/runs", sort="nope", expect=400)["error"].startswith("cannot sort by 'nope': choose one of run_id,")
    assert get(client, "/api/nowhere", expect=404)["error"] == "nothing at /api/nowhere: the API's endpoints are listed at /openapi.json"
    response = client.post("/api/runs")
    assert response.status_code == 405 and response.json() == {"error": "POST is not allowed on /api/runs", "status": 405}


def test_read_only_by_default_refuses_delete_and_keeps_the_run(client, store):
    run_id = store.list_runs()["run_id"][0]
    response = client.delete(f"/api/runs/{run_id}")
    assert response.status_code == 403
    assert response.json() == {
        "error": "this server is read-only: start it with `nirslake serve --allow-delete` to delete runs", "status": 403}
    assert get(client, "/api/info")["read_only"] is True
    assert get(client, f"/api/runs/{run_id}")["run_id"] == run_id and store.get_run(run_id) is not None


def test_delete_with_the_flag_removes_the_run_everywhere(tmp_path):
    ws = str(tmp_path / "ws")
    run_demo(ws, quick=True)
    run_demo(ws, quick=True, seed=1)
    with TestClient(create_app(ws, allow_delete=True)) as c:
        assert c.get("/api/info").json()["allow_delete"] is True
        victim, kept = c.get("/api/runs", params={"sort": "created_at"}).json()["items"]
        response = c.delete(f"/api/runs/{victim['run_id']}")
        assert response.status_code == 200, response.text
        # the run, 8 pipelines, 8 chains, 72 predictions and the pipelines' log events
        assert response.json()["run_id"] == victim["run_id"] and response.json()["deleted_records"] > 1 + 8 + 8 + 72
        assert c.get(f"/api/runs/{victim['run_id']}").status_code == 404
        assert [r["run_id"] for r in c.get("/api/runs").json()["items"]] == [kept["run_id"]]
        assert c.get("/api/predictions", params={"limit": 1}).json()["total"] == 72
        again = c.delete(f"/api/runs/{victim['run_id']}")
        assert again.status_code == 404 and again.json()["error"] == f"no run '{victim['run_id']}' in this workspace"
    with WorkspaceStore(ws) as store:  # another process's view of the lake agrees
        assert store.get_run(victim["run_id"]) is None and store.query_predictions().height == 72


def test_openapi_schema_lists_every_endpoint(client):
    schema = get(client, "/openapi.json")
    assert schema["info"]["title"] == "nirslake"
    paths = schema["paths"]
    for path in ("/api/runs", "/api/runs/{run_id}", "/api/pipelines", "/api/pipelines/{pipeline_id}", "/api/chains",
                 "/api/chains/{chain_id}", "/api/chain-summaries", "/api/leaderboard", "/api/predictions",
                 "/api/predictions/{prediction_id}", "/api/compare", "/api/queries", "/api/queries/{name}",
                 "/api/plots/{filename}", "/api/datasets", "/api/info"):
        assert path in paths, path
    assert "delete" in paths["/api/runs/{run_id}"]
    names = {p["name"] for p in paths["/api/predictions"]["get"]["parameters"]}
    assert {"dataset_name", "partition", "fold_id", "run_id", "chain_id", "sort", "limit", "offset"} <= names


def test_the_dashboard_pages_are_served(client):
    for page in ("/", "/leaderboard.html", "/chain.html", "/prediction.html", "/compare.html", "/app.js", "/style.css"):
        response = client.get(page)
        assert response.status_code == 200, page
    assert "<title>nirslake · runs</title>" in client.get("/").text


def test_a_missing_workspace_is_refused_without_creating_it(tmp_path):
    with pytest.raises(ValueError, match="no nirslake workspace at"):
        create_app(str(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()


def test_serve_refuses_a_missing_workspace_and_a_busy_port_in_one_line(demo_ws, tmp_path, capsys):
    import socket

    from nirslake import cli

    assert cli.main(["serve", "-w", str(tmp_path / "nothing"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nirslake: error: no nirslake workspace at") and err.count("\n") == 1
    assert not (tmp_path / "nothing").exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "-w", demo_ws, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nirslake: error: cannot listen on 127.0.0.1:{port}: ") and err.count("\n") == 1, err


def test_loopback_hosts_are_told_from_the_others():
    from nirslake.web.app import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("example.org")


def test_docs_web_md_pairs_every_endpoint_with_its_python_twin(client):
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "web.md").read_text(encoding="utf-8")
    table = [line for line in page.splitlines() if line.startswith("| `GET /api") or line.startswith("| `DELETE /api")]
    for path, methods in get(client, "/openapi.json")["paths"].items():
        for method in methods:
            documented = path.replace("{filename}", "{kind}.{png,svg}")
            rows = [line for line in table if line.startswith(f"| `{method.upper()} {documented}")
                    and line[len(f"| `{method.upper()} {documented}"):][:1] in ("?", "`", " ")]
            assert rows, f"{method.upper()} {path} is missing from docs/web.md"
            twin = rows[0].split("|")[2]
            assert "store." in twin or "nirslake." in twin, f"{method.upper()} {path}: no Python twin named"


def test_a_workspace_on_s3_is_served_alike(s3_workspace):
    run_demo(s3_workspace, quick=True)
    with WorkspaceStore(s3_workspace) as store:
        expected_runs = store.list_runs()["run_id"].to_list()
        pid = store.top_predictions(1)["prediction_id"][0]
        n_true = len(store.get_prediction(pid, load_arrays=True)["y_true"])
    with TestClient(create_app(s3_workspace)) as c:
        assert [r["run_id"] for r in c.get("/api/runs").json()["items"]] == expected_runs
        assert c.get("/api/chains", params={"limit": 1}).json()["total"] == 8
        assert c.get("/api/leaderboard", params={"n": 1}).json()["total"] == 2
        assert len(c.get(f"/api/predictions/{pid}").json()["y_true"]) == n_true
        assert c.get("/api/plots/predicted.png", params={"prediction_id": pid}).content[:4] == b"\x89PNG"
        only_one = c.get("/api/compare")
        assert only_one.status_code == 400 and "comparing needs two runs" in only_one.json()["error"]
