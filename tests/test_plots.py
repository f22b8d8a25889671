"""Pictures: every plot kind as PNG and SVG from nirslake.plots and from `nirslake plot`, valid and
not empty, the same bytes the web API serves; bad requests get one-line errors."""

from __future__ import annotations

import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the plot extra is not installed: pip install -e '.[plot]'")

from nirslake import WorkspaceStore, cli, plots  # noqa: E402
from nirslake.cli.demo import run_demo  # noqa: E402

NIRSLAKE = Path(sys.executable).parent / "nirslake"


@pytest.fixture(scope="module")
def demo_ws(tmp_path_factory) -> str:
    ws = str(tmp_path_factory.mktemp("plots") / "ws")
    run_demo(ws, quick=True)
    return ws


@pytest.fixture(scope="module")
def store(demo_ws):
    with WorkspaceStore(demo_ws) as s:
        yield s


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82"), "PNG without its header or end chunk"
    return struct.unpack(">II", data[16:24])


def svg_root(data: bytes) -> ET.Element:
    root = ET.fromstring(data)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return root


def marks(root: ET.Element) -> int:
    """Drawn shapes: matplotlib writes markers and text as paths (and <use> of a defined path)."""
    return sum(1 for e in root.iter() if e.tag.rsplit("}", 1)[-1] in ("path", "use"))


def options(store, kind: str) -> dict:
    if kind in ("predicted", "residuals"):
        return {"chain_id": store.leaderboard(1)["chain_id"][0]}
    return {"dataset_name": "wheat_protein", "n": 4}


@pytest.mark.parametrize("kind", plots.KINDS)
def test_every_kind_renders_a_valid_png_and_svg(store, kind, tmp_path):
    fig = plots.figure(store, kind, **options(store, kind))
    png = plots.save(fig, tmp_path / f"{kind}.png").read_bytes()
    width, height = png_size(png)
    assert width >= 500 and height >= 300 and len(png) > 10_000
    # A figure lays itself out at its first drawing: each picture is drawn once, as the CLI and the web do.
    svg = plots.save(plots.figure(store, kind, **options(store, kind)), tmp_path / f"{kind}.svg").read_bytes()
    assert marks(svg_root(svg)) > 20
    again = plots.figure(store, kind, **options(store, kind))
    assert plots.render(again, "svg") == svg, "stable bytes: the same picture drawn anew renders the same SVG"


def test_a_prediction_and_a_chain_show_their_points(store):
    pid = store.top_predictions(1)["prediction_id"][0]
    row = store.get_prediction(pid, load_arrays=True)
    one = plots.figure(store, "predicted", prediction_id=pid)
    ax = one.axes[0]
    points = ax.collections[0].get_offsets()
    assert len(points) == len(row["y_true"]) and (points[:, 0] == row["y_true"]).all() and (points[:, 1] == row["y_pred"]).all()
    chain = plots.figure(store, "predicted", chain_id=row["chain_id"])
    assert len(chain.axes[0].collections) == 3, "one colour per fold"
    assert sum(len(c.get_offsets()) for c in chain.axes[0].collections) == 45  # every training sample once out of fold
    test = plots.figure(store, "residuals", chain_id=row["chain_id"], partition="test")
    assert sum(len(c.get_offsets()) for c in test.axes[0].collections) == 3 * 15


@pytest.mark.parametrize("kind", plots.KINDS)
def test_cli_plot_writes_the_same_picture_the_web_api_serves(demo_ws, store, kind, tmp_path):
    pytest.importorskip("fastapi", reason="the web extra is not installed")
    from fastapi.testclient import TestClient

    from nirslake.web import create_app

    opts = options(store, kind)
    flags = {"chain_id": "--chain", "dataset_name": "--dataset", "n": "-n"}
    argv = [str(NIRSLAKE), "plot", kind, "-w", demo_ws, "-o", str(tmp_path / f"{kind}.svg")]
    for key, value in opts.items():
        argv += [flags[key], str(value)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {tmp_path / f'{kind}.svg'}"
    written = (tmp_path / f"{kind}.svg").read_bytes()
    with TestClient(create_app(demo_ws)) as client:
        served = client.get(f"/api/plots/{kind}.svg", params=opts)
    assert served.status_code == 200 and served.content == written


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predicted", "--prediction", "nope"], "unknown prediction_id 'nope'"),
        (["predicted"], "give a prediction_id or a chain_id (one of them)"),
        (["leaderboard"], "the workspace holds several datasets: choose one of corn_moisture, wheat_protein"),
        (["leaderboard", "--dataset", "milk"], "no ranked chains for dataset 'milk': choose one of corn_moisture, wheat_protein"),
        (["fold-scores", "--dataset", "milk_fat", "--chain", "x"], "the fold-scores plot shows the chains of a dataset"),
        (["leaderboard", "--dataset", "wheat_protein", "-n", "0"], "n must be a positive integer, got 0"),
    ],
)
def test_bad_plot_requests_get_one_line_errors_and_write_nothing(demo_ws, argv, message, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert cli.main(["plot", *argv, "-w", demo_ws, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nirslake: error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


def test_the_file_name_picks_the_format(store, tmp_path):
    fig = plots.figure(store, "leaderboard", dataset_name="corn_moisture")
    with pytest.raises(ValueError, match=r"must end in \.png or \.svg"):
        plots.save(fig, tmp_path / "board.jpg")
    assert not (tmp_path / "board.jpg").exists()


def test_a_prediction_without_arrays_says_so(tmp_path, make_pipeline, add_prediction):
    with WorkspaceStore(str(tmp_path / "ws")) as store:
        pid = add_prediction(store, make_pipeline(store))
        with pytest.raises(ValueError, match=f"prediction {pid} has no arrays"):
            plots.figure(store, "predicted", prediction_id=pid)
