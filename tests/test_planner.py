"""`distillab plan`: the planner's ranking on a synthetic grid, and the plan of the committed demos."""

from pathlib import Path

import numpy as np
import pytest

from distillab.study.law import fit_law, gain_features
from distillab.study.planner import (finding_vector, narrowing_runs, plan_grid, plan_markdown, predictable_cells,
                               read_rows, variance_after)
from test_law import synthetic_rows

RESULTS = Path(__file__).parent.parent / "docs" / "results"


def test_variance_after_one_run_matches_the_information_form():
    rng = np.random.default_rng(0)
    root = rng.normal(size=(10, 10))
    sigma = root @ root.T + np.eye(10)
    c, h = rng.normal(size=10), rng.normal(size=(2, 10))
    noise = np.diag([0.3, 0.7])
    posterior = np.linalg.inv(np.linalg.inv(sigma) + h.T @ np.linalg.inv(noise) @ h)
    assert variance_after(sigma, c, h, noise) == pytest.approx(float(c @ posterior @ c), rel=1e-9)


def synthetic_cells(gaps=(-0.4, -0.1, 0.2, 0.6), alphas=(0.05, 0.2, 0.5, 0.8)):
    """Planned cells of a grid: one teacher per gap, every alpha; only what the ranking reads."""
    return [{"features": gain_features(a, g), "row": {"alpha": a}, "teacher": {"gap": g}, "flops": 1.0}
            for g in gaps for a in alphas]


def test_the_runs_that_narrow_a_finding_most_are_ranked_first():
    law = fit_law(synthetic_rows(np.random.default_rng(3))[0], replicates=100, seed=1)
    cells = synthetic_cells()
    weak = [c for c in cells if c["teacher"]["gap"] < 0 and c["row"]["alpha"] == 0.2]
    vector = finding_vector([(t, 0.5 / len(weak), c["features"]) for c in weak for t in ("in_domain", "ood")],
                            ("in_domain", "ood"))
    finding = {"finding": "F1", "askable": True, "decision": None, "vector": vector}
    ranked = narrowing_runs(law, cells, [finding], top=len(cells))
    # independent recomputation: the posterior variance in information form for every candidate
    boots = np.array([np.concatenate([r.theta["in_domain"], r.theta["ood"]]) for r in law.replicates])
    g = law.clusters
    sigma = np.cov(boots, rowvar=False) * g / (g - 1)
    noise = np.diag([law.noise[t].sigma2 + law.noise[t].tau2 for t in ("in_domain", "ood")])
    expected = []
    for cell in cells:
        h = np.kron(np.eye(2), cell["features"][None, :])
        posterior = np.linalg.inv(np.linalg.inv(sigma) + h.T @ np.linalg.inv(noise) @ h)
        expected.append(1 - float(vector @ posterior @ vector) / float(vector @ sigma @ vector))
    order = np.argsort(expected)[::-1]
    assert [id(s["cell"]) for s in ranked] == [id(cells[i]) for i in order]
    assert [s["score"] for s in ranked] == pytest.approx(sorted(expected, reverse=True), rel=1e-6)
    assert 0 < ranked[-1]["score"] < ranked[0]["score"] < 1  # every run informs the finding, none settles it
    # a decided finding asks for nothing
    assert narrowing_runs(law, cells, [{**finding, "decision": "reproduced"}], top=3) == []


def test_predictable_cells_are_those_with_a_one_seed_interval_inside_the_margin():
    def cell(half):
        return {"one_seed": {"overall": {"gain": 0.01, "pi": (0.01 - half, 0.01 + half)}}}

    cells = [cell(0.005), cell(0.019), cell(0.021), cell(0.3)]
    assert predictable_cells(cells, margin=0.02) == cells[:2]


def test_plan_of_the_committed_default_demo_uses_its_measured_teachers_and_predicts_its_cells():
    result = plan_grid("default", [RESULTS / "demo-default"], replicates=60, seed=0)
    rows = read_rows(RESULTS / "demo-default")
    teachers = {(r["model"], r["tokens"]): r["loss/validation"] for r in rows if r["role"] == "teacher"}
    cells = result["cells"]
    assert len(cells) == 15 and all(c["teacher_measured"] and c["baseline_measured"] for c in cells)
    for c in cells:
        assert c["predicted"]["teacher_loss"] == pytest.approx(teachers[(c["teacher"]["model"], c["teacher"]["tokens"])])
    # the prediction of each cell's in-domain gain against the cell's measured mean (an in-sample check)
    observed = {}
    for r in rows:
        if r["role"] == "student":
            observed.setdefault((r["teacher_model"], r["teacher_tokens"], r["alpha"]), []).append(r["gain/in_domain"])
    inside = [c["predicted"]["in_domain"]["pi"][0] - 0.01 <= np.mean(observed[(c["teacher"]["model"],
              c["teacher"]["tokens"], c["row"]["alpha"])]) <= c["predicted"]["in_domain"]["pi"][1] + 0.01
              for c in cells]
    assert sum(inside) >= 13
    assert not any("data differ" in w for w in result["warnings"])
    text = plan_markdown(result)
    assert "## The runs that would most narrow the open findings" in text and "nats / PFLOP" in text


def test_plan_of_a_paper_preset_from_a_cpu_fit_warns_loudly():
    result = plan_grid(str(Path(__file__).parent.parent / "configs" / "paper" / "exp1.yaml"),
                       [RESULTS / "demo-full"], replicates=30, seed=0)
    warnings = " ".join(result["warnings"])
    assert "data differ" in warnings and "student parameters N" in warnings and "α" in warnings
    assert plan_markdown(result).count("WARNING — EXTRAPOLATION") == 1
    assert len([c for c in result["cells"] if "predicted" in c]) == 24


def test_plan_from_the_committed_scaling_study_reads_every_size_and_knows_its_data():
    """`--from docs/results/scaling` stands for its four sizes, and each size's data are told from its
    scaling.json (the scaling study's own grid at one size is then on the same data: no warning)."""
    result = plan_grid("scaling:cpu-14k", [RESULTS / "scaling"], replicates=20, seed=0)
    assert sorted(Path(s).name for s in result["sources"]) == ["cpu-14k", "cpu-27k", "cpu-3.5k", "cpu-7k"]
    assert not any("cannot be told" in w or "data differ" in w for w in result["warnings"])
    assert all(c["teacher_measured"] and c["baseline_measured"] for c in result["cells"])
