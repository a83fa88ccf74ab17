"""The KD objective against a float64 formula written independently here, in NumPy."""

import numpy as np
import pytest
import torch

import distillab.losses as losses
import distillab.losses.fused as fused
from distillab.losses import distillation_loss


def numpy_objective(s, t, y, alpha, temperature, ignore_index=-100):
    """(1-a) CE + a T^2 KL(p_T || p_S) over target tokens, float64, from the definitions."""
    s = s.reshape(-1, s.shape[-1]).astype(np.float64)
    t = t.reshape(-1, t.shape[-1]).astype(np.float64)
    y = y.reshape(-1)
    ce_terms, kl_terms = [], []
    for row in range(s.shape[0]):
        if y[row] == ignore_index:
            continue
        z = s[row] - s[row].max()
        log_q = z - np.log(np.exp(z).sum())
        ce_terms.append(-log_q[y[row]])
        zs, zt = s[row] / temperature, t[row] / temperature
        log_qt = zs - zs.max() - np.log(np.exp(zs - zs.max()).sum())
        log_pt = zt - zt.max() - np.log(np.exp(zt - zt.max()).sum())
        kl_terms.append(np.sum(np.exp(log_pt) * (log_pt - log_qt)))
    ce, kl = np.mean(ce_terms), np.mean(kl_terms)
    return (1 - alpha) * ce + alpha * temperature**2 * kl, ce, temperature**2 * kl


def numeric_gradient(objective, s, eps=1e-6):
    """Central differences of objective(student logits) -> float, element by element."""
    grad = np.zeros_like(s)
    it = np.nditer(s, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        up, down = s.copy(), s.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (objective(up) - objective(down)) / (2 * eps)
    return grad


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_matches_float64_formula_with_masking(alpha, temperature):
    rng = np.random.default_rng(0)
    s = rng.normal(scale=3.0, size=(2, 5, 13))
    t = rng.normal(scale=3.0, size=(2, 5, 13))
    y = rng.integers(0, 13, size=(2, 5))
    y[0, :2] = -100
    y[1, 4] = -100
    student = torch.tensor(s, requires_grad=True)
    out = distillation_loss(student, torch.tensor(t), torch.tensor(y), alpha=alpha, temperature=temperature)
    total, ce, kd = numpy_objective(s, t, y, alpha, temperature)
    assert out.n_tokens == 7
    assert float(out.total.detach()) == pytest.approx(total, rel=1e-12, abs=1e-12)
    assert float(out.ce) == pytest.approx(ce, rel=1e-12)
    assert float(out.kd) == pytest.approx(kd, rel=1e-10, abs=1e-12)
    out.total.backward()
    expected = numeric_gradient(lambda z: numpy_objective(z, t, y, alpha, temperature)[0], s)
    np.testing.assert_allclose(student.grad.numpy(), expected, atol=1e-8)
    # masked positions receive no gradient
    assert np.all(student.grad.numpy()[0, :2] == 0)


def test_chunked_rows_match_unchunked(monkeypatch):
    rng = np.random.default_rng(1)
    s = torch.tensor(rng.normal(size=(3, 37, 50)), dtype=torch.float32)
    t = torch.tensor(rng.normal(size=(3, 37, 50)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 50, size=(3, 37)))
    results = []
    for chunk in (7, 4096):
        monkeypatch.setattr(fused, "CHUNK_ROWS", chunk)
        student = s.clone().requires_grad_(True)
        out = distillation_loss(student, t, y, alpha=0.4, temperature=2.0)
        out.total.backward()
        results.append((float(out.total.detach()), student.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1])


def test_upstream_gradient_scales(monkeypatch):
    rng = np.random.default_rng(2)
    s = rng.normal(size=(4, 9))
    t = rng.normal(size=(4, 9))
    y = rng.integers(0, 9, size=4)
    a = torch.tensor(s, requires_grad=True)
    distillation_loss(a, torch.tensor(t), torch.tensor(y), alpha=0.3).total.backward()
    b = torch.tensor(s, requires_grad=True)
    (0.25 * distillation_loss(b, torch.tensor(t), torch.tensor(y), alpha=0.3).total).backward()
    torch.testing.assert_close(b.grad, 0.25 * a.grad)


def test_gradients_reach_only_the_student():
    from distillab.models import LADDER, build_model

    student = build_model(LADDER["cpu-0.1m"], 64, 16, seed=0)
    teacher = build_model(LADDER["cpu-0.3m"], 64, 16, seed=1).eval().requires_grad_(False)
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        teacher_logits = teacher(input_ids=ids[:, :-1]).logits
    student_logits = student(input_ids=ids[:, :-1]).logits
    out = distillation_loss(student_logits, teacher_logits, ids[:, 1:], alpha=0.7, temperature=2.0)
    out.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not out.ce.requires_grad and not out.kd.requires_grad


def test_alpha_zero_ignores_teacher_and_equals_cross_entropy():
    rng = np.random.default_rng(3)
    s = torch.tensor(rng.normal(size=(6, 11)))
    y = torch.tensor(rng.integers(0, 11, size=6))
    with_teacher = distillation_loss(s, torch.tensor(rng.normal(size=(6, 11))), y, alpha=0.0)
    without = distillation_loss(s, None, y, alpha=0.0)
    expected = torch.nn.functional.cross_entropy(s, y)
    assert float(with_teacher.total) == pytest.approx(float(expected), rel=1e-12)
    assert float(without.total) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": 0.5, "temperature": 0.0}, "temperature"),
    ],
)
def test_bad_arguments(kwargs, message):
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=message):
        distillation_loss(s, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), **kwargs)


def test_shape_mismatch_and_missing_teacher():
    with pytest.raises(ValueError, match="slice both"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), alpha=0.5)
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(torch.zeros(2, 3), None, torch.zeros(2, dtype=torch.long), alpha=0.5)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_overwriting_the_logits_gives_the_same_loss_and_gradient(temperature):
    rng = np.random.default_rng(4)
    s = rng.normal(scale=2.0, size=(2, 40, 30)).astype(np.float32)
    t = torch.tensor(rng.normal(scale=2.0, size=(2, 40, 30)).astype(np.float32))
    y = torch.tensor(rng.integers(0, 30, size=(2, 40)))
    y[1, 5:9] = -100
    leaf = torch.tensor(s, requires_grad=True)
    expected = distillation_loss(leaf, t, y, alpha=0.6, temperature=temperature)
    expected.total.backward()

    weight = torch.eye(30, requires_grad=True)  # logits produced by an op, as in a model
    inputs = torch.tensor(s)
    logits = inputs @ weight
    got = distillation_loss(logits, t, y, alpha=0.6, temperature=temperature, overwrite_logits=True)
    got.total.backward()
    assert float(got.total.detach()) == pytest.approx(float(expected.total.detach()), rel=1e-6)
    # d(loss)/d(weight) = inputs^T @ d(loss)/d(logits)
    expected_weight_grad = inputs.reshape(-1, 30).T @ leaf.grad.reshape(-1, 30)
    torch.testing.assert_close(weight.grad, expected_weight_grad, rtol=1e-5, atol=1e-6)


def test_extreme_logits_stay_finite_and_exact():
    """Targets with probabilities far below float32's range still give the exact CE."""
    s = torch.zeros(3, 5)
    s[:, 0] = 200.0  # every other token has log-probability of about -200
    y = torch.tensor([1, 2, 0])
    t = torch.zeros(3, 5)
    t[:, 4] = 150.0
    out = distillation_loss(s.clone().requires_grad_(True), t, y, alpha=0.5)
    total, ce, kd = numpy_objective(s.numpy(), t.numpy(), y.numpy(), 0.5, 1.0)
    assert float(out.ce) == pytest.approx(ce, rel=1e-5)
    assert float(out.kd) == pytest.approx(kd, rel=1e-5)


def numpy_top_k_objective(s, t, y, alpha, temperature, k):
    """(1-a) CE + a T^2 KL(p_k || q_T), p_k = teacher softmax renormalised over its top k."""
    s = s.reshape(-1, s.shape[-1]).astype(np.float64)
    t = t.reshape(-1, t.shape[-1]).astype(np.float64)
    y = y.reshape(-1)
    ce_terms, kl_terms = [], []
    for row in range(s.shape[0]):
        if y[row] == -100:
            continue
        z = s[row] - s[row].max()
        ce_terms.append(-(z[y[row]] - np.log(np.exp(z).sum())))
        top = np.argsort(-t[row], kind="stable")[:k]
        pk = np.exp(t[row][top] / temperature - (t[row][top] / temperature).max())
        pk /= pk.sum()
        zs = s[row] / temperature
        log_qt = zs - zs.max() - np.log(np.exp(zs - zs.max()).sum())
        kl_terms.append(np.sum(pk * (np.log(pk) - log_qt[top])))
    ce, kl = np.mean(ce_terms), np.mean(kl_terms)
    return (1 - alpha) * ce + alpha * temperature**2 * kl, ce, temperature**2 * kl


@pytest.mark.parametrize("k, temperature", [(1, 1.0), (3, 1.0), (3, 2.0), (13, 0.5)])
def test_top_k_matches_float64_formula(k, temperature):
    rng = np.random.default_rng(5)
    s = rng.normal(scale=2.0, size=(3, 4, 13))
    t = rng.normal(scale=2.0, size=(3, 4, 13))
    y = rng.integers(0, 13, size=(3, 4))
    y[2, 1] = -100
    student = torch.tensor(s, requires_grad=True)
    out = distillation_loss(student, torch.tensor(t), torch.tensor(y), alpha=0.6, temperature=temperature, top_k=k)
    total, ce, kd = numpy_top_k_objective(s, t, y, 0.6, temperature, k)
    assert float(out.total.detach()) == pytest.approx(total, rel=1e-10)
    assert float(out.kd) == pytest.approx(kd, rel=1e-9, abs=1e-12)
    out.total.backward()
    grad = numeric_gradient(lambda z: numpy_top_k_objective(z, t, y, 0.6, temperature, k)[0], s)
    np.testing.assert_allclose(student.grad.numpy(), grad, atol=1e-7)
    reference = losses.reference_distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=0.6,
                                                   temperature=temperature, top_k=k)
    assert float(reference.total) == pytest.approx(total, rel=1e-10)


def test_hard_labels_are_cross_entropy_against_the_teacher_argmax():
    rng = np.random.default_rng(6)
    s = torch.tensor(rng.normal(size=(7, 9)))
    t = torch.tensor(rng.normal(size=(7, 9)))
    y = torch.tensor(rng.integers(0, 9, size=7))
    out = distillation_loss(s, t, y, alpha=0.3, divergence="hard")
    ce = torch.nn.functional.cross_entropy(s, y)
    hard = torch.nn.functional.cross_entropy(s, t.argmax(-1))
    assert float(out.kd) == pytest.approx(float(hard), rel=1e-12)
    assert float(out.total) == pytest.approx(float(0.7 * ce + 0.3 * hard), rel=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, y, alpha=0.3, divergence="hard", temperature=2.0)
    with pytest.raises(ValueError, match="top_k"):
        distillation_loss(s, t, y, alpha=0.3, top_k=0)
