"""report.html in headless Chromium: no console errors, every section in the DOM, figures drawn."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from betasmooth.calibrate import CANDIDATE_BETAS
from betasmooth.report import build_report
from test_report import make_run

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = (1280, 2000)


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no headless browser installed (looked for {', '.join(BROWSERS)})")


def _chromium(browser: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    return subprocess.run(
        [browser, *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    browser = _browser()
    run = make_run(tmp_path_factory.mktemp("browser") / "run")
    return browser, build_report(run)


def test_report_renders_without_console_errors(report, tmp_path):
    browser, page = report
    shot = tmp_path / "shot.png"
    done = _chromium(
        browser,
        tmp_path,
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={shot}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        page.resolve().as_uri(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # Chromium logs every console message of the page as ...:CONSOLE...; the page has no
    # script, so any such line (an uncaught error, a failed resource) is a fault.
    console = [line for line in done.stderr.splitlines() if re.search(r":CONSOLE|Uncaught", line)]
    assert console == []
    with Image.open(shot) as im:
        assert im.size == WINDOW
        rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    # The embedded figures were decoded and drawn: a text-only page is grey, the magma maps
    # and the coloured curves are not.
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert (saturation > 60).mean() > 0.01


def test_dom_holds_every_section(report, tmp_path):
    browser, page = report
    done = _chromium(browser, tmp_path, "--dump-dom", page.resolve().as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    for section in ("run", "results", "methods", "defense", "cost", "theory", "settings"):
        assert re.search(rf'<h2 id="{section}"', dom), section
    for table in (
        "medians",
        "defense-table_gradient",
        "defense-table_lrp",
        "theory-numbers",
        "settings-table",
    ):
        assert f'<table id="{table}"' in dom
    html = page.read_text()
    assert dom.count("<img ") == html.count("<img ") == 11


def test_every_table_fits_a_printed_landscape_page(tmp_path):
    # Printed, a table wider than the page is cut. Chromium's command line lays pages out
    # for the screen only, so the report's print rules are applied as screen rules, at the
    # width an A4 landscape page leaves inside Chromium's default margins (1123 - 2 x 38 px),
    # to a run with the default seven betas: fifteen columns in each defense table.
    browser = _browser()
    run = make_run(tmp_path / "run", betas=CANDIDATE_BETAS)
    # A long command line, as a user's paths make it, wraps in its cell.
    config = json.loads((run / "config.json").read_text())
    config["argv"] = ["betasmooth", "attack", "--data", "/data/" + "sub/" * 30 + "val.npz"]
    config["argv"] += ["--method", "gradient,input_x_gradient,lrp", "--out", "/runs/" * 12]
    (run / "config.json").write_text(json.dumps(config))
    html = build_report(run).read_text(encoding="utf-8")
    css = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    assert re.search(r"@page\{size:landscape\}", css)
    rules = re.search(r"@media print\{(.*)\}\s*$", css, re.S).group(1)
    measure = (
        "<script>document.body.setAttribute('data-over', JSON.stringify("
        "[...document.querySelectorAll('table')].filter("
        "t => t.scrollWidth > t.parentElement.clientWidth).map(t => t.id)))</script>"
    )
    page = tmp_path / "print.html"
    page.write_text(
        html.replace("</style>", rules + "</style>").replace("</body>", measure + "</body>"),
        encoding="utf-8",
    )
    done = _chromium(browser, tmp_path, "--window-size=1047,2000", "--dump-dom", page.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    over = re.search(r'data-over="([^"]*)"', done.stdout).group(1).replace("&quot;", '"')
    assert json.loads(over) == []
