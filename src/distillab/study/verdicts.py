"""Verdicts on the paper's three findings, decided by a fixed rule from a sweep's result rows.

    F1  Does a smaller or undertrained teacher improve a larger student at a tuned alpha?
    F2  Does a stronger teacher (more parameters or more tokens) saturate or reverse the gain?
    F3  Is the gain larger out of distribution (F3-OOD) and downstream (F3-downstream) than
        in-domain?

The rule, written once here and printed in every report:

- Gains are paired: a student minus the baseline with its seeds (same initial weights, same
  batches). "overall" = mean of the in-domain and the OOD loss gains (nats).
- Seeds of a student setting are ordered by (init seed, data seed). The first `TUNING_SEEDS`
  (2) are **tuning seeds**: each teacher's alpha is the one with the best mean overall gain over
  them (ties: the smaller alpha), and they are left out of every interval. The later seeds are
  **interval seeds**; each contributes its gains at the tuned alpha only.
- Teacher strength is *measured*, with a noise-aware band: a teacher is weaker than the student
  if its held-out loss is above the 95 % Student-t prediction interval of one new baseline
  seed's held-out loss, computed from the baselines of the first `LABEL_SEEDS` (7) seeds (fewer
  than 2 such baselines: +-label_tolerance around their mean).
- Each finding is one pooled quantity per interval seed (averaged over the teachers, or teacher
  pairs, it concerns; a seed counts only where every one of them has a finished run), and its
  interval is the repeated confidence interval of `distillab.study.sequential.DESIGN` (group-sequential,
  Lan-DeMets O'Brien-Fleming-type alpha spending; looks at 5, 10 and 15 interval seeds): valid at 95 %
  whatever number of seeds the demo ends with, even when seeds were added *because* a finding
  was still open. The looks are walked in seed order and the verdict is taken at the first look
  where it is decided; "reproduced" / "not reproduced" need the interval on one side of zero (or,
  where the paper predicts "no gain", inside +-margin); anything else is "inconclusive".

Why tuning seeds instead of leave-one-seed-out (LOSO) tuning: under LOSO a seed's value is its
gain at the alpha that did best on the *other* seeds, so every value changes when a seed is added
and the values are not independent of later seeds. The sequential guarantee needs each seed's
value fixed once it is observed and independent of the others (the interval at look k is a
function of the first n_k values only). With alpha tuned on two fixed seeds that are then left
out, the interval seeds are independent draws of "the gain at this alpha" (given the tuning), and
the interval is exact for that quantity under the normal model. Costs: two seeds per cell do not
enter the interval, and alpha is picked on two seeds (noisier than LOSO on many); gain: a seed
added later needs one run per teacher (its tuned alpha), not one per alpha. The strength labels
use a fixed set of baselines for the same reason: the teachers a finding pools must not change
as seeds are added.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from distillab.study.results import HELD_OUT, label_by_prediction_interval
from distillab.study.sequential import DESIGN, Design, sequential_decision
from distillab.study.stats import format_ci, mean_ci, prediction_interval

TUNING_SEEDS = 2  # per student setting: the first seeds, used to tune alpha and left out of intervals


def label_seeds(design: Design = DESIGN) -> int:
    """How many first seeds' baselines set the weaker / level / stronger band: the tuning seeds and the
    first look's."""
    return TUNING_SEEDS + design.first_look


LABEL_SEEDS = label_seeds()  # DESIGN's

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive (within seed noise)"

# where a finding stands in the adaptive loop
DECIDED = "decided"
OPEN = "open"  # inconclusive, more seeds allowed: the demo may add seeds for it
AT_MAX = "at max"  # inconclusive at the design's maximum number of seeds
NOT_ASKABLE = "cannot be asked"  # no teacher / pair / set / task it concerns

QUESTIONS = {
    "F1": "Does a smaller or undertrained teacher (weaker than the student by held-out loss) improve the "
          "student at a tuned α?",
    "F2": "Does a stronger teacher — more parameters or more tokens — saturate or reverse the gain?",
    "F3-OOD": "Is the gain larger out of distribution than in-domain?",
    "F3-downstream": "Does distillation help downstream accuracy where it does not help in-domain loss?",
}

RULES = {
    "F1": "Quantity: per interval seed, the overall gain at the tuned α, averaged over the teachers weaker than the "
          "student. Reproduced if its interval is above 0; not reproduced if it is below 0 or inside ±margin; "
          "otherwise inconclusive.",
    "F2": "Quantity: per interval seed, gain(stronger teacher) − gain(weaker teacher) at each one's tuned α, averaged "
          "over neighbouring pairs on the size axis (same tokens) and the token axis (same size) where the larger one "
          "is measurably stronger. Reproduced (saturates or reverses) if the interval is below 0 or inside "
          "±margin; not reproduced if it is above 0; otherwise inconclusive.",
    "F3-OOD": "Quantity: per interval seed, OOD gain − in-domain gain at the tuned α, averaged over all teachers. "
              "Reproduced if the interval is above 0; not reproduced if it is below 0 or inside ±margin; "
              "otherwise inconclusive.",
    "F3-downstream": "Quantities: per interval seed, the downstream accuracy gain and the in-domain loss gain at the "
                     "tuned α, averaged over all teachers (different units, so not subtracted). Reproduced if the "
                     "accuracy gain's interval is above 0 and the in-domain gain's is not; not reproduced if the "
                     "accuracy gain's interval is below 0, or the in-domain gain's is above 0 while the accuracy "
                     "gain's is not; otherwise inconclusive.",
}


def seed_key(row: dict) -> str:
    """A run's seeds as one key (init seed, and the data seed where it differs)."""
    init, data = row["init_seed"], row["data_seed"]
    return str(init) if init == data else f"{init}/{data}"


def seed_order(key: str) -> tuple[int, int]:
    """Sort key of a seed key: (init seed, data seed) as numbers."""
    init, _, data = key.partition("/")
    return int(init), int(data or init)


def ordered_seeds(rows: list[dict]) -> list[str]:
    """The distinct seed keys of `rows` (any status), in seed order."""
    return sorted({seed_key(r) for r in rows}, key=seed_order)


def overall_gain(row: dict) -> float | None:
    parts = [p for p in (row.get("gain/in_domain"), row.get("gain/ood")) if p is not None]
    return statistics.fmean(parts) if parts else None


@dataclass
class TeacherEvidence:
    teacher_id: str
    model: str
    params: int
    tokens: int
    held_out_loss: float | None
    strength: str  # label by measured loss vs the student baseline's prediction interval
    alpha: float | None = None  # tuned on the tuning seeds
    alpha_scores: dict = field(default_factory=dict)  # alpha -> mean overall gain over the tuning seeds
    gains_by_seed: dict = field(default_factory=dict)  # interval seed -> {metric: gain at the tuned alpha}

    def ci(self, metric: str) -> dict:
        """Plain t-interval of this teacher's gains over its interval seeds (descriptive only)."""
        return mean_ci([g.get(metric) for g in self.gains_by_seed.values()])


@dataclass
class SettingEvidence:
    """One student setting (model, tokens, objective): its seeds' roles, the strength band, the teachers."""

    model: str
    tokens: int
    objective_key: str
    tuning_seeds: list[str]
    interval_seeds: list[str]
    band: dict  # prediction interval of the band seeds' baseline held-out losses (stats.prediction_interval)
    band_seeds: list[str]  # the seeds whose finished baselines made the band
    labels_final: bool  # every one of the first LABEL_SEEDS seeds has a finished baseline
    has_ood: bool
    has_downstream: bool
    teachers: list[TeacherEvidence]


def tune_alpha(students: list[dict], tuning_seeds: list[str]) -> tuple[float | None, dict]:
    """Student rows of one teacher -> (alpha with the best mean overall gain over the tuning seeds, scores).

    Only tuning seeds with at least one finished gain count, and only alphas finished on every such
    seed are candidates; ties go to the smaller alpha. (None, {}) when nothing is finished."""
    gains = {(r["alpha"], seed_key(r)): overall_gain(r) for r in students if seed_key(r) in tuning_seeds}
    gains = {k: v for k, v in gains.items() if v is not None}
    seeds = sorted({s for _, s in gains}, key=seed_order)
    alphas = sorted({a for a, _ in gains})
    scores = {a: statistics.fmean(gains[(a, s)] for s in seeds) for a in alphas if all((a, s) in gains for s in seeds)}
    if not scores:
        return None, {}
    return max(scores, key=lambda a: (scores[a], -a)), scores


def interval_gains(students: list[dict], alpha: float | None, interval_seeds: list[str]) -> dict:
    """Interval seed -> gains at the tuned alpha (seeds without a finished overall gain are left out)."""
    out = {}
    for r in students:
        if alpha is not None and r["alpha"] == alpha and seed_key(r) in interval_seeds and overall_gain(r) is not None:
            out[seed_key(r)] = {"overall": overall_gain(r), "in_domain": r.get("gain/in_domain"),
                                "ood": r.get("gain/ood"), "downstream": r.get("gain/downstream")}
    return dict(sorted(out.items(), key=lambda kv: seed_order(kv[0])))


def strength_band(baselines: list[dict], seeds: list[str], count: int = LABEL_SEEDS) -> tuple[dict, list[str], bool]:
    """The prediction interval of the finished baselines among the first `count` seeds."""
    band_seeds = seeds[:count]
    finished = {seed_key(r): r[f"loss/{HELD_OUT}"] for r in baselines
                if seed_key(r) in band_seeds and r.get(f"loss/{HELD_OUT}") is not None}
    used = [s for s in band_seeds if s in finished]
    final = len(band_seeds) == count and len(used) == count
    return prediction_interval([finished[s] for s in used]), used, final


def setting_evidence(key: tuple, students: list[dict], baselines: list[dict], by_id: dict,
                     tolerance: float, design: Design = DESIGN) -> SettingEvidence:
    """Evidence of one student setting from its student rows (all teachers) and its baselines."""
    seeds = ordered_seeds(students + baselines)
    tuning, interval = seeds[:TUNING_SEEDS], seeds[TUNING_SEEDS:]
    band, band_seeds, final = strength_band(baselines, seeds, label_seeds(design))
    losses = [b[f"loss/{HELD_OUT}"] for b in baselines if seed_key(b) in band_seeds
              and b.get(f"loss/{HELD_OUT}") is not None]
    per_teacher: dict[str, list[dict]] = {}
    for r in students:
        per_teacher.setdefault(r["teacher_id"], []).append(r)
    teachers = []
    for teacher_id, rows in per_teacher.items():
        teacher = by_id[teacher_id]
        loss = teacher.get(f"loss/{HELD_OUT}")
        strength = label_by_prediction_interval(loss, losses, tolerance) if loss is not None else "unknown"
        alpha, scores = tune_alpha(rows, tuning)
        teachers.append(TeacherEvidence(teacher_id, teacher["model"], teacher["non_embedding_parameters"],
                                        teacher["tokens"], loss, strength, alpha, scores,
                                        interval_gains(rows, alpha, interval)))
    teachers.sort(key=lambda e: (e.params, e.tokens))
    return SettingEvidence(key[0], key[1], key[2], tuning, interval, band, band_seeds, final,
                           any(r.get("gain/ood") is not None for r in students),
                           any(r.get("gain/downstream") is not None for r in students), teachers)


def teacher_evidence(rows: list[dict], tolerance: float, design: Design = DESIGN) -> dict[tuple, SettingEvidence]:
    """Per student setting (model, tokens, objective without alpha): its evidence. Rows of any status
    fix the seed order; only finished ones give numbers."""
    by_id = {r["run_id"]: r for r in rows}
    baselines: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["role"] == "baseline":
            baselines.setdefault((r["model"], r["tokens"]), []).append(r)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["role"] == "student" and r.get("teacher_id") in by_id:
            groups.setdefault((r["model"], r["tokens"], r["objective_key"]), []).append(r)
    return {key: setting_evidence(key, students, baselines.get(key[:2], []), by_id, tolerance, design)
            for key, students in groups.items()}


def label_teachers(rows: list[dict], tolerance: float,
                   design: Design = DESIGN) -> tuple[dict[str, str], dict[str, dict]]:
    """Each student row's `label_by_loss` (its teacher vs the student by measured held-out loss, the
    band of `strength_band`), set in place; returns ({teacher id: label}, {student model: band})."""
    settings = teacher_evidence(rows, tolerance, design).values()
    labels = {e.teacher_id: e.strength for setting in settings for e in setting.teachers}
    for row in rows:
        if row["role"] == "student" and row.get("teacher_id") in labels:
            row["label_by_loss"] = labels[row["teacher_id"]]
    return labels, {setting.model: setting.band for setting in settings}


def complete_seeds(seeds: list[str], parts: list, value) -> list[str]:
    """The seeds (in order) where every one of `parts` has a value: value(part, seed) is not None."""
    return [seed for seed in seeds if parts and all(value(p, seed) is not None for p in parts)]


def finding_series(seeds: list[str], parts: list, value) -> tuple[list[str], list[float]]:
    """Per complete seed (in order), the mean of value(part, seed) over `parts`. Returns (seeds used, values)."""
    used = complete_seeds(seeds, parts, value)
    return used, [statistics.fmean(value(p, seed) for p in parts) for seed in used]


def gain_of(metric: str):
    """value(evidence, seed) -> the teacher's gain `metric` on that interval seed, or None."""
    return lambda e, s: e.gains_by_seed.get(s, {}).get(metric)


def above(ci: dict) -> bool:
    return ci["lo"] is not None and ci["lo"] > 0


def below(ci: dict) -> bool:
    return ci["hi"] is not None and ci["hi"] < 0


def inside(ci: dict, margin: float) -> bool:
    return ci["lo"] is not None and -margin <= ci["lo"] and ci["hi"] <= margin


def rule_gain_expected(margin: float):
    """Decision on one interval where the paper predicts a positive effect (F1, F3-OOD); None = undecided."""
    def decide(cis: dict) -> str | None:
        ci = cis["gain"]
        return REPRODUCED if above(ci) else NOT_REPRODUCED if below(ci) or inside(ci, margin) else None
    return decide


def rule_no_gain_expected(margin: float):
    """Decision where the paper predicts no or a negative effect (F2); None = undecided."""
    def decide(cis: dict) -> str | None:
        ci = cis["gain"]
        return REPRODUCED if below(ci) or inside(ci, margin) else NOT_REPRODUCED if above(ci) else None
    return decide


def rule_downstream(cis: dict) -> str | None:
    """F3-downstream on the accuracy ("gain") and in-domain intervals; None = undecided."""
    down, in_domain = cis["gain"], cis["in_domain"]
    if above(down) and not above(in_domain):
        return REPRODUCED
    if below(down) or (above(in_domain) and not above(down)):
        return NOT_REPRODUCED
    return None


def _verdict(finding: str, decision: str, stage: str, detail: str, ci: dict | None = None, **extra) -> dict:
    return {"finding": finding, "question": QUESTIONS[finding], "verdict": decision, "stage": stage, "ci": ci,
            "detail": detail, "rule": RULES[finding], "n_seeds": 0, "seeds": [], "seeds_used": [], "look": None,
            "decided_at": None, "critical_value": None, "values": {}, **extra}


def not_askable(finding: str, detail: str, final: bool = True) -> dict:
    return _verdict(finding, INCONCLUSIVE, NOT_ASKABLE if final else OPEN, detail)


def sequential_verdict(finding: str, seeds: list[str], series: dict[str, list[float]], decide, design: Design,
                       detail: str, **extra) -> dict:
    """The verdict of one finding from its per-seed series: the first decisive look, or the last reached."""
    result = sequential_decision(series, decide, design)
    cis = result["cis"]
    if result["look"] is None:  # below the first look: the mean so far, no interval
        cis = {name: {**mean_ci(values), "lo": None, "hi": None} for name, values in series.items()}
        detail += (f" {len(seeds)} interval seed(s) so far; the first look is at {design.first_look}: no interval "
                   "yet.")
    if len(seeds) > design.max_seeds:
        detail += f" Seeds after the first {design.max_seeds} (the design's maximum) are not used."
    stage = DECIDED if result["decided"] else AT_MAX if result["at_max"] else OPEN
    n = result["n_seeds"]
    ci = cis.get("gain") if cis.get("gain", {}).get("n") else None
    other = {name: c for name, c in cis.items() if name != "gain"}
    return _verdict(finding, result["decision"] or INCONCLUSIVE, stage, detail, ci, n_seeds=n, seeds=seeds,
                    seeds_used=seeds[:n], look=result["look"], values=series,
                    decided_at={"look": result["look"], "n_seeds": n} if result["decided"] else None,
                    critical_value=ci.get("critical_value") if ci else None, **other, **extra)


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


def decide_f1(setting: SettingEvidence, margin: float, design: Design) -> dict:
    weak = [e for e in setting.teachers if e.strength == "weak-to-strong" and e.alpha is not None]
    if not weak:
        return not_askable("F1", "No teacher in the grid is weaker than the student by held-out loss (beyond the "
                           "baselines' prediction interval), so the question cannot be asked.", setting.labels_final)
    seeds, series = finding_series(setting.interval_seeds, weak, gain_of("overall"))
    names = ", ".join(f"{e.model} @ {e.tokens:,}" for e in weak)
    return sequential_verdict("F1", seeds, {"gain": series}, rule_gain_expected(margin), design,
                              f"Weaker teachers: {names}. Overall gain at the tuned α.",
                              teachers=[e.teacher_id for e in weak])


def decide_f2(setting: SettingEvidence, margin: float, design: Design) -> dict:
    pairs, notes = stronger_pairs([e for e in setting.teachers if e.alpha is not None])
    if not pairs:
        return not_askable("F2", "No pair of teachers where more parameters or more tokens made a measurably "
                           "stronger teacher. " + " ".join(notes))

    def difference(pair, seed):
        _, weaker, stronger = pair
        a, b = gain_of("overall")(weaker, seed), gain_of("overall")(stronger, seed)
        return b - a if a is not None and b is not None else None

    seeds, series = finding_series(setting.interval_seeds, pairs, difference)
    names = "; ".join(f"{axis}: {a.model} @ {a.tokens:,} → {b.model} @ {b.tokens:,}" for axis, a, b in pairs)
    return sequential_verdict("F2", seeds, {"gain": series}, rule_no_gain_expected(margin), design,
                              f"Pairs (weaker → stronger): {names}. Gain difference, stronger minus weaker. "
                              + " ".join(notes),
                              pairs=[{"axis": axis, "weaker": a.teacher_id, "stronger": b.teacher_id}
                                     for axis, a, b in pairs],
                              teachers=sorted({e.teacher_id for _, a, b in pairs for e in (a, b)}))


def decide_f3(setting: SettingEvidence, margin: float, design: Design) -> list[dict]:
    tuned = [e for e in setting.teachers if e.alpha is not None]
    ids = [e.teacher_id for e in tuned]
    verdicts = []
    if not setting.has_ood:
        verdicts.append(not_askable("F3-OOD", "No OOD sets were evaluated."))
    else:
        def ood_minus_in(e, s):
            ood, in_domain = gain_of("ood")(e, s), gain_of("in_domain")(e, s)
            return ood - in_domain if ood is not None and in_domain is not None else None

        seeds, series = finding_series(setting.interval_seeds, tuned, ood_minus_in)
        verdicts.append(sequential_verdict("F3-OOD", seeds, {"gain": series}, rule_gain_expected(margin), design,
                                           "OOD minus in-domain gain (nats), all teachers.", teachers=ids))
    if not setting.has_downstream:
        verdicts.append(not_askable("F3-downstream", "No downstream tasks were evaluated."))
        return verdicts

    def both(e, s):
        down, in_domain = gain_of("downstream")(e, s), gain_of("in_domain")(e, s)
        return (down, in_domain) if down is not None and in_domain is not None else None

    seeds = complete_seeds(setting.interval_seeds, tuned, both)
    series = {"gain": [statistics.fmean(both(e, s)[0] for e in tuned) for s in seeds],
              "in_domain": [statistics.fmean(both(e, s)[1] for e in tuned) for s in seeds]}
    verdict = sequential_verdict("F3-downstream", seeds, series, rule_downstream, design,
                                 "Downstream accuracy gain (the interval shown), all teachers.", teachers=ids)
    verdict["detail"] += f" In-domain loss gain at the same look: {format_ci(verdict['in_domain'])} nats."
    verdicts.append(verdict)
    return verdicts


def decide(setting: SettingEvidence, margin: float, design: Design = DESIGN) -> list[dict]:
    """The four verdicts of one student setting (F1, F2, F3-OOD, F3-downstream)."""
    return [decide_f1(setting, margin, design), decide_f2(setting, margin, design)] + decide_f3(setting, margin,
                                                                                                design)


def verdict_table(verdicts: list[dict]) -> list[str]:
    lines = ["| finding | question | verdict | numbers (mean [95 % repeated CI] over interval seeds) | seeds (look) "
             "| stage |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        unit = " accuracy" if v["finding"] == "F3-downstream" else " nats"
        numbers = format_ci(v["ci"]) + (unit if v["ci"] else "")
        look = f"{v['n_seeds']} (look {v['look']})" if v["look"] else f"{v['n_seeds']} (no look yet)"
        lines.append(f"| {v['finding']} | {v['question']} | **{v['verdict']}** | {numbers} | {look} | {v['stage']} |")
    return lines


STRENGTH_WORDS = {"weak-to-strong": "weaker", "same-level": "level", "strong-to-weak": "stronger", "unknown": "—"}


def teachers_table(setting: SettingEvidence, tolerance: float) -> list[str]:
    band = setting.band
    if band["lo"] is not None:
        band_text = (f"Student baseline held-out loss {band['mean']:.4f} nats, sd {band['sd']:.4f} over seeds "
                     f"{', '.join(setting.band_seeds)}; 95 % prediction interval for one seed "
                     f"[{band['lo']:.4f}, {band['hi']:.4f}]: a teacher above it is weaker, below it stronger.")
    elif band["mean"] is not None:
        band_text = (f"Student baseline held-out loss {band['mean']:.4f} nats (n={band['n']}): fewer than 2 "
                     f"baselines, so the band is ±{tolerance:g} nats.")
    else:
        band_text = "Student baseline: not evaluated yet."
    lines = ["", "### Teachers, measured", "", band_text,
             f"Tuning seeds (α picked, left out of intervals): {', '.join(setting.tuning_seeds) or '—'}; interval "
             f"seeds: {', '.join(setting.interval_seeds) or '—'}.", "",
             "| teacher | params (non-emb.) | tokens | held-out loss | vs student | tuned α | interval seeds | "
             "overall gain | in-domain gain | OOD gain | downstream gain |",
             "|---|---:|---:|---:|---|---|---:|---|---|---|---|"]
    for e in setting.teachers:
        loss = f"{e.held_out_loss:.4f}" if e.held_out_loss is not None else "—"
        alpha = f"{e.alpha:g}" if e.alpha is not None else "—"
        strength = STRENGTH_WORDS.get(e.strength, e.strength)
        lines.append(f"| {e.model} | {e.params:,} | {e.tokens:,} | {loss} | {strength} | {alpha} | "
                     f"{len(e.gains_by_seed)} | {format_ci(e.ci('overall'))} | {format_ci(e.ci('in_domain'))} | "
                     f"{format_ci(e.ci('ood'))} | {format_ci(e.ci('downstream'))} |")
    lines += ["", "Per-teacher intervals here are plain Student-t intervals over the interval seeds, for "
                  "reading only; the verdicts use the sequential intervals above.", ""]
    return lines


def rules_text(tolerance: float, margin: float, design: Design) -> list[str]:
    lines = ["### How the verdicts are decided", "",
             "Gains are paired (a student minus the baseline with the same initial weights and batches); overall = "
             "mean of the in-domain and OOD loss gains, in nats. Seeds are ordered; the first "
             f"{TUNING_SEEDS} are tuning seeds: each teacher's α is the one with the best mean overall gain on them, "
             "and they are left out of every interval, so the reported gain is not the lucky maximum of the runs it "
             "is judged on. A teacher's strength is its measured held-out loss against the 95 % prediction "
             f"interval of the student baselines of the first {label_seeds(design)} seeds (fewer than 2: "
             f"±{tolerance:g} nats), not its size. Each finding is one pooled quantity per interval seed.",
             "",
             f"Intervals: {design.describe()}. Seeds are added while a finding is inconclusive; because the "
             "intervals hold at every look at once, the one at the look where the demo stopped is valid however "
             "that look was reached (decided, at an opt-in time cap, or at the maximum). The verdict is the one at "
             f"the first look where it is decided. margin = {margin:g} nats. The rule was fixed before the runs and "
             "is the same for every grid:", ""]
    return lines + [f"- **{finding}**: {rule}" for finding, rule in RULES.items()] + [""]


def verdict_sections(rows: list[dict], tolerance: float, margin: float,
                     design: Design = DESIGN) -> tuple[list[str], dict]:
    """Markdown lines of the verdict section (and the evidence behind it) plus the same as data."""
    evidence_by_setting = teacher_evidence(rows, tolerance, design)
    lines = ["## Verdicts", ""]
    data = {"margin": margin, "tolerance": tolerance, "design": {"name": design.describe(), "looks": list(design.looks),
            "max_seeds": design.max_seeds, "alpha": design.alpha, "critical_values": list(design.critical_values),
            "tuning_seeds": TUNING_SEEDS, "label_seeds": label_seeds(design)}, "settings": []}
    if not evidence_by_setting:
        lines += ["No finished student with a finished baseline yet: no verdict.", ""]
        return lines, data
    labels = {r["objective_key"]: r["objective"] for r in rows if r.get("objective_key")}
    for key, setting in sorted(evidence_by_setting.items(), key=lambda kv: str(kv[0])):
        objective = labels.get(setting.objective_key, setting.objective_key)
        verdicts = decide(setting, margin, design)
        data["settings"].append({"student": setting.model, "tokens": setting.tokens, "objective": objective,
                                 "verdicts": verdicts, "tuning_seeds": setting.tuning_seeds,
                                 "interval_seeds": setting.interval_seeds, "band": setting.band,
                                 "band_seeds": setting.band_seeds,
                                 "teachers": [e.__dict__ for e in setting.teachers]})
        lines += [f"Student {setting.model} trained on {setting.tokens:,} tokens; objective {objective}.", ""]
        lines += verdict_table(verdicts)
        lines += ["", "What each verdict rests on:", ""]
        lines += [f"- **{v['finding']}** — {v['detail'].strip()}" for v in verdicts]
        lines += teachers_table(setting, tolerance)
    return lines + rules_text(tolerance, margin, design), data
