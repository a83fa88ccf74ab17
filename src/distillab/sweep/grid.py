"""Grid specs: a base run config, a teacher pool, students, and the KD settings to sweep (YAML)."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from distillab.config import DIVERGENCES, KDConfig, build_dataclass, read_yaml_mapping
from distillab.errors import ConfigError
from distillab.models import LADDER

# Peak dense bf16 throughput of accelerators, for compute estimates at a stated MFU.
DEVICE_PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu-v6e": 918e12}
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
class StudentMember:
    """One more student seed on one teacher at one alpha (beside the seeds x teachers x alphas product)."""
    seed: int = 43
    teacher: str = ""  # the teacher's model
    teacher_tokens: int = 0
    teacher_seed: int = 42
    alpha: float = 0.5


@dataclass
class StudentSet:
    models: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [43])
    # hand-picked (seed, teacher, alpha) students for every model and budget, each with its
    # baselines (e.g. the seeds a sequential study adds only where a finding is still open)
    members: list[StudentMember] = field(default_factory=list)
    train: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    # for each teacher and seed, also a baseline that spends the teacher's inference FLOPs on the
    # student itself: more tokens of the same stream (is distillation better than training longer?)
    compute_matched: bool = False


@dataclass
class KDSweep:
    """KD settings crossed with each other (and with every teacher) for each student.

    Any other kd key may be listed under `other` (e.g. loss_scale: [ce_fixed, kd_fixed]). Hard
    labels take T = 1 and no truncation only: other temperatures and top-k values are not
    crossed with them.
    """
    alpha: list[float] = field(default_factory=lambda: [0.5])
    temperature: list[float] = field(default_factory=lambda: [1.0])
    top_k: list[int | None] = field(default_factory=lambda: [None])
    divergence: list[str] = field(default_factory=lambda: ["forward_kl"])
    other: dict = field(default_factory=dict)

    def objectives(self) -> list[dict]:
        """The kd overrides (without alpha) of every objective in the sweep, in a fixed order."""
        names = ["temperature", "top_k", "divergence", *sorted(self.other)]
        values = [self.temperature, self.top_k, self.divergence, *(self.other[k] for k in sorted(self.other))]
        out = []
        for combination in itertools.product(*values):
            kd = dict(zip(names, combination))
            if kd["divergence"] == "hard":
                kd.update(temperature=1.0, top_k=None)
            if kd not in out:
                out.append(kd)
        return out


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


def load_grid(path: str | Path) -> GridSpec:
    return grid_from_dict(read_yaml_mapping(path, what="grid"))


def grid_from_dict(values: dict) -> GridSpec:
    spec = build_dataclass(GridSpec, values)
    validate_grid(spec)
    return spec


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
        if member.model not in LADDER:
            raise ConfigError(f"teachers.members[{i}].model",
                              f"unknown model {member.model!r}; `distillab models` lists them")
        if member.tokens <= 0:
            raise ConfigError(f"teachers.members[{i}].tokens", f"must be > 0, got {member.tokens}")
    if not spec.students.models or not spec.students.tokens or not spec.students.seeds:
        raise ConfigError("students", "name at least one student model, token budget and seed")
    validate_kd_sweep(spec.kd)
    for i, member in enumerate(spec.students.members):
        if not 0 < member.alpha <= 1:
            raise ConfigError(f"students.members[{i}].alpha", f"must be in (0, 1], got {member.alpha}")
    if "/" in spec.name or ".." in spec.name or not spec.name.strip():
        raise ConfigError("name", f"{spec.name!r} must be a plain name (it names the sweep directory)")


def validate_kd_sweep(kd: KDSweep) -> None:
    if not kd.alpha:
        raise ConfigError("kd.alpha", "list at least one alpha (baselines are added automatically)")
    for i, alpha in enumerate(kd.alpha):
        if not 0 < alpha <= 1:
            raise ConfigError(f"kd.alpha[{i}]", f"must be in (0, 1] (baselines are added automatically), got {alpha}")
    for i, temperature in enumerate(kd.temperature):
        if temperature <= 0:
            raise ConfigError(f"kd.temperature[{i}]", f"must be > 0, got {temperature}")
    for i, top_k in enumerate(kd.top_k):
        if top_k is not None and top_k < 1:
            raise ConfigError(f"kd.top_k[{i}]", f"must be >= 1 or null, got {top_k}")
    for i, divergence in enumerate(kd.divergence):
        if divergence not in DIVERGENCES:
            raise ConfigError(f"kd.divergence[{i}]", f"must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    for key, values in kd.other.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"kd.other.{key}", "must be a non-empty list of values to sweep")
        for value in values:
            build_dataclass(KDConfig, {key: copy.deepcopy(value)}, "kd")
