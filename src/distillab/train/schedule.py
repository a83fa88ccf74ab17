"""The optimizer and the learning-rate schedule of a run (pure functions of its train config)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distillab.config import TrainConfig


@dataclass(frozen=True)
class Plan:
    steps: int
    tokens_per_step: int
    warmup_steps: int
    decay_start: int  # first step of the final decay (wsd); == warmup_steps for cosine


def make_plan(train: TrainConfig, steps: int | None = None) -> Plan:
    """Steps from the token budget (or `steps` given: SFT's fixed count), warmup and decay start."""
    tokens_per_step = train.batch_size * train.seq_len * train.grad_accum * train.processes
    steps = steps or max(1, train.token_budget // tokens_per_step)
    warmup = train.warmup_steps if train.warmup_steps is not None else int(round(train.warmup_fraction * steps))
    warmup = min(warmup, steps - 1)
    if train.schedule == "wsd":
        decay_start = steps - max(1, int(round(train.decay_fraction * steps)))
        decay_start = max(decay_start, warmup)
    else:
        decay_start = warmup
    return Plan(steps, tokens_per_step, warmup, decay_start)


def cosine_decay(progress: float, peak: float, low: float) -> float:
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_decay(progress: float, peak: float, low: float) -> float:
    return peak + (low - peak) * progress


# train.schedule -> the decay after warmup (and, for wsd, after the stable phase)
DECAYS = {"cosine": cosine_decay, "wsd": linear_decay}


def learning_rate(step: int, plan: Plan, train: TrainConfig) -> float:
    """Learning rate for 0-based `step`: linear warmup, (wsd: hold the peak), then decay to min."""
    peak = train.lr
    if step < plan.warmup_steps:
        return peak * (step + 1) / plan.warmup_steps
    if step < plan.decay_start:
        return peak
    progress = min(1.0, (step - plan.decay_start) / max(1, plan.steps - 1 - plan.decay_start))
    return DECAYS[train.schedule](progress, peak, train.min_lr_ratio * peak)


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over two groups: decayed parameters and the rest. `train.weight_decay_params`: matrices
    (2-D and up) decay and norms do not, or all decay (optax.adamw without a mask, as the paper's
    authors ran it). Fused on GPUs, foreach on the CPU."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            decays = train.weight_decay_params == "all" or param.dim() >= 2
            (decay if decays else no_decay).append(param)
    groups = [{"params": params, "weight_decay": rate}
              for params, rate in ((decay, train.weight_decay), (no_decay, 0.0)) if params]
    on_gpu = any(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps,
                             **({"fused": True} if on_gpu else {"foreach": True}))
