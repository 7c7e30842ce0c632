"""The documentation stays true to the repository: every relative link in README.md and
docs/*.md resolves (files, folders and #anchors, with GitHub's heading slugs), every
benchmark script and grid file the docs name exists, every docs/ page the code names exists,
and the README's two commands are the ones a fresh machine (and .ci/run) runs.

Pure text: no Ray, no torch, well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
NAMED_PATH = re.compile(
    r"(?<![\w/.-])((?:benchmarks/[\w.-]+\.(?:py|sh))|(?:experiments/[\w.-]+\.ya?ml))"
)
DOCS_PATH = re.compile(r"(?<![\w/.-])(docs/[\w.-]+\.md)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (links and headings live there)."""
    return FENCE.sub("", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped (letters,
    digits, `_`, `-` and spaces kept), spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor GitHub generates for a page's headings (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(_prose(page.read_text())):
        slug = github_slug(title)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(INLINE_CODE.sub("``", _prose(page.read_text())))


def test_slugs_follow_github():
    assert github_slug("Before a big sweep: `launch.py plan`") == "before-a-big-sweep-launchpy-plan"
    assert github_slug("What this epsilon covers, and what may leave") == (
        "what-this-epsilon-covers-and-what-may-leave"
    )
    assert github_slug("Statistics: intervals, the primary endpoint") == (
        "statistics-intervals-the-primary-endpoint"
    )


def test_pages_exist():
    names = {p.name for p in PAGES}
    for page in ("grid", "datasets", "outputs", "statistics", "privacy", "federated",
                 "operations", "architecture", "tuning-design"):  # fmt: skip
        assert f"{page}.md" in names, page


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif not dest.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_scripts_and_grids_exist(page: Path):
    missing = sorted({p for p in NAMED_PATH.findall(page.read_text()) if not (ROOT / p).exists()})
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_docs_named_by_code_exist():
    """Comments, docstrings and messages that point readers to a docs/ page."""
    missing = []
    files = [ROOT / "launch.py", ROOT / ".ci" / "run", *(ROOT / "privdom_ray").rglob("*.py"),
             *(ROOT / "benchmarks").glob("*"), *(ROOT / "tests").glob("*.py")]  # fmt: skip
    for f in files:
        if f.is_file():
            for p in DOCS_PATH.findall(f.read_text(errors="replace")):
                if not (ROOT / p).exists():
                    missing.append(f"{f.relative_to(ROOT)}: {p}")
    assert not missing, missing


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"^```bash\n(.*?)^```", text, re.M | re.S)
    assert first_block is not None and text.index("```bash") < text.index("\n## ")
    commands = [ln for ln in first_block.group(1).splitlines() if ln and not ln.startswith("#")]
    assert commands == [
        "pip install uv && uv run launch.py --grid experiments/demo.yaml",
        "pip install uv && uv run pytest",
    ]
    assert (ROOT / "experiments" / "demo.yaml").is_file()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = commands[1].split("&& ", 1)[1]
    assert any(ln.split("#")[0].strip() == test_command for ln in ci), ".ci/run must run it"


def test_readme_minimal_grid_is_valid():
    from privdom_ray import grid

    text = (ROOT / "README.md").read_text()
    block = re.search(r"## A minimal grid\n\n```yaml\n(.*?)^```", text, re.M | re.S)
    assert block is not None
    spec = grid.parse_grid(yaml.safe_load(block.group(1)), base=ROOT / "experiments")
    assert (len(spec.sources), len(spec.epsilons), len(spec.seeds)) == (2, 3, 1)  # "6 models"


def test_grid_reference_is_accepted():
    """docs/grid.md's full grid names every key; with the other domains it refers to added,
    the parser accepts it as written (a renamed or removed key fails here)."""
    from privdom_ray import grid

    text = (ROOT / "docs" / "grid.md").read_text()
    block = re.search(r"^```yaml\n(.*?)^```", text, re.M | re.S)
    assert block is not None
    raw = yaml.safe_load(block.group(1))
    assert set(raw) == set(grid.TOP_KEYS)
    for name in ("site_b", "site_c", "public_site"):
        raw["domains"].append({"name": name, "kind": "synthetic", "root": f"../data/x/{name}"})
    grid.parse_grid(raw, base=ROOT / "experiments")
