"""`distillab demo`: the study's grids, its compute-matched arm, and `--quick` end to end."""

import csv
import json
from pathlib import Path

import pytest

from distillab.study.demo import DATA_STARVED, STUDIES, demo_grid, run_demo, study_grid
from distillab.errors import DistillabError
from distillab.models import LADDER, build_model
from distillab.sweep import grid_from_dict, plan
from distillab.study.verdicts import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED

RESULTS = Path(__file__).parent.parent / "docs" / "results"


@pytest.mark.parametrize("name", sorted(DATA_STARVED))
def test_the_first_demos_grids_plan_the_runs_of_their_committed_reports(name, tmp_path):
    committed = sorted(r["run_id"] for r in csv.DictReader(open(RESULTS / name / "results.csv")))
    assert sorted(r.id for r in plan(grid_from_dict(DATA_STARVED[name]), tmp_path)) == committed


def hf_flops(model_name: str, vocab: int, seq_len: int) -> tuple[float, float]:
    """(training, forward) FLOPs per token counted on the instantiated HF model: 6 (2) x matmul weights
    (head included) + 12 (4) x layers x seq x attention width."""
    model = build_model(LADDER[model_name], vocab, seq_len, seed=0)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    c = model.config
    attention = c.num_hidden_layers * seq_len * c.num_attention_heads * c.head_dim
    return 6 * matmul + 12 * attention, 2 * matmul + 4 * attention


@pytest.mark.parametrize("size", ["default", "full"])
def test_studies_are_in_the_papers_regime(size, tmp_path):
    study = STUDIES[size]
    runs = plan(grid_from_dict(study_grid(study)), tmp_path)
    student = LADDER[study.student].non_embedding_parameters()
    assert study.student_tokens / student >= 20  # >= 20 tokens per parameter
    ladder = sorted(LADDER[m].non_embedding_parameters() for m in study.ladder)
    assert sum(p < student for p in ladder) >= 2 and sum(p > student for p in ladder) >= 2
    teachers = {(r.info["model"], r.info["tokens"]) for r in runs if r.role == "teacher"}
    assert {(m, study.student_tokens) for m in study.ladder} <= teachers
    assert any(tokens > study.student_tokens for _, tokens in teachers)  # the token axis
    assert min(study.alphas) <= 0.1 and max(study.alphas) >= 0.2  # small alphas and the paper's larger ones
    # each teacher's compute-matched baseline spends the teacher's inference FLOPs on the student
    student_train, _ = hf_flops(study.student, study.vocab, study.seq_len)
    tokens_per_step = study.batch_size * study.seq_len
    matched = {r.info["tokens"] for r in runs if r.info.get("baseline_kind") == "compute-matched"}
    for model, _ in teachers:
        _, teacher_forward = hf_flops(model, study.vocab, study.seq_len)
        exact = study.student_tokens * (1 + teacher_forward / student_train)
        assert any(abs(tokens - exact) <= tokens_per_step / 2 for tokens in matched), model


def test_quick_demo_runs_the_pipeline_adds_seeds_and_reports_every_section(tmp_path, cache_dir):
    from distillab.study.verdicts import TUNING_SEEDS

    result = run_demo("quick", out_dir=tmp_path, log=lambda *args: None)
    out = tmp_path / "quick"
    study = STUDIES["quick"]
    planned = json.loads((out / "plan.json").read_text())["runs"]
    students = [r for r in planned if r["role"] == "student"]
    teachers = len(study.ladder) + len(study.token_axis)
    tuning = [r for r in students if r["info"]["seed"] <= TUNING_SEEDS]
    assert len(tuning) == teachers * len(study.alphas) * TUNING_SEEDS  # every teacher x alpha on the tuning seeds
    later = [r for r in students if r["info"]["seed"] > TUNING_SEEDS]
    assert len(result["rounds"]) == 2 and later  # the first look's seeds were added in a second round
    assert {r["info"]["seed"] for r in later} == set(range(TUNING_SEEDS + 1, TUNING_SEEDS + study.max_interval_seeds + 1))
    assert len({(r["info"]["teacher"], r["info"]["seed"]) for r in later}) == len(later)  # one tuned alpha each
    assert result["runs"] == {"done": len(planned)}

    report = (out / "report.md").read_text()
    sections = ["## Verdicts", "### Teachers, measured", "### How the verdicts are decided", "## About this run",
                "## The regime", "## Gains over the matched baseline", "### Over the compute-matched baseline",
                "## Best α per teacher", "## Plots"]
    positions = [report.index(s) for s in sections]
    assert positions == sorted(positions), "the report opens with the verdicts, then the evidence"
    for finding in ("F1", "F2", "F3-OOD", "F3-downstream"):
        assert f"| {finding} |" in report
    assert "trained on the in-domain training split only" in report and "Stopped because" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<h2>Verdicts</h2>" in html

    # every verdict in demo.json is the one the report prints, and each is one of the three
    assert [v["finding"] for v in result["verdicts"]] == ["F1", "F2", "F3-OOD", "F3-downstream"]
    for v in result["verdicts"]:
        assert v["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
        assert f"| {v['finding']} |" in report and f"**{v['verdict']}**" in report.split(f"| {v['finding']} |")[1]
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    for row in (r for r in rows if r["role"] == "student"):
        baseline = next(b for b in rows if b["run_id"] == row["baseline_id"])
        matched = next(b for b in rows if b["run_id"] == row["matched_baseline_id"])
        assert float(row["gain/validation"]) == pytest.approx(float(baseline["loss/validation"]) -
                                                              float(row["loss/validation"]))
        assert float(row["gain_matched/validation"]) == pytest.approx(float(matched["loss/validation"]) -
                                                                      float(row["loss/validation"]))
        assert int(matched["tokens"]) > int(row["tokens"]) and row["acc/piqa"]
    # a rerun resumes: nothing is retrained, the wall time is summed over both invocations
    again = run_demo("quick", out_dir=tmp_path, log=lambda *args: None)
    assert again["verdicts"] == result["verdicts"]
    assert json.loads((out / "demo_state.json").read_text())["invocations"] == 2


def test_full_demo_without_npm_names_the_missing_client_and_the_pip_only_demo(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on the PATH
    with pytest.raises(DistillabError, match="`npm` is not installed.*pip-only `distillab demo`"):
        run_demo("full", out_dir=tmp_path)


def test_unknown_size():
    with pytest.raises(DistillabError, match="unknown size"):
        demo_grid("huge")
