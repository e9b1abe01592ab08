"""What a person sees: the tiny sweep (conftest) served by TensorBoard on 127.0.0.1 and opened in
headless Chromium, Debian's `chromium` driven by Playwright (no browser is downloaded). Runs where
that browser is installed (`.ci/run` installs it); screenshots go to the test's temp directory."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from vanishlab.dashboard import LOG10
from vanishlab.results import GRAD_NORMS_AT_START, STATUS, VERDICT, read_record

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)"),
]
WAIT_MS = 30_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tensorboard(tiny_sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tensorboard --logdir <sweep>`, as a user opens a sweep; its URL once it answers."""
    port = free_port()
    log = tmp_path_factory.mktemp("tensorboard") / "tensorboard.log"
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(tiny_sweep)]
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.time() < deadline and process.poll() is None, log.read_text()
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with playwright.sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox refuses to start as root, as CI runs.
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, tmp_path: Path) -> Iterator:
    page = browser.new_page(viewport={"width": 1600, "height": 1100})
    page.set_default_timeout(WAIT_MS)
    yield page
    page.screenshot(path=tmp_path / "screenshot.png")
    page.close()


def records(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: read_record(p) for p in sweep_dir.glob("*/metrics.json")}


def until(condition, what: str):
    """Poll `condition` (TensorBoard loads its data after the page) until it is true."""
    deadline = time.time() + WAIT_MS / 1000
    while not (result := condition()):
        assert time.time() < deadline, f"not shown within {WAIT_MS} ms: {what}"
        time.sleep(0.5)
    return result


def test_hparams_table_shows_status_and_verdict_of_each_run(page, tensorboard, tiny_sweep):
    page.goto(f"{tensorboard}/#hparams")
    jobs = records(tiny_sweep)

    def cells() -> list[str]:
        texts = [t.strip() for t in page.locator("vaadin-grid-cell-content").all_inner_texts()]
        return texts if all(name in texts for name in jobs) else []

    shown = until(cells, "a row per run in the HParams table")
    header = shown[: shown.index("Trial ID") + 6]
    assert header[-4:] == ["Status", "Verdict", "model.activation", "optimizer.lr"], header
    for name, record in jobs.items():
        row = shown[shown.index(name) :]
        assert row[2:4] == [record[STATUS], record[VERDICT]], (name, row[:6])


def test_custom_scalars_chart_of_the_gradient_has_one_line_per_layer(page, tensorboard, tiny_sweep):
    name, record = sorted(records(tiny_sweep).items())[0]
    layers = len(record[GRAD_NORMS_AT_START])
    page.goto(f"{tensorboard}/#custom_scalars&regexInput={quote('^' + re.escape(name) + '$')}")
    chart = page.locator("tf-custom-scalar-multi-line-chart-card").first
    matches = chart.get_by_text(re.compile(r"Matches \(\d+\)"))
    until(lambda: matches.count() and matches.inner_text() != "Matches (0)", "the chart's lines")
    assert chart.get_by_text("log10 weight-gradient norm").count() == 1
    assert matches.inner_text() == f"Matches ({layers})"
    # Each series is drawn twice: smoothed, over its raw values.
    until(lambda: chart.locator("path.line").count() == 2 * layers, f"{layers} lines drawn")


def test_time_series_opens_on_log10_and_its_gradient_card_has_every_run(
    page, tensorboard, tiny_sweep
):
    page.goto(f"{tensorboard}/#timeseries")
    groups = page.locator(".group-title")
    until(lambda: groups.count() > 1, "the card groups")
    assert groups.all_inner_texts()[:2] == ["Pinned", LOG10.rstrip("/")]

    tag = f"{LOG10}grad_norm/layer_00"
    page.goto(f"{tensorboard}/?tagFilter={quote(tag)}#timeseries")
    card = page.locator("scalar-card").first
    jobs = records(tiny_sweep)
    text = until(lambda: all(n in card.inner_text() for n in jobs) and card.inner_text(), tag)
    for name in jobs:
        value = re.search(re.escape(name) + r"\s+(\S+)\s+(\S+)", text)
        assert value and float(value[2]) == float(value[2]), (name, text)  # a number, not NaN
