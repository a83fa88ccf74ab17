"""A grid expanded into runs: teachers, baselines and students, content-addressed.

    teacher   alpha = 0, the teacher's seed for init and data
    baseline  alpha = 0 with each student's seeds (added automatically), and baseline members
    student   one per (student, seed, teacher, alpha, objective); with kd.pairs, one per
              (student, seed, pair, pair alpha, objective)

Each run's id is a hash of its resolved results config (a student names its teacher by the
teacher's id, not its path), so re-running a grid skips finished runs, resumes interrupted
ones and shares runs between grids, and ids do not depend on where the sweep lives. A teacher
given as an existing checkpoint (`teachers.members[].path`) is no run: students name it by
that path or hub id.
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from distillab.config import ModelConfig, RunConfig, config_from_dict, merge, results_config
from distillab.errors import ConfigError
from distillab.files import stable_hash
from distillab.flops import compute_matched_tokens, teacher_inference_flops, training_flops
from distillab.gpus import GPU
from distillab.layout import SweepLayout
from distillab.memory import refuse_unless_fits, run_memory_plan
from distillab.models import resolve_spec
from distillab.sft import sft_config
from distillab.sweep.caches import assign_caches, format_caches, parse_bytes, teacher_spec
from distillab.sweep.grid import DEFAULT_MFU, DEVICE_PEAK_FLOPS, GridSpec, sft_stage_values
from distillab.train.schedule import make_plan

ROLE_ORDER = {"teacher": 0, "baseline": 1, "student": 2}


@dataclass
class Run:
    """A planned run. `config` holds the values the grid set (as written to plan.json);
    `settings` is that config checked, built once (and again only when `use_cache` changes it)."""

    id: str
    role: str  # teacher | baseline | student
    config: dict
    depends_on: list[str]
    info: dict
    settings: RunConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.settings = config_from_dict(self.config)  # a bad grid fails here, with the key

    def use_cache(self, directory: str, entry: dict) -> None:
        """Read the teacher's signal from the cache in `directory` (kd.cache; `entry` describes it)."""
        self.config["kd"]["cache"] = directory
        self.settings = config_from_dict(self.config)
        self.info.update(cached=True, teacher_cache=entry)

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def reference(self) -> str:
        """How a student's identity names this teacher."""
        return f"run:{self.id}"

    def checkpoint(self, sweep_dir: Path) -> str:
        return str(SweepLayout(sweep_dir).run(self.id).final)


@dataclass
class ExternalTeacher:
    """A teacher the sweep does not train: an existing checkpoint directory or downloaded hub id
    (at a revision: a checkpoint suite's intermediate step)."""
    path: str
    info: dict
    revision: str | None = None

    @property
    def id(self) -> str:
        return self.reference

    @property
    def reference(self) -> str:
        return self.path + (f"@{self.revision}" if self.revision else "")

    def checkpoint(self, sweep_dir: Path) -> str:
        return self.path


@dataclass
class TeacherGroup:
    """Several teachers of the pool at once: students name the first in kd.teacher, the rest in kd.teachers."""
    members: list
    weights: list[float]
    mix: str
    alpha: list[float]

    @property
    def id(self) -> str:
        return "+".join(m.id for m in self.members)

    @property
    def reference(self) -> str:
        return self.members[0].reference

    @property
    def info(self) -> dict:
        return {**self.members[0].info, "teachers": [m.info["model"] for m in self.members]}

    def checkpoint(self, sweep_dir: Path) -> str:
        return self.members[0].checkpoint(sweep_dir)

    def kd(self, sweep_dir: Path) -> dict:
        """The kd keys naming the other teachers (checkpoints) and how they combine."""
        return {"teachers": [m.checkpoint(sweep_dir) for m in self.members[1:]], "teacher_weights": self.weights,
                "teacher_mix": self.mix}


def teacher_key(info: dict) -> tuple:
    return info["model"], info["tokens"], info["seed"]


def run_id(config: dict, teacher_reference: str | None, other_references: list[str] | None = None) -> str:
    """The run's id: a hash of its results config, with the teacher named by `teacher_reference`
    (`run:<id>` for a teacher of the sweep, the path or hub id of an external one) and several
    teachers' others by theirs."""
    identity = dict(config)
    identity["kd"] = {**identity.get("kd", {}), "teacher": teacher_reference}
    if other_references:
        identity["kd"]["teachers"] = other_references
    identity.pop("run_dir", None)
    identity.pop("name", None)
    return stable_hash(results_config(config_from_dict(identity)))[:12]


class Planner:
    """Collects a grid's runs; identical configs collapse into one run."""

    def __init__(self, spec: GridSpec, sweep_dir: Path):
        self.spec, self.sweep_dir, self.runs = spec, Path(sweep_dir).resolve(), {}

    def add(self, role: str, config: dict, teacher: Run | ExternalTeacher | TeacherGroup | None, info: dict,
            after: Run | None = None) -> Run:
        members = teacher.members if isinstance(teacher, TeacherGroup) else [teacher] if teacher else []
        if isinstance(teacher, TeacherGroup):
            config = merge(config, {"kd": teacher.kd(self.sweep_dir)})
        identity = run_id(config, teacher.reference if teacher else None, [m.reference for m in members[1:]])
        if identity in self.runs:
            return self.runs[identity]
        config = merge(config, {"name": f"{role}-{info['model']}-{identity[:6]}",
                                "run_dir": str(SweepLayout(self.sweep_dir).run(identity).path)})
        if teacher is not None:
            config["kd"]["teacher"] = teacher.checkpoint(self.sweep_dir)
        if isinstance(members[0] if members else None, ExternalTeacher) and members[0].revision:
            config["kd"]["teacher_revision"] = members[0].revision
        if after is not None:  # a WSD branch starts from its trunk's checkpoint
            step = config["train"]["branch_from"]
            config["train"]["branch_from"] = str(SweepLayout(self.sweep_dir).run(after.id).step(step))
        depends = [m.id for m in members if isinstance(m, Run)] or ([after.id] if after else [])
        self.runs[identity] = Run(identity, role, config, depends, info)
        return self.runs[identity]

    def model(self, rung: str) -> dict:
        """The model section of a run of `rung`: its name and the grid's `rung_overrides` for it."""
        return {"name": rung, **self.spec.rung_overrides.get(rung, {})}

    def teacher_config(self, model: str, seed: int, tokens: int, extra: dict | None = None) -> dict:
        spec = self.spec
        return merge(spec.base, {"model": self.model(model), "kd": {"alpha": 0.0, "teacher": None},
                                 "train": {"token_budget": tokens, "init_seed": seed, "data_seed": seed}},
                     {"train": spec.teachers.train}, spec.teachers.overrides, extra or {})

    def teacher_pool(self) -> list[Run | ExternalTeacher]:
        pool, teachers = self.spec.teachers, []
        for model in pool.models:
            for seed in pool.seeds:
                info = {"model": model, "seed": seed}
                if pool.wsd_branch:
                    teachers += self.wsd_teachers(model, seed, info)
                    continue
                for tokens in pool.tokens:
                    teachers.append(self.add("teacher", self.teacher_config(model, seed, tokens), None,
                                             {**info, "tokens": tokens, "teacher_kind": "independent"}))
        for member in pool.members:
            info = {"model": member.model, "seed": member.seed, "tokens": member.tokens}
            if member.path:
                teacher = ExternalTeacher(member.path, {**info, "teacher_kind": "external"}, member.revision)
            else:
                teacher = self.add("teacher", self.teacher_config(member.model, member.seed, member.tokens), None,
                                   {**info, "teacher_kind": "independent"})
            if teacher not in teachers:
                teachers.append(teacher)
        return teachers

    def wsd_teachers(self, model: str, seed: int, info: dict) -> list[Run]:
        """A WSD trunk at the largest budget and a decay branch per smaller budget (plus, if asked,
        each budget trained independently with the same schedule)."""
        def config(tokens, extra=None):
            return self.teacher_config(model, seed, tokens, extra)

        budgets = sorted(set(self.spec.teachers.tokens))
        warmup = make_plan(config_from_dict(config(budgets[-1], {"train": {"schedule": "wsd"}})).train).warmup_steps
        shared = {"train": {"schedule": "wsd", "warmup_steps": warmup}}
        branch_steps = {tokens: make_plan(config_from_dict(config(tokens, shared)).train).decay_start
                        for tokens in budgets[:-1]}
        trunk = self.add("teacher", config(budgets[-1], merge(shared, {"train": {
            "keep_steps": sorted(set(branch_steps.values()))}})), None,
            {**info, "tokens": budgets[-1], "teacher_kind": "wsd-trunk"})
        out = [trunk]
        for tokens, step in branch_steps.items():
            branch = config(tokens, merge(shared, {"train": {"branch_from": step}}))
            out.append(self.add("teacher", branch, None, {**info, "tokens": tokens, "teacher_kind": "wsd-branch"},
                                after=trunk))
            if self.spec.teachers.compare_independent:
                out.append(self.add("teacher", config(tokens, shared), None,
                                    {**info, "tokens": tokens, "teacher_kind": "independent"}))
        return out

    def student_settings(self) -> list[tuple]:
        """(model, tokens, seed, allowed teacher keys or None for all, allowed alphas or None for all,
        whether it gets compute-matched baselines) of every student setting."""
        students = self.spec.students
        matched = students.compute_matched
        out = [(m, t, s, None, None, matched) for m in students.models for t in students.tokens for s in students.seeds]
        for member in students.members:
            allowed = {(r.model, r.tokens, r.seed) for r in member.teachers} or None
            out.append((member.model, member.tokens, member.seed, allowed, member.alpha or None,
                        matched if member.compute_matched is None else member.compute_matched))
        return out

    def student_base(self, model: str, tokens: int, seed: int) -> dict:
        spec = self.spec
        return merge(spec.base, {"model": self.model(model), "train": {
            "token_budget": tokens, "init_seed": seed, "data_seed": seed}},
            {"train": spec.students.train}, spec.students.overrides)

    def students(self, teachers: list[Run | ExternalTeacher]) -> None:
        for model, tokens, seed, allowed, alphas, matched in self.student_settings():
            base = self.student_base(model, tokens, seed)
            info = {"model": model, "tokens": tokens, "seed": seed}
            if self.spec.baselines:
                self.add("baseline", merge(base, {"kd": {"alpha": 0.0, "teacher": None}}), None, info)
            chosen = [t for t in teachers if allowed is None or teacher_key(t.info) in allowed]
            self.distilled(base, info, chosen, alphas, matched)
            if allowed is None:
                self.distilled(base, info, self.teacher_groups(teachers), alphas, matched)

    def teacher_groups(self, teachers: list) -> list[TeacherGroup]:
        """The grid's teacher sets (kd.teacher_sets), their members found in the pool."""
        by_key = {teacher_key(t.info): t for t in teachers}
        return [TeacherGroup([by_key[(r.model, r.tokens, r.seed)] for r in group.members], list(group.weights),
                             group.mix, list(group.alpha)) for group in self.spec.kd.teacher_sets]

    def baseline_members(self) -> None:
        for member in self.spec.baseline_members:
            config = merge(self.student_base(member.model, member.tokens, member.seed), member.overrides,
                           {"kd": {"alpha": 0.0, "teacher": None}})
            self.add("baseline", config, None, {"model": member.model, "tokens": member.tokens, "seed": member.seed,
                                                "baseline_kind": "member"})

    def teacher_settings(self, teacher) -> list[tuple[float, dict]]:
        """(alpha, objective overrides) a teacher is used at: its pairs' when kd.pairs are given,
        else every kd.alpha (a teacher set: every kd.alpha)."""
        kd = self.spec.kd
        if isinstance(teacher, TeacherGroup):
            return [(alpha, {}) for alpha in teacher.alpha or kd.alpha]
        if not kd.pairs:
            return [(alpha, {}) for alpha in kd.alpha]
        key = teacher_key(teacher.info)
        return [(alpha, pair.objective) for pair in kd.pairs if (pair.model, pair.tokens, pair.seed) == key
                for alpha in pair.alpha]

    def matched_tokens(self, base: dict, teacher) -> int:
        """The compute-matched budget of a student (config `base`) distilled from `teacher`."""
        student = config_from_dict(merge(base, {"kd": {"alpha": 0.0, "teacher": None}}))
        shape = resolve_spec(teacher.settings.model) if isinstance(teacher, Run) else \
            resolve_spec(ModelConfig(name=teacher.info["model"]))
        t = student.train
        return compute_matched_tokens(resolve_spec(student.model), shape,
                                      student.data.tokenizer.vocab_size, t.seq_len, t.token_budget,
                                      t.batch_size * t.seq_len * t.grad_accum * t.processes)

    def compute_matched(self, base: dict, info: dict, teacher) -> int:
        """The compute-matched baseline of (student, teacher, seed); returns its budget."""
        tokens = self.matched_tokens(base, teacher)
        config = merge(base, {"kd": {"alpha": 0.0, "teacher": None}, "train": {"token_budget": tokens}})
        self.add("baseline", config, None, {**info, "tokens": tokens, "baseline_kind": "compute-matched",
                                            "matched_teacher": teacher.id})
        return tokens

    def distilled(self, base: dict, info: dict, teachers: list[Run | ExternalTeacher], alphas=None,
                  compute_matched: bool = False) -> None:
        for teacher in teachers:
            matched = self.compute_matched(base, info, teacher) \
                if compute_matched and not isinstance(teacher, TeacherGroup) else None
            for alpha, extra in self.teacher_settings(teacher):
                if alphas is not None and alpha not in alphas:
                    continue
                for objective in self.spec.kd.objectives(extra):
                    config = merge(base, {"kd": {**objective, "alpha": alpha, "teacher": "pending"}})
                    self.add("student", config, teacher, {
                        **info, "teacher": teacher.id, "teacher_model": teacher.info["model"],
                        **({"teachers": teacher.info["teachers"]} if "teachers" in teacher.info else {}),
                        "teacher_tokens": teacher.info["tokens"], "teacher_kind": teacher.info["teacher_kind"],
                        "alpha": alpha, "matched_tokens": matched, **objective})


def plan(spec: GridSpec, sweep_dir: Path, cache_decisions: list[int | None] | None = None) -> list[Run]:
    """Every run of the grid, teachers first. Teacher caches within the grid's `cache_disk_budget`
    (default: the free space where the sweep writes); `cache_decisions` (K or None per student, in
    planning order) takes those decisions instead (see `distillab.sweep.caches.assign_caches`)."""
    planner = Planner(spec, sweep_dir)
    planner.students(planner.teacher_pool())
    planner.baseline_members()
    budget = parse_bytes(spec.cache_disk_budget) if spec.cache_disk_budget is not None else None
    assign_caches(list(planner.runs.values()), planner.sweep_dir, budget, cache_decisions)
    for run in planner.runs.values():  # a stage that cannot run on a run's processes stops here, not after it
        sft_settings(run, spec.sft)
    return sorted(planner.runs.values(), key=lambda r: ROLE_ORDER[r.role])


def sft_settings(run: Run, stage: dict) -> RunConfig | None:
    """The checked config of `run`'s SFT stage (None without one), with the run's model and tokenizer
    where the stage reads them from its final directory (so its memory plan can be made first)."""
    if not stage:
        return None
    values = sft_stage_values(stage, run.config)
    settings = sft_config(values)
    data = dataclasses.replace(settings.data, tokenizer=run.settings.data.tokenizer)
    return dataclasses.replace(settings, model=run.settings.model, data=data)


def cache_plan(runs: list[Run]) -> list[int | None]:
    """K of each student's planned cache (None: online), in planning order (inverse of `cache_decisions`)."""
    return [run.info["teacher_cache"]["top_k"] if run.info.get("teacher_cache") else None
            for run in runs if run.role == "student"]


# ----------------------------------------------------------------------------- compute


def run_flops(run: Run, runs_by_id: dict[str, Run]) -> dict:
    """Training FLOPs of the run and, for students, the teacher's forward passes over its tokens."""
    cfg = run.settings
    vocab = cfg.data.tokenizer.vocab_size
    teacher = teacher_spec(run, runs_by_id)
    return {"train": training_flops(cfg, vocab),
            "teacher_inference": teacher_inference_flops(teacher, vocab, cfg, run.info.get("teacher_cache"))}


def format_memory(runs: list[Run], gpu: GPU | None, spec: GridSpec | None = None) -> list[str]:
    """The dry run's memory plans, one per distinct (role, student, teacher, layout): the training
    step, evaluation during training and, with the grid `spec`, the final evaluation and the analysis.
    Refuses (a one-line ConfigError naming the key that would fix it) the first that does not fit
    `gpu`, after the lines are printed."""
    by_id, seen, lines, refusal = {r.id: r for r in runs}, set(), ["", "memory plan per GPU:"], None
    for run in runs:
        cfg = run.settings
        cache = run.info.get("teacher_cache")
        teacher = None if cache else teacher_spec(run, by_id)  # a cache holds no model
        memory = run_memory_plan(cfg, teacher, gpu, cache["top_k"] if cache else None,
                                 *phase_settings(run, cfg, spec, by_id))
        key = (run.role, run.info["model"], teacher.name if teacher else None, memory.layout,
               cache["top_k"] if cache else None)
        if key in seen:
            continue
        seen.add(key)
        what = f"{run.role} {run.info['model']}" + (f" with teacher {teacher.name}" if teacher else "") + \
            (f" reading a top-{cache['top_k']} cache" if cache else "")
        lines.append(f"  {what}: {memory.describe()}")
        if not memory.fits and refusal is None:
            refusal = (memory, cfg, teacher, what)
    for run in runs if spec is not None and spec.sft else ():
        cfg = sft_settings(run, spec.sft)
        memory = run_memory_plan(cfg, None, gpu, None, (spec.eval.batch_size, cfg.train.seq_len))
        if ("sft", run.info["model"], memory.layout) in seen:
            continue
        seen.add(("sft", run.info["model"], memory.layout))
        what = f"the SFT stage of {run.info['model']}"
        lines.append(f"  {what}: {memory.describe()}")
        if not memory.fits and refusal is None:
            refusal = (memory, cfg, None, what)
    print("\n".join(lines))
    if refusal is not None:
        refuse_unless_fits(*refusal)
    return lines


def phase_settings(run: Run, cfg, spec: GridSpec | None, by_id: dict) -> tuple:
    """(final evaluation (batch, seq_len), analysis (models, batch, seq_len)) of a run in a sweep."""
    if spec is None:
        return None, None
    final_eval = (spec.eval.batch_size, spec.eval.seq_len or cfg.train.seq_len)
    analysis = None
    if spec.eval.analysis is not None and run.role == "student":
        student, teacher = resolve_spec(cfg.model), teacher_spec(run, by_id)
        stage = spec.eval.analysis
        analysis = ([student, teacher, student], stage.batch_size, stage.seq_len, 2 if stage.dtype == "bfloat16" else 4)
    return final_eval, analysis


def compute_rate(spec: GridSpec, device: str, mfu: float) -> tuple[float, str]:
    if device == "cpu":
        return spec.cpu_gflops * 1e9, f"{spec.cpu_gflops:.0f} GFLOP/s achieved (cpu_gflops in the grid; measure " \
                                      "with distillab bench)"
    if device in DEVICE_PEAK_FLOPS:
        return DEVICE_PEAK_FLOPS[device] * mfu, f"{DEVICE_PEAK_FLOPS[device] / 1e12:.0f} TFLOP/s peak bf16 x MFU " \
                                                f"{mfu:.0%}"
    raise ConfigError("--estimate-for", f"unknown device {device!r}; use cpu, {', '.join(DEVICE_PEAK_FLOPS)}")


def compute_summary(runs: list[Run], spec: GridSpec, device: str = "cpu", mfu: float = DEFAULT_MFU) -> dict:
    by_id = {r.id: r for r in runs}
    rate, rate_note = compute_rate(spec, device, mfu)
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


def format_notes(notes: list[str]) -> str:
    """A grid's notes (where it differs from what it reproduces), for the dry run."""
    if not notes:
        return ""
    lines = ["notes (where this grid differs from what it reproduces):"]
    for note in notes:
        lines += textwrap.wrap(note, 110, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(lines + ["", ""])


def format_plan(runs: list[Run], summary: dict) -> str:
    lines = [f"{len(runs)} runs ({sum(r.role == 'teacher' for r in runs)} teachers, "
             f"{sum(r.role == 'baseline' for r in runs)} baselines, {sum(r.role == 'student' for r in runs)} students)",
             f"compute on {summary['device']}: {summary['rate_note']}; hours are device-hours", "",
             f"{'id':12s} {'role':8s} {'model':12s} {'tokens':>16s} {'seed':>5s} {'teacher':12s} {'alpha':>5s} "
             f"{'objective':28s} {'PFLOP':>10s} {'hours':>9s}"]
    for run in runs:
        info, cost = run.info, summary["per_run"][run.id]
        objective = ""
        if run.role == "student":
            objective = run.settings.kd.objective().label(with_alpha=False)
        teacher = info.get("teacher_model") if info.get("teacher_kind") == "external" else info.get("teacher", "-")
        lines.append(f"{run.id:12s} {run.role:8s} {info['model']:12s} {info['tokens']:16,d} {info['seed']:5d} "
                     f"{teacher[:12]:12s} {info.get('alpha', 0):5.2f} {objective[:28]:28s} "
                     f"{(cost['train'] + cost['teacher_inference']) / 1e15:10.3f} {cost['hours']:9.2f}")
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
    return "\n".join(lines + format_caches(runs))
