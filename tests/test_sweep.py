import json
import math
import os
import statistics
from pathlib import Path

import pytest
import yaml

from distillab.errors import ConfigError
from distillab.files import exclusive_lock
from distillab.report import write_report
from distillab.study.results import add_gains_and_labels, label_by_loss, label_by_size
from distillab.study.stats import mean_ci
from distillab.sweep import compute_summary, format_plan, load_grid, plan, run_sweep


def grid_file(tmp_path: Path, cache_dir: Path, **changes) -> Path:
    grid = {
        "name": "tiny",
        "base": {
            "data": {"corpus": {"source": "packaged", "name": "python-stdlib", "limit": 150}, "tokenizer": {"vocab_size": 512},
                     "validation_fraction": 0.08, "cache_dir": str(cache_dir)},
            "train": {"batch_size": 4, "seq_len": 32, "eval_every": 1000, "checkpoint_every": 2, "log_every": 2,
                      "threads": 1},
            "eval": {"max_windows": 4},
        },
        "teachers": {"models": ["cpu-0.1m"], "tokens": [1024], "seeds": [42]},
        "students": {"models": ["cpu-0.1m"], "tokens": [512], "seeds": [43]},
        "kd": {"alpha": [0.5]},
        "eval": {"sets": ["in-domain"], "max_windows": 4},
    }
    for key, value in changes.items():
        grid[key] = value
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_labels_and_gains_on_hand_made_results():
    assert label_by_loss(4.50, 4.60, 0.02) == "strong-to-weak"
    assert label_by_loss(4.61, 4.60, 0.02) == "same-level"
    assert label_by_loss(4.70, 4.60, 0.02) == "weak-to-strong"
    assert label_by_size(3e6, 1e6) == "strong-to-weak" and label_by_size(1e6, 1e6) == "same-level"
    base = {"model": "cpu-1m", "tokens": 100, "init_seed": 43, "data_seed": 43, "non_embedding_parameters": 1_000_000,
            "domain/validation": "in-domain", "domain/milton": "ood", "domain/code": "ood"}
    rows = [
        {**base, "run_id": "t", "role": "teacher", "model": "cpu-3m", "tokens": 400, "init_seed": 42, "data_seed": 42,
         "non_embedding_parameters": 3_000_000, "loss/validation": 4.40},
        {**base, "run_id": "b", "role": "baseline", "loss/validation": 4.50, "loss/milton": 5.50, "loss/code": 7.0,
         "acc/piqa": 0.55},
        {**base, "run_id": "s", "role": "student", "teacher_id": "t", "loss/validation": 4.48, "loss/milton": 5.40,
         "loss/code": 7.1, "acc/piqa": 0.58},
    ]
    student = add_gains_and_labels(rows, tolerance=0.05)[2]
    assert student["baseline_id"] == "b"
    assert student["label_by_params"] == "strong-to-weak" and student["label_by_tokens"] == "strong-to-weak"
    assert student["gain/validation"] == pytest.approx(0.02)
    assert student["gain/in_domain"] == pytest.approx(0.02)
    assert student["gain/ood"] == pytest.approx(((5.50 - 5.40) + (7.0 - 7.1)) / 2)
    assert student["gain/downstream"] == pytest.approx(0.03)


def test_schedule_and_clock_arithmetic():
    from distillab.sweep.eta import Clock, run_seconds, schedule_seconds

    assert schedule_seconds([3, 3, 3], 2) == 6 and schedule_seconds([], 2) == 0
    assert schedule_seconds([3, 3, 3], 2, busy=[5]) == 8  # 0 -> 3 -> 6 on one worker, 5 -> 8 on the other
    assert schedule_seconds([4, 1, 1, 1, 1], 2) == 4 and schedule_seconds([10], 3) == 10
    assert run_seconds(2e10, 1e10) == pytest.approx(run_seconds(0, 1e10) + 2)
    clock = Clock({"a": 10, "b": 10, "c": 10, "d": 10}, workers=2)
    assert clock.seconds_left(now=0) == 20 and clock.line(now=0) == "0/4 runs done, about 20 s left"
    clock.start("a", now=0)
    clock.start("b", now=0)
    clock.finish("a", now=20)  # took twice the prediction: everything left is scaled by 2
    assert clock.correction() == 2
    assert clock.seconds_left(now=20) == 20  # b: 2 x 10 - 20 = 0 left; c and d: 20 each, side by side
    clock.finish("b", now=22)
    assert clock.line(now=22) == "2/4 runs done, about 21 s left"  # correction (20 + 22) / 20 = 2.1
    clock.add({"e": 10}, later=[10, 10])
    assert clock.line(now=22).startswith("2 of at most 7 runs done, at most about")
    clock.start("c", now=22)
    clock.finish("c", now=32)  # a third run: the first two (one per worker, with its imports) no longer count
    assert clock.correction() == 1


def test_mean_ci_matches_the_t_interval():
    values = [0.01, 0.05, -0.02]
    ci = mean_ci(values)
    t_2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # the 97.5 % quantile of t with 2 df, in closed form
    half = t_2 * statistics.stdev(values) / math.sqrt(3)
    assert ci["mean"] == pytest.approx(statistics.fmean(values))
    assert ci["lo"] == pytest.approx(ci["mean"] - half) and ci["hi"] == pytest.approx(ci["mean"] + half)
    assert mean_ci([0.1])["lo"] is None and mean_ci([])["mean"] is None


def test_plan_collapses_shared_runs_and_orders_teachers_first(tmp_path, cache_dir):
    spec = load_grid(grid_file(tmp_path, cache_dir, students={"models": ["cpu-0.1m"], "tokens": [1024],
                                                               "seeds": [42, 43]}))
    runs = plan(spec, tmp_path / "sweep")
    roles = [r.role for r in runs]
    # the seed-42 baseline is the teacher itself (same model, tokens and seeds): one run, not two
    assert roles.count("teacher") == 1 and roles.count("baseline") == 1 and roles.count("student") == 2
    assert roles.index("teacher") < roles.index("student")
    again = plan(spec, tmp_path / "elsewhere")
    assert [r.id for r in runs] == [r.id for r in again]  # ids do not depend on where the sweep lives
    text = format_plan(runs, compute_summary(runs, spec, device="h100"))
    assert "teacher_inference" in text and "->" in text


def test_hand_picked_teacher_members_join_the_pool(tmp_path, cache_dir):
    members = [{"model": "cpu-0.3m", "tokens": 2048}, {"model": "cpu-0.1m", "tokens": 1024, "seed": 42}]
    spec = load_grid(grid_file(tmp_path, cache_dir, teachers={"models": ["cpu-0.1m"], "tokens": [1024],
                                                              "members": members}))
    runs = plan(spec, tmp_path / "sweep")
    teachers = sorted((r.info["model"], r.info["tokens"]) for r in runs if r.role == "teacher")
    # the second member is the cross product's own teacher: it is planned once
    assert teachers == [("cpu-0.1m", 1024), ("cpu-0.3m", 2048)]
    assert sorted(r.info["teacher_model"] for r in runs if r.role == "student") == ["cpu-0.1m", "cpu-0.3m"]
    with pytest.raises(ConfigError) as info:
        load_grid(grid_file(tmp_path, cache_dir, teachers={"members": [{"model": "gpt-9", "tokens": 1}]}))
    assert info.value.key == "teachers.members[0].model"


def test_bad_grid_names_the_key(tmp_path, cache_dir):
    with pytest.raises(ConfigError) as info:
        load_grid(grid_file(tmp_path, cache_dir, kd={"alpha": [0.0]}))
    assert info.value.key == "kd.alpha[0]"
    with pytest.raises(ConfigError) as info:
        load_grid(grid_file(tmp_path, cache_dir, teachers={"models": ["gpt-9"], "tokens": [1]}))
    assert info.value.key == "teachers.models[0]"
    with pytest.raises(ConfigError) as info:
        plan(load_grid(grid_file(tmp_path, cache_dir, base={"train": {"lr": "fast"}})), tmp_path / "s")
    assert info.value.key == "train.lr"


@pytest.mark.slow
def test_grid_runs_fails_retries_and_reports(tmp_path, cache_dir):
    spec = load_grid(grid_file(tmp_path, cache_dir, notes=["Shakespeare stands in for the corpus"]))
    sweep_dir = tmp_path / "sweep"
    runs = plan(spec, sweep_dir)
    teacher = next(r for r in runs if r.role == "teacher")
    # a real fault: another process holds the teacher's run directory while the sweep runs
    with exclusive_lock(sweep_dir / "runs" / teacher.id / ".lock", "test"):
        status = run_sweep(spec, sweep_dir, workers=2, log=lambda *a: None)
    assert status[teacher.id] == "failed"
    assert [status[r.id] for r in runs if r.role == "baseline"] == ["done"]  # unrelated run not blocked
    assert [status[r.id] for r in runs if r.role == "student"] == ["blocked"]
    recorded = json.loads((sweep_dir / "runs" / teacher.id / "status.json").read_text())
    assert f"in use by another process (pid {os.getpid()})" in recorded["error"]

    baseline = next(r for r in runs if r.role == "baseline")
    final_stamp = (sweep_dir / "runs" / baseline.id / "final" / "model.safetensors").stat().st_mtime_ns
    without_retry = run_sweep(spec, sweep_dir, log=lambda *a: None)
    assert without_retry[teacher.id] == "failed"
    lines = []
    status = run_sweep(spec, sweep_dir, retry_failed=True, log=lines.append)
    assert all(s == "done" for s in status.values())
    # n/N and the time left: predicted at the grid's cpu_gflops before the first run, then after each run
    assert any(line.startswith("sweep: 2 runs to do, about") and "cpu_gflops = 120" in line for line in lines)
    assert [line.split("; ")[1].split(",")[0] for line in lines if "runs done" in line] == ["2/3 runs done",
                                                                                             "3/3 runs done"]
    # finished runs were not redone
    assert (sweep_dir / "runs" / baseline.id / "final" / "model.safetensors").stat().st_mtime_ns == final_stamp
    assert json.loads((sweep_dir / "runs" / baseline.id / "status.json").read_text())["attempts"] == 1

    report = write_report(sweep_dir)
    text = report.read_text()
    assert "Gains over the matched baseline" in text and (sweep_dir / "report.html").exists()
    assert "## Where this grid differs from what it reproduces\n\n- Shakespeare stands in for the corpus" in text
    assert (sweep_dir / "results.csv").exists() and (sweep_dir / "results.parquet").exists()
    import csv

    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    student = next(r for r in rows if r["role"] == "student")
    base_row = next(r for r in rows if r["role"] == "baseline")
    assert float(student["gain/validation"]) == pytest.approx(
        float(base_row["loss/validation"]) - float(student["loss/validation"]))


@pytest.mark.slow
def test_submitit_local_executor_runs_the_grid(tmp_path, cache_dir):
    pytest.importorskip("submitit")
    spec = load_grid(grid_file(tmp_path, cache_dir, students={"models": ["cpu-0.1m"], "tokens": [256],
                                                               "seeds": [43]}))
    status = run_sweep(spec, tmp_path / "sweep", executor="submitit-local", log=lambda *a: None)
    assert all(s == "done" for s in status.values()), status


@pytest.mark.slow
def test_killed_sweep_completes_without_redoing_finished_runs(tmp_path, cache_dir):
    """Kill the sweep process (and its workers) once a run is done; the rerun finishes the rest."""
    import signal
    import subprocess
    import sys
    import time

    grid = grid_file(tmp_path, cache_dir, students={"models": ["cpu-0.1m"], "tokens": [512], "seeds": [43, 44]})
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "DISTILLAB_CACHE": str(cache_dir)}
    command = [sys.executable, "-m", "distillab.cli", "sweep", str(grid), "--out", str(sweep_dir)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 180
    done_first = []
    while time.time() < deadline and process.poll() is None:
        done_first = [p.parent.name for p in sweep_dir.glob("runs/*/status.json")
                      if json.loads(p.read_text() or "{}").get("status") == "done"]
        if done_first:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert done_first, "no run finished before the deadline"
    stamps = {run_id: (sweep_dir / "runs" / run_id / "final" / "model.safetensors").stat().st_mtime_ns
              for run_id in done_first}
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "already done" in finished.stdout
    statuses = [json.loads(p.read_text())["status"] for p in sweep_dir.glob("runs/*/status.json")]
    assert statuses and all(s == "done" for s in statuses)
    for run_id, stamp in stamps.items():
        assert (sweep_dir / "runs" / run_id / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (sweep_dir / "report.md").exists()


def test_paper_preset_dry_run_prints_its_plan_and_notes(tmp_path):
    """One preset through the CLI (every preset's plan is held against PAPER.md in test_paper_presets)."""
    import subprocess
    import sys

    path = Path(__file__).parent.parent / "configs" / "paper" / "seeds.yaml"
    result = subprocess.run([sys.executable, "-m", "distillab.cli", "sweep", str(path), "--dry-run", "--device", "h100",
                             "--out", str(tmp_path / "s")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("notes (where this grid differs from what it reproduces):")
    assert "23 runs (3 teachers, 5 baselines, 15 students)" in result.stdout
    assert "teacher_inference" in result.stdout
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


def wsd_grid(tmp_path, cache_dir):
    teachers = {"models": ["cpu-0.1m"], "tokens": [1024, 2048], "seeds": [42], "wsd_branch": True,
                "compare_independent": True}
    spec = load_grid(grid_file(tmp_path, cache_dir, teachers=teachers,
                               students={"models": ["cpu-0.1m"], "tokens": [256], "seeds": [43]}))
    return spec, plan(spec, tmp_path / "sweep")


def test_wsd_branched_teacher_pool(tmp_path, cache_dir):
    """One trunk per teacher, branches for smaller budgets, independent twins for comparison."""
    spec, runs = wsd_grid(tmp_path, cache_dir)
    kinds = sorted(r.info["teacher_kind"] for r in runs if r.role == "teacher")
    assert kinds == ["independent", "wsd-branch", "wsd-trunk"]
    trunk = next(r for r in runs if r.info.get("teacher_kind") == "wsd-trunk")
    branch = next(r for r in runs if r.info.get("teacher_kind") == "wsd-branch")
    assert branch.depends_on == [trunk.id] and branch.config["train"]["branch_from"].endswith("step_00000006")
    assert trunk.config["train"]["keep_steps"] == [6]
    summary = compute_summary(runs, spec)
    assert summary["per_run"][branch.id]["train"] < summary["per_run"][trunk.id]["train"] / 4


@pytest.mark.slow
def test_wsd_branched_teacher_pool_runs_and_reports(tmp_path, cache_dir):
    spec, runs = wsd_grid(tmp_path, cache_dir)
    branch = next(r for r in runs if r.info.get("teacher_kind") == "wsd-branch")
    status = run_sweep(spec, tmp_path / "sweep", workers=2, log=lambda *a: None)
    assert all(s == "done" for s in status.values()), status
    text = write_report(tmp_path / "sweep").read_text()
    assert "WSD-branched vs independently trained teachers" in text
    import safetensors.torch as st

    independent = next(r for r in runs if r.info.get("teacher_kind") == "independent")
    a = st.load_file(str(tmp_path / "sweep" / "runs" / branch.id / "final" / "model.safetensors"))
    b = st.load_file(str(tmp_path / "sweep" / "runs" / independent.id / "final" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)  # the branch equals training that budget alone


def students_of(runs):
    return sorted((r.info["teacher_model"], r.info["alpha"], r.config["kd"].get("divergence", "forward_kl"),
                   r.info["seed"]) for r in runs if r.role == "student")


def test_pairs_use_each_teacher_at_its_own_alphas(tmp_path, cache_dir):
    teachers = {"models": ["cpu-0.1m", "cpu-0.3m"], "tokens": [1024], "seeds": [42]}
    pairs = [{"model": "cpu-0.1m", "tokens": 1024, "alpha": 0.2},
             {"model": "cpu-0.3m", "tokens": 1024, "alpha": [0.5, 0.8], "objective": {"divergence": "hard"}}]
    students = {"models": ["cpu-0.1m"], "tokens": [512], "seeds": [43, 44]}
    spec = load_grid(grid_file(tmp_path, cache_dir, teachers=teachers, students=students,
                               kd={"pairs": pairs, "temperature": [1.0, 2.0]}))
    runs = plan(spec, tmp_path / "sweep")
    # not the cross product (2 teachers x 3 alphas): each teacher at its pair's alphas; hard takes T = 1 only
    expected = [("cpu-0.1m", 0.2, "forward_kl", s) for s in (43, 43, 44, 44)] + \
               [("cpu-0.3m", a, "hard", s) for a in (0.5, 0.8) for s in (43, 44)]
    assert students_of(runs) == sorted(expected)
    temperatures = sorted(r.config["kd"]["temperature"] for r in runs
                          if r.role == "student" and r.info["teacher_model"] == "cpu-0.1m")
    assert temperatures == [1.0, 1.0, 2.0, 2.0]

    def error(kd=None, **changes):
        with pytest.raises(ConfigError) as info:
            load_grid(grid_file(tmp_path, cache_dir, teachers=teachers, students=students, kd=kd, **changes))
        return info.value.key, str(info.value)

    assert error({"pairs": pairs, "alpha": [0.5]})[0] == "kd.alpha"
    assert error({"pairs": pairs[:1]})[0] == "kd.pairs"  # the 0.3m teacher would teach no one
    assert error({"pairs": [*pairs, {"model": "cpu-1m", "tokens": 1024, "alpha": 0.5}]})[0] == "kd.pairs[2]"
    assert error({"pairs": [pairs[0], {**pairs[1], "alpha": [1.5]}]})[0] == "kd.pairs[1].alpha[0]"
    assert error({"pairs": [pairs[0], {**pairs[1], "objective": {"alpha": 0.3}}]})[0] == "kd.pairs[1].objective"
    assert error({"pairs": [pairs[0], {**pairs[1], "objective": {"divergence": "kl"}}]})[0] == \
        "kd.pairs[1].objective.divergence"


def test_student_and_baseline_members(tmp_path, cache_dir):
    teachers = {"models": ["cpu-0.1m", "cpu-0.3m"], "tokens": [1024], "seeds": [42]}
    students = {"models": ["cpu-0.1m"], "tokens": [512], "seeds": [43],
                "members": [{"model": "cpu-0.3m", "tokens": 512, "teachers": [{"model": "cpu-0.1m", "tokens": 1024}]}]}
    baselines = [{"model": "cpu-0.1m", "tokens": 1024, "seed": 42},  # the same run as the cpu-0.1m teacher
                 {"model": "cpu-0.1m", "tokens": 512, "overrides": {"kd": {"label_smoothing": 0.1}}}]
    spec = load_grid(grid_file(tmp_path, cache_dir, teachers=teachers, students=students,
                               baseline_members=baselines))
    runs = plan(spec, tmp_path / "sweep")
    assert [sum(r.role == role for r in runs) for role in ("teacher", "baseline", "student")] == [2, 3, 3]
    member = [r for r in runs if r.role == "student" and r.info["model"] == "cpu-0.3m"]
    assert [r.info["teacher_model"] for r in member] == ["cpu-0.1m"]  # restricted to the named teacher
    smoothed = [r for r in runs if r.config["kd"].get("label_smoothing")]
    assert len(smoothed) == 1 and smoothed[0].role == "baseline" and smoothed[0].config["kd"]["alpha"] == 0.0
    assert smoothed[0].config["train"]["init_seed"] == smoothed[0].config["train"]["data_seed"] == 43

    with pytest.raises(ConfigError) as info:
        load_grid(grid_file(tmp_path, cache_dir, teachers=teachers, students=students,
                            baseline_members=[{"model": "cpu-0.1m", "tokens": 512, "overrides": {"kd": {"alpha": 0.5}}}]))
    assert info.value.key == "baseline_members[0].overrides.kd"
    bad = {**students, "members": [{"model": "cpu-0.3m", "tokens": 512, "teachers": [{"model": "cpu-1m", "tokens": 9}]}]}
    with pytest.raises(ConfigError) as info:
        load_grid(grid_file(tmp_path, cache_dir, teachers=teachers, students=bad))
    assert info.value.key == "students.members[0].teachers[0]"


def test_external_teachers_are_named_by_path_and_not_trained(tmp_path, cache_dir):
    members = [{"model": "cpu-0.3m", "tokens": 10**9, "path": "some-org/some-model"}]
    spec = load_grid(grid_file(tmp_path, cache_dir, teachers={"members": members}))
    runs = plan(spec, tmp_path / "sweep")
    assert [r.role for r in runs] == ["baseline", "student"]
    student = runs[1]
    assert student.config["kd"]["teacher"] == "some-org/some-model" and student.depends_on == []
    assert student.info["teacher_kind"] == "external" and student.info["teacher_tokens"] == 10**9
    other = plan(load_grid(grid_file(tmp_path, cache_dir, teachers={"members": [{**members[0], "path": "x/y"}]})),
                 tmp_path / "sweep")
    assert other[1].id != student.id and other[0].id == runs[0].id  # the teacher is part of the student's identity
    summary = compute_summary(runs, spec)
    from distillab.config import config_from_dict
    from distillab.flops import teacher_inference_flops
    from distillab.models import LADDER

    cfg = config_from_dict(student.config)
    assert summary["per_run"][student.id]["teacher_inference"] == teacher_inference_flops(
        LADDER["cpu-0.3m"], cfg.data.tokenizer.vocab_size, cfg) > 0


def test_notes_are_printed_and_kept_out_of_run_ids(tmp_path, cache_dir):
    from distillab.sweep import format_notes

    plain = plan(load_grid(grid_file(tmp_path, cache_dir)), tmp_path / "sweep")
    noted = load_grid(grid_file(tmp_path, cache_dir, notes=["the corpus is a stand-in for the authors' one"]))
    assert [r.id for r in plan(noted, tmp_path / "sweep")] == [r.id for r in plain]
    assert "  - the corpus is a stand-in for the authors' one" in format_notes(noted.notes)
    assert format_notes([]) == ""


def test_baseline_members_are_never_a_students_matched_baseline():
    base = {"model": "cpu-1m", "tokens": 100, "init_seed": 43, "data_seed": 43, "non_embedding_parameters": 10,
            "domain/validation": "in-domain"}
    rows = [{**base, "run_id": "b", "role": "baseline", "kind": None, "loss/validation": 4.50},
            {**base, "run_id": "ls", "role": "baseline", "kind": "member", "loss/validation": 4.40},
            {**base, "run_id": "s", "role": "student", "teacher_id": None, "loss/validation": 4.45}]
    student = add_gains_and_labels(rows, tolerance=0.02)[2]
    assert student["baseline_id"] == "b" and student["gain/validation"] == pytest.approx(0.05)
