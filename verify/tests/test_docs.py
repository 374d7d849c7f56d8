"""Every citation in the code and the docs points at something that exists: a cited file of the repository (a module,
a doc, a result), and a cited section of a markdown file (`docs/contract.md, "Rounding points"`) as one of its
headings. Run from anywhere: paths are resolved from the repository root, never from the working directory."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), ROOT / "conftest.py", ROOT / "tox.ini",
                  ROOT / "pyproject.toml", ROOT / ".ci" / "run",
                  *(p for part in ("reference", "kernels", "verify") for p in (ROOT / part).rglob("*.py"))])
# a repository path (`verify/bands.py`, `baselines/nvidia-h200.json`) or any markdown file (`README.md`), then
# optionally `, "Section"` for a section of that markdown file
CITATION = re.compile(r'(?P<path>\b(?:(?:reference|kernels|verify|docs|baselines)/[\w./-]*\w\.\w+|[\w.-]*\w\.md))'
                      r'(?:, "(?P<section>[^"]+)")?')


def citations():
    for source in SOURCES:
        for number, line in enumerate(source.read_text().splitlines(), 1):
            for match in CITATION.finditer(line):
                yield pytest.param(match["path"], match["section"], id=f"{source.relative_to(ROOT)}:{number}")


def headings(path: pathlib.Path) -> set[str]:
    return {m[1].strip() for m in re.finditer(r"^#+\s+(.+)$", path.read_text(), flags=re.MULTILINE)}


def test_the_sources_are_found():
    assert ROOT / "README.md" in SOURCES and ROOT / "docs/contract.md" in SOURCES
    assert len(list(citations())) > 20


@pytest.mark.parametrize("path,section", list(citations()))
def test_citation_exists(path, section):
    target = ROOT / path
    assert target.is_file(), f"{path} is cited but is not a file of the repository"
    if section is not None:
        assert section in headings(target), f'{path} has no section "{section}": {sorted(headings(target))}'


# The tree speaks of the stage, its users and its results, never of how it was built (that is git's history).
HISTORY = re.compile(r"\bsessions?\b|\bissues? #?\d+\b|(?<![\w/])#\d{2,}\b", flags=re.IGNORECASE)


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: str(s.relative_to(ROOT)))
def test_the_tree_speaks_of_itself_not_of_its_making(source):
    found = [f"{source.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
             for n, line in enumerate(source.read_text().splitlines(), 1) if HISTORY.search(line)]
    assert not found, "\n".join(found)


def test_the_results_pages_are_what_the_committed_results_give():
    from verify.perf import results

    assert results.main(["--check"]) == 0, "run `python -m verify.perf.results` and commit docs/results/"
    assert sorted(p.stem for p in results.PAGES.glob("*.md")) == sorted(
        d.name for d in results.RESULTS.iterdir() if d.is_dir())
