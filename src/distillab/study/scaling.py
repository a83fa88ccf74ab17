"""`distillab demo --scaling`: the default demo's design repeated at several student sizes.

Do the answers move with scale? Each size is the default demo's study (`distillab.study.demo.STUDIES`)
with its student replaced by another rung of the CPU ladder, and everything that depends on the
student derived the way the default demo derives it:

    tokens        the default demo's tokens per non-embedding parameter (~24), in whole steps
    ladder        the two rungs below and the two above the student, on the student's tokens
    token axis    the first rung above, on the default demo's multiple (3x) of the student's tokens
    everything else (corpus, tokenizer, α grid, compute-matched baselines on the tuning seeds,
                  evaluation, and the design: a tuning round, then one round per look of
                  `distillab.study.sequential.DESIGN` while a finding is open, stopping on the
                  results alone) is the default demo's

Students: cpu-3.5k, cpu-7k, cpu-14k, cpu-27k (7.6x in parameters; cpu-27k's study is the default
demo itself). Fixed here before any run; never adjusted to the verdicts. Each size is its own sweep
directory (OUT/scaling/<rung>/, resumable like every demo); the combined report (OUT/scaling/
report.md) gives each finding's verdict per size, the slope of its paired quantity against
ln(parameters), the law (`distillab.study.law`) fitted on every size and its validation
(`distillab.study.validation`).

`--quick` runs the same code on the quick demo's tiny study (three small students): a smoke test of
the pipeline whose numbers mean nothing. Before the first run every size's plan is printed (runs,
rounds at most, predicted minutes on this machine) with their total.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from distillab.errors import DistillabError
from distillab.files import write_json_atomic, write_text_atomic
from distillab.layout import SweepLayout
from distillab.models import LADDER
from distillab.study.demo import STUDIES, Study, StudyPlan, about_lines, check_workers, cpu_rungs, \
    machine_description, measured_plan, run_study, student_regime
from distillab.study.stats import t_quantile_975

SCALING_STUDENTS = ("cpu-3.5k", "cpu-7k", "cpu-14k", "cpu-27k")
QUICK_STUDENTS = ("cpu-3.5k", "cpu-7k", "cpu-14k")
FINDING_CLAIMS = {"F1": +1, "F2": -1, "F3-OOD": +1, "F3-downstream": +1}  # sign of the paper's claimed quantity
CLAIM_WORDS = {"F1": "a weaker teacher helps", "F2": "a stronger teacher's extra gain saturates or reverses",
               "F3-OOD": "the gain is larger out of distribution", "F3-downstream": "downstream accuracy gains"}


def parameters(rung: str) -> int:
    return LADDER[rung].non_embedding_parameters()


def scaling_study(rung: str, base: str = "default") -> Study:
    """The `base` demo study with `rung` as its student (`demo.student_regime` at the base's tokens per
    non-embedding parameter, in whole steps, and its token-axis multiple); all else is the base's."""
    if rung not in cpu_rungs():
        raise DistillabError(f"scaling: {rung!r} is not a CPU rung; `distillab models` lists the ladder")
    study = STUDIES[base]
    regime = student_regime(rung, study.student_tokens / parameters(study.student), study.batch_size * study.seq_len,
                            1, study.token_axis[0][1])
    return dataclasses.replace(study, name=f"{study.name}-scaling-{rung}", **regime)


# ----------------------------------------------------------------------------- running the sizes


def run_size(study: Study, sweep_dir: Path, workers: int, study_plan: StudyPlan, log) -> dict:
    """One size: the demo's rounds of seeds in `sweep_dir`, its report, and scaling.json (wall time, rounds)."""
    from distillab.report import write_report

    outcome = run_study(study, sweep_dir, workers, log, study_plan=study_plan)
    about = [f"One size of `distillab demo --scaling`: student {study.student} "
             f"({parameters(study.student):,} non-embedding parameters) on {study.student_tokens:,} tokens."]
    about += about_lines(study, "scaling", workers, outcome, machine_description())
    write_report(sweep_dir, about=about, title=f"distillab demo --scaling, student {study.student}")
    state, status = outcome.state, outcome.status
    result = {"student": study.student, "study": study.name, "parameters": parameters(study.student),
              "tokens": study.student_tokens,
              "seconds": state.seconds, "rounds": state.rounds, "stop": state.stop,
              "plan": {"max_runs": study_plan.max_runs(), "predicted_max_minutes": study_plan.worst_seconds() / 60},
              "runs": {s: sum(v == s for v in status.values()) for s in set(status.values())}}
    write_json_atomic(SweepLayout(sweep_dir).scaling_result, result)
    if any(v != "done" for v in status.values()):
        raise DistillabError(f"scaling: some runs of {study.student} did not finish ({result['runs']}); see "
                             f"{SweepLayout(sweep_dir).run('*').status} and rerun the same command to resume")
    return result


def scaling_plans(students: tuple[str, ...], base: str, root: Path, workers: int, log) -> dict[str, StudyPlan]:
    """Every size's plan at its student's measured speed, and their total logged before the first run."""
    plans = {rung: measured_plan(scaling_study(rung, base), root / rung, workers) for rung in students}
    log(f"scaling: {len(plans)} sizes ({', '.join(students)}), each the default demo's design: at most "
        f"{sum(p.max_runs() for p in plans.values())} runs, predicted at most "
        f"{sum(p.worst_seconds() for p in plans.values()) / 60:.0f} min on this machine ("
        + ", ".join(f"{rung} {p.max_runs()} runs / {p.worst_seconds() / 60:.0f} min" for rung, p in plans.items())
        + "), less when findings are decided early")
    return plans


def run_scaling(out_dir: str | Path = "runs/demo", workers: int = 2, quick: bool = False, log=print) -> Path:
    """Run (or resume) every size, then write OUT/scaling[-quick]/report.md; returns its path."""
    check_workers(workers)
    students, base = (QUICK_STUDENTS, "quick") if quick else (SCALING_STUDENTS, "default")
    root = Path(out_dir) / ("scaling-quick" if quick else "scaling")
    plans = scaling_plans(students, base, root, workers, log)
    for rung in students:
        log(f"scaling: student {rung}")
        run_size(scaling_study(rung, base), root / rung, workers, plans[rung], log)
    return write_scaling_report(root, students, base, log)


# ----------------------------------------------------------------------------- the combined report


def size_verdicts(sweep_dir: Path) -> dict[str, dict]:
    """{finding: verdict} of one size's summary.json (its one student setting)."""
    summary = json.loads(SweepLayout(sweep_dir).summary.read_text())
    settings = summary["verdicts"]["settings"]
    return {v["finding"]: v for v in settings[0]["verdicts"]} if settings else {}


def trend(points: list[tuple[float, float, float, int]]) -> dict | None:
    """Weighted least-squares slope of a finding's quantity against ln(parameters): points (ln N, mean over the
    size's interval seeds, their sd, n). Weights n / sd²; interval slope ± t(min n − 1) · se, se² = 1 / Σ w (x − x̄)²
    (the seeds' noise only; a fixed-n interval, descriptive). None with fewer than 2 usable sizes."""
    usable = [(x, m, sd, n) for x, m, sd, n in points if n >= 2 and sd and sd > 0]
    if len(usable) < 2:
        return None
    w = [n / sd ** 2 for _, _, sd, n in usable]
    xbar = sum(wi * p[0] for wi, p in zip(w, usable)) / sum(w)
    ybar = sum(wi * p[1] for wi, p in zip(w, usable)) / sum(w)
    sxx = sum(wi * (p[0] - xbar) ** 2 for wi, p in zip(w, usable))
    slope = sum(wi * (p[0] - xbar) * (p[1] - ybar) for wi, p in zip(w, usable)) / sxx
    half = t_quantile_975(min(n for *_, n in usable) - 1) / math.sqrt(sxx)
    return {"slope": slope, "lo": slope - half, "hi": slope + half, "sizes": len(usable)}


def trend_sentence(finding: str, t: dict | None, unit: str) -> str:
    claim = CLAIM_WORDS[finding]
    if t is None:
        return f"**{finding}** ({claim}): fewer than two sizes with an interval; no trend can be read."
    numbers = f"{t['slope']:+.4f} [{t['lo']:+.4f}, {t['hi']:+.4f}] {unit} per e-fold of parameters ({t['sizes']} sizes)"
    toward = (t["slope"] > 0) == (FINDING_CLAIMS[finding] > 0)
    if t["lo"] > 0 or t["hi"] < 0:
        side = "toward" if toward else "away from"
        return f"**{finding}** ({claim}): slope {numbers}; the evidence points {side} the paper's claim as size grows."
    lean = "toward" if toward else "away from"
    return (f"**{finding}** ({claim}): slope {numbers}; the interval includes 0, so the evidence points neither way "
            f"as size grows (the estimate leans {lean} the claim).")


def verdict_and_trend_lines(root: Path, students: tuple[str, ...]) -> list[str]:
    verdicts = {rung: size_verdicts(root / rung) for rung in students}
    findings = list(FINDING_CLAIMS)
    lines = ["## Verdicts per size", "", "| finding | " + " | ".join(
        f"{rung} ({parameters(rung):,})" for rung in students) + " |", "|---|" + "---|" * len(students)]
    for finding in findings:
        cells = []
        for rung in students:
            v = verdicts[rung].get(finding)
            ci = (v or {}).get("ci") or {}
            numbers = f" {ci['mean']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}] (n={ci['n']})" \
                if ci.get("lo") is not None else ""
            cells.append(f"**{v['verdict']}**{numbers}" if v else "—")
        lines.append(f"| {finding} | " + " | ".join(cells) + " |")
    lines += ["", "## Trends with size", "",
              "Each finding's paired quantity (mean over the size's interval seeds, as in its verdict) regressed on "
              "ln(non-embedding parameters), weighted by seeds / variance; the interval is Student t with the fewest "
              "seeds of any size, so it reflects the seeds' noise.", ""]
    for finding in findings:
        points = []
        for rung in students:
            ci = (verdicts[rung].get(finding) or {}).get("ci") or {}
            if ci.get("mean") is not None:
                points.append((math.log(parameters(rung)), ci["mean"], ci.get("sd"), ci.get("n", 0)))
        unit = "accuracy" if finding == "F3-downstream" else "nats"
        lines.append("- " + trend_sentence(finding, trend(points), unit))
    return lines + [""]


def about_scaling(root: Path, students: tuple[str, ...], base: str) -> list[str]:
    lines = ["## About this study", ""]
    if base == "quick":
        lines += ["**Smoke test** (`--scaling --quick`): the quick demo's tiny study at three sizes; its numbers mean "
                  "nothing.", ""]
    lines += ["| student | non-emb. params | tokens | tokens / param | ladder (on its tokens) | token axis | wall time |",
              "|---|---:|---:|---:|---|---|---:|"]
    total = 0.0
    for rung in students:
        study = scaling_study(rung, base)
        state = json.loads((root / rung / "scaling.json").read_text())
        total += state["seconds"]
        axis = ", ".join(f"{m} × {k}" for m, k in study.token_axis)
        lines.append(f"| {rung} | {parameters(rung):,} | {study.student_tokens:,} | "
                     f"{study.student_tokens / parameters(rung):.1f} | {', '.join(study.ladder)} | {axis} | "
                     f"{state['seconds'] / 60:.1f} min |")
    lines += ["", f"Total wall time {total / 60:.1f} min on {machine_description()}. Each size's own report: "
              + ", ".join(f"[{rung}]({rung}/report.md)" for rung in students) + ".", ""]
    return lines


def write_scaling_report(root: Path, students: tuple[str, ...], base: str, log=print) -> Path:
    """OUT/scaling/report.md: per-size verdicts, trends, the law on every size and its validation."""
    from distillab.study.planner import law_lines, read_rows
    from distillab.study.law import fit_law
    from distillab.study.validation import largest_size_check, leave_one_teacher_out, validation_lines

    rows = [row for rung in students for row in read_rows(root / rung)]
    lines = ["# distillab demo --scaling: do the answers move with student size?", ""]
    lines += verdict_and_trend_lines(root, students)
    law = fit_law(rows, replicates=200, seed=0)
    lines += law_lines(law)
    lines += validation_lines(largest_size_check(rows), leave_one_teacher_out(rows))
    lines += about_scaling(root, students, base)
    path = SweepLayout(root).report
    write_text_atomic(path, "\n".join(lines) + "\n")
    log(f"scaling: report {path}")
    return path
