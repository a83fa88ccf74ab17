"""The sampled teacher signal: unbiased in expectation (Monte-Carlo against float64), biased variants
fail the same test, the `sampled` cache coding round-trips, and the config refuses what has no
unbiased estimator."""

import numpy as np
import pytest
import torch

from distillab.cache.coding import DrawnRows, make_coding
from distillab.config import config_from_dict
from distillab.errors import ConfigError
from distillab.losses import SampledTeacher, run_fused
from distillab.losses.objective import KDObjective
from distillab.losses.sampled import sampled_gradient_float64
from distillab.signals.sampling import distinct_with_counts, draw, to_teacher

ROWS, VOCAB, SAMPLES, REPEATS = 3, 40, 12, 3000
KD_ONLY = KDObjective(alpha=1.0, samples=SAMPLES).at(0, 1)  # CE weight 0, KD weight 1


def problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64) * 2.0
    student = torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64)
    exact = torch.softmax(student, -1) - torch.softmax(teacher, -1)  # d KL(p || q) / dz, float64
    return teacher, student, exact


def loss_gradients(student: torch.Tensor, signal: SampledTeacher) -> torch.Tensor:
    """Per-row d KD / d z through the training loss (alpha = 1), one row of gradients per repeat."""
    logits = student.float().expand(REPEATS, ROWS, VOCAB).clone().requires_grad_(True)
    labels = torch.zeros(REPEATS, ROWS, dtype=torch.long)
    out = run_fused(logits, signal, labels, KD_ONLY)
    out.total.backward()
    return logits.grad.double() * REPEATS * ROWS


def sampled_signal(teacher: torch.Tensor, tau: float) -> SampledTeacher:
    logits = teacher.float().repeat(REPEATS, 1)  # REPEATS windows of ROWS positions, each its own draws
    rows = draw(logits, list(range(REPEATS)), SAMPLES, tau)
    return to_teacher(rows, (REPEATS, ROWS), SAMPLES, tau, torch.device("cpu"))


def z_scores(gradients: torch.Tensor, exact: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """|mean - exact| / standard error of the mean, per coordinate. The standard error is the larger of
    the sample's and the unbiased estimator's own, sqrt((p^2 / r - p^2) / m / repeats) in float64 (a
    token too rare to be drawn in any repeat has a sample spread of 0)."""
    p = torch.softmax(teacher, -1)
    r = torch.softmax(torch.log_softmax(teacher, -1) / tau, -1)
    own = ((p * p / r - p * p) / SAMPLES / REPEATS).sqrt()
    error = torch.maximum(gradients.std(0) / REPEATS**0.5, own)
    return (gradients.mean(0) - exact).abs() / error


@pytest.mark.parametrize("tau", [1.0, 0.7, 2.0])
def test_mean_sampled_gradient_equals_the_full_float64_gradient(tau):
    teacher, student, exact = problem()
    z = z_scores(loss_gradients(student, sampled_signal(teacher, tau)), exact, teacher, tau)
    assert float(z.max()) < 4.5, f"max |mean - exact| = {float(z.max()):.2f} standard errors"
    chi2 = float((z**2).sum())  # ~ chi-square with ROWS * (VOCAB - 1) degrees of freedom if unbiased
    assert chi2 < ROWS * VOCAB * 1.5


def test_biased_variants_fail_the_same_test():
    teacher, student, exact = problem()
    # 1. draws from a tempered proposal without importance weights
    logits = teacher.float().repeat(REPEATS, 1)
    rows = draw(logits, list(range(REPEATS)), SAMPLES, 2.0)
    unweighted = to_teacher(rows, (REPEATS, ROWS), SAMPLES, 1.0, torch.device("cpu"))
    # 2. the drawn ids with the teacher's own probabilities, renormalised over them
    rows = draw(logits, list(range(REPEATS)), SAMPLES, 1.0)
    probs = np.exp(rows.logprobs) * (rows.counts > 0)
    renormalised = SampledTeacher(torch.from_numpy(rows.ids).view(REPEATS, ROWS, -1),
                                  torch.from_numpy((probs / probs.sum(-1, keepdims=True)).astype(np.float32))
                                  .view(REPEATS, ROWS, -1), torch.from_numpy(rows.logprobs).view(REPEATS, ROWS, -1))
    # 3. the top-k tokens, renormalised (what a top-k cache gives)
    top = torch.log_softmax(teacher.float(), -1).topk(SAMPLES, -1)
    weights = torch.softmax(top.values, -1)
    top_k = SampledTeacher(top.indices.expand(REPEATS, ROWS, SAMPLES), weights.expand(REPEATS, ROWS, SAMPLES),
                           top.values.expand(REPEATS, ROWS, SAMPLES))
    for name, signal in (("unweighted tau 2", unweighted), ("renormalised draws", renormalised), ("top-k", top_k)):
        z = z_scores(loss_gradients(student, signal), exact, teacher)
        assert float(z.max()) > 4.5, f"{name} passed the unbiasedness test"


def test_sampled_loss_gradient_equals_its_float64_formula_and_value():
    teacher, student, _ = problem(1)
    rows = draw(teacher.float(), [7], SAMPLES, 1.0)
    signal = to_teacher(rows, (1, ROWS), SAMPLES, 1.0, torch.device("cpu"))
    logits = student.float()[None].clone().requires_grad_(True)
    out = run_fused(logits, signal, torch.zeros(1, ROWS, dtype=torch.long), KD_ONLY)
    out.total.backward()
    expected = sampled_gradient_float64(student[None], signal.indices, signal.weights) / ROWS
    assert torch.allclose(logits.grad.double(), expected, atol=1e-6)
    log_q = torch.log_softmax(student, -1).gather(-1, signal.indices[0])
    value = (signal.weights[0].double() * (signal.logprobs[0].double() - log_q)).sum() / ROWS
    assert abs(float(out.kd) - float(value)) < 1e-5


def test_draws_are_a_function_of_the_window_id():
    teacher, _, _ = problem()
    a = draw(teacher.float().repeat(2, 1), [5, 9], SAMPLES)
    b = draw(teacher.float(), [9], SAMPLES)
    assert np.array_equal(a.ids[ROWS:, : b.ids.shape[1]], b.ids) and np.array_equal(a.counts[ROWS:, : b.ids.shape[1]],
                                                                                     b.counts)
    assert (a.counts.sum(1) == SAMPLES).all()


def test_distinct_with_counts_against_numpy():
    drawn = torch.randint(0, 9, (50, 16), generator=torch.Generator().manual_seed(3))
    ids, counts = distinct_with_counts(drawn)
    for row in range(50):
        values, expected = np.unique(drawn[row].numpy(), return_counts=True)
        kept = counts[row] > 0
        assert ids[row][kept].tolist() == values.tolist() and counts[row][kept].tolist() == expected.tolist()


@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_sampled_coding_round_trip(tau):
    teacher = torch.randn(64, 3000, generator=torch.Generator().manual_seed(4)) * 3
    rows = draw(teacher, [0, 1], 32, tau)
    coding = make_coding({"name": "sampled", "samples": 32, "proposal_temperature": tau}, 3000, 32)
    back = coding.decode(coding.encode(rows), 64)
    order = np.argsort(np.where(rows.counts > 0, rows.ids, 1 << 40), axis=1)
    for name in ("ids", "counts"):
        original = np.take_along_axis(getattr(rows, name), order, axis=1)
        assert np.array_equal(np.where(rows.counts > 0, original, 0)[:, : back.ids.shape[1]], getattr(back, name))
    original = np.take_along_axis(rows.logprobs, order, axis=1)[:, : back.ids.shape[1]]
    assert np.abs(np.where(back.counts > 0, original - back.logprobs, 0)).max() <= coding.log_step / 2 + 1e-6
    assert np.array_equal(back.log_z, rows.log_z if tau != 1.0 else np.zeros(64, dtype=np.float32))
    assert isinstance(DrawnRows.concat([back, rows]), DrawnRows)


def base(**kd):
    return {"kd": {"teacher": "t", "alpha": 0.5, **kd}}


@pytest.mark.parametrize("kd, key", [
    ({"samples": 8, "divergence": "reverse_kl"}, "kd.divergence"),
    ({"samples": 8, "divergence": "jsd"}, "kd.divergence"),
    ({"samples": 8, "temperature": 2.0}, "kd.temperature"),
    ({"samples": 8, "top_k": 4}, "kd.top_k"),
    ({"samples": 300}, "kd.samples"),
    ({"proposal_temperature": 0.5}, "kd.proposal_temperature"),
])
def test_config_refuses_what_has_no_unbiased_estimator(kd, key):
    with pytest.raises(ConfigError) as info:
        config_from_dict(base(**kd))
    assert info.value.key == key and "\n" not in str(info.value)


def test_a_sampled_signal_reaches_the_loss_only_through_an_objective_with_samples():
    teacher, student, _ = problem()
    signal = to_teacher(draw(teacher.float(), [0], SAMPLES), (1, ROWS), SAMPLES, 1.0, torch.device("cpu"))
    with pytest.raises(ValueError, match="samples"):
        run_fused(student.float()[None], signal, torch.zeros(1, ROWS, dtype=torch.long),
                  KDObjective(alpha=0.5, divergence="reverse_kl").at(0, 1))
    with pytest.raises(ConfigError) as info:  # the objective itself refuses draws for reverse KL
        KDObjective(alpha=0.5, divergence="reverse_kl", samples=SAMPLES)
    assert info.value.key == "divergence"
