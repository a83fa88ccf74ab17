"""Every KD objective against an independent float64 formula written here in NumPy, gradients
by central differences: divergences, truncation (top-k, top-p, tail bucket), label smoothing,
loss scales, sparse teachers, the fused LM head, and alpha / temperature schedules."""

import math

import numpy as np
import pytest
import torch

from distillab.losses import Head, distillation_loss, run_fused, sparse_distillation_loss
import dataclasses

from distillab.losses.divergences import DIVERGENCES as REGISTRY
from distillab.losses.divergences import value_only
from distillab.losses.teacher_rows import truncate_dense
from distillab.losses.objective import KDObjective, Schedule

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


def log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def divergence(name, p, q, beta=0.5, lam=0.1):
    """D(p, q) on one row of probabilities, straight from the definitions."""
    def kl(a, b):
        mask = a > 0
        return float(np.sum(a[mask] * (np.log(a[mask]) - np.log(b[mask]))))
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_forward_kl":
        return kl(p, lam * p + (1 - lam) * q)
    if name == "skew_reverse_kl":
        return kl(q, lam * q + (1 - lam) * p)
    if name == "tvd":
        return 0.5 * float(np.abs(p - q).sum())
    raise ValueError(name)


def teacher_side(t_row, temperature, top_k=None, top_p=None, tail=False):
    """(categories of the kept tokens, teacher probabilities over them [+ tail]) at temperature T."""
    p1 = np.exp(log_softmax(t_row))
    order = np.argsort(-t_row, kind="stable")
    if top_k is None and top_p is None:
        return np.arange(len(t_row)), np.exp(log_softmax(t_row / temperature))
    if top_k is not None:
        kept = order[:top_k]
    else:
        cumulative = np.cumsum(p1[order]) - p1[order]
        kept = order[cumulative < top_p]
    masses = p1[kept]
    if tail:  # the dropped tokens' mass, summed (not 1 - kept mass: exact however small)
        masses = np.append(masses, np.delete(p1, kept).sum())
    tempered = np.exp(log_softmax(np.log(np.maximum(masses, 1e-300)) / temperature))
    return kept, tempered


def student_side(s_row, temperature, kept, divergence_name, truncated, tail):
    q = np.exp(log_softmax(s_row / temperature))
    if not truncated:
        return q
    if tail:
        return np.append(q[kept], 1 - q[kept].sum())
    if divergence_name == "forward_kl":
        return q[kept]  # the whole-vocabulary student at the kept tokens (forward KL's convention)
    return q[kept] / q[kept].sum()


def objective(s, t, y, alpha, temperature=1.0, name="forward_kl", top_k=None, top_p=None, tail=False,
              eps=0.0, loss_scale="mix", scale_by_t2=True):
    """The whole loss in float64, row by row."""
    ce_terms, kd_terms = [], []
    for row in range(s.shape[0]):
        if y[row] < 0:
            continue
        log_q1 = log_softmax(s[row])
        ce_terms.append(-(1 - eps) * log_q1[y[row]] - eps * log_q1.mean())
        if name == "hard":
            kd_terms.append(-log_q1[np.argmax(t[row])])
            continue
        kept, p = teacher_side(t[row], temperature, top_k, top_p, tail)
        q = student_side(s[row], temperature, kept, name, top_k is not None or top_p is not None, tail)
        kd_terms.append(divergence(name, p, q))
    c = temperature**2 if scale_by_t2 and name != "hard" else 1.0
    ce, kd = np.mean(ce_terms), c * np.mean(kd_terms)
    w_ce, w_kd = {"mix": (1 - alpha, alpha), "ce_fixed": (1, alpha), "kd_fixed": (1 - alpha, 1)}[loss_scale]
    return w_ce * ce + w_kd * kd, ce, kd


def numeric_gradient(f, s, eps=1e-6):
    grad = np.zeros_like(s)
    for index in np.ndindex(*s.shape):
        up, down = s.copy(), s.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = (f(up) - f(down)) / (2 * eps)
    return grad


def inputs(seed=0, rows=6, vocab=9):
    rng = np.random.default_rng(seed)
    s, t = rng.normal(scale=2.0, size=(rows, vocab)), rng.normal(scale=2.0, size=(rows, vocab))
    y = rng.integers(0, vocab, size=rows)
    y[1] = -100
    return s, t, y


def check(kwargs, numpy_kwargs, seed=0, tol=1e-7):
    s, t, y = inputs(seed)
    leaf = torch.tensor(s, requires_grad=True)
    out = distillation_loss(leaf, torch.tensor(t), torch.tensor(y), **kwargs)
    total, ce, kd = objective(s, t, y, **numpy_kwargs)
    assert float(out.total.detach()) == pytest.approx(total, rel=1e-10, abs=1e-12)
    assert float(out.ce) == pytest.approx(ce, rel=1e-10) and float(out.kd) == pytest.approx(kd, rel=1e-9, abs=1e-12)
    out.total.backward()
    np.testing.assert_allclose(leaf.grad.numpy(), numeric_gradient(lambda z: objective(z, t, y, **numpy_kwargs)[0], s),
                               atol=tol)
    return out


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_each_divergence_matches_its_definition(name, temperature):
    check({"alpha": 0.6, "temperature": temperature, "divergence": name},
          {"alpha": 0.6, "temperature": temperature, "name": name})


@pytest.mark.parametrize("name", DIVERGENCES + ["hard"])
def test_each_divergence_is_zero_when_student_equals_teacher(name):
    s, _, y = inputs(1)
    same = torch.tensor(s)
    if name == "hard":  # CE against its own argmax: the student's log-prob of its own top token
        out = distillation_loss(same.clone(), same, torch.tensor(y), alpha=1.0, divergence="hard")
        assert float(out.kd) == pytest.approx(float(-torch.log_softmax(same, -1).max(-1).values[[0, 2, 3, 4, 5]]
                                                    .mean()), rel=1e-12)
        return
    out = distillation_loss(same.clone().requires_grad_(True), same, torch.tensor(y), alpha=1.0, divergence=name,
                            temperature=1.5)
    assert abs(float(out.kd)) < 1e-12


def test_jsd_tends_to_the_kls_at_the_ends_of_beta():
    s, t, y = inputs(2)
    kls = {name: float(distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=1.0,
                                         divergence=name).kd) for name in ("forward_kl", "reverse_kl")}
    small = distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=1.0, divergence="jsd",
                              beta=1e-5).kd
    large = distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=1.0, divergence="jsd",
                              beta=1 - 1e-5).kd
    assert float(small) / 1e-5 == pytest.approx(kls["forward_kl"], rel=1e-3)
    assert float(large) / 1e-5 == pytest.approx(kls["reverse_kl"], rel=1e-3)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("truncation", [{"top_k": 3}, {"top_p": 0.6}, {"top_k": 3, "tail": True},
                                        {"top_p": 0.6, "tail": True}])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_truncated_teachers(name, truncation, temperature):
    tail = truncation.get("tail", False)
    torch_kwargs = {k: v for k, v in truncation.items() if k != "tail"}
    check({"alpha": 0.5, "temperature": temperature, "divergence": name, "tail_bucket": tail, **torch_kwargs},
          {"alpha": 0.5, "temperature": temperature, "name": name, **truncation})


@pytest.mark.parametrize("eps", [0.1, 0.3])
@pytest.mark.parametrize("loss_scale", ["mix", "ce_fixed", "kd_fixed"])
def test_label_smoothing_and_loss_scales(eps, loss_scale):
    check({"alpha": 0.3, "label_smoothing": eps, "loss_scale": loss_scale},
          {"alpha": 0.3, "eps": eps, "loss_scale": loss_scale})


def test_t_squared_scaling_can_be_turned_off_and_hard_labels_are_never_scaled():
    check({"alpha": 0.5, "temperature": 3.0, "scale_by_t2": False},
          {"alpha": 0.5, "temperature": 3.0, "scale_by_t2": False})
    check({"alpha": 0.5, "divergence": "hard"}, {"alpha": 0.5, "name": "hard"})


@pytest.mark.parametrize("name", DIVERGENCES)
def test_a_sparse_teacher_equals_the_dense_truncated_one(name):
    """A top-K capture (K = 6) used at k = 4: exactly the dense teacher truncated to its top 4."""
    s, t, y = inputs(3, rows=5, vocab=11)
    rows = truncate_dense(torch.tensor(t), 6, None)
    leaf = torch.tensor(s, requires_grad=True)
    sparse = sparse_distillation_loss(leaf, rows.indices, rows.logprobs, rows.log_tail, torch.tensor(y), alpha=0.5,
                                      temperature=2.0, divergence=name, top_k=4)
    sparse.total.backward()
    total, _, _ = objective(s, t, y, 0.5, 2.0, name, top_k=4)
    assert float(sparse.total.detach()) == pytest.approx(total, rel=1e-10)
    np.testing.assert_allclose(leaf.grad.numpy(),
                               numeric_gradient(lambda z: objective(z, t, y, 0.5, 2.0, name, top_k=4)[0], s), atol=1e-7)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_a_tail_below_float32_resolution_is_kept(name):
    """A peaked teacher (tail mass ~1e-12) with the tail bucket: the tail is the dropped tokens'
    mass, not 1 - kept mass (which float32 rounds to 0, making reverse KL infinite). Online in
    float32, and from sparse rows (a top-6 capture) at k = 6 and k = 4, against float64."""
    s, t, y = inputs(5, rows=5, vocab=11)
    t[:, 0] += 30.0
    labels, student = torch.tensor(y), torch.tensor(s, dtype=torch.float32)
    captured = truncate_dense(torch.tensor(t, dtype=torch.float32), 6, None)
    assert float(captured.log_tail.max()) < -25  # far below float32's resolution of 1 (~ -16.6)
    for temperature in (1.0, 2.0):
        for k in (6, 4):
            expected = objective(s, t, y, 0.5, temperature, name, top_k=k, tail=True)[2]
            common = dict(alpha=0.5, temperature=temperature, divergence=name, top_k=k, tail_bucket=True)
            leaf = student.clone().requires_grad_(True)
            online = distillation_loss(leaf, torch.tensor(t, dtype=torch.float32), labels, **common)
            online.total.backward()
            sparse = sparse_distillation_loss(student.clone(), captured.indices, captured.logprobs, captured.log_tail,
                                              labels, **common)
            assert float(online.kd) == pytest.approx(expected, rel=1e-4)
            assert float(sparse.kd) == pytest.approx(expected, rel=1e-4)
            assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_lm_head_equals_the_unfused_loss(temperature):
    """Hidden states + output layers (never materialising logits) vs logits = h @ W^T, float32."""
    rng = np.random.default_rng(4)
    h, w = torch.tensor(rng.normal(size=(3, 40, 16)), dtype=torch.float32), \
        torch.tensor(rng.normal(scale=0.3, size=(70, 16)), dtype=torch.float32)
    h_t, w_t = torch.tensor(rng.normal(size=(3, 40, 12)), dtype=torch.float32), \
        torch.tensor(rng.normal(scale=0.3, size=(64, 12)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 64, size=(3, 40)))
    y[0, :7] = -100
    a_h, a_w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    plain = distillation_loss(a_h @ a_w[:64].T, h_t @ w_t.T, y, alpha=0.4, temperature=temperature)
    plain.total.backward()
    b_h, b_w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fused = run_fused(Head(b_h, b_w), Head(h_t, w_t), y, KDObjective(alpha=0.4, temperature=temperature).at(0, 1))
    fused.total.backward()
    assert float(fused.total.detach()) == pytest.approx(float(plain.total.detach()), rel=1e-5)
    torch.testing.assert_close(b_h.grad, a_h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_w.grad, a_w.grad, rtol=1e-5, atol=1e-5)
    assert b_w.grad[64:].abs().max() == 0  # padding rows of the output layer get no gradient


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("truncation", [{}, {"top_k": 3}, {"top_p": 0.6, "tail_bucket": True}])
def test_the_autograd_fallback_agrees_with_each_closed_form(name, truncation, monkeypatch):
    """A divergence registered without u (and without a fused kernel) is differentiated by autograd,
    chunk by chunk: the same loss and gradient as its closed form, at T = 1 and T = 2."""
    entry = REGISTRY[name]
    monkeypatch.setitem(REGISTRY, "by_autograd", dataclasses.replace(entry, kernel=value_only(entry.kernel),
                                                                     fused=None))
    s, t, y = (torch.tensor(x) for x in inputs(6))
    for temperature in (1.0, 2.0):
        outs = []
        for divergence in (name, "by_autograd"):
            leaf = s.clone().requires_grad_(True)
            out = distillation_loss(leaf, t, y, alpha=0.5, temperature=temperature, divergence=divergence,
                                    **truncation)
            out.total.backward()
            outs.append((float(out.total.detach()), leaf.grad))
        assert outs[1][0] == pytest.approx(outs[0][0], rel=1e-12)
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-9, atol=1e-12)


def test_every_registered_divergence_is_tested_here():
    """The divergences over one vocabulary; those comparing two tokenizers (an `aligned` kernel) have
    their float64 formulas in tests/test_cross_tokenizer.py."""
    assert {name for name, entry in REGISTRY.items() if entry.aligned is None} == {*DIVERGENCES, "hard"}


def test_objective_keys_and_labels_of_the_teacher_signal_fields():
    sampled = KDObjective(alpha=0.5, samples=12, proposal_temperature=1.5)
    assert sampled.key() == "alpha=0.5,samples=12,proposal_temperature=1.5"
    assert sampled.label() == "α 0.5, forward KL, T 1, sampled 12 at τ 1.5"
    mixed = KDObjective(alpha=0.5, teacher_weights=[3.0, 1.0], teacher_mix="route")
    assert mixed.key() == "alpha=0.5,teacher_weights=3/1,teacher_mix=route"
    assert mixed.label(with_alpha=False) == "forward KL, T 1, 2 teachers, routed per document 0.75/0.25"
    assert mixed.teacher_shares(2) == [0.75, 0.25] and KDObjective().teacher_shares(3) == [1 / 3] * 3
    assert KDObjective.from_dict(mixed.as_dict()) == mixed


def test_ambiguous_combinations_are_refused():
    s, t, y = (torch.tensor(x) for x in inputs(5))
    for kwargs, word in (({"top_k": 3, "top_p": 0.5}, "top_k or kd.top_p, not both"), ({"tail_bucket": True}, "tail_bucket"),
                         ({"divergence": "hard", "top_k": 3}, "argmax"), ({"divergence": "nope"}, "divergence")):
        with pytest.raises(ValueError, match=word):
            distillation_loss(s, t, y, alpha=0.5, **kwargs)


def test_schedules_follow_their_shapes():
    assert Schedule().value(0.4, 0.7) == 0.4
    assert Schedule("linear", start=0.0).value(0.4, 0.25) == pytest.approx(0.1)
    assert Schedule("cosine", start=0.0, end=1.0).value(0.4, 0.5) == pytest.approx(0.5)
    assert Schedule("cosine", start=0.0, end=1.0).value(0.4, 1 / 3) == pytest.approx(0.5 * (1 - math.cos(math.pi / 3)))
    wsd = Schedule("wsd", warmup_fraction=0.2, decay_fraction=0.5)
    assert [wsd.value(0.8, x) for x in (0.0, 0.1, 0.2, 0.5, 0.75, 1.0)] == pytest.approx([0, 0.4, 0.8, 0.8, 0.4, 0])
    objective = KDObjective(alpha=0.6, loss_scale="kd_fixed", alpha_schedule=Schedule("linear", start=0.0))
    now = objective.at(5, 11)  # progress 0.5
    assert (now.alpha, now.ce_weight, now.kd_weight) == pytest.approx((0.3, 0.7, 1.0))


def test_objective_keys_are_stable_and_complete():
    a = KDObjective(alpha=0.5, temperature=2.0, top_k=20)
    assert a.key() == KDObjective(alpha=0.5, temperature=2.0, top_k=20).key() != KDObjective(alpha=0.5).key()
    assert a.setting().key() == KDObjective(alpha=0.2, temperature=2.0, top_k=20).setting().key()
    assert KDObjective.from_dict(a.as_dict()) == a
    assert a.label() == "α 0.5, forward KL, T 2, top-20"
    assert KDObjective(alpha=0.4, divergence="hard").label(with_alpha=False) == "hard labels"
