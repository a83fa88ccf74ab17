"""Compute accounting, in one place for sweeps (estimates before running) and reports (after).

A run's training FLOPs count the tokens it trains: its whole budget, or for a WSD branch only
the decay it trains from its trunk's checkpoint. A student's teacher-inference FLOPs count a
forward pass of the teacher per student token when the teacher runs online, and nothing when
its outputs come from a cache (the cache's capture is a job of its own, counted once).
"""

from __future__ import annotations

from distillab.config import RunConfig
from distillab.models import ModelSpec, resolve_spec
from distillab.train.schedule import make_plan


def trained_tokens(config: RunConfig) -> int:
    """Tokens a run trains itself (a WSD branch: its decay only)."""
    if not config.train.branch_from:
        return config.train.token_budget
    plan = make_plan(config.train)
    return (plan.steps - plan.decay_start) * plan.tokens_per_step


def training_flops(config: RunConfig, vocab_size: int) -> float:
    spec = resolve_spec(config.model)
    return spec.training_flops_per_token(vocab_size, config.train.seq_len) * trained_tokens(config)


def teacher_inference_flops(teacher: ModelSpec | None, vocab_size: int, config: RunConfig, cached: bool) -> float:
    """A student's teacher forward passes over its tokens (0 without a teacher or from a cache)."""
    if teacher is None or cached:
        return 0.0
    return teacher.forward_flops_per_token(vocab_size, config.train.seq_len) * trained_tokens(config)


def capture_flops(teacher: ModelSpec, vocab_size: int, seq_len: int, tokens: int) -> float:
    """One pass of the teacher over `tokens` tokens to fill a cache."""
    return teacher.forward_flops_per_token(vocab_size, seq_len) * tokens


def compute_matched_tokens(student: ModelSpec, teacher: ModelSpec, vocab_size: int, seq_len: int, tokens: int,
                           tokens_per_step: int) -> int:
    """The budget of a baseline that spends a distilled student's teacher-inference FLOPs on training
    the student itself: tokens x (1 + teacher forward FLOPs / student training FLOPs per token),
    rounded to whole steps (at least one more step than the student's own budget)."""
    ratio = teacher.forward_flops_per_token(vocab_size, seq_len) / student.training_flops_per_token(vocab_size, seq_len)
    steps = tokens // tokens_per_step
    return max(steps + 1, round(tokens * (1.0 + ratio) / tokens_per_step)) * tokens_per_step
