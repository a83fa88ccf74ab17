"""`distillab demo`: the study's grids (a function of the student rung), its plan fixed in code, results
that do not depend on workers or timing, and `--quick` end to end."""

import csv
import json
from pathlib import Path

import pytest

from distillab.study.demo import (
    DATA_STARVED,
    RUN_THREADS,
    STUDIES,
    Study,
    cpu_rungs,
    demo_grid,
    plan_study,
    regime_study,
    run_demo,
    study_grid,
)
from distillab.errors import DistillabError
from distillab.models import LADDER, build_model
from distillab.study.sequential import DESIGN
from distillab.sweep import grid_from_dict, plan, run_sweep
from distillab.study.verdicts import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, TUNING_SEEDS

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


def test_the_studies_are_the_regime_function_of_their_student_rung():
    # the committed demos' grids, now built from the rung: two rungs below and two above, ~24 tokens per parameter
    default, full = STUDIES["default"], STUDIES["full"]
    assert (default.student, default.student_tokens, default.ladder, default.token_axis) == (
        "cpu-27k", 655_360, ("cpu-7k", "cpu-14k", "cpu-55k", "cpu-0.1m"), (("cpu-55k", 3),))
    assert (full.student, full.student_tokens, full.ladder, full.token_axis) == (
        "cpu-55k", 1_310_720, ("cpu-14k", "cpu-27k", "cpu-0.1m", "cpu-0.3m"), (("cpu-0.1m", 4),))
    larger = regime_study("scaling", "cpu-0.1m", "shakespeare", 0.08, ("validation",), 10, 8, token_multiple=2)
    assert larger.ladder == ("cpu-27k", "cpu-55k", "cpu-0.3m", "cpu-1m") and larger.token_axis == (("cpu-0.3m", 2),)
    per_parameter = larger.student_tokens / LADDER["cpu-0.1m"].non_embedding_parameters()
    assert 20 <= per_parameter <= 30 and larger.student_tokens % (32 * 32 * 128) == 0
    assert larger.weaker_rungs == ("cpu-27k", "cpu-55k")
    for rung in (cpu_rungs()[1], cpu_rungs()[-2]):
        with pytest.raises(DistillabError, match="two CPU rungs below and two above"):
            regime_study("x", rung, "shakespeare", 0.08, ("validation",), 10, 8, token_multiple=2)


def test_the_plan_is_fixed_in_code(tmp_path):
    """At most: the tuning round, then every teacher (at one alpha) and the baseline on every interval seed up
    to the design's last look; rounds: one per look. Counted independently by planning that largest grid."""
    study = STUDIES["default"]
    study_plan = plan_study(study, tmp_path, rate=26.5e9, workers=2)
    tuning = plan(grid_from_dict(study_grid(study)), tmp_path)
    teachers = [r for r in tuning if r.role == "teacher"]
    # teachers, then per tuning seed: every teacher x alpha, the baseline and one compute-matched baseline per
    # teacher shape (a teacher's inference FLOPs depend on its shape, not its tokens)
    shapes = {t.info["model"] for t in teachers}
    assert len(study_plan.tuning) == len(tuning) == len(teachers) + TUNING_SEEDS * (
        len(teachers) * len(study.alphas) + 1 + len(shapes)) == 45
    members = [{"model": study.student, "tokens": study.student_tokens, "seed": seed, "alpha": [study.alphas[0]],
                "teachers": [{"model": t.info["model"], "tokens": t.info["tokens"]}], "compute_matched": False}
               for seed in range(TUNING_SEEDS + 1, TUNING_SEEDS + DESIGN.max_seeds + 1) for t in teachers]
    largest = plan(grid_from_dict(study_grid(study, members)), tmp_path)
    assert study_plan.max_runs() == len(largest) == len(tuning) + DESIGN.max_seeds * (len(teachers) + 1)
    assert study_plan.looks == DESIGN.looks and "in 4 rounds" in study_plan.describe()
    # compute-matched baselines only on the tuning seeds
    assert {r.info["seed"] for r in largest if r.info.get("baseline_kind") == "compute-matched"} == {1, 2}
    # the worst case at the project machine's measured speed fits the 30-minute goal
    assert study_plan.worst_seconds() < 30 * 60
    assert study_plan.later(DESIGN.looks[1], study_plan.teachers) == study_plan.seed_runs(study_plan.teachers) * (
        DESIGN.looks[2] - DESIGN.looks[1])


TINY = Study("tiny", "shakespeare", 0.08, 300, 32, 4, student="cpu-7k", student_tokens=1024, ladder=("cpu-14k",),
             token_axis=(("cpu-14k", 2),), alphas=(0.5,), sets=("validation", "milton"), tasks=(), limit=4,
             max_windows=4, corpus_limit=12)


@pytest.mark.slow
def test_results_do_not_depend_on_the_number_of_workers_or_the_order_runs_finish(tmp_path, cache_dir):
    """The same tiny study grid on one worker and on two (other completion orders), one thread per run:
    results.csv is the same, byte for byte."""
    from distillab.report import write_report
    from distillab.sweep.execute import LocalWorkers

    tables = []
    for workers in (1, 2):
        sweep_dir = tmp_path / f"workers-{workers}"
        pool = LocalWorkers(sweep_dir, RUN_THREADS, workers)
        try:
            status = run_sweep(grid_from_dict(study_grid(TINY)), sweep_dir, workers=workers, log=lambda *a: None,
                               pool=pool)
        finally:
            pool.close()
        assert set(status.values()) == {"done"}
        write_report(sweep_dir)
        tables.append((sweep_dir / "results.csv").read_text())
    assert tables[0] == tables[1]


def test_quick_demo_runs_the_pipeline_adds_seeds_and_reports_every_section(tmp_path, cache_dir):
    lines = []
    result = run_demo("quick", out_dir=tmp_path, log=lines.append)
    out = tmp_path / "quick"
    study = STUDIES["quick"]
    planned = json.loads((out / "plan.json").read_text())["runs"]
    students = [r for r in planned if r["role"] == "student"]
    teachers = len(study.ladder) + len(study.token_axis)
    tuning = [r for r in students if r["info"]["seed"] <= TUNING_SEEDS]
    assert len(tuning) == teachers * len(study.alphas) * TUNING_SEEDS  # every teacher x alpha on the tuning seeds
    later = [r for r in students if r["info"]["seed"] > TUNING_SEEDS]
    assert len(result["rounds"]) == 2 and later  # the first look's seeds were added in a second round
    assert {r["info"]["seed"] for r in later} == set(range(TUNING_SEEDS + 1, TUNING_SEEDS + DESIGN.first_look + 1))
    assert len({(r["info"]["teacher"], r["info"]["seed"]) for r in later}) == len(later)  # one tuned alpha each
    assert result["runs"] == {"done": len(planned)} and len(planned) <= result["plan"]["max_runs"]
    assert {r["info"]["seed"] for r in planned if r["info"].get("baseline_kind") == "compute-matched"} == {1, 2}
    # the plan before the first run, then n/N and the time left after each run
    assert lines.index(next(line for line in lines if line.startswith("demo: plan (fixed in code)"))) < \
        lines.index(next(line for line in lines if "runs done" in line))
    assert any(f"of at most {result['plan']['max_runs']} runs done, at most about" in line for line in lines)
    assert any(line.endswith(f"{len(planned)}/{len(planned)} runs done") for line in lines)

    report = (out / "report.md").read_text()
    sections = ["## Verdicts", "### Teachers, measured", "### How the verdicts are decided", "## About this run",
                "## The regime", "## Gains over the matched baseline", "### Over the compute-matched baseline",
                "## Best α per teacher", "## Plots"]
    positions = [report.index(s) for s in sections]
    assert positions == sorted(positions), "the report opens with the verdicts, then the evidence"
    for finding in ("F1", "F2", "F3-OOD", "F3-downstream"):
        assert f"| {finding} |" in report
    assert "trained on the in-domain training split only" in report and "Stopped because" in report
    assert "results.csv and the verdicts do not" in report and "MACHINE-DEPENDENT" not in report
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
        assert float(row["gain/validation"]) == pytest.approx(float(baseline["loss/validation"]) -
                                                              float(row["loss/validation"]))
        assert row["acc/piqa"]
        if int(row["init_seed"]) <= TUNING_SEEDS:
            matched = next(b for b in rows if b["run_id"] == row["matched_baseline_id"])
            assert float(row["gain_matched/validation"]) == pytest.approx(float(matched["loss/validation"]) -
                                                                          float(row["loss/validation"]))
            assert int(matched["tokens"]) > int(row["tokens"])
        else:
            assert not row["matched_baseline_id"]
    # a rerun resumes: nothing is retrained, the results are the same, the wall time is summed
    table = (out / "results.csv").read_text()
    again = run_demo("quick", out_dir=tmp_path, log=lambda *args: None)
    assert again["verdicts"] == result["verdicts"] and (out / "results.csv").read_text() == table
    state = json.loads((out / "demo_state.json").read_text())
    assert state["invocations"] == 2 and state["rounds"] == result["rounds"]  # the rerun trained no round


def test_an_opt_in_time_cap_is_labelled_machine_dependent():
    from distillab.study.demo import DemoState, StudyOutcome, about_lines, beyond_cap, time_cap_text
    from distillab.sweep.eta import Clock

    study_plan = plan_study(STUDIES["default"], Path("unused"), rate=26.5e9, workers=2)
    clock = Clock({}, 2)
    assert not beyond_cap(None, study_plan, study_plan.teachers, 5, clock, elapsed=10_000)
    round_seconds = study_plan.round_seconds(study_plan.teachers, 5)
    assert beyond_cap(10, study_plan, study_plan.teachers, 5, clock, elapsed=600 - round_seconds + 1)
    assert not beyond_cap(10, study_plan, study_plan.teachers, 5, clock, elapsed=600 - round_seconds - 1)
    state = DemoState(stop=time_cap_text(10, ["F1"]), time_cap_minutes=10, capped=True)
    text = "\n".join(about_lines(STUDIES["default"], "default", 2, StudyOutcome(state, {}, study_plan, ""),
                                  "a machine"))
    assert "Machine-dependent result" in text and "MACHINE-DEPENDENT" in text and "--time-cap" in text


def test_full_demo_without_npm_names_the_missing_client_and_the_pip_only_demo(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on the PATH
    with pytest.raises(DistillabError, match="`npm` is not installed.*pip-only `distillab demo`"):
        run_demo("full", out_dir=tmp_path)


def test_unknown_size_and_bad_options():
    with pytest.raises(DistillabError, match="unknown size"):
        demo_grid("huge")
    with pytest.raises(DistillabError, match="--workers: must be >= 1"):
        run_demo("quick", workers=0)
    with pytest.raises(DistillabError, match="--time-cap: must be a positive"):
        run_demo("quick", time_cap_minutes=0)
