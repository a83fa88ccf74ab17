"""Results of a sweep: one table (CSV + Parquet), teacher-student labels, gains, and a report.

Gains are paired: each student is compared with the baseline that has its model, token
budget and seeds (same initial weights, same batches). For a loss, gain = baseline - student
(positive: distillation helped); for an accuracy, gain = student - baseline. Aggregates:
in-domain and OOD gain = mean loss gain over the sets of that domain; downstream gain = mean
accuracy gain over tasks.

Relationship labels of a (teacher, student) pair:
    by_loss    strong-to-weak if the teacher's held-out loss is below the student baseline's by
               more than the tolerance, weak-to-strong if above by more, else same-level
    by_params  by non-embedding parameters (teacher more / equal / fewer)
    by_tokens  by training tokens
"""

from __future__ import annotations

import base64
import csv
import json
import math
import statistics
from pathlib import Path

from distillab.config import ModelConfig, config_from_dict
from distillab.data.shards import write_json_atomic
from distillab.errors import DataError
from distillab.models import resolve_spec

HELD_OUT = "validation"


def label_by_loss(teacher_loss: float, baseline_loss: float, tolerance: float) -> str:
    if teacher_loss < baseline_loss - tolerance:
        return "strong-to-weak"
    if teacher_loss > baseline_loss + tolerance:
        return "weak-to-strong"
    return "same-level"


def label_by_size(teacher: float, student: float) -> str:
    if teacher > student:
        return "strong-to-weak"
    if teacher < student:
        return "weak-to-strong"
    return "same-level"


def _t_quantile_975(df: int) -> float:
    """Two-sided 95 % Student-t quantile (table for small df, normal beyond)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
    if df in table:
        return table[df]
    smaller = [k for k in table if k < df]
    return table[max(smaller)] if df <= 30 else 1.96


def mean_ci(values: list[float]) -> dict:
    """Mean with a 95 % confidence interval (Student t) over seeds."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    n = len(values)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "sd": None}
    mean = statistics.fmean(values)
    if n == 1:
        return {"mean": mean, "lo": None, "hi": None, "n": 1, "sd": None}
    sd = statistics.stdev(values)
    half = _t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "sd": sd}


def collect_rows(sweep_dir: Path) -> list[dict]:
    """One row per run with its settings, eval results and compute."""
    plan_path = Path(sweep_dir) / "plan.json"
    if not plan_path.exists():
        raise DataError(f"{plan_path}: not found; run `distillab sweep GRID --out {sweep_dir}` first")
    planned = json.loads(plan_path.read_text())
    rows = []
    for run in planned["runs"]:
        cfg = config_from_dict(run["config"])
        spec = resolve_spec(cfg.model)
        run_dir = Path(run["config"]["run_dir"])
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
        report = {}
        if (run_dir / "final" / "eval.json").exists():
            report = json.loads((run_dir / "final" / "eval.json").read_text())
        info = run["info"]
        vocab = cfg.data.tokenizer.vocab_size
        row = {
            "run_id": run["id"],
            "role": run["role"],
            "status": status.get("status", "pending"),
            "error": status.get("error"),
            "model": info["model"],
            "non_embedding_parameters": spec.non_embedding_parameters(),
            "tokens": info["tokens"],
            "init_seed": cfg.train.init_seed,
            "data_seed": cfg.train.data_seed,
            "teacher_id": info.get("teacher"),
            "teacher_model": info.get("teacher_model"),
            "teacher_tokens": info.get("teacher_tokens"),
            "teacher_kind": info.get("teacher_kind") if run["role"] != "teacher" else None,
            "kind": info.get("teacher_kind") if run["role"] == "teacher" else None,
            "alpha": cfg.kd.alpha,
            "temperature": cfg.kd.temperature,
            "divergence": "forward_kl",
            "top_k": cfg.kd.top_k,
            "hard_labels": cfg.kd.hard_labels,
            "train_flops": spec.training_flops_per_token(vocab, cfg.train.seq_len) * cfg.train.token_budget,
            "teacher_inference_flops": (
                resolve_spec(ModelConfig(name=info["teacher_model"])).forward_flops_per_token(vocab, cfg.train.seq_len)
                * cfg.train.token_budget if info.get("teacher_model") else 0.0
            ),
        }
        for name, result in report.get("sets", {}).items():
            row[f"loss/{name}"] = result["loss"]
            row[f"ppl/{name}"] = result["ppl"]
            row[f"domain/{name}"] = result.get("domain")
        for name, result in report.get("tasks", {}).items():
            row[f"acc/{name}"] = result["value"]
            row[f"acc_stderr/{name}"] = result["stderr"]
        rows.append(row)
    return rows


def add_gains_and_labels(rows: list[dict], tolerance: float) -> list[dict]:
    by_id = {r["run_id"]: r for r in rows}
    baselines = {(r["model"], r["tokens"], r["init_seed"], r["data_seed"]): r for r in rows if r["role"] == "baseline"}
    for row in rows:
        if row["role"] != "student":
            continue
        baseline = baselines.get((row["model"], row["tokens"], row["init_seed"], row["data_seed"]))
        teacher = by_id.get(row["teacher_id"])
        row["baseline_id"] = baseline["run_id"] if baseline else None
        if teacher:
            row["label_by_params"] = label_by_size(teacher["non_embedding_parameters"], row["non_embedding_parameters"])
            row["label_by_tokens"] = label_by_size(teacher["tokens"], row["tokens"])
            row["teacher_loss/validation"] = teacher.get(f"loss/{HELD_OUT}")
        if not baseline:
            continue
        if teacher and teacher.get(f"loss/{HELD_OUT}") is not None and baseline.get(f"loss/{HELD_OUT}") is not None:
            row["label_by_loss"] = label_by_loss(teacher[f"loss/{HELD_OUT}"], baseline[f"loss/{HELD_OUT}"], tolerance)
        domains: dict[str, list[float]] = {"in-domain": [], "ood": []}
        for key in list(row):
            if key.startswith("loss/") and baseline.get(key) is not None and row[key] is not None:
                name = key[5:]
                gain = baseline[key] - row[key]
                row[f"gain/{name}"] = gain
                domain = row.get(f"domain/{name}")
                if domain in domains:
                    domains[domain].append(gain)
            if key.startswith("acc/") and baseline.get(key) is not None and row[key] is not None:
                row[f"gain_acc/{key[4:]}"] = row[key] - baseline[key]
        task_gains = [row[k] for k in row if k.startswith("gain_acc/")]
        row["gain/in_domain"] = statistics.fmean(domains["in-domain"]) if domains["in-domain"] else None
        row["gain/ood"] = statistics.fmean(domains["ood"]) if domains["ood"] else None
        row["gain/downstream"] = statistics.fmean(task_gains) if task_gains else None
    return rows


def write_table(rows: list[dict], sweep_dir: Path) -> tuple[Path, Path | None]:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    csv_path = Path(sweep_dir) / "results.csv"
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in columns})
    tmp.replace(csv_path)
    parquet_path = None
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: [r.get(c) for r in rows] for c in columns})
        parquet_path = Path(sweep_dir) / "results.parquet"
        pq.write_table(table, parquet_path)
    except ImportError:
        pass
    return csv_path, parquet_path


def summarize(rows: list[dict]) -> list[dict]:
    """Seed-aggregated gains per (student model, tokens, teacher, alpha, temperature)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["role"] == "student" and row.get("baseline_id"):
            key = (row["model"], row["tokens"], row["teacher_model"], row["teacher_tokens"], row["alpha"],
                   row["temperature"], row["top_k"], row["hard_labels"], row["teacher_kind"])
            groups.setdefault(key, []).append(row)
    out = []
    for key, members in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        entry = dict(zip(("model", "tokens", "teacher_model", "teacher_tokens", "alpha", "temperature", "top_k",
                          "hard_labels", "teacher_kind"), key))
        entry["label_by_loss"] = members[0].get("label_by_loss")
        for metric in ("in_domain", "ood", "downstream"):
            entry[metric] = mean_ci([m.get(f"gain/{metric}") for m in members])
        out.append(entry)
    return out


def _fmt(ci: dict) -> str:
    if ci["mean"] is None:
        return "—"
    if ci["lo"] is None:
        return f"{ci['mean']:+.4f} (n=1)"
    return f"{ci['mean']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}] (n={ci['n']})"


def make_plots(summary: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if not summary:
        return paths
    # one line per teacher and objective (temperature, top-k, hard labels)
    teachers = sorted({(s["teacher_model"], s["teacher_tokens"], s["temperature"], s["top_k"], s["hard_labels"])
                       for s in summary}, key=str)

    def errorbars(entries, metric):
        means = [e[metric]["mean"] for e in entries]
        low = [e[metric]["mean"] - e[metric]["lo"] if e[metric]["lo"] is not None else 0 for e in entries]
        high = [e[metric]["hi"] - e[metric]["mean"] if e[metric]["hi"] is not None else 0 for e in entries]
        return means, [low, high]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=False)
    for ax, metric in zip(axes, ("in_domain", "ood", "downstream")):
        for teacher in teachers:
            entries = sorted([s for s in summary if (s["teacher_model"], s["teacher_tokens"], s["temperature"],
                                                     s["top_k"], s["hard_labels"]) == teacher
                              and s[metric]["mean"] is not None], key=lambda s: s["alpha"])
            if entries:
                means, err = errorbars(entries, metric)
                objective = "hard" if teacher[4] else f"T={teacher[2]:g}" + (f" k={teacher[3]}" if teacher[3] else "")
                ax.errorbar([e["alpha"] for e in entries], means, yerr=err, marker="o", capsize=3,
                            label=f"{teacher[0]} @ {teacher[1]:,} {objective}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("alpha")
        ax.set_title(f"{metric.replace('_', '-')} gain vs alpha")
    axes[0].set_ylabel("gain over baseline (nats; accuracy for downstream)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "gain_vs_alpha.png", dpi=100)
    plt.close(fig)
    paths.append(out_dir / "gain_vs_alpha.png")

    best = best_alpha(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, axis_key, title in ((axes[0], "teacher_params", "teacher size"), (axes[1], "teacher_tokens", "teacher tokens")):
        for metric, color in (("in_domain", "tab:blue"), ("ood", "tab:orange"), ("downstream", "tab:green")):
            points = [(b[axis_key], b[metric]) for b in best if b.get(metric) is not None]
            if points:
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color, label=metric)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.set_title(f"gain at the best alpha vs {title}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "gain_vs_teacher.png", dpi=100)
    plt.close(fig)
    paths.append(out_dir / "gain_vs_teacher.png")
    return paths


def best_alpha(summary: list[dict]) -> list[dict]:
    """Per (student, teacher): the alpha with the best mean OOD-and-in-domain gain."""
    from distillab.models import LADDER

    out = []
    keys = sorted({(s["model"], s["tokens"], s["teacher_model"], s["teacher_tokens"]) for s in summary}, key=str)
    for key in keys:
        entries = [s for s in summary if (s["model"], s["tokens"], s["teacher_model"], s["teacher_tokens"]) == key]
        scored = [e for e in entries if e["in_domain"]["mean"] is not None]
        if not scored:
            continue
        top = max(scored, key=lambda e: e["in_domain"]["mean"] + (e["ood"]["mean"] or 0))
        out.append({"model": key[0], "tokens": key[1], "teacher_model": key[2], "teacher_tokens": key[3],
                    "teacher_params": LADDER[key[2]].non_embedding_parameters(), "alpha": top["alpha"],
                    "in_domain": top["in_domain"]["mean"], "ood": top["ood"]["mean"],
                    "downstream": top["downstream"]["mean"], "label_by_loss": top["label_by_loss"]})
    return out


def write_report(sweep_dir: str | Path, tolerance: float | None = None, about: list[str] | None = None,
                 title: str | None = None) -> Path:
    """report.md + report.html: verdicts first, then `about` (free lines), gains, teachers, plots."""
    from distillab.verdicts import verdict_sections

    sweep_dir = Path(sweep_dir)
    planned = json.loads((sweep_dir / "plan.json").read_text()) if (sweep_dir / "plan.json").exists() else {}
    spec = planned.get("spec", {})
    if tolerance is None:
        tolerance = spec.get("label_tolerance", 0.02)
    rows = add_gains_and_labels(collect_rows(sweep_dir), tolerance)
    csv_path, parquet_path = write_table(rows, sweep_dir)
    summary = summarize(rows)
    verdict_lines, verdict_data = verdict_sections(rows, tolerance, spec.get("verdict_margin", 0.02))
    write_json_atomic(sweep_dir / "summary.json", {"groups": summary, "best_alpha": best_alpha(summary),
                                                   "verdicts": verdict_data})
    plots = make_plots(summary, sweep_dir)
    lines = [f"# {title or 'Sweep report: ' + planned.get('name', sweep_dir.name)}", ""]
    lines += verdict_lines
    if about:
        lines += ["## About this run", ""] + about + [""]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "blocked", "running", "pending")}
    lines.append("Runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".")
    failed = [r for r in rows if r["status"] == "failed"]
    for row in failed:
        lines.append(f"- failed: `{row['run_id']}` ({row['role']} {row['model']}): {row['error']}")
    lines += ["", "## Gains over the matched baseline", "",
              "Gain = baseline − student loss (nats; positive = distillation helped), mean over seeds with a 95 % "
              "interval (Student t). Downstream: accuracy difference.", "",
              "| student | tokens | teacher | teacher tokens | label (loss) | α | T | top-k | in-domain | OOD | downstream |",
              "|---|---:|---|---:|---|---:|---:|---:|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['model']} | {s['tokens']:,} | {s['teacher_model']} | {s['teacher_tokens']:,} | "
                     f"{s['label_by_loss'] or '—'} | {s['alpha']} | {'hard' if s['hard_labels'] else s['temperature']} | "
                     f"{s['top_k'] or '—'} | {_fmt(s['in_domain'])} | "
                     f"{_fmt(s['ood'])} | {_fmt(s['downstream'])} |")
    kinds = [r for r in rows if r["role"] == "teacher" and r.get("kind") in ("wsd-branch", "independent", "wsd-trunk")]
    if any(r["kind"] == "wsd-branch" for r in kinds):
        lines += ["", "## WSD-branched vs independently trained teachers", "",
                  "Held-out loss of each teacher; a branch is a short decay from the trunk's stable phase.", "",
                  "| model | tokens | seed | kind | held-out loss | training FLOPs |", "|---|---:|---:|---|---:|---:|"]
        for r in sorted(kinds, key=lambda r: (r["model"], r["tokens"], str(r["kind"]))):
            loss = r.get(f"loss/{HELD_OUT}")
            lines.append(f"| {r['model']} | {r['tokens']:,} | {r['init_seed']} | {r['kind']} | "
                         f"{f'{loss:.4f}' if loss is not None else '—'} | {r['train_flops']:.3g} |")
    lines += ["", "## Best α per teacher", "", "| student | teacher | teacher tokens | label | best α | in-domain | OOD |",
              "|---|---|---:|---|---:|---:|---:|"]
    for b in best_alpha(summary):
        ood = f"{b['ood']:+.4f}" if b["ood"] is not None else "—"
        lines.append(f"| {b['model']} | {b['teacher_model']} | {b['teacher_tokens']:,} | {b['label_by_loss'] or '—'} "
                     f"| {b['alpha']} | {b['in_domain']:+.4f} | {ood} |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", f"Full table: `{csv_path.name}`" + (f", `{parquet_path.name}`" if parquet_path else "") + "."]
    markdown = "\n".join(lines) + "\n"
    (sweep_dir / "report.md").write_text(markdown)
    html = _to_html(markdown, sweep_dir)
    (sweep_dir / "report.html").write_text(html)
    return sweep_dir / "report.md"


def _to_html(markdown: str, folder: Path) -> str:
    """A self-contained HTML page: tables and headings from the markdown, plots inlined as base64."""
    import html
    import re

    def inline(text: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))

    out = ["<!doctype html><meta charset='utf-8'><title>distillab report</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style>"]
    in_table = False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-:") for c in cells):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{inline(c)}</th>" for c in cells) + "</tr>")
                continue
            out.append("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("!["):
            name = line[line.index("(") + 1 : line.rindex(")")]
            data = base64.b64encode((folder / name).read_bytes()).decode()
            out.append(f"<p><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'></p>")
        elif line.startswith("### "):
            out.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out) + "\n"
