"""The KD objective: one value that says what a student is trained on.

    total = w_ce * CE_eps(student, labels) + w_kd * D_T(teacher || student)

with (w_ce, w_kd) = (1 - a, a) for loss_scale "mix" (the paper's main runs), (1, a) for
"ce_fixed" and (1 - a, 1) for "kd_fixed"; CE_eps the cross-entropy with label smoothing eps;
D_T a divergence between the teacher's and the student's distributions at temperature T
(times T^2 unless scale_by_t2 is off; "hard" is the cross-entropy against the teacher's
argmax, never scaled), over the teacher truncated to its top-k / top-p tokens when asked (the
student then either keeps its whole-vocabulary log-probabilities at the kept tokens, or is
renormalised over them too: `top_k_student`).
a and T may follow schedules over the run.

`KDObjective` is that value, checked when it is made (`check_objective`: the one place KD
values are checked). A run config's `kd:` section is one (`distillab.config.KDConfig` adds
where the teacher's signal comes from); the loss reads it at a step through `at()`
(`StepObjective`). Config, loss, training loop, sweep, report and verdicts all take it. `key()`
is stable (for grouping runs and naming settings), `label()` is for people. The divergences,
their parameters and labels come from `distillab.losses.divergences.DIVERGENCES`; nothing here
or downstream enumerates them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from distillab.errors import ConfigError, require
from distillab.losses.divergences import DIVERGENCES, Divergence, Params
from distillab.losses.sampled import MAX_SAMPLES


@dataclass(frozen=True)
class Schedule:
    """How a KD weight or temperature moves over training (fractions of the run's steps).

    constant: the value throughout; linear / cosine: from `start` to `end` (default: the value);
    wsd: `start` -> the value over `warmup_fraction`, hold, then -> `end` over the last
    `decay_fraction`. `start` and `end` default to 0 for wsd and to the value otherwise.
    """

    shape: Literal["constant", "linear", "cosine", "wsd"] = "constant"
    start: float | None = None
    end: float | None = None
    warmup_fraction: float = 0.1
    decay_fraction: float = 0.2

    def __post_init__(self):
        for part in ("warmup_fraction", "decay_fraction"):
            value = getattr(self, part)
            require(0 <= value <= 1, part, f"must be in [0, 1], got {value}")
        require(self.warmup_fraction + self.decay_fraction <= 1, "decay_fraction",
                "warmup_fraction + decay_fraction must be <= 1")

    def value(self, peak: float, progress: float) -> float:
        """The scheduled value at `progress` (0 = first step, 1 = last) for a run whose value is `peak`."""
        progress = min(1.0, max(0.0, progress))
        if self.shape == "constant":
            return peak
        if self.shape in ("linear", "cosine"):
            start = peak if self.start is None else self.start
            end = peak if self.end is None else self.end
            ramp = progress if self.shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * progress))
            return start + (end - start) * ramp
        start = 0.0 if self.start is None else self.start
        end = 0.0 if self.end is None else self.end
        if self.warmup_fraction > 0 and progress < self.warmup_fraction:
            return start + (peak - start) * progress / self.warmup_fraction
        decay_start = 1.0 - self.decay_fraction
        if self.decay_fraction > 0 and progress > decay_start:
            return peak + (end - peak) * (progress - decay_start) / self.decay_fraction
        return peak

    def label(self) -> str:
        if self.shape == "constant":
            return ""
        ends = [f"{v:g}" if v is not None else "·" for v in (self.start, self.end)]
        return f"{self.shape}({ends[0]}→{ends[1]})"


# (w_ce, w_kd) from the alpha in force, per kd.loss_scale
LOSS_WEIGHTS = {"mix": lambda alpha: (1.0 - alpha, alpha), "ce_fixed": lambda alpha: (1.0, alpha),
                "kd_fixed": lambda alpha: (1.0 - alpha, 1.0)}


@dataclass(frozen=True)
class KDObjective(Params):
    """What a student is trained on (the module docstring has the formula). The divergences'
    parameters (`beta`, `skew`, ...) are inherited from `Params`. Made only with valid values."""

    alpha: float = 0.0
    temperature: float = 1.0
    # KL(p_T || p_S) by default; hard = cross-entropy against the teacher's argmax (no T^2);
    # any name of `distillab.losses.divergences.DIVERGENCES`
    divergence: str = "forward_kl"
    scale_by_t2: bool = True  # multiply the KD term by T^2 (keeps gradient scale across T)
    # truncate the teacher to its k most likely tokens, or to the smallest set holding p of its
    # mass (at T = 1); renormalised over the kept tokens, or the rest kept as one tail category
    top_k: int | None = None
    top_p: float | None = None
    tail_bucket: bool = False
    # the student's side of a truncated KD term without a tail: full = its whole-vocabulary
    # log-probabilities at the kept tokens (forward KL; other divergences renormalise it, else the
    # value is infinite); renormalised = renormalised over the teacher's kept tokens too
    top_k_student: Literal["full", "renormalised"] = "full"
    label_smoothing: float = 0.0  # on the CE term
    # mix: (1 - alpha) CE + alpha KD; ce_fixed: CE + alpha KD; kd_fixed: (1 - alpha) CE + KD
    loss_scale: Literal["mix", "ce_fixed", "kd_fixed"] = "mix"
    alpha_schedule: Schedule = Schedule()
    temperature_schedule: Schedule = Schedule()
    # a sampled teacher signal (docs/teacher-signals.md): per position this many token ids drawn
    # from the teacher's distribution raised to 1 / proposal_temperature, importance-weighted
    # back: an unbiased estimate for a divergence with a `sampled` kernel; unset = the full (or
    # truncated) distribution
    samples: int | None = None
    proposal_temperature: float = 1.0
    # several teachers (kd.teachers beside kd.teacher): their weights in that order (empty:
    # equal) and how they combine: mixture = the weighted mixture of their distributions,
    # route = each document to one teacher, drawn by weight
    teacher_weights: list[float] = field(default_factory=list)
    teacher_mix: Literal["mixture", "route"] = "mixture"

    def __post_init__(self):
        check_objective(self)

    @classmethod
    def from_config(cls, kd) -> "KDObjective":
        """The objective of a `kd:` section (a `KDConfig`, or anything with the objective's fields)."""
        return cls(**{f.name: getattr(kd, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_dict(cls, values: dict) -> "KDObjective":
        """Inverse of `as_dict` (for objectives read back from summaries and result tables)."""
        values = dict(values)
        for name in ("alpha_schedule", "temperature_schedule"):
            values[name] = Schedule(**values.get(name, {}))
        return cls(**values)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def entry(self) -> Divergence:
        """The divergence's registry entry."""
        return DIVERGENCES[self.divergence]

    @property
    def distills(self) -> bool:
        """Whether the run needs a teacher at all (some step has a KD weight above zero)."""
        return self.alpha > 0 or self.alpha_schedule.shape != "constant"

    @property
    def truncated(self) -> bool:
        return self.top_k is not None or self.top_p is not None

    @property
    def whole_vocabulary_student(self) -> bool:
        """With a truncated teacher (no tail): the student's whole-vocabulary log-probabilities at the
        kept tokens (forward KL, `top_k_student` full), not the student renormalised over them."""
        return self.entry.whole_vocabulary_student and self.top_k_student == "full"

    def at(self, step: int, steps: int) -> "StepObjective":
        """The objective in force at 0-based `step` of a run of `steps` steps: what the loss reads."""
        progress = step / max(1, steps - 1)
        alpha = self.alpha_schedule.value(self.alpha, progress)
        temperature = self.temperature_schedule.value(self.temperature, progress)
        ce_weight, kd_weight = LOSS_WEIGHTS[self.loss_scale](alpha) if self.distills else (1.0, 0.0)
        return StepObjective(self, alpha, temperature, ce_weight, kd_weight)

    def teacher_shares(self, teachers: int) -> list[float]:
        """The weights of `teachers` teachers (kd.teacher, then kd.teachers) normalised to sum 1:
        `teacher_weights` when given, else equal."""
        raw = list(self.teacher_weights) or [1.0] * teachers
        return [w / sum(raw) for w in raw]

    def setting(self) -> "KDObjective":
        """The objective without alpha: what a sweep varies alpha within (a verdict's setting)."""
        return dataclasses.replace(self, alpha=0.0)

    def key(self) -> str:
        """A stable, complete identity: equal keys <=> equal objectives. Defaults are left out."""
        default = dataclasses.asdict(KDObjective())
        parts = [f"{name}={_compact(value)}" for name, value in dataclasses.asdict(self).items()
                 if value != default[name]]
        return ",".join(parts) or "lm"

    def label(self, with_alpha: bool = True) -> str:
        """A short human description, e.g. 'α 0.5, forward KL, T 2, top-20'."""
        parts = [f"α {self.alpha:g}" + (f" {self.alpha_schedule.label()}" if self.alpha_schedule.label() else "")
                 ] if with_alpha else []
        parts.append(self.entry.describe(self))
        if not self.entry.argmax_teacher:
            parts.append(f"T {self.temperature:g}" + (f" {self.temperature_schedule.label()}"
                                                       if self.temperature_schedule.label() else ""))
            if not self.scale_by_t2:
                parts.append("no T²")
        if self.top_k is not None:
            parts.append(f"top-{self.top_k}" + (" + tail" if self.tail_bucket else ""))
        if self.top_k_student == "renormalised":
            parts.append("student renormalised")
        if self.top_p is not None:
            parts.append(f"top-p {self.top_p:g}" + (" + tail" if self.tail_bucket else ""))
        if self.samples is not None:
            parts.append(f"sampled {self.samples}" + (f" at τ {self.proposal_temperature:g}"
                                                       if self.proposal_temperature != 1.0 else ""))
        if self.teacher_weights or self.teacher_mix != "mixture":
            mix = "mixture" if self.teacher_mix == "mixture" else "routed per document"
            shares = "/".join(f"{w:.2g}" for w in self.teacher_shares(len(self.teacher_weights)))
            parts.append(f"{len(self.teacher_weights)} teachers, {mix} {shares}" if self.teacher_weights
                         else f"teachers {mix}")
        if self.label_smoothing:
            parts.append(f"label smoothing {self.label_smoothing:g}")
        if self.loss_scale != "mix":
            parts.append({"ce_fixed": "CE weight 1", "kd_fixed": "KD weight 1"}[self.loss_scale])
        return ", ".join(parts)


def _compact(value) -> str:
    if isinstance(value, dict):
        return "(" + ",".join(f"{k}={_compact(v)}" for k, v in value.items() if v is not None) + ")"
    if isinstance(value, list):
        return "/".join(_compact(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class StepObjective:
    """The objective at one step: the scheduled alpha and temperature and the two loss weights,
    beside the run's `objective` (divergence, truncation, label smoothing, ...)."""

    objective: KDObjective
    alpha: float
    temperature: float
    ce_weight: float
    kd_weight: float

    @property
    def kd_scale(self) -> float:
        """c: the KD term's factor (T^2, or 1 for a divergence without it and when scaling is off)."""
        return self.temperature**2 if self.objective.scale_by_t2 and self.objective.entry.t2_factor else 1.0

    def without_teacher(self) -> "StepObjective":
        """The language-model loss alone (CE weight 1): a step whose teacher signal is empty."""
        return dataclasses.replace(self, ce_weight=1.0, kd_weight=0.0)


# ----------------------------------------------------------------------------- the checks

# The values a field may take alone: name -> (test, what the values must be).
FIELD_RULES = {
    "alpha": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "temperature": (lambda v: v > 0, "must be > 0"),
    "divergence": (lambda v: v in DIVERGENCES, f"must be one of {', '.join(DIVERGENCES)}"),
    "top_k": (lambda v: v is None or v >= 1, "must be >= 1"),
    "top_p": (lambda v: v is None or 0 < v <= 1, "must be in (0, 1]"),
    "top_k_student": (lambda v: v in ("full", "renormalised"), "must be full or renormalised"),
    "label_smoothing": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "samples": (lambda v: v is None or 1 <= v <= MAX_SAMPLES, f"must be in [1, {MAX_SAMPLES}]"),
    "proposal_temperature": (lambda v: v > 0, "must be > 0"),
    "teacher_weights": (lambda v: all(w > 0 for w in v), "must all be > 0"),
    **{f.name: (f.metadata["ok"], f"must be {f.metadata['bounds']}") for f in dataclasses.fields(Params)},
}


def field_problem(name: str, value) -> str | None:
    """What is wrong with `value` as the objective's field `name` on its own; None if nothing."""
    rule = FIELD_RULES.get(name)
    if rule is None or rule[0](value):
        return None
    return f"{rule[1]}, got {value!r}"


def check_objective(o: KDObjective) -> None:
    """Every check of KD values, alone and together: a ConfigError naming the field (relative to
    the kd section; `distillab.config` puts it inside `kd.`)."""
    for f in dataclasses.fields(KDObjective):
        problem = field_problem(f.name, getattr(o, f.name))
        if problem is not None:
            raise ConfigError(f.name, problem)
    require(o.top_k is None or o.top_p is None, "top_p",
            "set kd.top_k or kd.top_p, not both (which would apply first is ambiguous)")
    require(not o.tail_bucket or o.truncated, "tail_bucket",
            "needs a truncation (kd.top_k or kd.top_p) whose dropped mass forms the tail")
    if o.top_k_student != "full":
        require(o.truncated, "top_k_student",
                "applies to a truncated teacher only; set kd.top_k (or kd.top_p), or leave it at full")
        require(not o.tail_bucket, "top_k_student",
                "with kd.tail_bucket the student keeps a tail category; leave kd.top_k_student at full")
    if o.entry.argmax_teacher:
        require(o.temperature == 1.0 and o.temperature_schedule.shape == "constant", "temperature",
                f"must be 1 with kd.divergence={o.divergence} (the teacher's argmax has no temperature)")
        for key in ("top_k", "top_p"):
            require(getattr(o, key) is None, key, f"leave unset with kd.divergence={o.divergence} (ambiguous "
                    "with the argmax)")
        require(not o.tail_bucket, "tail_bucket", f"leave unset with kd.divergence={o.divergence}")
    check_teacher_signal(o)
    for end in ("start", "end"):
        value = getattr(o.alpha_schedule, end)
        require(value is None or 0 <= value <= 1, f"alpha_schedule.{end}", f"must be in [0, 1], got {value}")
        value = getattr(o.temperature_schedule, end)
        require(value is None or value > 0, f"temperature_schedule.{end}", f"must be > 0, got {value}")


def check_teacher_signal(o: KDObjective) -> None:
    """The sampled signal's and the cross-tokenizer divergences' combinations with the rest."""
    if o.samples is None:
        require(o.proposal_temperature == 1.0, "proposal_temperature", "applies to sampled signals only; set "
                "kd.samples too")
    else:
        require(o.entry.sampled is not None, "divergence",
                f"{o.divergence} has no unbiased estimator from sampled teacher tokens (only forward_kl's gradient "
                "q - p is linear in the teacher's p); use forward_kl, or leave kd.samples unset")
        require(o.temperature == 1.0 and o.temperature_schedule.shape == "constant", "temperature",
                "must be 1 with kd.samples (the draws estimate the teacher at T = 1; kd.proposal_temperature "
                "shapes the draws instead)")
        for key in ("top_k", "top_p"):
            require(getattr(o, key) is None, key, "leave unset with kd.samples (a sampled signal keeps only the "
                    "tokens drawn, weighted to stay unbiased)")
        require(not o.tail_bucket, "tail_bucket", "leave unset with kd.samples")
    if o.entry.aligned is not None:
        for key in ("top_k", "top_p"):
            require(getattr(o, key) is None, key, f"leave unset with kd.divergence={o.divergence} (it compares "
                    "whole distributions of two vocabularies)")
        require(not o.tail_bucket, "tail_bucket", f"leave unset with kd.divergence={o.divergence}")
