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


# ---- the authors' form: closed-form rows, crafted per-token arrays, one end-to-end call -----------

def two_level_logits(vocab: int, m: int, a: float) -> np.ndarray:
    """Logits of a row with m tokens at probability a and vocab - m at b = (1 - m a) / (vocab - m)."""
    b = (1 - m * a) / (vocab - m)
    return np.log(np.array([a] * m + [b] * (vocab - m)))[np.random.default_rng(m).permutation(vocab)]


def test_top_mass_entropy_and_effective_vocab_in_closed_form():
    vocab = 100
    cases = [(20, 0.04), (1, 0.9), (60, 0.015)]  # a > 1/V > b in each
    logits = torch.tensor(np.stack([two_level_logits(vocab, m, a) for m, a in cases]))
    got = model_token_metrics(logits, torch.zeros(3, dtype=torch.long))
    for row, (m, a) in enumerate(cases):
        b = (1 - m * a) / (vocab - m)
        top = lambda k: min(k, m) * a + max(0, k - m) * b  # noqa: E731
        assert float(got["top10_mass"][row]) == pytest.approx(top(10), rel=1e-12)
        assert float(got["top50_mass"][row]) == pytest.approx(top(50), rel=1e-12)
        assert float(got["effective_vocab"][row]) == m  # the authors' definition: tokens with p > 1/V
        assert float(got["entropy"][row]) == pytest.approx(-m * a * math.log(a) - (vocab - m) * b * math.log(b))
        assert float(got["max_prob"][row]) == pytest.approx(a)


def test_row_chunks_give_the_whole_rows_values():
    from distillab.evaluate.analysis import chunk_rows, chunked

    rng = np.random.default_rng(1)
    a, b = torch.tensor(rng.normal(size=(11, 60))), torch.tensor(rng.normal(size=(11, 60)) * 2)
    targets = torch.tensor(rng.integers(0, 60, size=11))
    whole_model, whole_pair = model_token_metrics(a, targets), pair_token_metrics(a, b)
    for rows in (1, 4, 11, 50):
        for whole, part in ((whole_model, chunked(model_token_metrics, (a, targets), rows)),
                            (whole_pair, chunked(pair_token_metrics, (a, b), rows))):
            assert set(part) == set(whole)
            for key in whole:
                assert torch.allclose(part[key], whole[key], rtol=1e-12, atol=1e-12), key
    assert chunk_rows(128_256) * 8 * 128_256 <= 1 << 28 and chunk_rows(10**12) == 1


def test_equal_position_buckets():
    from distillab.evaluate.analysis_tables import equal_position_buckets

    buckets = equal_position_buckets(2048)
    assert len(buckets) == 20 and buckets[0][0] == 0 and buckets[-1][1] == 2048
    assert {hi - lo for lo, hi in buckets} == {102, 103}
    for p in range(2048):  # bucket b holds exactly the positions with p * 20 // 2048 == b
        assert [b for b, (lo, hi) in enumerate(buckets) if lo <= p < hi] == [p * 20 // 2048]
    assert equal_position_buckets(40) == [(2 * b, 2 * b + 2) for b in range(20)]
    assert equal_position_buckets(7) == [(p, p + 1) for p in range(7)]  # fewer positions than buckets


def crafted_per_token(seq_len: int, windows: int) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(2)
    n = seq_len * windows
    positions = np.tile(np.arange(seq_len), windows)
    base_loss = 6.0 - 3.0 * positions / seq_len + rng.normal(0, 0.3, n)  # falls with context
    per_token = {
        "baseline": {"loss": base_loss, "entropy": rng.permutation(n) / 10.0},  # distinct: equal quintiles
        "student": {"loss": base_loss - rng.uniform(0, 0.2, n), "entropy": rng.uniform(0, 5, n)},
        "teacher": {"loss": base_loss - 0.5, "entropy": rng.permutation(n) / 7.0},
    }
    return per_token, positions


def test_authors_analysis_against_direct_formulas():
    from distillab.evaluate.analysis_tables import authors_analysis

    seq_len, windows = 40, 5
    per_token, positions = crafted_per_token(seq_len, windows)
    result = authors_analysis(per_token, positions, seq_len, ("student", "baseline"), "teacher")
    assert result["position_buckets"] == 20
    s, b = per_token["student"], per_token["baseline"]
    for name, arrays in per_token.items():
        rows = result["models"][name]["loss_by_position"]
        for bucket, row in enumerate(rows):  # bucket = position * 20 // seq_len
            picked = [arrays["loss"][i] for i in range(len(positions)) if positions[i] * 20 // seq_len == bucket]
            assert row["tokens"] == len(picked) == 2 * windows
            assert row["loss"] == pytest.approx(sum(picked) / len(picked), rel=1e-12)
    for bucket, row in enumerate(result["gain"]["by_position"]):
        idx = [i for i in range(len(positions)) if positions[i] * 20 // seq_len == bucket]
        gain = [b["loss"][i] - s["loss"][i] for i in idx]
        assert row["gain"] == pytest.approx(np.mean(gain), rel=1e-12)
        assert row["gain_stderr"] == pytest.approx(np.std(gain, ddof=1) / math.sqrt(len(gain)), rel=1e-9)
        assert row["entropy_change"] == pytest.approx(np.mean([s["entropy"][i] - b["entropy"][i] for i in idx]))
    difficulty = result["difficulty"]
    assert difficulty["reference"] == "teacher"
    for key, table in (("entropy", difficulty["by_entropy_quintile"]), ("loss", difficulty["by_loss_quintile"])):
        order = np.argsort(per_token["teacher"][key], kind="stable")  # distinct values: 5 groups of 40
        for q, (row, idx) in enumerate(zip(table, np.split(order, 5))):
            assert row["bin"] == f"Q{q + 1}" and row["tokens"] == 40
            assert row["entropy_change"] == pytest.approx(np.mean(s["entropy"][idx] - b["entropy"][idx]), rel=1e-12)
            assert row["loss_change"] == pytest.approx(np.mean(s["loss"][idx] - b["loss"][idx]), rel=1e-12)
            assert row["gain"] == pytest.approx(-row["loss_change"], rel=1e-12)
            for name, arrays in per_token.items():
                assert row[f"loss/{name}"] == pytest.approx(np.mean(arrays["loss"][idx]), rel=1e-12)
                assert row[f"entropy/{name}"] == pytest.approx(np.mean(arrays["entropy"][idx]), rel=1e-12)
    alone = authors_analysis({"teacher": per_token["teacher"]}, positions, seq_len, None, None)
    assert set(alone) == {"position_buckets", "models"}  # no gain pair, no reference: no pair tables


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, cache_dir):
    from distillab.config import config_from_dict
    from distillab.train import train

    from conftest import tiny_run

    folder = tmp_path_factory.mktemp("short")
    return train(config_from_dict(tiny_run(folder, cache_dir, "short", train={"token_budget": 3 * 4 * 32})),
                 log=lambda *a: None).final_dir


def direct_per_token(model_dir, tokens: np.ndarray, seq_len: int, starts: np.ndarray, vocab: int) -> dict:
    """-log p(target) and entropy per token, float64, computed here without distillab's metrics."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    window = torch.tensor(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=window[:, :-1]).logits[..., :vocab].double().reshape(-1, vocab)
    log_p = logits - torch.logsumexp(logits, -1, keepdim=True)
    loss = -log_p.gather(1, window[:, 1:].reshape(-1, 1)).squeeze(1)
    return {"loss": loss.numpy(), "entropy": -(log_p.exp() * log_p).sum(-1).numpy()}


@pytest.mark.slow
def test_analyze_cli_writes_the_authors_tables(tiny_teacher, short_run, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from distillab.data.tokenizer import load_tokenizer
    from distillab.evaluate.analysis import analysis_tokens
    from distillab.evaluate.perplexity import window_starts

    out = tmp_path / "analysis"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-m", "distillab.cli", "analyze", "--model", f"student={short_run}",
                             "--model", f"teacher={tiny_teacher}", "--model", f"baseline={tiny_teacher}",
                             "--max-windows", "3", "--out", str(out)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    analysis = json.loads((out / "analysis.json").read_text())
    assert set(analysis["pairs"]) == {"student|teacher", "student|baseline", "teacher|baseline"}
    seq_len = analysis["seq_len"]
    tokenizer = load_tokenizer(short_run)
    tokens = analysis_tokens("validation", short_run, tokenizer)
    starts = window_starts(len(tokens), seq_len, 3)
    direct = {name: direct_per_token(path, tokens, seq_len, starts, len(tokenizer))
              for name, path in (("student", short_run), ("baseline", tiny_teacher))}
    positions = np.tile(np.arange(seq_len), len(starts))
    for name, arrays in direct.items():
        model = analysis["models"][name]
        assert model["perplexity"] == pytest.approx(math.exp(arrays["loss"].mean()), rel=1e-5)
        assert model["loss"] == pytest.approx(arrays["loss"].mean(), rel=1e-5)
        for bucket, row in enumerate(analysis["paper"]["models"][name]["loss_by_position"]):
            assert row["loss"] == pytest.approx(arrays["loss"][positions * 20 // seq_len == bucket].mean(), rel=1e-5)
    quintiles = analysis["paper"]["difficulty"]["by_entropy_quintile"]
    edges = np.quantile(direct["baseline"]["entropy"], [0.2, 0.4, 0.6, 0.8])
    which = np.searchsorted(edges, direct["baseline"]["entropy"], side="right")  # [lo, hi) bins
    change = direct["student"]["entropy"] - direct["baseline"]["entropy"]
    for q, row in enumerate(quintiles):
        assert row["tokens"] == int((which == q).sum())
        assert row["entropy_change"] == pytest.approx(change[which == q].mean(), rel=1e-4, abs=1e-6)
    assert abs(quintiles[0]["entropy_change"]) > 1e-3  # two different models: a real change
    markdown = (out / "analysis.md").read_text()
    assert "## Loss by position (20 equal buckets)" in markdown and "Quintiles of the reference's entropy" in markdown
    assert (out / "authors_analysis.png").stat().st_size > 1000


def test_unknown_reference_is_one_line_error():
    from distillab.errors import DistillabError
    from distillab.evaluate.analysis import check_reference

    check_reference("baseline", {"student": 0, "baseline": 0})
    with pytest.raises(DistillabError, match=r"--reference: 'teacher' is not among --model names \(student, baseline\)"):
        check_reference("teacher", {"student": 0, "baseline": 0})
