"""The dashboard in a real headless browser (Debian's chromium, driven through its chromedriver by
selenium) against `nirslake serve` on a demo workspace: each page shows what a person expects
(rows, a drawn plot, no script errors), and a screenshot of each is kept in tests/artifacts/web/."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (test extra)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from nirslake import WorkspaceStore  # noqa: E402
from nirslake.cli.demo import run_demo  # noqa: E402

NIRSLAKE = Path(sys.executable).parent / "nirslake"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "web"
WAIT = 60  # seconds: generous, the machine has 2 cores shared with other work
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1300,1900",
)


def find_browser() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; .ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI must run this test: .ci/run installs both
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="nirslake-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for drivers online
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Server:
    """`nirslake serve --port 0` as a person starts it; the URL is read from its first line."""

    def __init__(self, workspace: str, *flags: str):
        self.process = subprocess.Popen(
            [str(NIRSLAKE), "serve", "-w", workspace, "--port", "0", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.process.stdout.readline()), daemon=True).start()
        try:
            first = lines.get(timeout=WAIT)
        except queue.Empty:
            self.process.kill()
            pytest.fail(f"nirslake serve printed nothing in {WAIT} s")
        assert first.startswith("nirslake: serving "), (first, self.process.stderr.read() if self.process.poll() is not None else "")
        self.url = first.split(" at ", 1)[1].split(" ", 1)[0].rstrip("/")
        assert self.url.startswith("http://127.0.0.1:"), first

    def stop(self) -> tuple[int, str]:
        """Ctrl-C, as a person stops it: a clean exit, no traceback."""
        self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return self.process.returncode, err


@pytest.fixture(scope="module")
def demo_ws(tmp_path_factory) -> str:
    ws = str(tmp_path_factory.mktemp("browser") / "ws")
    run_demo(ws, quick=True, seed=0)
    run_demo(ws, quick=True, seed=1)
    return ws


@pytest.fixture(scope="module")
def server(demo_ws):
    served = Server(demo_ws)
    yield served
    code, err = served.stop()
    assert code == 0 and "Traceback" not in err, err


def wait_for(driver, css: str, count: int | None = None):
    """The elements matching ``css`` once there are any (or exactly ``count``)."""
    def ready(d):
        found = d.find_elements(By.CSS_SELECTOR, css)
        if d.find_elements(By.CSS_SELECTOR, ".error"):
            raise AssertionError(f"the page shows an error: {d.find_element(By.CSS_SELECTOR, '.error').text}")
        return found if (found and (count is None or len(found) == count)) else False
    return WebDriverWait(driver, WAIT).until(ready)


def plots_drawn(driver, expected: int) -> list[str]:
    """Wait until ``expected`` plot images have loaded and have a size; their kinds."""
    WebDriverWait(driver, WAIT).until(lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('img[data-plot]')];"
        "return imgs.length === arguments[0] && imgs.every(i => i.complete && i.naturalWidth > 300 && i.naturalHeight > 200);",
        expected))
    return driver.execute_script("return [...document.querySelectorAll('img[data-plot]')].map(i => i.dataset.plot)")


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.get_screenshot_as_file(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    print(f"screenshot: {path}")
    return path


def no_script_errors(driver) -> None:
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def table_texts(driver, css: str) -> list[list[str]]:
    """The cells' text of a table, read in one step (the page may be replacing the table)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' tbody tr')].map(r => [...r.cells].map(c => c.innerText));", css)


RUN_ID = 7  # the runs table's run id column (a delete button may follow it)


def cells(row) -> list[str]:
    return [td.text for td in row.find_elements(By.TAG_NAME, "td")]


def test_runs_page_lists_the_runs_and_datasets(browser, server, demo_ws):
    with WorkspaceStore(demo_ws) as store:
        runs = store.list_runs()
    browser.get(server.url + "/")
    rows = wait_for(browser, "#runs-table tbody tr", 2)
    assert [cells(r)[RUN_ID] for r in rows] == runs["run_id"].to_list(), "newest first, as list_runs"
    assert all(cells(r)[1] == "nirs_demo_sweep" and cells(r)[2] == "completed" for r in rows)
    assert cells(rows[0])[4:6] == ["8", "72"]  # pipelines, predictions
    assert [a.text for a in rows[0].find_elements(By.CSS_SELECTOR, "td a")] == ["wheat_protein", "corn_moisture"]
    assert browser.find_element(By.ID, "run-count").text == "runs 1–2 of 2"
    datasets = wait_for(browser, "#datasets-table tbody tr", 2)
    assert [cells(r) for r in datasets] == [["corn_moisture", "8", "2"], ["wheat_protein", "8", "2"]]
    assert "read-only" in browser.find_element(By.ID, "workspace").text
    assert not [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == "delete"], "read-only: no delete buttons"
    no_script_errors(browser)
    screenshot(browser, "runs")


def test_leaderboard_page_shows_the_ranked_chains_and_their_plots(browser, server, demo_ws):
    with WorkspaceStore(demo_ws) as store:
        board = store.leaderboard(5)
    browser.get(server.url + "/leaderboard.html?dataset=wheat_protein&n=5")
    rows = wait_for(browser, "#leaderboard-table tbody tr", 5)
    wheat = board.filter(board["dataset_name"] == "wheat_protein")
    for row, expected in zip(rows, wheat.iter_rows(named=True)):
        shown = cells(row)
        assert shown[:4] == [str(expected["rank"]), expected["model_name"], expected["preprocessings"], "rmse"]
        assert float(shown[4]) == pytest.approx(expected["val_score_mean"], rel=1e-3)
        assert shown[-1] == expected["chain_id"][-8:]
    assert plots_drawn(browser, 2) == ["leaderboard", "fold-scores"]
    no_script_errors(browser)
    screenshot(browser, "leaderboard")

    Select(browser.find_element(By.ID, "dataset")).select_by_value("corn_moisture")
    corn = board.filter(board["dataset_name"] == "corn_moisture")["chain_id"].to_list()
    WebDriverWait(browser, WAIT).until(lambda d: [
        row[-1] for row in table_texts(d, "#leaderboard-table")] == [c[-8:] for c in corn])
    assert "dataset=corn_moisture" in browser.current_url
    plots_drawn(browser, 2)


def test_chain_page_shows_fold_scores_and_the_folds_plot(browser, server, demo_ws):
    with WorkspaceStore(demo_ws) as store:
        best = store.leaderboard(1).filter(store.leaderboard(1)["dataset_name"] == "wheat_protein").row(0, named=True)
    browser.get(server.url + "/leaderboard.html?dataset=wheat_protein&n=3")
    first = wait_for(browser, "#leaderboard-table tbody tr", 3)[0]
    first.find_element(By.TAG_NAME, "a").click()  # to the best chain, as a person would
    folds = wait_for(browser, "#folds-table tbody tr", 9)
    assert browser.current_url.endswith(f"/chain.html?id={best['chain_id']}")
    shown = [cells(r) for r in folds]
    assert sorted(c[0] for c in shown) == ["test"] * 3 + ["train"] * 3 + ["val"] * 3
    val = [c for c in shown if c[0] == "val"]
    assert sorted(c[1] for c in val) == ["0", "1", "2"]
    summary = {cells(r)[0]: cells(r) for r in wait_for(browser, "#summary-table tbody tr", 1)}
    assert float(summary["val"][2]) == pytest.approx(best["val_score_mean"], rel=1e-3)
    assert summary["val"][6] == "3"
    assert browser.find_element(By.ID, "title").text == f"Chain: {best['model_name']} | {best['preprocessings']}"
    assert plots_drawn(browser, 2) == ["predicted", "residuals"]
    no_script_errors(browser)
    screenshot(browser, "chain")


def test_prediction_page_shows_predicted_vs_observed_as_nirslake_plot_draws_it(browser, server, demo_ws, tmp_path):
    with WorkspaceStore(demo_ws) as store:
        pid = store.top_predictions(1, dataset_name="corn_moisture")["prediction_id"][0]
        row = store.get_prediction(pid, load_arrays=True)
    browser.get(server.url + f"/prediction.html?id={pid}")
    samples = wait_for(browser, "#arrays-table tbody tr", len(row["y_true"]))
    assert [int(cells(r)[0]) for r in samples] == row["sample_indices"].tolist()
    assert float(cells(samples[0])[1]) == pytest.approx(row["y_true"][0], rel=1e-3)
    assert browser.find_element(By.ID, "title").text.startswith(f"Prediction: corn_moisture · {row['model_name']}")
    assert plots_drawn(browser, 2) == ["predicted", "residuals"]
    # The picture the page shows is the one `nirslake plot` writes, byte for byte.
    shown = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(document.querySelector('img[data-plot=predicted]').src).then(r => r.text()).then(done);")
    target = tmp_path / "predicted.svg"
    done = subprocess.run([str(NIRSLAKE), "plot", "predicted", "-w", demo_ws, "--prediction", pid, "-o", str(target)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert shown == target.read_text(encoding="utf-8")
    no_script_errors(browser)
    screenshot(browser, "prediction")


def test_two_runs_compared_from_the_runs_page(browser, server):
    browser.get(server.url + "/")
    rows = wait_for(browser, "#runs-table tbody tr", 2)
    for row in rows:
        row.find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
    next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.startswith("compare")).click()
    compared = wait_for(browser, "#compare-table tbody tr", 8)
    assert {cells(r)[0] for r in compared} == {"corn_moisture", "wheat_protein"}
    for row in compared:
        val_a, val_b, change = (float(x) for x in cells(row)[4:7])
        assert change == pytest.approx(val_a - val_b, abs=2e-3)  # rmse: a positive change means b is better
    no_script_errors(browser)
    screenshot(browser, "compare")


def test_a_bad_link_shows_the_api_error_on_the_page(browser, server):
    browser.get(server.url + "/chain.html?id=no-such-chain")
    message = WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".error"))[0].text
    assert message == "no chain 'no-such-chain' in this workspace"


def test_delete_button_only_with_the_flag_and_it_deletes(browser, tmp_path):
    ws = str(tmp_path / "ws")
    run_demo(ws, quick=True, seed=0)
    run_demo(ws, quick=True, seed=1)
    served = Server(ws, "--allow-delete")
    try:
        browser.get(served.url + "/")
        rows = wait_for(browser, "#runs-table tbody tr", 2)
        victim = cells(rows[1])[RUN_ID]
        assert "deleting runs allowed" in browser.find_element(By.ID, "workspace").text
        rows[1].find_element(By.XPATH, ".//button[text()='delete']").click()
        alert = WebDriverWait(browser, WAIT).until(lambda d: d.switch_to.alert)
        assert victim in alert.text
        alert.accept()
        remaining = wait_for(browser, "#runs-table tbody tr", 1)
        assert cells(remaining[0])[RUN_ID] != victim
        assert browser.find_element(By.ID, "run-count").text == "runs 1–1 of 1"
        screenshot(browser, "runs-after-delete")
    finally:
        code, err = served.stop()
    assert code == 0 and "Traceback" not in err, err
    with WorkspaceStore(ws) as store:
        assert store.get_run(victim) is None and store.list_runs().height == 1
