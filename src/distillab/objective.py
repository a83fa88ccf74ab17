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

Config, loss, training loop, sweep, report and verdicts all take a `KDObjective`. `key()` is
stable (for grouping runs and naming settings), `label()` is for people. Adding a divergence
means a new name in `DIVERGENCES` (config) and a kernel in `distillab.losses`; nothing here
or downstream enumerates divergences.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from distillab.config import KDConfig, ScheduleConfig


@dataclass(frozen=True)
class Schedule:
    """A value over training progress in [0, 1] (see `distillab.config.ScheduleConfig`)."""

    shape: str = "constant"
    start: float | None = None
    end: float | None = None
    warmup_fraction: float = 0.1
    decay_fraction: float = 0.2

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> "Schedule":
        return cls(**dataclasses.asdict(config))

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


@dataclass(frozen=True)
class KDObjective:
    alpha: float = 0.0
    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    scale_by_t2: bool = True
    top_k: int | None = None
    top_p: float | None = None
    tail_bucket: bool = False
    top_k_student: str = "full"
    label_smoothing: float = 0.0
    loss_scale: str = "mix"
    alpha_schedule: Schedule = Schedule()
    temperature_schedule: Schedule = Schedule()

    @classmethod
    def from_config(cls, kd: KDConfig) -> "KDObjective":
        fields = {f.name for f in dataclasses.fields(cls)} - {"alpha_schedule", "temperature_schedule"}
        return cls(**{name: getattr(kd, name) for name in fields},
                   alpha_schedule=Schedule.from_config(kd.alpha_schedule),
                   temperature_schedule=Schedule.from_config(kd.temperature_schedule))

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
    def distills(self) -> bool:
        """Whether the run needs a teacher at all (some step has a KD weight above zero)."""
        return self.alpha > 0 or self.alpha_schedule.shape != "constant"

    @property
    def truncated(self) -> bool:
        return self.top_k is not None or self.top_p is not None

    def at(self, step: int, steps: int) -> "StepObjective":
        """The weights and temperature in force at 0-based `step` of a run of `steps` steps."""
        progress = step / max(1, steps - 1)
        alpha = self.alpha_schedule.value(self.alpha, progress)
        temperature = self.temperature_schedule.value(self.temperature, progress)
        ce_weight, kd_weight = {"mix": (1.0 - alpha, alpha), "ce_fixed": (1.0, alpha),
                                "kd_fixed": (1.0 - alpha, 1.0)}[self.loss_scale]
        if not self.distills:
            ce_weight, kd_weight = 1.0, 0.0
        return StepObjective(alpha, temperature, ce_weight, kd_weight)

    def setting(self) -> "KDObjective":
        """The objective without alpha: what a sweep varies alpha within (a verdict's setting)."""
        return dataclasses.replace(self, alpha=0.0)

    def key(self) -> str:
        """A stable, complete identity: equal keys <=> equal objectives. Defaults are left out."""
        default = KDObjective()
        parts = []
        for name, value in dataclasses.asdict(self).items():
            if value != dataclasses.asdict(default)[name]:
                parts.append(f"{name}={_compact(value)}")
        return ",".join(parts) or "lm"

    def label(self, with_alpha: bool = True) -> str:
        """A short human description, e.g. 'α 0.5, forward KL, T 2, top-20'."""
        parts = [f"α {self.alpha:g}" + (f" {self.alpha_schedule.label()}" if self.alpha_schedule.label() else "")
                 ] if with_alpha else []
        if self.divergence == "hard":
            parts.append("hard labels")
        else:
            name = {"forward_kl": "forward KL", "reverse_kl": "reverse KL", "tvd": "TVD",
                    "jsd": f"JSD β {self.beta:g}", "skew_forward_kl": f"skew forward KL λ {self.skew:g}",
                    "skew_reverse_kl": f"skew reverse KL λ {self.skew:g}"}.get(self.divergence, self.divergence)
            parts.append(name)
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
        if self.label_smoothing:
            parts.append(f"label smoothing {self.label_smoothing:g}")
        if self.loss_scale != "mix":
            parts.append({"ce_fixed": "CE weight 1", "kd_fixed": "KD weight 1"}[self.loss_scale])
        return ", ".join(parts)


def _compact(value) -> str:
    if isinstance(value, dict):
        return "(" + ",".join(f"{k}={_compact(v)}" for k, v in value.items() if v is not None) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class StepObjective:
    """What one step uses: the scheduled alpha and temperature, and the two loss weights."""

    alpha: float
    temperature: float
    ce_weight: float
    kd_weight: float
