"""Mechanism analysis: how a student's next-token distributions relate to its teacher's and
its baseline's, and where (which tokens, which positions) distillation changed its predictions.

Per model, averaged over target tokens:
    entropy (nats), max_prob, gt_logprob, gt_rank (0 = top-1), top1_acc,
    effective_vocab (tokens with p > 1/V), top10_mass, top50_mass
Per pair (a, b):
    kl_ab = KL(p_a || p_b), kl_ba, js (Jensen-Shannon, nats), top1_agreement,
    top5_jaccard, logit_cosine, top10_spearman (rank correlation of a's and b's logits over
    a's top-10 tokens), prob_overlap = sum_v min(p_a, p_b)
    loss = -gt_logprob and perplexity = exp(loss) over all analysed tokens
Gain (student vs baseline): student minus baseline ground-truth log-prob per token, binned by
quintile of the baseline's entropy (token difficulty) and by position in the window.
The authors' form (`paper` in analysis.json, see analysis_tables.py): loss in 20 equal
position buckets per model, gain and entropy change by 20 buckets and by difficulty quintile.

The metric functions are pure and take logits [N, V]; `analyze` runs models over windows,
in row chunks (`chunked`) so that float64 copies of the logits stay small.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distillab.data.loader import stack_windows
from distillab.errors import DistillabError
from distillab.evaluate.analysis_tables import analysis_markdown, authors_analysis, plot_authors_analysis
from distillab.evaluate.perplexity import safe_exp, vocab_limit, window_starts
from distillab.files import default_cache_dir, write_json_atomic, write_text_atomic
from distillab.layout import ANALYSIS
from distillab.models import load_causal_lm

MODEL_METRICS = ("entropy", "max_prob", "gt_logprob", "gt_rank", "top1_acc", "effective_vocab", "top10_mass",
                 "top50_mass")
PAIR_METRICS = ("kl_ab", "kl_ba", "js", "top1_agreement", "top5_jaccard", "logit_cosine", "top10_spearman",
                "prob_overlap")

# the authors' analysis: 2,048-token sequences (200: the CLI's --max-windows default); their pairs
AUTHORS_SEQ_LEN = 2048
DEFAULT_PAIRS = (("student", "teacher"), ("student", "baseline"), ("teacher", "baseline"))


def model_token_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token metrics of one model: each value is a tensor [N]."""
    logits = logits.double()
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    vocab = logits.shape[-1]
    gt_logit = logits.gather(1, targets[:, None])
    sorted_p = p.topk(min(50, vocab), dim=-1).values  # the 50 largest, descending (all a full sort gave)
    return {
        "entropy": -(p * log_p).sum(-1),
        "max_prob": sorted_p[:, 0],
        "gt_logprob": log_p.gather(1, targets[:, None]).squeeze(1),
        "gt_rank": (logits > gt_logit).sum(-1).double(),
        "top1_acc": (logits.argmax(-1) == targets).double(),
        "effective_vocab": (p > 1.0 / vocab).sum(-1).double(),
        "top10_mass": sorted_p[:, :10].sum(-1),
        "top50_mass": sorted_p[:, :50].sum(-1),
    }


def _spearman_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row of two [N, k] tensors (no tie correction)."""
    rx = x.argsort(-1).argsort(-1).double()
    ry = y.argsort(-1).argsort(-1).double()
    rx = rx - rx.mean(-1, keepdim=True)
    ry = ry - ry.mean(-1, keepdim=True)
    return (rx * ry).sum(-1) / (rx.norm(dim=-1) * ry.norm(dim=-1))


def pair_token_metrics(logits_a: torch.Tensor, logits_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token agreement metrics between two models' logits [N, V]."""
    a, b = logits_a.double(), logits_b.double()
    log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.log((p + q) / 2)
    top5_a, top5_b = a.topk(5, -1).indices, b.topk(5, -1).indices
    shared = (top5_a[:, :, None] == top5_b[:, None, :]).any(-1).sum(-1).double()
    top10 = a.topk(10, -1).indices
    return {
        "kl_ab": (p * (log_p - log_q)).sum(-1),
        "kl_ba": (q * (log_q - log_p)).sum(-1),
        "js": 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).double(),
        "top5_jaccard": shared / (10 - shared),
        "logit_cosine": (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-8),
        "top10_spearman": _spearman_rows(a.gather(1, top10), b.gather(1, top10)),
        "prob_overlap": torch.minimum(p, q).sum(-1),
    }


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """[0,1), [1,4), [4,16), [16,64), ... up to seq_len: early positions have little context."""
    edges = [0, 1]
    while edges[-1] * 4 < seq_len:
        edges.append(edges[-1] * 4)
    edges.append(seq_len)
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]


def binned_gain(gain: np.ndarray, key: np.ndarray, edges: list[tuple[float, float]], labels: list[str]) -> list[dict]:
    rows = []
    for (lo, hi), label in zip(edges, labels):
        mask = (key >= lo) & (key < hi)
        values = gain[mask]
        n = int(mask.sum())
        rows.append({
            "bin": label,
            "lo": float(lo),
            "hi": float(hi),
            "tokens": n,
            "mean_gain": float(values.mean()) if n else None,
            "stderr": float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
        })
    return rows


def gain_analysis(student_lp: np.ndarray, baseline_lp: np.ndarray, baseline_entropy: np.ndarray,
                  positions: np.ndarray, seq_len: int) -> dict:
    """Student minus baseline ground-truth log-prob, by baseline-entropy quintile and by position."""
    gain = student_lp - baseline_lp
    quantiles = np.quantile(baseline_entropy, [0.2, 0.4, 0.6, 0.8])
    edges = list(zip([-np.inf, *quantiles], [*quantiles, np.inf]))
    by_entropy = binned_gain(gain, baseline_entropy, edges, [f"Q{i + 1}" for i in range(5)])
    buckets = position_buckets(seq_len)
    by_position = binned_gain(gain, positions, buckets, [f"{lo}-{hi - 1}" for lo, hi in buckets])
    return {"mean_gain": float(gain.mean()), "tokens": int(gain.size), "by_entropy_quintile": by_entropy,
            "by_position": by_position}


def chunk_rows(vocab: int, budget_bytes: int = 1 << 28) -> int:
    """Rows per chunk so that one float64 [rows, vocab] tensor stays within `budget_bytes`."""
    return max(1, budget_bytes // (8 * vocab))


def chunked(fn, tensors: tuple[torch.Tensor, ...], rows: int) -> dict[str, torch.Tensor]:
    """fn applied to row slices of `tensors`, per-row outputs concatenated: the same values as
    fn on the whole rows (every metric here is row-wise), with float64 copies of at most
    `rows` rows of logits alive at a time."""
    parts = [fn(*(t[i : i + rows] for t in tensors)) for i in range(0, len(tensors[0]), rows)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def batch_logits(loaded: dict, window: torch.Tensor, vocab_size: int | None) -> dict[str, torch.Tensor]:
    """Each model's logits [rows, V] over window[:, :-1], cut to the tokenizer's vocabulary."""
    logits = {}
    for name, model in loaded.items():
        out = model(input_ids=window[:, :-1], use_cache=False).logits
        limit = vocab_limit(model, vocab_size)
        if limit:
            out = out[..., :limit]
        logits[name] = out.reshape(-1, out.shape[-1])
    return logits


@torch.inference_mode()
def analyze(
    models: dict[str, Path],
    tokens: np.ndarray,
    seq_len: int,
    max_windows: int,
    out_dir: Path,
    pairs: list[tuple[str, str]] | None = None,
    gain: tuple[str, str] | None = None,
    batch_size: int = 4,
    vocab_size: int | None = None,
    device: torch.device = torch.device("cpu"),
    set_name: str = "",
    reference: str | None = None,
    log=print,
    plots: bool = True,
    dtype: str = "float32",
) -> dict:
    """Run every model over the same windows; write analysis.json, analysis.md and (`plots`) the plots
    into `out_dir`. `reference` (default: the gain pair's baseline) sets token difficulty."""
    reference = reference or (gain[1] if gain else None)
    check_reference(reference, models)
    weights = getattr(torch, dtype)  # the models' weights and logits; metrics are float64 either way
    loaded = {name: load_causal_lm(path, device, key=f"--model {name}", dtype=weights).eval()
              for name, path in models.items()}
    pairs = pairs or []
    starts = window_starts(len(tokens), seq_len, max_windows)
    sums_model = {name: {m: 0.0 for m in MODEL_METRICS} for name in loaded}
    sums_pair = {f"{a}|{b}": {m: 0.0 for m in PAIR_METRICS} for a, b in pairs}
    per_token: dict[str, dict[str, list]] = {name: {"loss": [], "entropy": []} for name in loaded}
    count = 0
    for i in range(0, len(starts), batch_size):
        window = stack_windows(tokens, starts[i : i + batch_size], seq_len + 1).to(device)
        targets = window[:, 1:].reshape(-1)
        logits = batch_logits(loaded, window, vocab_size)
        rows = chunk_rows(max(z.shape[-1] for z in logits.values()))
        for name, z in logits.items():
            metrics = chunked(model_token_metrics, (z, targets), rows)
            for metric, values in metrics.items():
                sums_model[name][metric] += float(values.sum())
            per_token[name]["loss"].append((-metrics["gt_logprob"]).cpu().numpy())
            per_token[name]["entropy"].append(metrics["entropy"].cpu().numpy())
        for a, b in pairs:
            for metric, values in chunked(pair_token_metrics, (logits[a], logits[b]), rows).items():
                sums_pair[f"{a}|{b}"][metric] += float(values.sum())
        count += targets.numel()
    arrays = {name: {k: np.concatenate(v) for k, v in parts.items()} for name, parts in per_token.items()}
    positions = np.tile(np.arange(seq_len), len(starts))
    result = {
        "set": set_name,
        "seq_len": seq_len,
        "windows": int(len(starts)),
        "tokens": count,
        "checkpoints": {name: str(path) for name, path in models.items()},
        "models": {name: model_means(sums, count) for name, sums in sums_model.items()},
        "pairs": {name: {m: v / count for m, v in sums.items()} for name, sums in sums_pair.items()},
    }
    if gain:
        result["gain"] = {"student": gain[0], "baseline": gain[1], **gain_analysis(
            -arrays[gain[0]]["loss"], -arrays[gain[1]]["loss"], arrays[gain[1]]["entropy"], positions, seq_len)}
    result["paper"] = authors_analysis(arrays, positions, seq_len, gain, reference)
    write_analysis(result, out_dir, plots)
    log(f"analyze: {count:,} tokens over {len(starts)} windows; wrote {out_dir / 'analysis.json'}, analysis.md"
        + (" and plots" if plots else ""))
    return result


def model_means(sums: dict[str, float], count: int) -> dict[str, float]:
    """Today's per-token means, then loss = -mean gt_logprob and perplexity = exp(loss)."""
    means = {m: v / count for m, v in sums.items()}
    return {**means, "loss": -means["gt_logprob"], "perplexity": safe_exp(-means["gt_logprob"])}


def write_analysis(result: dict, out_dir: Path, plots: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / ANALYSIS, result)
    write_text_atomic(out_dir / "analysis.md", analysis_markdown(result))
    if plots:
        plot_analysis(result, out_dir)


def plot_analysis(result: dict, out_dir: Path) -> list[Path]:
    """One PNG per view: per-model metrics, per-pair metrics, gain by difficulty, gain by position,
    and the authors' form (authors_analysis.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def grid(table: dict, metrics: tuple, title: str, file: str):
        names = list(table)
        if not names:
            return
        fig, axes = plt.subplots(2, 4, figsize=(14, 6))
        for ax, metric in zip(axes.flat, metrics):
            ax.bar(range(len(names)), [table[n][metric] for n in names], color="tab:blue")
            ax.set_xticks(range(len(names)), [n.replace("|", "\nvs ") for n in names], fontsize=8)
            ax.set_title(metric, fontsize=10)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out_dir / file, dpi=100)
        plt.close(fig)
        written.append(out_dir / file)

    grid(result["models"], MODEL_METRICS, f"per-model metrics on {result['set']}", "models.png")
    grid(result["pairs"], PAIR_METRICS, f"pairwise agreement on {result['set']}", "pairs.png")
    if "gain" in result:
        gain = result["gain"]
        for key, file, xlabel in (("by_entropy_quintile", "gain_by_difficulty.png", "baseline entropy quintile (Q5 = hardest)"),
                                  ("by_position", "gain_by_position.png", "position in window")):
            rows = [r for r in gain[key] if r["mean_gain"] is not None]
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.bar([r["bin"] for r in rows], [r["mean_gain"] for r in rows],
                   yerr=[1.96 * (r["stderr"] or 0) for r in rows], color="tab:green", capsize=3)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{gain['student']} - {gain['baseline']} log-prob (nats)")
            ax.set_title("distillation gain per token (95% CI)")
            fig.tight_layout()
            fig.savefig(out_dir / file, dpi=100)
            plt.close(fig)
            written.append(out_dir / file)
    return written + plot_authors_analysis(result, out_dir)


def parse_models(items: list[str]) -> dict[str, Path]:
    """NAME=DIR arguments -> {name: directory}, each an HF model directory."""
    models = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DistillabError(f"--model: {item!r} must look like NAME=DIR (e.g. student=runs/s/final)")
        if not Path(path, "config.json").is_file():
            raise DistillabError(f"--model {name}: {path} is not an HF model directory (no config.json)")
        models[name] = Path(path)
    return models


def check_reference(reference: str | None, models: dict) -> None:
    if reference is not None and reference not in models:
        raise DistillabError(f"--reference: {reference!r} is not among --model names ({', '.join(models)})")


def parse_pair(text: str, models: dict, option: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not sep or a not in models or b not in models:
        raise DistillabError(f"{option}: {text!r} must be A:B with A and B among --model names ({', '.join(models)})")
    return a, b


def analysis_tokens(set_name: str, first: Path, tokenizer) -> np.ndarray:
    """The tokens of an evaluation set, tokenized with the models' shared tokenizer."""
    from distillab.checkpoint import read_meta
    from distillab.data.shards import load_prepared, prepare_corpus_tokens
    from distillab.evaluate.sets import resolve_set

    eval_set = resolve_set(set_name)
    if eval_set.split is None:
        return prepare_corpus_tokens(eval_set.corpus, tokenizer, default_cache_dir()).tokens("all")
    meta = read_meta(first)
    if not meta.get("data_dir"):
        raise DistillabError(f"--set {set_name}: {first} does not name its training data; use another set")
    return load_prepared(Path(meta["data_dir"])).tokens(eval_set.split)


def analyze_checkpoints(model_args: list[str], pair_args: list[str] | None, gain_arg: str | None, set_name: str,
                        seq_len: int | None, max_windows: int, out: str, batch_size: int, device: str,
                        reference: str | None = None, plots: bool = True, log=print, dtype: str = "float32") -> dict:
    """`distillab analyze`: checkpoints that share a tokenizer, compared on one set; windows of
    `seq_len` (default: the authors' 2,048, or the model's positions if fewer)."""
    import json

    from distillab.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from distillab.runtime import resolve_device, setup_runtime

    setup_runtime(None)
    models = parse_models(model_args)
    check_reference(reference, models)
    first = next(iter(models.values()))
    tokenizer = load_tokenizer(first)
    for name, path in models.items():
        if tokenizer_fingerprint(load_tokenizer(path)) != tokenizer_fingerprint(tokenizer):
            raise DistillabError(f"--model {name}: {path} has another tokenizer than {first}; models must share one")
    pairs = [parse_pair(p, models, "--pairs") for p in pair_args or []] or [
        (a, b) for a, b in DEFAULT_PAIRS if a in models and b in models]
    gain = parse_pair(gain_arg, models, "--gain") if gain_arg else (
        ("student", "baseline") if "student" in models and "baseline" in models else None)
    positions = json.loads((first / "config.json").read_text()).get("max_position_embeddings") or 256
    seq_len = seq_len or min(AUTHORS_SEQ_LEN, int(positions))
    return analyze(models, analysis_tokens(set_name, first, tokenizer), seq_len, max_windows, Path(out),
                   pairs=pairs, gain=gain, batch_size=batch_size, vocab_size=len(tokenizer),
                   device=resolve_device(device, key="--device"), set_name=set_name, reference=reference,
                   plots=plots, log=log, dtype=dtype)
