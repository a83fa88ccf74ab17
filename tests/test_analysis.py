"""Mechanism metrics against direct formulas on small hand-made distributions."""

import math

import numpy as np
import pytest
import torch

from distillab.evaluate.analysis import gain_analysis, model_token_metrics, pair_token_metrics, position_buckets


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


A = np.array([[2.0, 1.0, 0.0, -1.0, -3.0, 0.5, 0.2, 0.1, -0.5, 1.5, 0.0, -2.0],
              [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
B = np.array([[1.0, 2.0, 0.0, -1.0, -2.0, 0.4, 0.3, 0.0, -0.6, 1.4, 0.1, -1.0],
              [3.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
Y = np.array([1, 6])


def test_model_metrics():
    got = model_token_metrics(torch.tensor(A), torch.tensor(Y))
    for row in range(2):
        p = softmax(A[row])
        assert float(got["entropy"][row]) == pytest.approx(-sum(x * math.log(x) for x in p))
        assert float(got["max_prob"][row]) == pytest.approx(p.max())
        assert float(got["gt_logprob"][row]) == pytest.approx(math.log(p[Y[row]]))
        assert float(got["gt_rank"][row]) == sum(1 for x in A[row] if x > A[row][Y[row]])
        assert float(got["effective_vocab"][row]) == sum(1 for x in p if x > 1 / 12)
        assert float(got["top10_mass"][row]) == pytest.approx(sum(sorted(p, reverse=True)[:10]))
        assert float(got["top50_mass"][row]) == pytest.approx(1.0)
    assert got["top1_acc"].tolist() == [0.0, 0.0]
    assert float(got["gt_rank"][1]) == 0  # a uniform row: nothing beats the target
    assert float(got["entropy"][1]) == pytest.approx(math.log(12))


def test_pair_metrics():
    got = pair_token_metrics(torch.tensor(A), torch.tensor(B))
    for row in range(2):
        p, q = softmax(A[row]), softmax(B[row])
        m = (p + q) / 2
        kl = lambda x, y: sum(a * math.log(a / b) for a, b in zip(x, y))  # noqa: E731
        assert float(got["kl_ab"][row]) == pytest.approx(kl(p, q))
        assert float(got["kl_ba"][row]) == pytest.approx(kl(q, p))
        assert float(got["js"][row]) == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m))
        assert float(got["prob_overlap"][row]) == pytest.approx(sum(min(a, b) for a, b in zip(p, q)))
        cos = A[row] @ B[row] / (np.linalg.norm(A[row]) * np.linalg.norm(B[row]) or 1)
        if np.linalg.norm(A[row]) > 0:
            assert float(got["logit_cosine"][row]) == pytest.approx(cos)
        top5a = set(np.argsort(-A[row], kind="stable")[:5])
        top5b = set(np.argsort(-B[row], kind="stable")[:5])
        if row == 0:  # ties in row 1 make the top-5 set ambiguous
            assert float(got["top5_jaccard"][row]) == pytest.approx(len(top5a & top5b) / len(top5a | top5b))
            top10 = np.argsort(-A[row])[:10]
            ra = np.argsort(np.argsort(A[row][top10]))
            rb = np.argsort(np.argsort(B[row][top10]))
            d2 = ((ra - rb) ** 2).sum()
            assert float(got["top10_spearman"][row]) == pytest.approx(1 - 6 * d2 / (10 * (100 - 1)))
    assert float(got["top1_agreement"][0]) == 0.0  # argmax 0 vs 1
    same = pair_token_metrics(torch.tensor(A), torch.tensor(A))
    assert float(same["kl_ab"][0]) == pytest.approx(0, abs=1e-12) and float(same["top5_jaccard"][0]) == 1.0
    assert float(same["top10_spearman"][0]) == pytest.approx(1.0) and float(same["prob_overlap"][0]) == pytest.approx(1)


def test_gain_bins():
    rng = np.random.default_rng(0)
    entropy = rng.uniform(0, 5, size=1000)
    positions = np.tile(np.arange(100), 10)
    baseline = -entropy
    student = baseline + np.where(entropy > 4, 0.5, 0.0)  # gains only on the hardest tokens
    result = gain_analysis(student, baseline, entropy, positions, 100)
    quintiles = result["by_entropy_quintile"]
    assert [r["tokens"] for r in quintiles] == [200] * 5
    assert quintiles[0]["mean_gain"] == pytest.approx(0.0)
    assert quintiles[4]["mean_gain"] == pytest.approx(0.5 * np.mean(entropy[entropy >= np.quantile(entropy, 0.8)] > 4))
    assert result["mean_gain"] == pytest.approx(np.mean(student - baseline))
    assert sum(r["tokens"] for r in result["by_position"]) == 1000
    assert position_buckets(256) == [(0, 1), (1, 4), (4, 16), (16, 64), (64, 256)]
