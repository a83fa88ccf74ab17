"""report.html as a reader sees it: the committed demo reports' markdown rendered to HTML leaves no
raw markdown behind (backticks, bold asterisks, list dashes) and keeps every table, code span,
list item and plot (counted from the markdown here, line by line)."""

import re
from pathlib import Path

import pytest

from distillab.report import to_html

RESULTS = Path(__file__).parent.parent / "docs" / "results"
REPORTS = sorted(p.parent.name for p in RESULTS.glob("*/report.md"))


def markdown_counts(markdown: str) -> dict:
    lines = markdown.splitlines()
    tables = sum(1 for i, line in enumerate(lines) if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")))
    return {"<table>": tables, "<code>": sum(len(re.findall(r"`[^`]+`", line)) for line in lines),
            "<li>": sum(1 for line in lines if line.startswith("- ")),
            "<img": sum(1 for line in lines if line.startswith("![")),
            "<strong>": sum(len(re.findall(r"\*\*[^*]+\*\*", line)) for line in lines)}


def test_there_are_committed_reports():
    assert {"demo-default", "demo-full"} <= set(REPORTS)


@pytest.mark.parametrize("name", REPORTS)
def test_a_committed_report_renders_without_raw_markdown(name):
    folder = RESULTS / name
    markdown = (folder / "report.md").read_text()
    page = to_html(markdown, folder)
    assert "`" not in page and "**" not in page and "<p>- " not in page
    for tag, expected in markdown_counts(markdown).items():
        assert page.count(tag) == expected, tag
    assert page.count("src=\"data:image/png;base64,") == markdown_counts(markdown)["<img"]  # plots inlined
