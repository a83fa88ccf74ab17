"""Experiment grids: teacher pools -> students (+ matched baselines) -> evaluation, resumable.

A grid spec (YAML) names a base run config, a teacher pool (models x token budgets x seeds),
students (models x budgets x seeds) and the KD settings to sweep. `plan` expands it into runs:

    teacher   alpha = 0, the teacher's seed for init and data
    baseline  alpha = 0 with each student's seeds (added automatically)
    student   one per (student, seed, teacher, alpha, temperature)

Each run is content-addressed: its id is a hash of its resolved config (a student's teacher
is named by the teacher's id, not its path), so re-running a grid skips finished runs,
resumes interrupted ones and shares runs between grids. Runs execute in dependency order
(teachers before their students) on N local worker processes or through submitit (Slurm, or
its local executor). A failed run is recorded with its error, blocks only its dependants, and
is retried with --retry-failed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distillab.config import _build, config_from_dict, stable_hash
from distillab.data.shards import write_json_atomic
from distillab.errors import ConfigError, DistillabError
from distillab.models import LADDER, resolve_spec
from distillab.train import results_config

# Peak dense bf16 throughput of accelerators, for compute estimates at a stated MFU.
DEVICE_PEAK_FLOPS = {"h100": 989e12, "tpu-v6e": 918e12}
DEFAULT_MFU = 0.40


@dataclass
class TeacherMember:
    """One hand-picked teacher of the pool, beside the models x tokens x seeds cross product."""
    model: str = ""
    tokens: int = 0
    seed: int = 42


@dataclass
class TeacherPool:
    models: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [42])
    train: dict = field(default_factory=dict)  # overrides of the base train section
    overrides: dict = field(default_factory=dict)  # any other run-config overrides (e.g. data)
    # one warmup-stable-decay trunk per model and seed (the largest budget); every smaller
    # budget is a short decay branched from the trunk's stable phase
    wsd_branch: bool = False
    # with wsd_branch: also train each budget independently (same schedule), for comparison
    compare_independent: bool = False
    # hand-picked teachers added to the cross product (e.g. only the sizes and budgets a study needs)
    members: list[TeacherMember] = field(default_factory=list)


@dataclass
class StudentSet:
    models: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [43])
    train: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)


@dataclass
class KDSweep:
    alpha: list[float] = field(default_factory=lambda: [0.5])
    temperature: list[float] = field(default_factory=lambda: [1.0])
    top_k: list[int | None] = field(default_factory=lambda: [None])
    # true adds hard-label students (teacher argmax); they take T = 1 and no top-k only
    hard_labels: list[bool] = field(default_factory=lambda: [False])


@dataclass
class SweepEval:
    sets: list[str] = field(default_factory=lambda: ["in-domain"])
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    max_windows: int = 64
    seq_len: int | None = None


@dataclass
class GridSpec:
    name: str = "grid"
    base: dict = field(default_factory=dict)
    teachers: TeacherPool = field(default_factory=TeacherPool)
    students: StudentSet = field(default_factory=StudentSet)
    kd: KDSweep = field(default_factory=KDSweep)
    eval: SweepEval = field(default_factory=SweepEval)
    baselines: bool = True
    # teacher vs student-baseline held-out loss within this many nats = same-level
    label_tolerance: float = 0.02
    # verdicts: an interval inside +-margin nats counts as "no effect" (see distillab.verdicts)
    verdict_margin: float = 0.02
    # CPU throughput for estimates (GFLOP/s achieved in training); measure with `distillab bench`
    cpu_gflops: float = 120.0


@dataclass
class Run:
    id: str
    role: str  # teacher | baseline | student
    config: dict
    depends_on: list[str]
    info: dict

    @property
    def name(self) -> str:
        return self.config["name"]


def load_grid(path: str | Path) -> GridSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "grid file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(str(path), "not valid YAML") from None
    if not isinstance(values, dict):
        raise ConfigError(str(path), "the top level must be a mapping")
    spec = _build(GridSpec, values)
    _validate_grid(spec)
    return spec


def _validate_grid(spec: GridSpec) -> None:
    for section, models in (("teachers", spec.teachers.models), ("students", spec.students.models)):
        for i, model in enumerate(models):
            if model not in LADDER:
                raise ConfigError(f"{section}.models[{i}]", f"unknown model {model!r}; `distillab models` lists them")
    for section, tokens in (("teachers", spec.teachers.tokens), ("students", spec.students.tokens)):
        for i, value in enumerate(tokens):
            if value <= 0:
                raise ConfigError(f"{section}.tokens[{i}]", f"must be > 0, got {value}")
    for i, member in enumerate(spec.teachers.members):
        if member.model not in LADDER:
            raise ConfigError(f"teachers.members[{i}].model",
                              f"unknown model {member.model!r}; `distillab models` lists them")
        if member.tokens <= 0:
            raise ConfigError(f"teachers.members[{i}].tokens", f"must be > 0, got {member.tokens}")
    if not spec.students.models or not spec.students.tokens:
        raise ConfigError("students", "name at least one student model and token budget")
    for i, alpha in enumerate(spec.kd.alpha):
        if not 0 < alpha <= 1:
            raise ConfigError(f"kd.alpha[{i}]", f"must be in (0, 1] (baselines are added automatically), got {alpha}")
    for i, temperature in enumerate(spec.kd.temperature):
        if temperature <= 0:
            raise ConfigError(f"kd.temperature[{i}]", f"must be > 0, got {temperature}")
    for i, top_k in enumerate(spec.kd.top_k):
        if top_k is not None and top_k < 1:
            raise ConfigError(f"kd.top_k[{i}]", f"must be >= 1 or null, got {top_k}")


def _merge(base: dict, *updates: dict) -> dict:
    out = copy.deepcopy(base)
    for update in updates:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = _merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def _run_id(config: dict, teacher_id: str | None) -> str:
    identity = dict(config)
    identity["kd"] = {**identity.get("kd", {}), "teacher": f"run:{teacher_id}" if teacher_id else None}
    identity.pop("run_dir", None)
    identity.pop("name", None)
    return stable_hash(results_config(config_from_dict(identity)))[:12]


def plan(spec: GridSpec, sweep_dir: Path) -> list[Run]:
    """Every run of the grid, teachers first; identical configs collapse into one run."""
    sweep_dir = Path(sweep_dir).resolve()
    runs: dict[str, Run] = {}

    def add(role: str, config: dict, teacher: Run | None, info: dict, after: Run | None = None) -> Run:
        run_id = _run_id(config, teacher.id if teacher else None)
        if run_id in runs:
            return runs[run_id]
        config = _merge(config, {"name": f"{role}-{info['model']}-{run_id[:6]}",
                                 "run_dir": str(sweep_dir / "runs" / run_id)})
        if teacher is not None:
            config["kd"]["teacher"] = str(sweep_dir / "runs" / teacher.id / "final")
        if after is not None:  # a WSD branch starts from its trunk's checkpoint
            step = config["train"]["branch_from"]
            config["train"]["branch_from"] = str(sweep_dir / "runs" / after.id / "checkpoints" / f"step_{step:08d}")
        config_from_dict(config)  # validates: a bad grid fails here, with the key
        depends = [teacher.id] if teacher else [after.id] if after else []
        run = Run(run_id, role, config, depends, info)
        runs[run_id] = run
        return run

    def teacher_config(model: str, seed: int, tokens: int, extra: dict | None = None) -> dict:
        return _merge(spec.base, {"model": {"name": model}, "kd": {"alpha": 0.0, "teacher": None},
                                  "train": {"token_budget": tokens, "init_seed": seed, "data_seed": seed}},
                      {"train": spec.teachers.train}, spec.teachers.overrides, extra or {})

    teachers = []
    for model in spec.teachers.models:
        for seed in spec.teachers.seeds:
            info = {"model": model, "seed": seed}
            if not spec.teachers.wsd_branch:
                for tokens in spec.teachers.tokens:
                    teachers.append(add("teacher", teacher_config(model, seed, tokens), None,
                                        {**info, "tokens": tokens, "teacher_kind": "independent"}))
                continue
            teachers.extend(_wsd_teachers(
                spec, lambda tokens, extra=None, m=model, s=seed: teacher_config(m, s, tokens, extra), add, info))
    for member in spec.teachers.members:
        teacher = add("teacher", teacher_config(member.model, member.seed, member.tokens), None,
                      {"model": member.model, "seed": member.seed, "tokens": member.tokens,
                       "teacher_kind": "independent"})
        if teacher not in teachers:
            teachers.append(teacher)
    for model in spec.students.models:
        for tokens in spec.students.tokens:
            for seed in spec.students.seeds:
                student_base = _merge(spec.base, {"model": {"name": model},
                                                  "train": {"token_budget": tokens, "init_seed": seed,
                                                            "data_seed": seed}}, {"train": spec.students.train},
                                      spec.students.overrides)
                info = {"model": model, "tokens": tokens, "seed": seed}
                if spec.baselines:
                    add("baseline", _merge(student_base, {"kd": {"alpha": 0.0, "teacher": None}}), None, info)
                objectives = [(t, k, False) for t in spec.kd.temperature for k in spec.kd.top_k]
                if True in spec.kd.hard_labels:
                    objectives = [o for o in objectives if False in spec.kd.hard_labels] + [(1.0, None, True)]
                for teacher in teachers:
                    for alpha in spec.kd.alpha:
                        for temperature, top_k, hard in objectives:
                            config = _merge(student_base, {"kd": {"alpha": alpha, "temperature": temperature,
                                                                  "top_k": top_k, "hard_labels": hard,
                                                                  "teacher": "pending"}})
                            add("student", config, teacher, {**info, "teacher": teacher.id,
                                                             "teacher_model": teacher.info["model"],
                                                             "teacher_tokens": teacher.info["tokens"],
                                                             "teacher_kind": teacher.info["teacher_kind"],
                                                             "alpha": alpha, "temperature": temperature,
                                                             "top_k": top_k, "hard_labels": hard})
    order = {"teacher": 0, "baseline": 1, "student": 2}
    return sorted(runs.values(), key=lambda r: order[r.role])


def _wsd_teachers(spec: GridSpec, teacher_config, add, info: dict) -> list[Run]:
    """A WSD trunk at the largest budget and a decay branch per smaller budget (plus, if asked,
    each budget trained independently with the same schedule)."""
    from distillab.train import make_plan

    budgets = sorted(set(spec.teachers.tokens))
    longest = config_from_dict(teacher_config(budgets[-1], {"train": {"schedule": "wsd"}})).train
    warmup = make_plan(longest).warmup_steps
    shared = {"train": {"schedule": "wsd", "warmup_steps": warmup}}
    branch_steps = {}
    for tokens in budgets[:-1]:
        branch_cfg = config_from_dict(teacher_config(tokens, shared)).train
        branch_steps[tokens] = make_plan(branch_cfg).decay_start
    trunk = add("teacher", teacher_config(budgets[-1], _merge(shared, {"train": {
        "keep_steps": sorted(set(branch_steps.values()))}})), None,
        {**info, "tokens": budgets[-1], "teacher_kind": "wsd-trunk"})
    out = [trunk]
    for tokens, step in branch_steps.items():
        branch = teacher_config(tokens, _merge(shared, {"train": {"branch_from": step}}))
        out.append(add("teacher", branch, None, {**info, "tokens": tokens, "teacher_kind": "wsd-branch"}, after=trunk))
        if spec.teachers.compare_independent:
            out.append(add("teacher", teacher_config(tokens, shared), None,
                           {**info, "tokens": tokens, "teacher_kind": "independent"}))
    return out


# ----------------------------------------------------------------------------- compute


def run_flops(run: Run, runs_by_id: dict[str, Run]) -> dict:
    """Training FLOPs of the run and, for students, the teacher's forward passes over its tokens."""
    cfg = config_from_dict(run.config)
    spec = resolve_spec(cfg.model)
    vocab = cfg.data.tokenizer.vocab_size
    tokens = cfg.train.token_budget
    if cfg.train.branch_from:  # a WSD branch trains only its decay
        from distillab.train import make_plan

        branch_plan = make_plan(cfg.train)
        tokens = (branch_plan.steps - branch_plan.decay_start) * branch_plan.tokens_per_step
    train_flops = spec.training_flops_per_token(vocab, cfg.train.seq_len) * tokens
    teacher_flops = 0.0
    if run.depends_on:
        teacher_cfg = config_from_dict(runs_by_id[run.depends_on[0]].config)
        teacher_spec = resolve_spec(teacher_cfg.model)
        teacher_flops = teacher_spec.forward_flops_per_token(vocab, cfg.train.seq_len) * tokens
    return {"train": train_flops, "teacher_inference": teacher_flops}


def compute_summary(runs: list[Run], spec: GridSpec, device: str = "cpu", mfu: float = DEFAULT_MFU) -> dict:
    by_id = {r.id: r for r in runs}
    if device == "cpu":
        rate = spec.cpu_gflops * 1e9
        rate_note = f"{spec.cpu_gflops:.0f} GFLOP/s achieved (cpu_gflops in the grid; measure with distillab bench)"
    elif device in DEVICE_PEAK_FLOPS:
        rate = DEVICE_PEAK_FLOPS[device] * mfu
        rate_note = f"{DEVICE_PEAK_FLOPS[device] / 1e12:.0f} TFLOP/s peak bf16 x MFU {mfu:.0%}"
    else:
        raise ConfigError("--device", f"unknown device {device!r}; use cpu, {', '.join(DEVICE_PEAK_FLOPS)}")
    buckets = {"teacher_training": 0.0, "teacher_inference": 0.0, "student_training": 0.0}
    per_run = {}
    for run in runs:
        flops = run_flops(run, by_id)
        per_run[run.id] = {**flops, "hours": (flops["train"] + flops["teacher_inference"]) / rate / 3600}
        if run.role == "teacher":
            buckets["teacher_training"] += flops["train"]
        else:
            buckets["student_training"] += flops["train"]
            buckets["teacher_inference"] += flops["teacher_inference"]
    total = sum(buckets.values())
    return {"device": device, "rate_flops": rate, "rate_note": rate_note, "per_run": per_run,
            "flops": buckets, "total_flops": total,
            "hours": {k: v / rate / 3600 for k, v in buckets.items()}, "total_hours": total / rate / 3600}


def format_plan(runs: list[Run], summary: dict) -> str:
    lines = [f"{len(runs)} runs ({sum(r.role == 'teacher' for r in runs)} teachers, "
             f"{sum(r.role == 'baseline' for r in runs)} baselines, {sum(r.role == 'student' for r in runs)} students)",
             f"compute on {summary['device']}: {summary['rate_note']}; hours are device-hours", "",
             f"{'id':12s} {'role':8s} {'model':12s} {'tokens':>14s} {'seed':>5s} {'teacher':12s} {'alpha':>5s} "
             f"{'T':>4s} {'top-k':>6s} {'PFLOP':>9s} {'hours':>8s}"]
    for run in runs:
        info, cost = run.info, summary["per_run"][run.id]
        lines.append(
            f"{run.id:12s} {run.role:8s} {info['model']:12s} {info['tokens']:14,d} {info['seed']:5d} "
            f"{info.get('teacher', '-'):12s} {info.get('alpha', 0):5.2f} {info.get('temperature', 1):4.1f} "
            f"{'hard' if info.get('hard_labels') else (info.get('top_k') or '-'):>6} "
            f"{(cost['train'] + cost['teacher_inference']) / 1e15:9.3f} {cost['hours']:8.2f}"
        )
    lines += ["", "dependencies: " + (", ".join(f"{r.depends_on[0]} -> {r.id}" for r in runs if r.depends_on)
                                     or "none")]
    hours, flops = summary["hours"], summary["flops"]
    lines += ["", "compute split:"]
    for key in ("teacher_training", "teacher_inference", "student_training"):
        lines.append(f"  {key:18s} {flops[key] / 1e15:12.3f} PFLOP  {hours[key]:10.2f} h")
    lines.append(f"  {'total':18s} {summary['total_flops'] / 1e15:12.3f} PFLOP  {summary['total_hours']:10.2f} h")
    teacher_cost = flops["teacher_training"] + flops["teacher_inference"]
    lines.append(f"  distillation pays for itself only if its gain beats spending {teacher_cost / 1e15:.3f} PFLOP "
                 "on the students instead")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- execution


def _status_path(sweep_dir: Path, run_id: str) -> Path:
    return Path(sweep_dir) / "runs" / run_id / "status.json"


def read_status(sweep_dir: Path, run_id: str) -> dict:
    path = _status_path(sweep_dir, run_id)
    if not path.exists():
        return {"status": "pending"}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"status": "pending"}


def write_status(sweep_dir: Path, run_id: str, **fields) -> None:
    path = _status_path(sweep_dir, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = read_status(sweep_dir, run_id)
    write_json_atomic(path, {**previous, **fields, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def execute_run(sweep_dir: str | Path, run_id: str, threads: int | None = None) -> dict:
    """Train (or resume) one run of a planned sweep, then evaluate it. Runs in a worker process."""
    from distillab.evaluate.run import evaluate_checkpoint
    from distillab.train import train

    sweep_dir = Path(sweep_dir)
    planned = json.loads((sweep_dir / "plan.json").read_text())
    run = next(r for r in planned["runs"] if r["id"] == run_id)
    settings = planned["eval"]
    attempts = read_status(sweep_dir, run_id).get("attempts", 0) + 1
    write_status(sweep_dir, run_id, status="running", attempts=attempts, pid=os.getpid(), error=None)
    try:
        if os.environ.get("DISTILLAB_INJECT_FAILURE") == run_id:  # fault injection for tests
            raise RuntimeError("injected failure")
        config_values = _merge(run["config"], {"train": {"threads": threads}} if threads else {})
        config = config_from_dict(config_values)
        if config.train.processes > 1 and "WORLD_SIZE" not in os.environ:
            final_dir = _train_with_torchrun(config_values, config.train.processes)
        else:
            final_dir = train(config).final_dir
        evaluate_checkpoint(final_dir, settings["sets"], tasks=settings["tasks"], limit=settings["limit"],
                            max_windows=settings["max_windows"], seq_len=settings["seq_len"], threads=threads)
    except BaseException as exc:  # recorded, then re-raised for the executor
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        write_status(sweep_dir, run_id, status="failed", error=f"{type(exc).__name__}: {message}",
                     traceback=traceback.format_exc()[-4000:])
        raise
    write_status(sweep_dir, run_id, status="done", error=None)
    return {"id": run_id, "status": "done"}


def _train_with_torchrun(config_values: dict, processes: int) -> Path:
    """Train one run on `processes` data-parallel workers of this machine (GPUs, or CPU processes)."""
    run_dir = Path(config_values["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    launch = run_dir / "launch.yaml"
    launch.write_text(yaml.safe_dump(config_values, sort_keys=False))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "distillab.cli", "train", str(launch)]
    done = subprocess.run(command, capture_output=True, text=True)
    sys.stdout.write(done.stdout[-20000:])
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DistillabError(f"torchrun ({processes} processes) failed: {last}")
    return run_dir / "final"


def write_plan(spec: GridSpec, runs: list[Run], sweep_dir: Path) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sweep_dir / "plan.json", {
        "name": spec.name,
        "spec": dataclasses.asdict(spec),
        "eval": dataclasses.asdict(spec.eval),
        "runs": [{"id": r.id, "role": r.role, "depends_on": r.depends_on, "info": r.info, "config": r.config}
                 for r in runs],
    })


def run_sweep(
    spec: GridSpec,
    sweep_dir: str | Path,
    workers: int = 1,
    executor: str = "local",
    retry_failed: bool = False,
    slurm: dict | None = None,
    log=print,
) -> dict:
    """Execute every unfinished run in dependency order; return {run id: final status}."""
    sweep_dir = Path(sweep_dir).resolve()
    runs = plan(spec, sweep_dir)
    write_plan(spec, runs, sweep_dir)
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    status = {r.id: read_status(sweep_dir, r.id).get("status", "pending") for r in runs}
    for run_id, state in status.items():
        if state == "running":  # a previous sweep process died: the run resumes from its checkpoint
            status[run_id] = "pending"
        if state == "failed" and retry_failed:
            status[run_id] = "pending"
    done_before = sum(s == "done" for s in status.values())
    if done_before:
        log(f"sweep: {done_before} of {len(runs)} runs already done; skipping them")
    submit = _local_submitter(sweep_dir, threads) if executor == "local" else _submitit_submitter(
        sweep_dir, executor, threads, slurm or {})
    in_flight: dict[str, object] = {}
    while True:
        for run in runs:
            if status[run.id] != "pending" or run.id in in_flight:
                continue
            dependencies = [status[d] for d in run.depends_on]
            if any(d in ("failed", "blocked") for d in dependencies):
                status[run.id] = "blocked"
                log(f"sweep: {run.name} blocked: its teacher failed")
                continue
            if all(d == "done" for d in dependencies) and len(in_flight) < workers:
                log(f"sweep: starting {run.name} ({run.id})")
                in_flight[run.id] = submit(run.id)
        if not in_flight:
            break
        finished = _wait_any(in_flight)
        for run_id in finished:
            handle = in_flight.pop(run_id)
            ok = _succeeded(handle)
            status[run_id] = "done" if ok else "failed"
            if not ok:
                error = read_status(sweep_dir, run_id).get("error") or "worker exited with an error"
                write_status(sweep_dir, run_id, status="failed", error=error)
                log(f"sweep: {run_id} failed: {error}")
            else:
                log(f"sweep: {run_id} done")
    counts = {s: sum(v == s for v in status.values()) for s in ("done", "failed", "blocked", "pending")}
    log("sweep: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return status


def _local_submitter(sweep_dir: Path, threads: int):
    def submit(run_id: str):
        log_path = sweep_dir / "runs" / run_id / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(log_path, "a")
        env = {**os.environ, "DISTILLAB_PROGRESS": "0"}
        process = subprocess.Popen(
            [sys.executable, "-m", "distillab.cli", "sweep-run", str(sweep_dir), run_id, "--threads", str(threads)],
            stdout=handle, stderr=subprocess.STDOUT, env=env,
        )
        process._log_handle = handle  # closed when the run finishes
        return process
    return submit


def _submitit_submitter(sweep_dir: Path, executor: str, threads: int, slurm: dict):
    try:
        import submitit
    except ImportError:
        raise DistillabError("--executor slurm needs submitit: pip install submitit") from None
    folder = sweep_dir / "submitit"
    if executor == "submitit-local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=int(slurm.get("timeout_min", 24 * 60)))
    else:
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        ex.update_parameters(**{"timeout_min": 24 * 60, "cpus_per_task": threads, **slurm})

    def submit(run_id: str):
        return ex.submit(execute_run, str(sweep_dir), run_id, threads)
    return submit


def _wait_any(in_flight: dict) -> list[str]:
    while True:
        finished = [run_id for run_id, handle in in_flight.items() if _is_done(handle)]
        if finished:
            return finished
        time.sleep(0.5)


def _is_done(handle) -> bool:
    if isinstance(handle, subprocess.Popen):
        return handle.poll() is not None
    return handle.done()


def _succeeded(handle) -> bool:
    if isinstance(handle, subprocess.Popen):
        handle._log_handle.close()
        return handle.returncode == 0
    try:
        handle.result()
        return True
    except Exception:  # the worker recorded its error in status.json
        return False
