"""The teacher signal a run's `kd` section asks for: the one factory the training loop calls.

    a cross-tokenizer kd.divergence (uld, alm: an `aligned` kernel in the registry)
                              a `CrossTokenizerTeacher` (any tokenizer; byte-span alignment)
    kd.samples                the teacher's draws (`SampledOnlineTeacher`), or a `sampled` cache
    kd.teachers               `SeveralTeachers` over kd.teacher and kd.teachers (each online or
                              from its cache in kd.cache / kd.caches), mixed or routed
    otherwise                 `distillab.teacher.build_teacher_signal` (online, or a top-K cache)

Every teacher gets the checks of `build_teacher_signal` (its weights' manifest, tokenizer,
positions, finite outputs; a cache's identity), plus: a sampled cache holds draws of
kd.samples at kd.proposal_temperature, and a top-K cache is not read as a sampled one.
"""

from __future__ import annotations

import dataclasses

import torch

from distillab.config import KDConfig
from distillab.errors import ConfigError
from distillab.models import model_directory
from distillab.signals.cross_tokenizer import CrossTokenizerTeacher
from distillab.signals.sampling import SampledOnlineTeacher, to_teacher
from distillab.signals.several import DocumentRouter, SeveralTeachers
from distillab.teacher import CachedTeacher, OnlineTeacher, build_teacher_signal


class SampledCachedTeacher:
    """A `sampled` teacher cache read by window id: the stored draws of each position."""

    def __init__(self, cached: CachedTeacher, samples: int, proposal_temperature: float):
        self.cached, self.samples, self.proposal_temperature = cached, samples, proposal_temperature
        self.description = cached.description.replace(f"top-{cached.top_k}, ", "")

    def inference_flops_per_token(self) -> float:
        return 0.0

    def check_covers(self, stream, sequences: int) -> None:
        self.cached.check_covers(stream, sequences)

    def signal(self, batch, head: bool = False):
        size, seq = batch.inputs.shape
        rows = self.cached.cache.rows(batch.window_ids.cpu().numpy())
        return to_teacher(rows, (size, seq), self.samples, self.proposal_temperature, batch.inputs.device)


def build_signal(kd: KDConfig, data, device: torch.device, precision: str, seq_len: int, distills: bool,
                 packing: str = "concat", rows: int | None = None):
    """The run's teacher signal (None for teachers and baselines), every check done before training;
    `rows`: the student's output rows, which a same-tokenizer teacher's distribution covers."""
    if not distills:
        return None
    if kd.entry.aligned is not None:
        if packing != "concat":
            raise ConfigError("data.packing", f"kd.divergence={kd.divergence} needs concat windows")
        directory = model_directory(kd.teacher or "", revision=kd.teacher_revision)
        return CrossTokenizerTeacher.load(directory, data.tokenizer, device, kd.entry.alignment)
    names = [(kd.teacher, kd.cache), *zip(kd.teachers, kd.caches or ["off"] * len(kd.teachers))]
    signals = [one_signal(kd, name, cache, data, device, precision, seq_len, packing, rows, first=i == 0)
               for i, (name, cache) in enumerate(names)]
    if len(signals) == 1:
        return signals[0]
    weights = kd.teacher_shares(len(signals))
    router = DocumentRouter(data.tokens("train"), data.tokenizer.eos_token_id, seq_len, packing, weights) \
        if kd.teacher_mix == "route" else None
    return SeveralTeachers(signals, weights, kd.teacher_mix, router)


def one_signal(kd: KDConfig, teacher: str, cache: str, data, device, precision, seq_len, packing, rows,
               first: bool):
    key = "kd.cache" if first else "kd.caches"
    single = dataclasses.replace(kd, teacher=teacher, cache=cache, teachers=[], caches=[],
                                 teacher_revision=kd.teacher_revision if first else None)
    signal = build_teacher_signal(single, data, device, precision, seq_len, True, packing, rows)
    if isinstance(signal, CachedTeacher):
        coding = signal.cache.manifest["coding"]
        if coding["name"] == "sampled":
            drawn = (int(coding["samples"]), float(coding["proposal_temperature"]))
            if drawn != (kd.samples, kd.proposal_temperature):
                raise ConfigError("kd.samples", f"the sampled cache {cache} holds {drawn[0]} draws at proposal "
                                                f"temperature {drawn[1]:g}; set kd.samples and "
                                                "kd.proposal_temperature to those")
            return SampledCachedTeacher(signal, *drawn)
        if kd.samples is not None:
            raise ConfigError(key, f"{cache} holds a top-{signal.top_k} cache, not draws; capture one with "
                                   f"--coding sampled --samples {kd.samples}, or leave kd.samples unset")
        return signal
    if kd.samples is not None:
        return SampledOnlineTeacher(signal, kd.samples, kd.proposal_temperature)
    return signal


def online_teachers(signal) -> list[OnlineTeacher]:
    """The online teachers inside a signal (to place on devices)."""
    if isinstance(signal, OnlineTeacher):
        return [signal]
    if isinstance(signal, SampledOnlineTeacher):
        return [signal.teacher]
    if isinstance(signal, SeveralTeachers):
        return [t for s in signal.signals for t in online_teachers(s)]
    return []


def check_covers(signal, stream, sequences: int) -> None:
    """Refuse, before training, a run that would read windows one of its caches did not capture."""
    if signal is not None and hasattr(signal, "check_covers"):
        signal.check_covers(stream, sequences)
