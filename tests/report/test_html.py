"""report.html of the demo ``run``, rendered by a real headless browser (Chromium from the distribution).

The page must open from ``file://`` with no network, run its script without an error, and show
the image browser, the class table and the error breakdown filled in. ``FCOS_WRITE_SCREENSHOT=1``
also writes the screenshot the README shows (docs/report.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fcos_offline.cli import main

REPO = Path(__file__).resolve().parents[2]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium here: .ci/run installs the distribution's package (apt-get install chromium); it could not be installed")


def _browse(url: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--enable-logging=stderr", "--v=0"]
    return subprocess.run([_chromium(), *flags, *args, url], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("html") / "run"
    assert main(["run", "--workdir", str(root), "--num-images", "12", "--batch-sizes", "1", "--engines", "onnxruntime"]) == 0
    return root


def test_the_run_page_renders_in_a_browser_without_errors(demo_run: Path, tmp_path: Path) -> None:
    page = demo_run / "report.html"
    text = page.read_text()
    fetches = re.findall(r"""(?:src|href)\s*=\s*['"]?(?:https?:)?//|url\(\s*['"]?(?:https?:)?//|@import|fetch\(|XMLHttpRequest""", text)
    assert not fetches, f"the page must not reach the network: {fetches}"  # (the SVG namespace URI is a name, not a fetch)
    url = page.as_uri()
    dom = _browse(url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # the page logs nothing: no script error, no warning
    assert "data-errors" not in dom.stdout
    html = dom.stdout
    browser = html[html.index('id="browser"') :]
    assert len(re.findall(r"<div class=\"card\"><svg", browser)) >= 1, "the image browser drew no picture"
    assert re.search(r"<rect [^>]*stroke=", browser), "no box drawn on the pictures"
    classes = html[html.index('id="classes"') : html.index("</section>", html.index('id="classes"'))]
    assert classes.count("<tr>") >= 2, "the class table is empty"
    errors = html[html.index('id="errors"') : html.index("</section>", html.index('id="errors"'))]
    assert all(kind in errors for kind in ("cls", "loc", "both", "dupe", "bkg", "missed")), "the error breakdown lacks a kind"
    analysis = json.loads((demo_run / "analysis.json").read_text())
    bars = re.findall(r"class=\"bar\" style=\"width:\s*([0-9.]+)", errors)
    assert len(bars) == 6 and any(float(w) > 0 for w in bars), "the error breakdown's bars hold no value"
    assert sum(analysis["tide"]["counts"].values()) > 0 and any(v for v in analysis["tide"]["delta_ap"].values())
    assert analysis["configuration"] in html, "the page does not say whose detections it analyses"
    shot = tmp_path / "report.png"
    done = _browse(url, f"--screenshot={shot}", "--window-size=1280,4000", "--hide-scrollbars")
    assert done.returncode == 0 and shot.is_file() and shot.stat().st_size > 20_000, done.stderr[-2000:]
    if os.environ.get("FCOS_WRITE_SCREENSHOT"):
        shutil.copy(shot, REPO / "docs" / "report.png")


def test_the_page_holds_what_analysis_json_says(demo_run: Path) -> None:
    """The figures the page shows are analysis.json's (JSON beside every table)."""
    analysis = json.loads((demo_run / "analysis.json").read_text())
    text = (demo_run / "report.html").read_text()
    assert analysis["classes"] and analysis["images"] and set(analysis["tide"]["delta_ap"]) == {"cls", "loc", "both", "dupe", "bkg", "missed"}
    for row in analysis["classes"]:
        assert f">{row['name']}<" in text
