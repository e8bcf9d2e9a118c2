"""The docs name files that exist: every repository path a page, the README or bench/results'
README puts in code, every page in the site's nav, every file of bench/results behind a claim
its README states. `make test` also builds the site with `mkdocs build --strict`, which checks
the links between pages; these checks cover what mkdocs cannot see (paths into the repository)."""

import itertools
import re

import yaml

from tests.conftest import REPO

DOCS = REPO / "docs"
RESULTS = REPO / "bench" / "results"
TRACKED_DIRS = ("tasks/", "flows/", "schemas/", "tests/", "bench/", "bin/", "docs/")
ROOT_FILES = {"params.yaml", "dvc.yaml", "prefect.yaml", "mkdocs.yml", "Makefile", "pyproject.toml"}
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`\s]+)`")


def _pages() -> list:
    return sorted(DOCS.rglob("*.md")) + [REPO / "README.md", RESULTS / "README.md"]


def _expand(path: str) -> list[str]:
    """`a_{1b,8b}_c` names a_1b_c and a_8b_c."""
    parts = re.split(r"\{([^}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _named_paths(text: str) -> set[str]:
    names = set()
    for span in CODE_SPAN.findall(FENCE.sub("", text)):
        span = span.rstrip(".,:;)")
        if span in ROOT_FILES or (span.startswith(TRACKED_DIRS) and not re.search(r"[A-Z]{3,}|[<*]|\.\.\.", span)):
            names.update(_expand(span))
    return names


def test_every_repository_path_the_docs_name_exists():
    missing = [
        f"{page.relative_to(REPO)}: {name}"
        for page in _pages()
        for name in sorted(_named_paths(page.read_text()))
        if not (REPO / name).exists()
    ]
    assert not missing, "the docs name paths that do not exist:\n" + "\n".join(missing)


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    def entries(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from entries(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from entries(value)

    nav = set(entries(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert nav == pages, f"in nav only: {sorted(nav - pages)}; pages not in nav: {sorted(pages - nav)}"


def test_bench_results_holds_the_files_its_readme_states_and_no_others():
    text = (RESULTS / "README.md").read_text()
    named = {
        n
        for n in CODE_SPAN.findall(text)
        if "/" not in n and not n.startswith(".") and re.search(r"\.(jsonl|json|txt|png)$", n)
    }
    present = {p.name for p in RESULTS.iterdir() if p.name != "README.md"}
    # a summary's trace is named as "`X.txt` (summary), `.json`"
    named |= {n[: -len(".txt")] + ".json" for n in named if n.endswith(".txt") and n[:-4] + ".json" in present}
    assert named - present == set(), f"named but missing: {sorted(named - present)}"
    assert present - named == set(), f"files no claim stands on: {sorted(present - named)}"


def test_readme_is_short_and_links_into_the_docs():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert text.startswith("# qlora-flow\n\n```bash\nmake run ")
    links = re.findall(r"\]\(([^)#]+)", text)
    assert any(link.startswith("docs/") for link in links)
    assert [link for link in links if not (REPO / link).exists()] == []
