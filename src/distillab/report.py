"""A sweep's report: verdicts first, then gains, teachers, best alpha and plots (report.md + report.html).

The rows and gains come from `distillab.study.results`, the verdicts from `distillab.study.verdicts`.
"""

from __future__ import annotations

import base64
from pathlib import Path

from distillab.files import write_json_atomic, write_text_atomic
from distillab.layout import SweepLayout
from distillab.study.results import HELD_OUT, add_gains_and_labels, collect_rows, summarize, write_table
from distillab.signals.describe import signals_section
from distillab.study.stats import format_ci, mean_ci
from distillab.sweep.execute import read_plan


def make_plots(summary: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if not summary:
        return paths
    # one line per teacher and objective
    teachers = sorted({(s["teacher_model"], s["teacher_tokens"], s["objective"]) for s in summary}, key=str)

    def errorbars(entries, metric):
        means = [e[metric]["mean"] for e in entries]
        low = [e[metric]["mean"] - e[metric]["lo"] if e[metric]["lo"] is not None else 0 for e in entries]
        high = [e[metric]["hi"] - e[metric]["mean"] if e[metric]["hi"] is not None else 0 for e in entries]
        return means, [low, high]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=False)
    for ax, metric in zip(axes, ("in_domain", "ood", "downstream")):
        for teacher in teachers:
            entries = sorted([s for s in summary if (s["teacher_model"], s["teacher_tokens"], s["objective"]) == teacher
                              and s[metric]["mean"] is not None], key=lambda s: s["alpha"])
            if entries:
                means, err = errorbars(entries, metric)
                ax.errorbar([e["alpha"] for e in entries], means, yerr=err, marker="o", capsize=3,
                            label=f"{teacher[0]} @ {teacher[1]:,} {teacher[2]}")
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
    """Per (student, teacher, objective): the alpha with the best mean in-domain + OOD gain."""
    from distillab.models import LADDER

    out = []
    keys = sorted({(s["model"], s["tokens"], s["teacher_model"], s["teacher_tokens"], s["objective"])
                   for s in summary}, key=str)
    for key in keys:
        entries = [s for s in summary
                   if (s["model"], s["tokens"], s["teacher_model"], s["teacher_tokens"], s["objective"]) == key]
        scored = [e for e in entries if e["in_domain"]["mean"] is not None]
        if not scored:
            continue
        top = max(scored, key=lambda e: e["in_domain"]["mean"] + (e["ood"]["mean"] or 0))
        out.append({"model": key[0], "tokens": key[1], "teacher_model": key[2], "teacher_tokens": key[3],
                    "objective": key[4], "teacher_params": LADDER[key[2]].non_embedding_parameters(),
                    "alpha": top["alpha"], "in_domain": top["in_domain"]["mean"], "ood": top["ood"]["mean"],
                    "downstream": top["downstream"]["mean"], "label_by_loss": top["label_by_loss"]})
    return out


def regime_plot(rows: list[dict], out_dir: Path, bands: dict) -> Path | None:
    """Held-out loss against non-embedding parameters: teachers as points, each student model's
    baseline band (the verdicts' 95 % prediction interval of its baseline seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = [r for r in rows if r["role"] == "teacher" and r.get(f"loss/{HELD_OUT}") is not None]
    if not teachers:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in teachers:
        ax.scatter(r["non_embedding_parameters"], r[f"loss/{HELD_OUT}"], color="tab:blue")
        ax.annotate(f"{r['model']} @ {r['tokens'] / 1e6:.2g}M", (r["non_embedding_parameters"], r[f"loss/{HELD_OUT}"]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    for model, band in bands.items():
        if band["mean"] is None:
            continue
        params = next(r["non_embedding_parameters"] for r in rows if r["model"] == model)
        ax.axhline(band["mean"], color="tab:red", linewidth=1, label=f"student {model} baseline ({band['n']} seeds)")
        if band["lo"] is not None:
            ax.axhspan(band["lo"], band["hi"], color="tab:red", alpha=0.15)
        ax.axvline(params, color="tab:red", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel(f"held-out loss ({HELD_OUT}, nats)")
    ax.set_title("teachers and the student's baseline band")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "regime.png", dpi=100)
    plt.close(fig)
    return out_dir / "regime.png"


WORDS = {"weak-to-strong": "weaker", "same-level": "level", "strong-to-weak": "stronger", "unknown": "—"}


def regime_section(rows: list[dict], out_dir: Path, labels: dict, bands: dict) -> list[str]:
    """Where the study sits: tokens per parameter of every run, the teacher ladder (each teacher weaker,
    level or stronger than the student by measured loss, with the verdicts' noise-aware band), seeds per cell."""
    plot = regime_plot(rows, out_dir, bands)
    lines = ["## The regime", ""]
    if plot is not None:
        lines += [f"![regime]({plot.name})", ""]
    teachers = [r for r in rows if r["role"] == "teacher" and r["run_id"] in labels]
    if teachers:
        lines += ["Teachers against the student (outside the baseline seeds' 95 % prediction interval = weaker or "
                  "stronger): " + "; ".join(f"{r['model']} @ {r['tokens']:,} {WORDS[labels[r['run_id']]]}"
                                           for r in sorted(teachers, key=lambda r: (r['non_embedding_parameters'],
                                                                                   r['tokens']))) + ".", ""]
    lines += ["| run | model | non-emb. params | tokens | tokens / param | seeds | held-out loss |",
              "|---|---|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        kind = r["role"] if r["role"] != "baseline" or not r.get("matched_teacher") else "compute-matched baseline"
        groups.setdefault((kind, r["model"], r["tokens"]), []).append(r)
    for (kind, model, tokens), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        params = members[0]["non_embedding_parameters"]
        losses = [m[f"loss/{HELD_OUT}"] for m in members if m.get(f"loss/{HELD_OUT}") is not None]
        loss = format_ci(mean_ci(losses), signed=False) if losses else "—"
        seeds = len({(m["init_seed"], m["data_seed"]) for m in members})
        lines.append(f"| {kind} | {model} | {params:,} | {tokens:,} | {tokens / params:.1f} | {seeds} | {loss} |")
    lines += ["", "Seeds per cell (student runs per teacher and α):", "",
              "| teacher | teacher tokens | α | objective | seeds |", "|---|---:|---:|---|---:|"]
    cells: dict[tuple, set] = {}
    for r in rows:
        if r["role"] == "student":
            cells.setdefault((r["teacher_model"], r["teacher_tokens"], r["alpha"], r["objective"]), set()).add(
                (r["init_seed"], r["data_seed"]))
    for (model, tokens, alpha, objective), seeds in sorted(cells.items(), key=str):
        lines.append(f"| {model} | {tokens:,} | {alpha:g} | {objective} | {len(seeds)} |")
    return lines + [""]


def runs_section(rows: list[dict]) -> list[str]:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "blocked", "running", "pending")}
    lines = ["Runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "."]
    lines += [f"- failed: `{r['run_id']}` ({r['role']} {r['model']}): {r['error']}" for r in rows
              if r["status"] == "failed"]
    return lines


def gains_section(summary: list[dict]) -> list[str]:
    lines = ["", "## Gains over the matched baseline", "",
             "Gain = baseline − student loss (nats; positive = distillation helped), mean over seeds with a 95 % "
             "interval (Student t). Downstream: accuracy difference.", "",
             "| student | tokens | teacher | teacher tokens | label (loss) | α | objective | in-domain | OOD | downstream |",
             "|---|---:|---|---:|---|---:|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['model']} | {s['tokens']:,} | {s['teacher_model']} | {s['teacher_tokens']:,} | "
                     f"{s['label_by_loss'] or '—'} | {s['alpha']} | {s['objective']} | {format_ci(s['in_domain'])} | "
                     f"{format_ci(s['ood'])} | {format_ci(s['downstream'])} |")
    matched = [s for s in summary if s["matched_in_domain"]["n"]]
    if matched:
        lines += ["", "### Over the compute-matched baseline", "",
                  "The same students against a baseline that spent the teacher's inference FLOPs on training "
                  "itself longer (same seeds, more tokens of the same stream): positive = distillation beat "
                  "simply training longer.", "",
                  "| student | teacher | teacher tokens | α | objective | in-domain | OOD | downstream |",
                  "|---|---|---:|---:|---|---|---|---|"]
        for s in matched:
            lines.append(f"| {s['model']} | {s['teacher_model']} | {s['teacher_tokens']:,} | {s['alpha']} | "
                         f"{s['objective']} | {format_ci(s['matched_in_domain'])} | {format_ci(s['matched_ood'])} | "
                         f"{format_ci(s['matched_downstream'])} |")
    return lines


def sft_section(summary: list[dict]) -> list[str]:
    """Each student's gains before and after the grid's SFT stage, side by side."""
    fine_tuned = [s for s in summary if any(s[f"sft_{m}"]["n"] for m in ("in_domain", "ood", "downstream"))]
    if not fine_tuned:
        return []
    lines = ["", "## Gains before and after SFT", "",
             "The same students and baselines after both were fine-tuned on chat data (the grid's `sft` stage; "
             "downstream tasks in the chat template, few-shot examples as turns). In-domain after SFT is scored on the "
             "chat data's assistant tokens.", "",
             "| student | tokens | teacher | teacher tokens | α | objective | downstream | downstream after SFT | "
             "in-domain | in-domain after SFT | OOD | OOD after SFT |",
             "|---|---:|---|---:|---:|---|---|---|---|---|---|---|"]
    for s in fine_tuned:
        lines.append(f"| {s['model']} | {s['tokens']:,} | {s['teacher_model']} | {s['teacher_tokens']:,} | "
                     f"{s['alpha']} | {s['objective']} | {format_ci(s['downstream'])} | "
                     f"{format_ci(s['sft_downstream'])} | {format_ci(s['in_domain'])} | "
                     f"{format_ci(s['sft_in_domain'])} | {format_ci(s['ood'])} | {format_ci(s['sft_ood'])} |")
    return lines


def wsd_section(rows: list[dict]) -> list[str]:
    kinds = [r for r in rows if r["role"] == "teacher" and r.get("kind") in ("wsd-branch", "independent", "wsd-trunk")]
    if not any(r["kind"] == "wsd-branch" for r in kinds):
        return []
    lines = ["", "## WSD-branched vs independently trained teachers", "",
             "Held-out loss of each teacher; a branch is a short decay from the trunk's stable phase.", "",
             "| model | tokens | seed | kind | held-out loss | training FLOPs |", "|---|---:|---:|---|---:|---:|"]
    for r in sorted(kinds, key=lambda r: (r["model"], r["tokens"], str(r["kind"]))):
        loss = r.get(f"loss/{HELD_OUT}")
        lines.append(f"| {r['model']} | {r['tokens']:,} | {r['init_seed']} | {r['kind']} | "
                     f"{f'{loss:.4f}' if loss is not None else '—'} | {r['train_flops']:.3g} |")
    return lines


def best_alpha_section(summary: list[dict]) -> list[str]:
    lines = ["", "## Best α per teacher", "",
             "| student | teacher | teacher tokens | objective | label | best α | in-domain | OOD |",
             "|---|---|---:|---|---|---:|---:|---:|"]
    for b in best_alpha(summary):
        ood = f"{b['ood']:+.4f}" if b["ood"] is not None else "—"
        lines.append(f"| {b['model']} | {b['teacher_model']} | {b['teacher_tokens']:,} | {b['objective']} | "
                     f"{b['label_by_loss'] or '—'} | {b['alpha']} | {b['in_domain']:+.4f} | {ood} |")
    return lines


def write_report(sweep_dir: str | Path, tolerance: float | None = None, about: list[str] | None = None,
                 title: str | None = None, extra_sections=None) -> Path:
    """report.md + report.html: verdicts first, then `about` (free lines), gains, teachers, plots.

    `extra_sections(rows, sweep_dir)` may add markdown lines (and plots) after the about section.
    """
    from distillab.study.verdicts import label_teachers, verdict_sections

    sweep_dir = Path(sweep_dir)
    files = SweepLayout(sweep_dir)
    planned = read_plan(sweep_dir) if files.plan.exists() else {}
    spec = planned.get("spec", {})
    tolerance = spec.get("label_tolerance", 0.02) if tolerance is None else tolerance
    rows = add_gains_and_labels(collect_rows(sweep_dir), tolerance)
    labels, bands = label_teachers(rows, tolerance)
    csv_path, parquet_path = write_table(rows, sweep_dir)
    summary = summarize(rows)
    verdict_lines, verdict_data = verdict_sections(rows, tolerance, spec.get("verdict_margin", 0.02))
    write_json_atomic(files.summary, {"groups": summary, "best_alpha": best_alpha(summary),
                                                   "verdicts": verdict_data})
    plots = make_plots(summary, sweep_dir)
    lines = [f"# {title or 'Sweep report: ' + planned.get('name', sweep_dir.name)}", ""] + verdict_lines
    if about:
        lines += ["## About this run", ""] + about + [""]
    if spec.get("notes"):
        lines += ["## Where this grid differs from what it reproduces", ""] + [f"- {n}" for n in spec["notes"]] + [""]
    if extra_sections is not None:
        lines += extra_sections(rows, sweep_dir)
    lines += regime_section(rows, sweep_dir, labels, bands)
    lines += runs_section(rows) + gains_section(summary) + signals_section(rows)
    lines += sft_section(summary) + wsd_section(rows)
    lines += best_alpha_section(summary)
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", f"Full table: `{csv_path.name}`" + (f", `{parquet_path.name}`" if parquet_path else "") + "."]
    markdown = "\n".join(lines) + "\n"
    write_text_atomic(files.report, markdown)
    write_text_atomic(files.report_html, to_html(markdown, sweep_dir))
    return files.report


def to_html(markdown: str, folder: Path) -> str:
    """A self-contained HTML page of the report (CommonMark with tables, by markdown-it-py; raw HTML
    in the markdown is escaped), its plots inlined as base64."""
    from markdown_it import MarkdownIt

    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = renderer.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            if child.type == "image" and (folder / child.attrGet("src")).is_file():
                data = base64.b64encode((folder / child.attrGet("src")).read_bytes()).decode()
                child.attrSet("src", f"data:image/png;base64,{data}")
    return ("<!doctype html><meta charset='utf-8'><title>distillab report</title>\n"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style>\n"
            + renderer.renderer.render(tokens, renderer.options, {}))
