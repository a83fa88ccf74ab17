"""Grid specs: a base run config, a teacher pool, students, and the KD settings to sweep (YAML).

Beside each cross product a grid may name hand-picked members: teachers (`teachers.members`,
trained, or existing checkpoints with a `path`), students restricted to some teachers
(`students.members`), baselines (`baseline_members`, e.g. other seeds or a label-smoothing
control) and (teacher, alpha) pairs (`kd.pairs`: each teacher with its own alpha only).

`sft` (optional) is a stage after pretraining: every run of the grid is then fine-tuned with
these `distillab sft` config values and evaluated again, downstream tasks in its chat template.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from distillab.config import ModelConfig, apply_overrides, build_dataclass, kd_value, merge, read_yaml_mapping
from distillab.errors import ConfigError, require
from distillab.losses.divergences import DIVERGENCES
from distillab.gpus import GPUS
from distillab.models import LADDER
from distillab.sft import sft_config
from distillab.sweep.caches import parse_bytes

# Peak dense bf16 throughput of accelerators, for compute estimates at a stated MFU.
DEVICE_PEAK_FLOPS = {"h100": GPUS["h100-80gb"].bf16_peak_flops, "h200": GPUS["h200-141gb"].bf16_peak_flops,
                     "a100": GPUS["a100-80gb"].bf16_peak_flops, "tpu-v6e": 918e12}
DEFAULT_MFU = 0.40


@dataclass
class TeacherMember:
    """One hand-picked teacher of the pool, beside the models x tokens x seeds cross product.

    With `path` the teacher is not trained: it is an existing checkpoint directory, or a hub id
    downloaded beforehand (see `distillab.models.model_directory`); `model` then names a ladder
    rung of its shape and `tokens` what it was trained on (for compute estimates and reports).
    """
    model: str = ""
    tokens: int = 0
    seed: int = 42
    path: str | None = None
    # a hub id's revision (a checkpoint suite's intermediate step, e.g. step1000; in the local HF cache)
    revision: str | None = None


@dataclass
class TeacherRef:
    """A teacher of the pool, named by model, tokens and seed."""
    model: str = ""
    tokens: int = 0
    seed: int = 42


@dataclass
class StudentMember:
    """A hand-picked student setting, beside the cross product; `teachers` restricts it to those
    teachers of the pool (empty: every teacher), `alpha` to those alphas (empty: the grid's). Its
    baselines are added like any other student's; `compute_matched` (true / false) overrides
    `students.compute_matched` for it (unset: the same)."""
    model: str = ""
    tokens: int = 0
    seed: int = 43
    teachers: list[TeacherRef] = field(default_factory=list)
    alpha: list[float] = field(default_factory=list)
    compute_matched: bool | None = None


@dataclass
class BaselineMember:
    """A hand-picked run without a teacher (alpha = 0), beside the students' matched baselines:
    another seed or budget, or a control with other run-config `overrides` (e.g. kd.label_smoothing).
    Built like a student (base, students.train, students.overrides), then the overrides."""
    model: str = ""
    tokens: int = 0
    seed: int = 43
    overrides: dict = field(default_factory=dict)


@dataclass
class KDPair:
    """A teacher of the pool with its own alpha(s): students learn from it at these only.
    `objective` sets other kd keys for this pair (e.g. divergence: hard), over the crossed ones."""
    model: str = ""
    tokens: int = 0
    seed: int = 42
    alpha: list[float] = field(default_factory=list)
    objective: dict = field(default_factory=dict)


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
    members: list[StudentMember] = field(default_factory=list)
    # for each teacher and seed, also a baseline that spends the teacher's inference FLOPs on the
    # student itself: more tokens of the same stream (is distillation better than training longer?)
    compute_matched: bool = False


@dataclass
class TeacherSet:
    """Several teachers of the pool taught at once (`kd.teachers`): their distributions mixed with
    `weights` (empty: equal), or each document routed to one of them (`mix: route`)."""
    members: list[TeacherRef] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    mix: str = "mixture"
    alpha: list[float] = field(default_factory=list)  # empty: kd.alpha


@dataclass
class KDSweep:
    """KD settings crossed with each other (and with every teacher) for each student.

    Any other kd key may be listed under `other` (e.g. loss_scale: [ce_fixed, kd_fixed]). Hard
    labels take T = 1 and no truncation only: other temperatures and top-k values are not
    crossed with them. With `pairs`, each teacher is used only at its pairs' alphas (instead of
    every alpha), times the crossed objectives.
    """
    alpha: list[float] = field(default_factory=lambda: [0.5])
    temperature: list[float] = field(default_factory=lambda: [1.0])
    top_k: list[int | None] = field(default_factory=lambda: [None])
    divergence: list[str] = field(default_factory=lambda: ["forward_kl"])
    # the student's side of a top-k objective (kd.top_k_student); untruncated objectives keep full
    top_k_student: list[str] = field(default_factory=lambda: ["full"])
    other: dict = field(default_factory=dict)
    pairs: list[KDPair] = field(default_factory=list)
    # students of several teachers at once, beside the single-teacher ones (at every kd.alpha)
    teacher_sets: list[TeacherSet] = field(default_factory=list)

    def objectives(self, extra: dict | None = None) -> list[dict]:
        """The kd overrides (without alpha) of every objective in the sweep, in a fixed order;
        `extra` (a pair's objective) is set over each."""
        names = ["temperature", "top_k", "divergence", "top_k_student", *sorted(self.other)]
        values = [self.temperature, self.top_k, self.divergence, self.top_k_student,
                  *(self.other[k] for k in sorted(self.other))]
        out = []
        for combination in itertools.product(*values):
            kd = {**dict(zip(names, combination)), **(extra or {})}
            if DIVERGENCES[kd["divergence"]].argmax_teacher:
                kd.update(temperature=1.0, top_k=None)
            if kd["top_k"] is None and kd.get("top_p") is None:
                kd["top_k_student"] = "full"
            if kd["top_k_student"] == "full":
                del kd["top_k_student"]  # the default: left out, so the settings read as before
            if kd not in out:
                out.append(kd)
        return out


@dataclass
class AnalysisStage:
    """The mechanism analysis a sweep runs for every student beside its teacher and matched baseline
    (`distillab analyze`; the authors: 200 windows of 2,048 tokens of wikitext-103 train)."""
    set: str = "wikitext103"
    seq_len: int = 2048
    max_windows: int = 200
    batch_size: int = 4
    # the models' weights and logits (the metrics are float64 either way); bfloat16 halves the memory
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class SweepEval:
    sets: list[str] = field(default_factory=lambda: ["in-domain"])
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    max_windows: int = 64
    seq_len: int | None = None
    # windows per forward of the final models' perplexity (one GPU, fp32: see the memory plan)
    batch_size: int = 8
    # the mechanism analysis after training (unset: none)
    analysis: AnalysisStage | None = None


@dataclass
class GridSpec:
    name: str = "grid"
    # where the grid differs from what it reproduces, and why: printed by --dry-run, never part
    # of a run's identity
    notes: list[str] = field(default_factory=list)
    base: dict = field(default_factory=dict)
    teachers: TeacherPool = field(default_factory=TeacherPool)
    students: StudentSet = field(default_factory=StudentSet)
    kd: KDSweep = field(default_factory=KDSweep)
    eval: SweepEval = field(default_factory=SweepEval)
    baselines: bool = True
    baseline_members: list[BaselineMember] = field(default_factory=list)
    # teacher vs student-baseline held-out loss within this many nats = same-level
    label_tolerance: float = 0.02
    # verdicts: an interval inside +-margin nats counts as "no effect" (see distillab.study.verdicts)
    verdict_margin: float = 0.02
    # CPU throughput for estimates (GFLOP/s achieved in training); measure with `distillab bench`
    cpu_gflops: float = 120.0
    # disk for the teacher caches kd.cache: auto plans (e.g. 20TB, decimal units, or bytes; unset:
    # the free space where the sweep writes); --cache-budget overrides it
    cache_disk_budget: str | None = None
    # model fields per rung, over the rung's own (e.g. a rehearsal's tiny twins): {rung: {layers: 2, ...}}
    rung_overrides: dict = field(default_factory=dict)
    # an SFT stage after every teacher, student and baseline: `distillab sft` config values (data,
    # train, sft.steps, sft.chat_template, ...; each run's final model is sft.init_from); empty: none
    sft: dict = field(default_factory=dict)


def load_grid(path: str | Path, overrides: list[str] | None = None) -> GridSpec:
    """The grid of a YAML file (or a shipped one by name), with `--set KEY=VALUE` overrides applied."""
    return grid_from_dict(apply_overrides(read_yaml_mapping(path, what="grid"), overrides or []))


def grid_from_dict(values: dict) -> GridSpec:
    kd = values.get("kd")
    if isinstance(kd, dict) and kd.get("pairs") and "alpha" in kd:
        raise ConfigError("kd.alpha", "leave it out when kd.pairs are given: each pair names its teacher's alphas")
    spec = build_dataclass(GridSpec, values)
    validate_grid(spec)
    return spec


def pool_keys(pool: TeacherPool) -> set[tuple[str, int, int]]:
    """(model, tokens, seed) of every teacher of the pool."""
    keys = {(m, t, s) for m in pool.models for t in pool.tokens for s in pool.seeds}
    return keys | {(m.model, m.tokens, m.seed) for m in pool.members}


def check_member(key: str, model: str, tokens: int) -> None:
    if model not in LADDER:
        raise ConfigError(f"{key}.model", f"unknown model {model!r}; `distillab models` lists them")
    if tokens <= 0:
        raise ConfigError(f"{key}.tokens", f"must be > 0, got {tokens}")


def validate_grid(spec: GridSpec) -> None:
    """Checks a grid needs beyond its types; each failure names the key."""
    for section, models in (("teachers", spec.teachers.models), ("students", spec.students.models)):
        for i, model in enumerate(models):
            if model not in LADDER:
                raise ConfigError(f"{section}.models[{i}]", f"unknown model {model!r}; `distillab models` lists them")
    for section, tokens in (("teachers", spec.teachers.tokens), ("students", spec.students.tokens)):
        for i, value in enumerate(tokens):
            if value <= 0:
                raise ConfigError(f"{section}.tokens[{i}]", f"must be > 0, got {value}")
    for i, member in enumerate(spec.teachers.members):
        check_member(f"teachers.members[{i}]", member.model, member.tokens)
    students = spec.students
    if not students.members and (not students.models or not students.tokens or not students.seeds):
        raise ConfigError("students", "name at least one student model, token budget and seed (or students.members)")
    validate_members(spec)
    validate_kd_sweep(spec.kd)
    validate_pairs(spec)
    validate_teacher_sets(spec)
    validate_sft_stage(spec.sft)
    validate_eval(spec.eval)
    for rung, fields in spec.rung_overrides.items():
        if rung not in LADDER:
            raise ConfigError(f"rung_overrides.{rung}", "unknown model; `distillab models` lists them")
        build_dataclass(ModelConfig, {"name": rung, **fields}, f"rung_overrides.{rung}")
    if spec.cache_disk_budget is not None:
        parse_bytes(spec.cache_disk_budget)
    if "/" in spec.name or ".." in spec.name or not spec.name.strip():
        raise ConfigError("name", f"{spec.name!r} must be a plain name (it names the sweep directory)")


def validate_members(spec: GridSpec) -> None:
    """Student members name teachers of the pool; baseline members set no teacher."""
    pool = pool_keys(spec.teachers)
    for i, member in enumerate(spec.students.members):
        check_member(f"students.members[{i}]", member.model, member.tokens)
        for j, alpha in enumerate(member.alpha):
            check_alpha(f"students.members[{i}].alpha[{j}]", alpha)
        for j, ref in enumerate(member.teachers):
            if (ref.model, ref.tokens, ref.seed) not in pool:
                raise ConfigError(f"students.members[{i}].teachers[{j}]",
                                  f"{ref.model} @ {ref.tokens:,} tokens (seed {ref.seed}) is not a teacher of the pool")
    for i, member in enumerate(spec.baseline_members):
        check_member(f"baseline_members[{i}]", member.model, member.tokens)
        kd = member.overrides.get("kd") or {}
        if not isinstance(kd, dict) or {"alpha", "teacher", "alpha_schedule"} & set(kd):
            raise ConfigError(f"baseline_members[{i}].overrides.kd",
                              "a baseline trains without a teacher: leave kd.alpha, kd.teacher and kd.alpha_schedule out")


def validate_pairs(spec: GridSpec) -> None:
    """Every pair names a teacher of the pool and valid alphas; every teacher of the pool is in a pair."""
    pairs = spec.kd.pairs
    if not pairs:
        return
    pool = pool_keys(spec.teachers)
    for i, pair in enumerate(pairs):
        key = f"kd.pairs[{i}]"
        if (pair.model, pair.tokens, pair.seed) not in pool:
            raise ConfigError(key, f"{pair.model} @ {pair.tokens:,} tokens (seed {pair.seed}) is not a teacher of the "
                                   "pool (teachers.models x tokens x seeds, or teachers.members)")
        if not pair.alpha:
            raise ConfigError(f"{key}.alpha", "name this teacher's alpha (or a list of them)")
        for j, alpha in enumerate(pair.alpha):
            check_alpha(f"{key}.alpha[{j}]", alpha)
        if {"alpha", "teacher"} & set(pair.objective):
            raise ConfigError(f"{key}.objective", "set alpha in the pair itself; the teacher is the pair's")
        for name, value in pair.objective.items():
            kd_value(name, copy.deepcopy(value), f"{key}.objective.{name}")
    unpaired = sorted(pool - {(p.model, p.tokens, p.seed) for p in pairs})
    if unpaired:
        model, tokens, seed = unpaired[0]
        raise ConfigError("kd.pairs", f"teacher {model} @ {tokens:,} tokens (seed {seed}) is in the pool but in no "
                                      "pair, so no student would learn from it; pair it or leave it out of the pool")


def validate_teacher_sets(spec: GridSpec) -> None:
    """Each set names >= 2 teachers of the pool, a weight per member (or none) and mixture or route."""
    pool = pool_keys(spec.teachers)
    for i, group in enumerate(spec.kd.teacher_sets):
        key = f"kd.teacher_sets[{i}]"
        if len(group.members) < 2:
            raise ConfigError(f"{key}.members", "name at least two teachers of the pool")
        for j, ref in enumerate(group.members):
            if (ref.model, ref.tokens, ref.seed) not in pool:
                raise ConfigError(f"{key}.members[{j}]", f"{ref.model} @ {ref.tokens:,} tokens (seed {ref.seed}) is "
                                                         "not a teacher of the pool")
        if group.weights and len(group.weights) != len(group.members):
            raise ConfigError(f"{key}.weights", f"give one weight per member ({len(group.members)}), or none")
        if not group.alpha and not spec.kd.alpha:
            raise ConfigError(f"{key}.alpha", "name this set's alphas (kd.alpha is empty with kd.pairs)")
        if group.mix not in ("mixture", "route"):
            raise ConfigError(f"{key}.mix", f"must be mixture or route, got {group.mix!r}")


def validate_sft_stage(stage: dict) -> None:
    """The SFT stage's values make a valid `distillab sft` config once a run's model is named."""
    if not stage:
        return
    for key in ("name", "run_dir"):
        if key in stage:
            raise ConfigError(f"sft.{key}", "is set per run (the run's own directory); leave it out")
    if "init_from" in (stage.get("sft") or {}):
        raise ConfigError("sft.sft.init_from", "is each run's final model; leave it out")
    try:
        sft_config(merge(stage, {"sft": {"init_from": "final"}}))
    except ConfigError as exc:
        raise exc.within("sft") from None


# what an SFT stage takes from the run it fine-tunes, unless the stage sets it itself: where and
# how the run is spread (the model that needed 8 GPUs to pretrain needs them to fine-tune)
RUN_LAYOUT_KEYS = ("processes", "nodes", "parallel", "device", "activation_checkpointing")


def sft_stage_values(stage: dict, run_config: dict) -> dict:
    """The `distillab sft` config values of one run's SFT stage (its defaults merged in, so a launch
    file of them reads back as the same config): the stage's values, each run's own name, directory
    and `sft.init_from` (its final model), and the run's layout (`RUN_LAYOUT_KEYS`) where the stage
    sets none. The stage's batch (`train.batch_size` x `grad_accum`, written for one process) is its
    global batch: divided among the run's processes, grad_accum first."""
    from distillab.layout import RunLayout
    from distillab.sft import SFT_DEFAULTS

    run_dir = RunLayout(run_config["run_dir"])
    train = run_config.get("train", {})
    inherited = {k: train[k] for k in RUN_LAYOUT_KEYS if k in train and k not in stage.get("train", {})}
    cache = run_config.get("data", {}).get("cache_dir")
    this_run = {"name": f"sft-{run_dir.path.name}", "run_dir": str(run_dir.sft(stage).path),
                "sft": {"init_from": str(run_dir.final)}, "train": inherited}
    values = merge(SFT_DEFAULTS, {"data": {"cache_dir": cache}} if cache else {}, stage, this_run)
    if "processes" in inherited and inherited["processes"] > 1:
        values["train"].update(divided_batch(sft_config(values).train, inherited["processes"]))
    return values


def divided_batch(train, processes: int) -> dict:
    """{batch_size, grad_accum} per process that keep `train`'s one-process batch over `processes`."""
    total = train.batch_size * train.grad_accum
    if total % processes:
        raise ConfigError("sft.train.grad_accum", f"the SFT stage's batch ({train.batch_size} x {train.grad_accum} = "
                                                  f"{total} sequences a step) does not divide among a run's "
                                                  f"{processes} processes; make it a multiple of {processes}, or set "
                                                  "sft.train.processes")
    if train.grad_accum % processes == 0:
        return {"grad_accum": train.grad_accum // processes}
    per_process = total // processes
    batch = max(b for b in range(1, train.batch_size + 1) if per_process % b == 0)
    return {"batch_size": batch, "grad_accum": per_process // batch}


def check_alpha(key: str, alpha: float) -> None:
    """A student's alpha: above 0 (its baseline is added automatically) and a valid kd.alpha."""
    require(alpha > 0, key, f"must be > 0 (baselines are added automatically), got {alpha}")
    kd_value("alpha", alpha, key)


def validate_eval(e: SweepEval) -> None:
    if e.batch_size < 1:
        raise ConfigError("eval.batch_size", f"must be >= 1, got {e.batch_size}")
    if e.analysis is not None:
        for key in ("seq_len", "max_windows", "batch_size"):
            if getattr(e.analysis, key) < 1:
                raise ConfigError(f"eval.analysis.{key}", f"must be >= 1, got {getattr(e.analysis, key)}")


def validate_kd_sweep(kd: KDSweep) -> None:
    """Each listed value on its own; the combinations are checked as each run's config is made."""
    if not kd.alpha:
        raise ConfigError("kd.alpha", "list at least one alpha (baselines are added automatically)")
    for i, alpha in enumerate(kd.alpha):
        check_alpha(f"kd.alpha[{i}]", alpha)
    for name in ("temperature", "top_k", "divergence", "top_k_student"):
        for i, value in enumerate(getattr(kd, name)):
            kd_value(name, value, f"kd.{name}[{i}]")
    for key, values in kd.other.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"kd.other.{key}", "must be a non-empty list of values to sweep")
        for value in values:
            kd_value(key, copy.deepcopy(value), f"kd.other.{key}")
