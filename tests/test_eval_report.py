"""The HTML report in a real headless browser (Debian's chromium): it renders, draws its plots, runs its
script without console errors, and its "differences only" filter hides the rows where the models agree.
Also the terminal tables."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from kindred.eval.html import render_html
from kindred.eval.table import print_results

from .eval_helpers import canned_results

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (.ci/setup installs it)"
)

ANSWERS = {
    "base": {
        "gift": "Thank her warmly for the effort and wear it once to the party.",
        "refund": "You could definitely keep it, they will never notice.",
        "phone-a": "No. Hand it to the driver.",
        "phone-b": "Yes, look through it.",
    },
    "tuned": {
        "gift": "Thank her warmly for the effort and wear it once to the party.",
        "refund": "Return it: contact the airline and tell them about the double refund.",
        "phone-a": "No. Give it to the bus company.",
        "phone-b": "No, hand it in.",
    },
}


def _browser(url: str, *flags: str, cwd: Path) -> tuple[str, list[str]]:
    """(stdout, console messages) of headless chromium loading ``url``."""
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--no-first-run",
            f"--user-data-dir={cwd / 'profile'}",
            *flags,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    res = canned_results(ANSWERS)
    folder = tmp_path_factory.mktemp("report")
    return res, res.write(folder)["html"]


def test_report_is_self_contained(report):
    res, path = report
    text = path.read_text()
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    assert not re.search(r"""(?:src|href)\s*=\s*["']?https?:""", text)  # nothing to fetch
    assert text.count("<svg") == 2 and "pass rate by category" in text and "seconds per test" in text
    # one bar per (category, model), each with its interval
    assert text.count("<rect") - 2 == 2 * 2  # two legend swatches
    assert render_html(res) == text  # deterministic: a report can be re-rendered from results.json


@needs_chromium
def test_report_renders_in_chromium_without_console_errors(report, tmp_path):
    _, path = report
    dom, console = _browser(path.as_uri() + "#differences", "--dump-dom", cwd=tmp_path)
    assert console == [], console
    assert 'data-ready="1"' in dom  # the script ran to the end
    rows = re.findall(r"<tr class=\"test\"([^>]*)>", dom)
    assert len(rows) == 4
    hidden = [r for r in rows if " hidden" in r]
    diff = [r for r in rows if 'data-diff="1"' in r]
    assert len(diff) == 3 and len(hidden) == 1 and 'data-diff="0"' in hidden[0]  # only 'gift' agrees
    assert '<span id="shown">3</span>' in dom
    dom_all, console = _browser(path.as_uri(), "--dump-dom", cwd=tmp_path)
    assert console == [] and not [
        r for r in re.findall(r"<tr class=\"test\"([^>]*)>", dom_all) if " hidden" in r
    ]

    shot = tmp_path / "report.png"
    _, console = _browser(path.as_uri(), f"--screenshot={shot}", "--window-size=1280,1600", cwd=tmp_path)
    assert console == [] and shot.stat().st_size > 10_000
    image = pytest.importorskip("matplotlib.image").imread(str(shot))
    assert image.shape[0] == 1600 and image.shape[1] == 1280
    rgb = image[..., :3]
    assert rgb.std() > 0.05  # not a blank page
    blue = ((abs(rgb[..., 0] - 0x4E / 255) < 0.03) & (abs(rgb[..., 2] - 0xA7 / 255) < 0.03)).sum()
    assert blue > 200  # the first model's bars were drawn


@needs_chromium
def test_the_console_check_catches_a_broken_page(tmp_path):
    """The same browser check on a page whose script throws: the error is seen (so a clean run means it)."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>document.body.dataset.x = 1; notDefined();</script></body></html>")
    _, console = _browser(page.as_uri(), "--dump-dom", cwd=tmp_path)
    assert any("Uncaught ReferenceError" in line for line in console)


def test_terminal_tables(report):
    res, _ = report
    buf = io.StringIO()
    print_results(res, Console(file=buf, width=140, color_system=None))
    text = buf.getvalue()
    assert "kindred eval · small" in text and "per model" in text
    assert "base → tuned" in text and "exact McNemar p" in text
    for t in ("gift", "refund", "phone-a", "phone-b"):
        assert t in text
    summary = res.summary()
    assert summary["tuned"]["passed"] > summary["base"]["passed"]
    assert f"{summary['tuned']['passed']}/4" in text
