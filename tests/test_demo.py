"""`distillab demo --quick`: the whole study pipeline end to end, and every section of its report."""

import csv
import json

import pytest

from distillab.demo import demo_grid, run_demo
from distillab.errors import DistillabError
from distillab.verdicts import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


def test_quick_demo_runs_the_pipeline_and_the_report_has_every_section(tmp_path, cache_dir):
    result = run_demo("quick", out_dir=tmp_path, log=lambda *args: None)
    out = tmp_path / "quick"
    grid = demo_grid("quick")
    n_teachers = len(grid["teachers"]["members"])
    n_seeds = len(grid["students"]["seeds"])
    n_runs = n_teachers + n_seeds + n_teachers * n_seeds * len(grid["kd"]["alpha"])
    assert result["runs"] == {"done": n_runs}

    report = (out / "report.md").read_text()
    sections = ["## Verdicts", "### Teachers, measured", "### How the verdicts are decided", "## About this run",
                "## Gains over the matched baseline", "## Best α per teacher", "## Plots"]
    positions = [report.index(s) for s in sections]
    assert positions == sorted(positions), "the report opens with the verdicts, then the evidence"
    for finding in ("F1", "F2", "F3-OOD", "F3-downstream"):
        assert f"| {finding} |" in report
    assert "trained on the in-domain training split only" in report
    train_tokens = int(report.split("In-domain training split: ")[1].split(" tokens")[0].replace(",", ""))
    longest = max([m["tokens"] for m in grid["teachers"]["members"]] + grid["students"]["tokens"])
    assert f"The largest run sees {longest / train_tokens:.2f} of an epoch" in report
    assert "wall time" in report and "CPU cores" in report
    for plot in ("gain_vs_alpha.png", "gain_vs_teacher.png"):
        assert (out / plot).stat().st_size > 1000
        assert f"]({plot})" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<h2>Verdicts</h2>" in html

    assert {v["verdict"] for v in result["verdicts"]} <= {REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE}
    assert [v["finding"] for v in result["verdicts"]] == ["F1", "F2", "F3-OOD", "F3-downstream"]
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == n_runs
    students = [r for r in rows if r["role"] == "student"]
    assert all(r["gain/validation"] and r["gain/milton"] and r["acc/piqa"] for r in students)
    # a rerun resumes: nothing is retrained, the wall time is summed over both invocations
    again = run_demo("quick", out_dir=tmp_path, log=lambda *args: None)
    assert again["verdicts"] == result["verdicts"]
    assert json.loads((out / "demo_time.json").read_text())["invocations"] == 2


def test_full_demo_without_npm_names_the_missing_client_and_the_pip_only_demo(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on the PATH
    with pytest.raises(DistillabError, match="`npm` is not installed.*pip-only `distillab demo`"):
        run_demo("full", out_dir=tmp_path)
