"""report.html: the self-contained page ``report.write_report`` renders next to report.md,
opened in a real headless browser (Debian's chromium; `.ci/run` installs it if missing)."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import _sweep

from privdom_ray import report
from privdom_ray.folder import HTML

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    """A headless-capable browser (`.ci/run` installs Debian's chromium where it can)."""
    found = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if found is None:
        pytest.skip(f"no browser among {BROWSERS} (apt-get install chromium)")
    return found


def dom(page: Path, fragment: str = "") -> str:
    """The page's DOM after its scripts ran, as the browser serialises it."""
    proc = subprocess.run(
        [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
         f"{page.resolve().as_uri()}{fragment}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and "<main>" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def cells(markdown: str) -> list[str]:
    """Every table cell of the markdown report, as text."""
    out = []
    for line in markdown.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            out += [c.strip() for c in line.strip().strip("|").split("|") if c.strip()]
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, str]:
    """One finished output folder and its report, rendered once for the module (the tests
    only read it): (folder, report.md's text)."""
    folder = tmp_path_factory.mktemp("html")
    _sweep(folder)
    return folder, report.write_report(folder)


@pytest.mark.slow
def test_the_page_holds_the_reports_numbers_inline_and_collapses_all_but_the_primary(rendered):
    tmp_path, md = rendered
    page = (tmp_path / HTML).read_text()
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched at view time
    assert page.count('src="data:image/png;base64,') == len(
        list((tmp_path / "figures").glob("*.png"))
    )
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    for cell in cells(md):  # the same numbers as report.md, every one
        plain = re.sub(r"\*\*|`", "", cell)
        assert " ".join(plain.split()) in " ".join(text.split()), cell
    first = page.index("<h2")
    primary, rest = page[first:].split("<h2", 2)[1], page[first:].split("<h2", 2)[2]
    assert "<table>" in primary and "<details>" not in primary  # the primary endpoint, open
    assert rest.count("<table>") == rest.count("<details><summary>table")  # the rest folded
    assert '<div class="toc">' in page and 'data-filter="epsilon"' in page


@pytest.mark.slow
def test_a_browser_runs_the_filters_by_epsilon_site_and_label(rendered):
    page = rendered[0] / HTML
    everything = dom(page)
    assert 'data-ready="1"' in everything and 'class="hidden"' not in everything
    only = dom(page, "#epsilon=1&site=b&label=pneumonia")
    assert 'data-filtered="epsilon=1&amp;site=b&amp;label=pneumonia"' in only
    shown = re.sub(r"<(h3|tr)[^>]*class=\"hidden\".*?</\1>", "", only, flags=re.S)
    headings = re.findall(r"<h3[^>]*>(.*?)</h3>", shown, flags=re.S)
    assert headings and all("ε = inf" not in h for h in headings)  # other epsilons hidden
    hidden_rows = len(re.findall(r'<tr class="hidden"', only))
    assert hidden_rows > 0 and "ε = inf" in everything
