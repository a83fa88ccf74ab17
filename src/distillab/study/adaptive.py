"""Seeds until the answer is clear: which runs the demo adds next, from the rows it has.

The demo runner calls `seeds_to_add(rows, tolerance, margin)` between rounds, after every planned
run has finished (rows from `results.collect_rows` + `add_gains_and_labels`, any status). Per
student setting it gets the findings still open and the runs that take each open finding to its
next look of `distillab.study.sequential.DESIGN`:

1. Tuning: every teacher x every alpha of the setting (and the baseline) on the first
   `verdicts.TUNING_SEEDS` seeds. Until those exist nothing else is asked for.
2. Interval seeds: for each open finding (inconclusive, below the design's maximum), the teachers
   it concerns at their tuned alpha, plus the baseline, on enough further seeds to reach the next
   look. Seeds are reused in order before new ones are made (new seed = largest init seed of the
   setting + 1, ...; data seed = init seed), so every open finding gets the *same* new seeds and
   stays paired. A seed where one of the concerned runs failed is skipped, not retried here.

Decided findings keep the verdict of their first decisive look (`distillab.study.verdicts`); adding
seeds for another finding never changes it. A finding at the maximum, or one that cannot be
asked (no weaker teacher once the band is final, no stronger pair, no OOD set, no task), asks for
nothing. The compute-matched baselines of the demo (if any) are the runner's to add per seed.
"""

from __future__ import annotations

from distillab.study.sequential import DESIGN, Design
from distillab.study.verdicts import (
    OPEN,
    TUNING_SEEDS,
    SettingEvidence,
    decide,
    ordered_seeds,
    seed_key,
    seed_order,
    teacher_evidence,
)


def next_look(n: int, design: Design) -> int | None:
    """The first look above n seeds (None at or past the maximum)."""
    later = [look for look in design.looks if look > n]
    return later[0] if later else None


def new_seeds(seeds: list[str]):
    """Fresh seeds after the largest init seed in `seeds`: (init, data) pairs, data = init."""
    start = max((seed_order(s)[0] for s in seeds), default=0) + 1
    return iter((s, s) for s in range(start, 1_000_000_000))


def as_key(seed: tuple[int, int]) -> str:
    return seed_key({"init_seed": seed[0], "data_seed": seed[1]})


def student_request(template: dict, alpha: float, seed: tuple[int, int]) -> dict:
    return {"role": "student", "model": template["model"], "tokens": template["tokens"],
            "objective_key": template["objective_key"], "teacher_id": template["teacher_id"], "alpha": alpha,
            "temperature": template.get("temperature"), "divergence": template.get("divergence"),
            "top_k": template.get("top_k"), "init_seed": seed[0], "data_seed": seed[1]}


def baseline_request(template: dict, seed: tuple[int, int]) -> dict:
    return {"role": "baseline", "model": template["model"], "tokens": template["tokens"], "init_seed": seed[0],
            "data_seed": seed[1]}


class SettingRuns:
    """The existing runs of one student setting, indexed for "is this run there?" and "did it fail?"."""

    def __init__(self, students: list[dict], baselines: list[dict]):
        self.students = {(r["teacher_id"], r["alpha"], seed_key(r)): r for r in students}
        self.baselines = {seed_key(r): r for r in baselines}
        self.templates = {r["teacher_id"]: r for r in students}
        self.alphas = sorted({r["alpha"] for r in students})
        self.baseline_template = students[0]
        self.seeds = ordered_seeds(students + baselines)
        self.fresh = new_seeds(self.seeds)

    def failed(self, cells: list[tuple], seed: str) -> bool:
        rows = [self.students.get((t, a, seed)) for t, a in cells] + [self.baselines.get(seed)]
        return any(r is not None and r.get("status") == "failed" for r in rows)

    def missing(self, cells: list[tuple], seed: tuple[int, int]) -> list[dict]:
        key = as_key(seed)
        out = [student_request(self.templates[t], a, seed) for t, a in cells if (t, a, key) not in self.students]
        if key not in self.baselines:
            out.append(baseline_request(self.baseline_template, seed))
        return out


def tuning_runs(runs: SettingRuns) -> list[dict]:
    """Every teacher x alpha (and the baseline) on the tuning seeds that lack them."""
    seeds = [seed_order(s) for s in runs.seeds[:TUNING_SEEDS]]
    while len(seeds) < TUNING_SEEDS:
        seeds.append(next(runs.fresh))
    cells = [(t, a) for t in runs.templates for a in runs.alphas]
    return [request for seed in seeds for request in runs.missing(cells, seed)]


def finding_runs(verdict: dict, setting: SettingEvidence, runs: SettingRuns, shared: list, design: Design) -> list:
    """The runs that take one open finding to its next look. `shared` holds the new seeds made so far
    (extended in place) so that all findings of a setting draw the same new seeds in order."""
    tuned = {e.teacher_id: e.alpha for e in setting.teachers if e.alpha is not None}
    if verdict["finding"] == "F1" and not setting.labels_final:
        concerned = list(tuned)  # until the band's baselines are in, any teacher may turn out weaker
    else:
        concerned = verdict.get("teachers") or list(tuned)
    cells = [(t, tuned[t]) for t in concerned if t in tuned]
    target = next_look(len(verdict["seeds"]), design)
    if not cells or target is None:
        return []
    needed = target - len(verdict["seeds"])
    candidates = [seed_order(s) for s in setting.interval_seeds
                  if s not in verdict["seeds"] and not runs.failed(cells, s)]
    chosen, index = candidates[:needed], 0
    while len(chosen) < needed:
        if index == len(shared):
            shared.append(next(runs.fresh))
        chosen.append(shared[index])
        index += 1
    return [request for seed in chosen for request in runs.missing(cells, seed)]


def dedupe(requests: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in requests:
        key = tuple(sorted((k, str(v)) for k, v in r.items()))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def seeds_to_add(rows: list[dict], tolerance: float, margin: float, design: Design = DESIGN) -> list[dict]:
    """Per student setting: {"student", "tokens", "objective_key", "findings" (finding -> verdict, stage,
    n_seeds, next_look), "runs" (requests: role, model, tokens, seeds, and for students teacher_id,
    alpha and the objective's temperature / divergence / top_k)}. Empty "runs" everywhere = stop."""
    out = []
    for key, setting in sorted(teacher_evidence(rows, tolerance, design).items(), key=lambda kv: str(kv[0])):
        students = [r for r in rows if r["role"] == "student" and (r["model"], r["tokens"], r["objective_key"]) == key]
        baselines = [r for r in rows if r["role"] == "baseline" and (r["model"], r["tokens"]) == key[:2]]
        runs = SettingRuns(students, baselines)
        verdicts = decide(setting, margin, design)
        requests = tuning_runs(runs)
        if not requests:
            shared: list = []
            for verdict in verdicts:
                if verdict["stage"] == OPEN:
                    requests += finding_runs(verdict, setting, runs, shared, design)
        findings = {v["finding"]: {"verdict": v["verdict"], "stage": v["stage"], "n_seeds": v["n_seeds"],
                                   "next_look": next_look(len(v["seeds"]), design) if v["stage"] == OPEN else None}
                    for v in verdicts}
        out.append({"student": key[0], "tokens": key[1], "objective_key": key[2], "findings": findings,
                    "runs": dedupe(requests)})
    return out


def undecided_findings(rows: list[dict], tolerance: float, margin: float, design: Design = DESIGN) -> list[tuple]:
    """(student, tokens, objective_key, finding) of every finding that more seeds could still decide."""
    return [(s["student"], s["tokens"], s["objective_key"], name) for s in seeds_to_add(rows, tolerance, margin, design)
            for name, f in s["findings"].items() if f["stage"] == OPEN]
