"""Verdicts on the paper's three findings, decided by a fixed rule from a sweep's result rows.

    F1  Does a smaller or undertrained teacher improve a larger student at a tuned alpha?
    F2  Does a stronger teacher (more parameters or more tokens) saturate or reverse the gain?
    F3  Is the gain larger out of distribution (F3-OOD) and downstream (F3-downstream) than
        in-domain?

The rule, written once here and printed in every report:

- Gains are paired: a student minus the baseline with its seeds (same initial weights, same
  batches). "overall" = mean of the in-domain and the OOD loss gains (nats).
- alpha is tuned without looking at the seed being scored (leave-one-seed-out): for each seed,
  the alpha with the best mean overall gain over the *other* seeds is chosen, and the seed's
  gains at that alpha are used. This removes the optimism of picking the best alpha on the
  same noisy runs that are then reported (with one seed there is no other seed; the alpha is
  picked on the seed itself and the verdict is at best inconclusive).
- Teacher strength is *measured*: a teacher is weaker than the student if its held-out loss
  is above the student baseline's (mean over seeds) by more than the label tolerance.
- Each finding is one pooled test over seeds: per seed, the quantity is averaged over the
  teachers (or teacher pairs) it concerns, and a 95 % Student-t interval is taken across seeds.
  "reproduced" / "not reproduced" need the interval on one side of zero (or, where the paper
  predicts "no gain", inside +-margin); anything else is "inconclusive (within seed noise)".
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from distillab.results import HELD_OUT, label_by_loss
from distillab.stats import format_ci, mean_ci

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive (within seed noise)"

QUESTIONS = {
    "F1": "Does a smaller or undertrained teacher (weaker than the student by held-out loss) improve the "
          "student at a tuned α?",
    "F2": "Does a stronger teacher — more parameters or more tokens — saturate or reverse the gain?",
    "F3-OOD": "Is the gain larger out of distribution than in-domain?",
    "F3-downstream": "Does distillation help downstream accuracy where it does not help in-domain loss?",
}

RULES = {
    "F1": "Quantity: per seed, the overall gain at the tuned α, averaged over the teachers weaker than the student. "
          "Reproduced if its 95 % interval is above 0; not reproduced if it is below 0 or inside ±margin; "
          "otherwise inconclusive.",
    "F2": "Quantity: per seed, gain(stronger teacher) − gain(weaker teacher) at each one's tuned α, averaged over "
          "neighbouring pairs on the size axis (same tokens) and the token axis (same size) where the larger one "
          "is measurably stronger. Reproduced (saturates or reverses) if the interval is below 0 or inside "
          "±margin; not reproduced if it is above 0; otherwise inconclusive.",
    "F3-OOD": "Quantity: per seed, OOD gain − in-domain gain at the tuned α, averaged over all teachers. "
              "Reproduced if the interval is above 0; not reproduced if it is below 0 or inside ±margin; "
              "otherwise inconclusive.",
    "F3-downstream": "Quantities: per seed, the downstream accuracy gain and the in-domain loss gain at the tuned α, "
                     "averaged over all teachers (different units, so not subtracted). Reproduced if the accuracy "
                     "gain's interval is above 0 and the in-domain gain's is not; not reproduced if the accuracy "
                     "gain's interval is below 0, or the in-domain gain's is above 0 while the accuracy gain's is "
                     "not; otherwise inconclusive.",
}


@dataclass
class TeacherEvidence:
    teacher_id: str
    model: str
    params: int
    tokens: int
    held_out_loss: float | None
    strength: str  # label by measured loss vs the student baseline
    alpha_by_seed: dict = field(default_factory=dict)  # seed -> tuned alpha
    gains_by_seed: dict = field(default_factory=dict)  # seed -> {metric: gain at the tuned alpha}

    def ci(self, metric: str) -> dict:
        return mean_ci([g.get(metric) for g in self.gains_by_seed.values()])


def _overall(row: dict) -> float | None:
    parts = [row.get("gain/in_domain"), row.get("gain/ood")]
    parts = [p for p in parts if p is not None]
    return statistics.fmean(parts) if parts else None


def _seed(row: dict) -> str:
    """A student's seeds as one key (init seed, and the data seed where it differs)."""
    init, data = row["init_seed"], row["data_seed"]
    return str(init) if init == data else f"{init}/{data}"


def tune_alpha_leave_one_seed_out(students: list[dict]) -> tuple[dict, dict]:
    """Student rows of one teacher (all alphas and seeds) -> (seed -> alpha, seed -> gains at it)."""
    by_alpha_seed = {(r["alpha"], _seed(r)): r for r in students if _overall(r) is not None}
    seeds = sorted({s for _, s in by_alpha_seed})
    alphas = sorted({a for a, _ in by_alpha_seed})
    chosen, gains = {}, {}
    for seed in seeds:
        others = [s for s in seeds if s != seed] or [seed]
        candidates = [a for a in alphas if (a, seed) in by_alpha_seed and all((a, o) in by_alpha_seed for o in others)]
        if not candidates:
            continue
        best = max(candidates, key=lambda a: (statistics.fmean(_overall(by_alpha_seed[(a, o)]) for o in others), -a))
        row = by_alpha_seed[(best, seed)]
        chosen[seed] = best
        gains[seed] = {"overall": _overall(row), "in_domain": row.get("gain/in_domain"),
                       "ood": row.get("gain/ood"), "downstream": row.get("gain/downstream")}
    return chosen, gains


def teacher_evidence(rows: list[dict], tolerance: float) -> dict[tuple, list[TeacherEvidence]]:
    """Per student setting (model, tokens, objective without alpha): the evidence of each teacher."""
    by_id = {r["run_id"]: r for r in rows}
    baselines: dict[tuple, list[float]] = {}
    for r in rows:
        if r["role"] == "baseline" and r.get(f"loss/{HELD_OUT}") is not None:
            baselines.setdefault((r["model"], r["tokens"]), []).append(r[f"loss/{HELD_OUT}"])
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        if r["role"] == "student" and r.get("baseline_id") and r.get("teacher_id") in by_id:
            key = (r["model"], r["tokens"], r["objective_key"])
            groups.setdefault(key, {}).setdefault(r["teacher_id"], []).append(r)
    out: dict[tuple, list[TeacherEvidence]] = {}
    for key, per_teacher in groups.items():
        baseline_losses = baselines.get(key[:2], [])
        baseline_loss = statistics.fmean(baseline_losses) if baseline_losses else None
        evidence = []
        for teacher_id, students in per_teacher.items():
            teacher = by_id[teacher_id]
            loss = teacher.get(f"loss/{HELD_OUT}")
            strength = (label_by_loss(loss, baseline_loss, tolerance)
                        if loss is not None and baseline_loss is not None else "unknown")
            alphas, gains = tune_alpha_leave_one_seed_out(students)
            evidence.append(TeacherEvidence(teacher_id, teacher["model"], teacher["non_embedding_parameters"],
                                            teacher["tokens"], loss, strength, alphas, gains))
        evidence.sort(key=lambda e: (e.params, e.tokens))
        out[key] = evidence
    return out


def _pooled(evidence: list[TeacherEvidence], value) -> dict:
    """Per seed, the mean of value(evidence, seed) over the evidence that has the seed; then a t-interval."""
    seeds = sorted({s for e in evidence for s in e.gains_by_seed})
    per_seed = []
    for seed in seeds:
        values = [value(e, seed) for e in evidence if seed in e.gains_by_seed]
        values = [v for v in values if v is not None]
        if values:
            per_seed.append(statistics.fmean(values))
    return mean_ci(per_seed)


def _above(ci: dict) -> bool:
    return ci["lo"] is not None and ci["lo"] > 0


def _below(ci: dict) -> bool:
    return ci["hi"] is not None and ci["hi"] < 0


def _inside(ci: dict, margin: float) -> bool:
    return ci["lo"] is not None and -margin <= ci["lo"] and ci["hi"] <= margin


def _verdict(finding: str, ci: dict | None, decision: str, detail: str, **extra) -> dict:
    return {"finding": finding, "question": QUESTIONS[finding], "verdict": decision, "ci": ci, "detail": detail,
            "rule": RULES[finding], **extra}


def stronger_pairs(evidence: list[TeacherEvidence]) -> tuple[list[tuple], list[str]]:
    """Neighbouring teachers on the size axis (same tokens) and the token axis (same model);
    kept where the larger one is measurably stronger. Returns (pairs, notes on dropped pairs)."""
    pairs, notes = [], []
    axes = [("parameters", lambda e: e.tokens, lambda e: e.params), ("tokens", lambda e: e.model, lambda e: e.tokens)]
    for axis, fixed, along in axes:
        lines: dict = {}
        for e in evidence:
            lines.setdefault(fixed(e), []).append(e)
        for members in lines.values():
            members.sort(key=along)
            for smaller, larger in zip(members, members[1:]):
                if along(smaller) == along(larger):
                    continue
                if smaller.held_out_loss is None or larger.held_out_loss is None:
                    continue
                if larger.held_out_loss < smaller.held_out_loss:
                    pairs.append((axis, smaller, larger))
                else:
                    notes.append(f"{larger.model} @ {larger.tokens:,} tokens has more {axis} than {smaller.model} @ "
                                 f"{smaller.tokens:,} but is not stronger (held-out loss {larger.held_out_loss:.4f} vs "
                                 f"{smaller.held_out_loss:.4f}); the pair is left out of F2")
    return pairs, notes


def decide(evidence: list[TeacherEvidence], margin: float) -> list[dict]:
    verdicts = []
    n_seeds = len({s for e in evidence for s in e.gains_by_seed})
    few = f" Only {n_seeds} seed(s): no interval can exclude zero." if n_seeds < 2 else ""

    weak = [e for e in evidence if e.strength == "weak-to-strong"]
    if not weak:
        verdicts.append(_verdict("F1", None, INCONCLUSIVE, "No teacher in the grid is weaker than the student by "
                                 "held-out loss, so the question cannot be asked." + few))
    else:
        ci = _pooled(weak, lambda e, s: e.gains_by_seed[s]["overall"])
        decision = (REPRODUCED if _above(ci) else NOT_REPRODUCED if _below(ci) or _inside(ci, margin)
                    else INCONCLUSIVE)
        names = ", ".join(f"{e.model} @ {e.tokens:,}" for e in weak)
        verdicts.append(_verdict("F1", ci, decision, f"Weaker teachers: {names}. Overall gain at the tuned α." + few))

    pairs, notes = stronger_pairs(evidence)
    if not pairs:
        verdicts.append(_verdict("F2", None, INCONCLUSIVE, "No pair of teachers where more parameters or more tokens "
                                 "made a measurably stronger teacher. " + " ".join(notes) + few))
    else:
        seeds = sorted({s for _, a, b in pairs for s in a.gains_by_seed if s in b.gains_by_seed})
        per_seed = []
        for seed in seeds:
            diffs = [b.gains_by_seed[seed]["overall"] - a.gains_by_seed[seed]["overall"] for _, a, b in pairs
                     if seed in a.gains_by_seed and seed in b.gains_by_seed]
            per_seed.append(statistics.fmean(diffs))
        ci = mean_ci(per_seed)
        decision = (REPRODUCED if _below(ci) or _inside(ci, margin) else NOT_REPRODUCED if _above(ci)
                    else INCONCLUSIVE)
        names = "; ".join(f"{axis}: {a.model} @ {a.tokens:,} → {b.model} @ {b.tokens:,}" for axis, a, b in pairs)
        verdicts.append(_verdict("F2", ci, decision, f"Pairs (weaker → stronger): {names}. Gain difference, "
                                 "stronger minus weaker. " + " ".join(notes) + few,
                                 pairs=[{"axis": axis, "weaker": a.teacher_id, "stronger": b.teacher_id}
                                        for axis, a, b in pairs]))

    def ood_minus_in(e, s):
        g = e.gains_by_seed[s]
        return g["ood"] - g["in_domain"] if g["ood"] is not None and g["in_domain"] is not None else None

    ci = _pooled(evidence, ood_minus_in)
    if ci["n"] == 0:
        verdicts.append(_verdict("F3-OOD", None, INCONCLUSIVE, "No OOD sets were evaluated."))
    else:
        decision = (REPRODUCED if _above(ci) else NOT_REPRODUCED if _below(ci) or _inside(ci, margin)
                    else INCONCLUSIVE)
        verdicts.append(_verdict("F3-OOD", ci, decision, "OOD minus in-domain gain (nats), all teachers." + few))

    down = _pooled(evidence, lambda e, s: e.gains_by_seed[s]["downstream"])
    in_domain = _pooled(evidence, lambda e, s: e.gains_by_seed[s]["in_domain"])
    if down["n"] == 0:
        verdicts.append(_verdict("F3-downstream", None, INCONCLUSIVE, "No downstream tasks were evaluated."))
    else:
        if _above(down) and not _above(in_domain):
            decision = REPRODUCED
        elif _below(down) or (_above(in_domain) and not _above(down)):
            decision = NOT_REPRODUCED
        else:
            decision = INCONCLUSIVE
        verdicts.append(_verdict("F3-downstream", down, decision, "Downstream accuracy gain (the interval shown); "
                                 f"in-domain loss gain {format_ci(in_domain)} nats." + few, in_domain=in_domain))
    return verdicts


def verdict_sections(rows: list[dict], tolerance: float, margin: float) -> tuple[list[str], dict]:
    """Markdown lines of the verdict section (and the evidence behind it) plus the same as data."""
    evidence_by_setting = teacher_evidence(rows, tolerance)
    lines = ["## Verdicts", ""]
    data = {"margin": margin, "tolerance": tolerance, "settings": []}
    if not evidence_by_setting:
        lines += ["No finished student with a finished baseline yet: no verdict.", ""]
        return lines, data
    baseline_rows = [r for r in rows if r["role"] == "baseline"]
    labels = {r["objective_key"]: r["objective"] for r in rows if r.get("objective_key")}
    for key, evidence in sorted(evidence_by_setting.items(), key=lambda kv: str(kv[0])):
        model, tokens, objective_key = key
        objective = labels.get(objective_key, objective_key)
        verdicts = decide(evidence, margin)
        data["settings"].append({"student": model, "tokens": tokens, "objective": objective, "verdicts": verdicts,
                                 "teachers": [e.__dict__ for e in evidence]})
        lines += [f"Student {model} trained on {tokens:,} tokens; objective {objective}.", "",
                  "| finding | question | verdict | numbers (mean [95 % interval] over seeds) |", "|---|---|---|---|"]
        for v in verdicts:
            numbers = format_ci(v["ci"]) + (" accuracy" if v["finding"] == "F3-downstream" and v["ci"] else
                                          " nats" if v["ci"] else "")
            lines.append(f"| {v['finding']} | {v['question']} | **{v['verdict']}** | {numbers} |")
        lines += ["", "What each verdict rests on:", ""]
        lines += [f"- **{v['finding']}** — {v['detail'].strip()}" for v in verdicts]
        noise = [r for r in baseline_rows if r["model"] == model and r["tokens"] == tokens]
        noise_ci = mean_ci([r.get(f"loss/{HELD_OUT}") for r in noise])
        lines += ["", "### Teachers, measured", "",
                  f"Student baseline held-out loss: {noise_ci['mean']:.4f} nats, seed-to-seed sd "
                  f"{noise_ci['sd'] if noise_ci['sd'] is not None else float('nan'):.4f} (n={noise_ci['n']})."
                  if noise_ci["mean"] is not None else "Student baseline: not evaluated yet.", "",
                  "| teacher | params (non-emb.) | tokens | held-out loss | vs student | tuned α per seed | "
                  "overall gain | in-domain gain | OOD gain | downstream gain |",
                  "|---|---:|---:|---:|---|---|---|---|---|---|"]
        for e in evidence:
            alphas = ", ".join(f"{a:g}" for _, a in sorted(e.alpha_by_seed.items()))
            loss = f"{e.held_out_loss:.4f}" if e.held_out_loss is not None else "—"
            lines.append(f"| {e.model} | {e.params:,} | {e.tokens:,} | {loss} | {e.strength} | {alphas} | "
                         f"{format_ci(e.ci('overall'))} | {format_ci(e.ci('in_domain'))} | {format_ci(e.ci('ood'))} | "
                         f"{format_ci(e.ci('downstream'))} |")
        lines.append("")
    lines += ["### How the verdicts are decided", "",
              "Gains are paired (a student minus the baseline with the same initial weights and batches); overall = "
              "mean of the in-domain and OOD loss gains, in nats. α is tuned leave-one-seed-out: each seed's gain is "
              "taken at the α that did best on the *other* seeds, so the reported gain is not the lucky maximum of "
              "the runs it is judged on. A teacher's strength is its measured held-out loss against the student "
              f"baseline's (tolerance {tolerance:g} nats), not its size. Each finding is one pooled quantity per seed "
              f"and a 95 % Student-t interval across seeds; margin = {margin:g} nats. The rule was fixed before the "
              "runs and is the same for every grid:", ""]
    lines += [f"- **{finding}**: {rule}" for finding, rule in RULES.items()]
    lines.append("")
    return lines, data
