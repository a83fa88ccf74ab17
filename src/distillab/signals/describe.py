"""One line naming the teacher signal a student saw, for results.csv (`teacher_signal`) and the
report's "Teacher signals" section.

    <where> <what> [of <n> teachers, mixed | routed]

where: online (the teacher runs beside the student) or cache (read by window id); what: full
(the whole distribution), top-k, top-p, hard (argmax), sampled m [at tau], or own tokenizer
(uld | alm: a teacher with another tokenizer, aligned by byte spans).
"""

from __future__ import annotations

from distillab.config import CACHE_MODES
from distillab.study.stats import mean_ci


def describe_signal(kd, cached: bool = False) -> str | None:
    """The signal of a run's `kd` section (None without a teacher); `cached`: a sweep gave it a cache."""
    if kd.teacher is None or not kd.distills:
        return None
    where = "cache" if cached or kd.cache not in CACHE_MODES else "online"
    if kd.entry.aligned is not None:
        what = f"own tokenizer ({kd.divergence.upper()})"
    elif kd.samples is not None:
        tau = f" at tau {kd.proposal_temperature:g}" if kd.proposal_temperature != 1 else ""
        what = f"sampled {kd.samples}{tau}"
    elif kd.entry.argmax_teacher:
        what = "hard (argmax)"
    elif kd.top_k is not None:
        what = f"top-{kd.top_k}"
    elif kd.top_p is not None:
        what = f"top-p {kd.top_p:g}"
    else:
        what = "full"
    several = f" of {1 + len(kd.teachers)} teachers, " + ("mixed" if kd.teacher_mix == "mixture" else "routed") \
        if kd.teachers else ""
    return f"{where} {what}{several}"


def signals_section(rows: list[dict]) -> list[str]:
    """Markdown: per student setting (teachers, objective, signal), its seeds and paired in-domain gain."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["role"] == "student" and row.get("teacher_signal"):
            key = (row.get("teachers") or row.get("teacher_model") or "", row["alpha"], row["objective"],
                   row["teacher_signal"])
            cells.setdefault(key, []).append(row)
    if not cells:
        return []
    lines = ["", "## Teacher signals", "",
             "Which signal each student saw: online or from a cache; full, top-k, sampled, or a teacher with "
             "its own tokenizer; one teacher or several (mixed or routed per document).", "",
             "| teachers | α | objective | signal | seeds | in-domain gain (nats, 95 % CI) |",
             "|---|---:|---|---|---:|---|"]
    for (teachers, alpha, objective, signal), members in sorted(cells.items(), key=str):
        gain = mean_ci([m.get("gain/in_domain") for m in members])
        shown = "—" if gain.get("mean") is None else f"{gain['mean']:+.4f}" + (
            f" [{gain['lo']:+.4f}, {gain['hi']:+.4f}]" if gain.get("lo") is not None else "")
        lines.append(f"| {teachers} | {alpha:g} | {objective} | {signal} | {len(members)} | {shown} |")
    return lines
