"""Every benchmark path and relative link in the project's Markdown resolves."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "benchmarks").glob("*.md"))]
# benchmarks/... from the repository root; results/... from benchmarks/ (the pages there, and
# the README's shorthand for benchmarks/results/).
PATH = re.compile(r"(?<![\w/.-])((?:benchmarks|results)/[\w./*-]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines()
            if re.match(r"#{1,6} ", line)}


def exists(path: str) -> bool:
    base = ROOT if path.startswith("benchmarks/") else ROOT / "benchmarks"
    path = path.rstrip(".")
    return any(base.glob(path)) if "*" in path else (base / path).exists()


def test_slug_follows_github():
    assert slug(" Engine: hybrid vs twin") == "engine-hybrid-vs-twin"
    assert slug("Set-up (fresh machine, Python ≥ 3.11)") == "set-up-fresh-machine-python--311"


def test_path_check_finds_missing_files():
    assert exists("benchmarks/results/") and exists("results/engine*.json")
    assert not exists("results/no_such_run.json") and not exists("benchmarks/nothing*.py")


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmark_paths_exist(page):
    missing = sorted({p for p in PATH.findall(page.read_text()) if not exists(p)})
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md"
                                   and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.name} has broken links: {broken}"
