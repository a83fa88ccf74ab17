"""The mechanism analysis in the authors' form, from per-token arrays, and analysis.md.

PAPER.md ("Mechanism analysis"): the student's gold log-prob gain over its baseline by
quintile of the baseline's entropy, with the entropy change, and by 20 equal position
buckets. Here, from per-token float64 arrays
(`loss` = -log p(target), `entropy` in nats) of every model over the same tokens:

    per model      mean loss in each of 20 position buckets (loss and perplexity = exp(mean
                   loss) over all tokens are in analysis.json's `models`, beside today's metrics)
    gain pair      gain = loss_baseline - loss_student (= student - baseline gold log-prob),
                   loss_change = -gain, entropy_change = H_student - H_baseline, per token
    by position    the gain pair's means in each of the 20 buckets
    by difficulty  quintiles of the reference model's entropy (the authors' key) and, beside
                   them, of its loss; per quintile the gain pair's means and every model's
                   mean loss and entropy

Invariants: bucket b holds positions p with p * n // seq_len == b (equal within one
position); quintile edges are the reference's 20/40/60/80 % quantiles, bins [lo, hi) with
the outer edges at -inf / +inf, so every token falls in exactly one bin of each table.
"""

from __future__ import annotations

import math

import numpy as np

POSITION_BUCKETS = 20


def equal_position_buckets(seq_len: int, n: int = POSITION_BUCKETS) -> list[tuple[int, int]]:
    """[lo, hi) of n equal buckets over positions 0..seq_len-1; empty ones (seq_len < n) dropped."""
    edges = [math.ceil(b * seq_len / n) for b in range(n + 1)]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]


def quintile_edges(key: np.ndarray) -> list[tuple[float, float]]:
    """Five [lo, hi) bins at the 20/40/60/80 % quantiles of `key`, outer edges infinite."""
    inner = np.quantile(key, [0.2, 0.4, 0.6, 0.8]).tolist()
    return list(zip([-math.inf, *inner], [*inner, math.inf]))


def binned_means(key: np.ndarray, edges: list[tuple[float, float]], labels: list[str],
                 columns: dict[str, np.ndarray], stderr: tuple[str, ...] = ()) -> list[dict]:
    """One row per bin [lo, hi) of `key`: tokens, and the mean of every column over the bin
    (None when empty); columns named in `stderr` also get `NAME_stderr` (std / sqrt(n))."""
    rows = []
    for (lo, hi), label in zip(edges, labels):
        mask = (key >= lo) & (key < hi)
        n = int(mask.sum())
        row = {"bin": label, "lo": float(lo), "hi": float(hi), "tokens": n}
        for name, values in columns.items():
            row[name] = float(values[mask].mean()) if n else None
            if name in stderr:
                row[f"{name}_stderr"] = float(values[mask].std(ddof=1) / math.sqrt(n)) if n > 1 else None
        rows.append(row)
    return rows


def pair_columns(per_token: dict[str, dict[str, np.ndarray]], gain: tuple[str, str] | None) -> dict:
    """gain, loss_change and entropy_change of the gain pair (student, baseline), per token."""
    if gain is None:
        return {}
    student, baseline = per_token[gain[0]], per_token[gain[1]]
    return {"gain": baseline["loss"] - student["loss"], "loss_change": student["loss"] - baseline["loss"],
            "entropy_change": student["entropy"] - baseline["entropy"]}


def model_columns(per_token: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """loss/NAME and entropy/NAME for every model."""
    return {f"{metric}/{name}": arrays[metric] for name, arrays in per_token.items() for metric in ("loss", "entropy")}


def difficulty_table(key: np.ndarray, columns: dict[str, np.ndarray]) -> list[dict]:
    return binned_means(key, quintile_edges(key), [f"Q{i + 1}" for i in range(5)], columns,
                        stderr=("gain", "entropy_change"))


def authors_analysis(per_token: dict[str, dict[str, np.ndarray]], positions: np.ndarray, seq_len: int,
                     gain: tuple[str, str] | None, reference: str | None) -> dict:
    """The `paper` section of analysis.json (see the module docstring); `per_token[name]` holds
    `loss` and `entropy` arrays over the same tokens, `positions` each token's position."""
    buckets = equal_position_buckets(seq_len)
    labels = [f"{lo}-{hi - 1}" for lo, hi in buckets]
    section = {"position_buckets": len(buckets), "models": {}}
    for name, arrays in per_token.items():
        section["models"][name] = {"loss_by_position": binned_means(positions, buckets, labels,
                                                                    {"loss": arrays["loss"]})}
    pair = pair_columns(per_token, gain)
    if pair:
        section["gain"] = {"student": gain[0], "baseline": gain[1],
                           "by_position": binned_means(positions, buckets, labels, pair,
                                                       stderr=("gain", "entropy_change"))}
    if reference is not None:
        columns = {**pair, **model_columns(per_token)}
        ref = per_token[reference]
        section["difficulty"] = {"reference": reference,
                                 "by_entropy_quintile": difficulty_table(ref["entropy"], columns),
                                 "by_loss_quintile": difficulty_table(ref["loss"], columns)}
    return section


def fmt(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def difficulty_markdown(difficulty: dict, key: str, title: str, models: list[str], has_gain: bool) -> list[str]:
    rows = difficulty[key]
    header = ["quintile", "tokens", *(["gain", "loss change", "entropy change"] if has_gain else []),
              *(f"loss {m}" for m in models), *(f"entropy {m}" for m in models)]
    body = [[r["bin"], str(r["tokens"]),
             *([fmt(r["gain"]), fmt(r["loss_change"]), fmt(r["entropy_change"])] if has_gain else []),
             *(fmt(r[f"loss/{m}"]) for m in models), *(fmt(r[f"entropy/{m}"]) for m in models)] for r in rows]
    return [f"### {title} (reference: {difficulty['reference']})", "", *markdown_table(header, body)]


def analysis_markdown(result: dict) -> str:
    """analysis.md: today's per-model and per-pair means, then the authors' tables."""
    lines = [f"# Mechanism analysis on {result['set'] or 'the given tokens'}", "",
             f"{result['windows']} windows × {result['seq_len']} tokens = {result['tokens']:,} target tokens.", ""]
    models = list(result["models"])
    metrics = list(next(iter(result["models"].values())))
    lines += ["## Per model", "", *markdown_table(["model", *metrics], [
        [m, *(fmt(result["models"][m][k]) for k in metrics)] for m in models])]
    if result["pairs"]:
        pair_metrics = list(next(iter(result["pairs"].values())))
        lines += ["## Per pair", "", *markdown_table(["pair", *pair_metrics], [
            [p.replace("|", " vs "), *(fmt(v[k]) for k in pair_metrics)] for p, v in result["pairs"].items()])]
    paper = result["paper"]
    lines += [f"## Loss by position ({paper['position_buckets']} equal buckets)", ""]
    buckets = [r["bin"] for r in paper["models"][models[0]]["loss_by_position"]]
    gain_rows = paper.get("gain", {}).get("by_position")
    body = [[b, *(fmt(paper["models"][m]["loss_by_position"][i]["loss"]) for m in models),
             *([fmt(gain_rows[i]["gain"]), fmt(gain_rows[i]["entropy_change"])] if gain_rows else [])]
            for i, b in enumerate(buckets)]
    lines += markdown_table(["positions", *(f"loss {m}" for m in models),
                             *(["gain", "entropy change"] if gain_rows else [])], body)
    if "difficulty" in paper:
        lines += ["## By difficulty", ""]
        for key, title in (("by_entropy_quintile", "Quintiles of the reference's entropy, the authors' key"),
                           ("by_loss_quintile", "Quintiles of the reference's loss")):
            lines += difficulty_markdown(paper["difficulty"], key, title, models, gain_rows is not None)
    if gain_rows:
        lines += ["gain = student − baseline gold log-prob (nats, > 0: the student is better); "
                  "changes are student − baseline.", ""]
    return "\n".join(lines)


def plot_authors_analysis(result: dict, out_dir) -> list:
    """authors_analysis.png: loss by position bucket per model; with a gain pair and a reference,
    gain and entropy change by quintile of the reference's entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper = result["paper"]
    difficulty = paper.get("difficulty") if "gain" in paper else None
    fig, axes = plt.subplots(1, 2 if difficulty else 1, figsize=(13 if difficulty else 7, 4), squeeze=False)
    ax = axes[0, 0]
    for name, values in paper["models"].items():
        rows = [r for r in values["loss_by_position"] if r["loss"] is not None]
        ax.plot([(r["lo"] + r["hi"] - 1) / 2 for r in rows], [r["loss"] for r in rows], marker="o", label=name)
    ax.set_xlabel(f"position ({paper['position_buckets']} equal buckets)")
    ax.set_ylabel("loss (nats)")
    ax.legend()
    if difficulty:
        rows = [r for r in difficulty["by_entropy_quintile"] if r["tokens"]]
        x = np.arange(len(rows))
        ax = axes[0, 1]
        ax.bar(x - 0.2, [r["gain"] for r in rows], 0.4, yerr=[1.96 * (r["gain_stderr"] or 0) for r in rows],
               label="gain (log-prob)", color="tab:green", capsize=3)
        ax.bar(x + 0.2, [r["entropy_change"] for r in rows], 0.4, label="entropy change", color="tab:purple")
        ax.set_xticks(x, [r["bin"] for r in rows])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel(f"{difficulty['reference']} entropy quintile (Q5 = hardest)")
        ax.set_ylabel(f"{paper['gain']['student']} - {paper['gain']['baseline']} (nats)")
        ax.legend()
    fig.tight_layout()
    path = out_dir / "authors_analysis.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
