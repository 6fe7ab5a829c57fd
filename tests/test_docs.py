"""The docs stay a product's docs: short pages, and every benchmark result file cited by the page that explains it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
#: Pages that may cite files of bench/results/ (bench/README.md only where it exists).
CITING_PAGES = (ROOT / "docs" / "benchmarks.md", ROOT / "bench" / "README.md")


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def prose_lines(readme: str) -> list[str]:
    """README lines outside the generated settings tables (the marker lines themselves count as prose)."""
    kept, generated = [], False
    for line in readme.splitlines():
        if re.fullmatch(r"<!-- /settings:\w+ -->", line.strip()):
            generated = False
        if not generated:
            kept.append(line)
        if re.fullmatch(r"<!-- settings:\w+ -->", line.strip()):
            generated = True
    return kept


def cited_results(text: str) -> set[str]:
    return set(re.findall(r"bench/results/([\w.+-]+\.json)", text))


def test_benchmarks_page_is_at_most_400_lines():
    assert len(lines(ROOT / "docs" / "benchmarks.md")) <= 400


def test_performance_page_is_at_most_200_lines():
    assert len(lines(ROOT / "docs" / "performance.md")) <= 200


def test_readme_has_at_most_200_lines_outside_the_generated_settings_tables():
    assert len(prose_lines((ROOT / "README.md").read_text(encoding="utf-8"))) <= 200


def test_prose_lines_leave_out_only_what_is_between_the_markers():
    readme = "a\n<!-- settings:train -->\n| x |\n| y |\n<!-- /settings:train -->\nb\n"
    assert prose_lines(readme) == ["a", "<!-- settings:train -->", "<!-- /settings:train -->", "b"]


def test_every_result_file_the_benchmarks_page_cites_exists():
    cited = cited_results((ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8"))
    assert cited, "docs/benchmarks.md cites no bench/results/ file"
    assert sorted(name for name in cited if not (RESULTS / name).is_file()) == []


def test_every_file_in_bench_results_is_cited():
    cited = set().union(*(cited_results(page.read_text(encoding="utf-8")) for page in CITING_PAGES if page.is_file()))
    assert sorted(path.name for path in RESULTS.iterdir() if path.name not in cited) == []
