"""Compute accounting, in one place for sweeps (estimates before running) and reports (after).

A run's training FLOPs count the tokens it trains: its whole budget, or for a WSD branch only
the decay it trains from its trunk's checkpoint. A student's teacher-inference FLOPs count a
forward pass of the teacher per student token when the teacher runs online; from a cache, its
equal share of the cache's one capture (so a sweep's sums count the teacher's inference once).
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


def teacher_inference_flops(teacher: ModelSpec | None, vocab_size: int, config: RunConfig,
                            cache: dict | None = None) -> float:
    """A student's teacher forward passes over its tokens (0 without a teacher); from a sweep's
    cache (`info["cache"]`: readers, students), its share of the capture."""
    if teacher is None:
        return 0.0
    if cache is not None:
        return capture_flops(teacher, vocab_size, config.train.seq_len, captured_tokens(cache, config.train.seq_len)) \
            / cache["students"]
    return teacher.forward_flops_per_token(vocab_size, config.train.seq_len) * trained_tokens(config)


def captured_tokens(cache: dict, seq_len: int) -> int:
    """At most the tokens a sweep's cache captures: per data seed the longest reader's windows
    (readers of one seed read a prefix of one order), summed over seeds."""
    longest: dict[int, int] = {}
    for seed, sequences in cache["readers"]:
        longest[seed] = max(longest.get(seed, 0), sequences)
    return sum(longest.values()) * seq_len


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
