"""Operating characteristics of a study design, by simulation: how likely each finding is decided at
each look, and how many runs and minutes the demo then takes. The demo's design
(`distillab.study.sequential.DESIGN`) was chosen with this module, by the rule of `choose_design`, before
any demo ran on it (docs/sweeps.md shows the tables; `python -m distillab.study.power` prints them).

Inputs, from the committed demos (`finding_values`: their results.csv read back and judged by the
verdict code itself, every interval seed of each finding's quantity; pinned in `CHOICE_INPUTS`):

- effect: the mean per-seed value measured by the full demo (the larger study), per finding;
  for F3-downstream, the accuracy gain and the in-domain loss gain;
- seed noise: the sd over seeds of the same quantity in each committed demo; "pessimistic" takes
  the larger of the two, "default" the default demo's own.

Model: per seed, a finding's value is normal(effect, sd), independent across seeds; findings are
independent of each other (the cost simulation needs only which are still open). Each look's
interval and each finding's rule are the verdicts' (`verdicts.rule_*`, vectorised here and checked
against them by the tests). Minutes come from the demo's own plan (`demo.plan_study`: every run's
FLOPs through the time model of `sweep.eta`) at the speed measured on the project's machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from distillab.study.sequential import DESIGN, Design, calibrate_critical_values

FINDINGS = ("F1", "F2", "F3-OOD", "F3-downstream")
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"

# measure_rate("cpu-27k", 512, 32, 128) on the project's 2-core machine (26.5 GFLOP/s, November 2026)
PROJECT_MACHINE_RATE = 26.5e9
WORKERS = 2
MARGIN = 0.02  # the grids' verdict_margin

# The selection rule, fixed before any demo ran on the new design:
LIMIT_MINUTES = 24.0  # worst case (every finding open to the last look), predicted, quiet machine; 30 is the goal
POWER = 0.8  # every finding decided with at least this probability at the pessimistic noise
REPLICATIONS = 20_000  # simulated studies per design and noise
CALIBRATION_REPLICATIONS = 400_000  # candidates' critical values (DESIGN's own used 2,000,000)
RNG_SEED = 20261120

CANDIDATE_LOOKS = ((6,), (8,), (10,), (12,), (14,), (3, 6), (4, 8), (5, 10), (6, 12), (7, 14), (3, 6, 9),
                   (4, 7, 10), (4, 8, 12), (5, 8, 11), (5, 10, 15), (3, 4, 5, 6, 7, 8), (4, 6, 8, 10, 12))


@dataclass(frozen=True)
class Effect:
    """One finding's per-seed quantity: mean and sd (F3-downstream: also the in-domain loss gain's)."""

    finding: str
    mean: float
    sd: float
    in_domain_mean: float | None = None
    in_domain_sd: float | None = None


# ----------------------------------------------------------------------------- inputs from the committed demos


def finding_values(results_csv: Path, tolerance: float = 0.02, margin: float = MARGIN) -> dict[str, dict]:
    """Finding -> {"gain": [...], "in_domain": [...]} per interval seed, judged by the verdict code from a
    committed results.csv (one student setting)."""
    from distillab.study.results import read_table
    from distillab.study.verdicts import decide, teacher_evidence

    settings = list(teacher_evidence(read_table(results_csv), tolerance).values())
    return {v["finding"]: v["values"] for v in decide(settings[0], margin)}


def stdev(values: list[float]) -> float:
    return float(np.std(values, ddof=1))


# The per-seed values the design was chosen from: `finding_values` of the committed demos of commit
# 77424d2 (docs/results/demo-default: interval seeds 3-5; demo-full: 3-10), to 6 decimals. Pinned, so
# that the choice can be rerun after those reports are regenerated under the new design;
# CHOICE_SOURCES are the sha256 of the two results.csv they came from.
CHOICE_INPUTS = {
    "default": {"F1": {"gain": [0.006357, -0.006966, -0.002863]},
                "F2": {"gain": [0.027306, 0.025271, 0.026973]},
                "F3-OOD": {"gain": [-0.041664, -0.013479, 0.001629]},
                "F3-downstream": {"gain": [-0.003333, 0.005333, -0.005333],
                                  "in_domain": [0.062237, 0.028196, 0.02928]}},
    "full": {"F1": {"gain": [0.042281, 0.018483, 0.021092, 0.019946, 0.001252, 0.011055, -0.001348, 0.019646]},
             "F2": {"gain": [0.017355, 0.02142, 0.02268, 0.026958, 0.023125]},
             "F3-OOD": {"gain": [-0.049989, -0.039207, -0.015909, -0.018687, -0.046069]},
             "F3-downstream": {"gain": [-0.0235, -0.0085, 0.008, -0.0015, -0.004],
                               "in_domain": [0.10092, 0.080001, 0.076218, 0.073924, 0.067598]}},
}
CHOICE_SOURCES = {"default": "bfd11b52d56009be9bf9f3056fe8efa75db1f5d2c49854291c42f6b9d7ab7397",
                  "full": "9d49783c2eed2ad08337f6a37fe7bacb88095bc22fe32ebe7861bc25a1427f4d"}


def measured_effects(values: dict = CHOICE_INPUTS) -> dict[str, dict[str, Effect]]:
    """{"pessimistic": {finding: Effect}, "default": {...}} from per-seed `values` of the two demos
    ({"default": finding_values(...), "full": ...}): the full demo's means, with the larger of the two
    demos' seed sds (pessimistic) or with the default demo's own."""
    default, full = values["default"], values["full"]
    out: dict[str, dict[str, Effect]] = {"pessimistic": {}, "default": {}}
    for finding in FINDINGS:
        effect = {"mean": float(np.mean(full[finding]["gain"]))}
        if finding == "F3-downstream":
            effect["in_domain_mean"] = float(np.mean(full[finding]["in_domain"]))
        for scenario, pick in (("pessimistic", max), ("default", lambda d, f: d)):
            sds = {"sd": pick(stdev(default[finding]["gain"]), stdev(full[finding]["gain"]))}
            if finding == "F3-downstream":
                sds["in_domain_sd"] = pick(stdev(default[finding]["in_domain"]), stdev(full[finding]["in_domain"]))
            out[scenario][finding] = Effect(finding, **effect, **sds)
    return out


# ----------------------------------------------------------------------------- one finding, many simulated studies


def intervals(values: np.ndarray, design: Design) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), each (replications x looks): the repeated intervals mean +- c_k sd / sqrt(n_k)."""
    lo, hi = [], []
    for n, c in zip(design.looks, design.critical_values):
        mean, sd = values[:, :n].mean(axis=1), values[:, :n].std(axis=1, ddof=1)
        lo.append(mean - c * sd / math.sqrt(n))
        hi.append(mean + c * sd / math.sqrt(n))
    return np.stack(lo, axis=1), np.stack(hi, axis=1)


def rule_outcomes(finding: str, gain: tuple, in_domain: tuple | None, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(reproduced, not reproduced) per replication and look: the verdicts' rules on arrays of (lo, hi)."""
    lo, hi = gain
    above, below, inside = lo > 0, hi < 0, (lo >= -margin) & (hi <= margin)
    if finding in ("F1", "F3-OOD"):  # rule_gain_expected
        return above, (below | inside) & ~above
    if finding == "F2":  # rule_no_gain_expected
        return below | inside, above & ~(below | inside)
    in_above = in_domain[0] > 0  # rule_downstream
    reproduced = above & ~in_above
    return reproduced, ~reproduced & (below | (in_above & ~above))


def simulate_finding(effect: Effect, design: Design, replications: int, rng: np.random.Generator,
                     margin: float = MARGIN) -> dict:
    """Simulated studies of one finding: {"look": index of the first decisive look per replication
    (len(looks) = never), "reproduced": bool per replication (at that look)}."""
    shape = (replications, design.max_seeds)
    gain = intervals(effect.mean + effect.sd * rng.standard_normal(shape), design)
    in_domain = None
    if effect.in_domain_mean is not None:
        in_domain = intervals(effect.in_domain_mean + effect.in_domain_sd * rng.standard_normal(shape), design)
    reproduced, not_reproduced = rule_outcomes(effect.finding, gain, in_domain, margin)
    decided = reproduced | not_reproduced
    look = np.where(decided.any(axis=1), decided.argmax(axis=1), len(design.looks))
    rows = np.arange(replications)
    first = np.minimum(look, len(design.looks) - 1)
    return {"look": look, "reproduced": reproduced[rows, first] & (look < len(design.looks))}


def decided_by_look(look: np.ndarray, looks: int) -> list[float]:
    """P(decided at or before look k), k = 1 .. looks."""
    return [float((look <= k).mean()) for k in range(looks)]


# ----------------------------------------------------------------------------- the whole study: runs and minutes


def study_cost(plan, looks: dict[str, np.ndarray]) -> dict:
    """Runs and seconds of simulated studies from the first decisive look of each finding: the tuning
    round, then per look the new seeds of the open findings (F2 and F3 concern every teacher, F1 the
    rungs below the student). `plan` is a `demo.StudyPlan`."""
    from distillab.study.demo import STUDY_OVERHEAD_SECONDS
    from distillab.sweep.eta import schedule_seconds

    replications = len(next(iter(looks.values())))
    seconds = np.full(replications, STUDY_OVERHEAD_SECONDS + schedule_seconds(list(plan.tuning.values()),
                                                                               plan.workers))
    runs = np.full(replications, len(plan.tuning))
    previous = 0
    for k, n in enumerate(plan.looks):
        every = np.zeros(replications, dtype=bool)
        for finding in ("F2", "F3-OOD", "F3-downstream"):
            every |= looks[finding] >= k
        weak = (looks["F1"] >= k) & ~every
        for mask, teachers in ((every, plan.teachers), (weak, plan.weaker)):
            seconds += mask * plan.round_seconds(teachers, n - previous)
            runs += mask * (len(teachers) + 1) * (n - previous)
        previous = n
    return {"seconds": seconds, "runs": runs}


def operating_characteristics(design: Design, plan, effects: dict[str, Effect], replications: int = REPLICATIONS,
                              rng_seed: int = RNG_SEED) -> dict:
    """Per finding P(decided by look k) and P(reproduced); expected and worst runs and minutes."""
    rng = np.random.default_rng(rng_seed)
    plan = replace(plan, design=design)
    simulated = {f: simulate_finding(effects[f], design, replications, rng) for f in FINDINGS}
    cost = study_cost(plan, {f: s["look"] for f, s in simulated.items()})
    return {"decided_by_look": {f: decided_by_look(s["look"], len(design.looks)) for f, s in simulated.items()},
            "reproduced": {f: float(s["reproduced"].mean()) for f, s in simulated.items()},
            "expected_runs": float(cost["runs"].mean()), "expected_minutes": float(cost["seconds"].mean() / 60),
            "worst_runs": plan.max_runs(), "worst_minutes": plan.worst_seconds() / 60}


# ----------------------------------------------------------------------------- choosing the design


def candidate_designs(replications: int = CALIBRATION_REPLICATIONS) -> list[Design]:
    """Every candidate (looks x spending function), calibrated like DESIGN; a single look is one design."""
    out = []
    for looks in CANDIDATE_LOOKS:
        for spending in ("obrien-fleming",) if len(looks) == 1 else ("obrien-fleming", "pocock"):
            values = calibrate_critical_values(looks, 0.05, replications, RNG_SEED, spending)
            out.append(Design(looks, 0.05, values, replications, RNG_SEED, spending))
    return out


def default_plan(workers: int = WORKERS, rate: float = PROJECT_MACHINE_RATE):
    """The default demo's plan at the project machine's measured speed (no run is made)."""
    import tempfile

    from distillab.study.demo import STUDIES, plan_study

    with tempfile.TemporaryDirectory() as folder:
        return plan_study(STUDIES["default"], Path(folder), rate, workers)


def evaluate(designs: list[Design], plan, effects: dict[str, dict[str, Effect]]) -> list[dict]:
    """Each design's operating characteristics under both noise scenarios."""
    return [{"design": d, **{scenario: operating_characteristics(d, plan, effects[scenario]) for scenario in effects}}
            for d in designs]


def eligible(entry: dict) -> bool:
    return (entry["pessimistic"]["worst_minutes"] <= LIMIT_MINUTES
            and smallest_power(entry) >= POWER)


def smallest_power(entry: dict) -> float:
    """The least likely finding's probability to be decided by the last look, at the pessimistic noise."""
    return min(p[-1] for p in entry["pessimistic"]["decided_by_look"].values())


def choose_design(entries: list[dict]) -> dict:
    """The rule: among designs whose worst case fits LIMIT_MINUTES and that decide every finding with
    probability >= POWER at the pessimistic noise, the largest smallest power (to 0.01); ties: the
    smallest expected minutes (mean over the two noise scenarios)."""
    def key(entry):
        expected = (entry["pessimistic"]["expected_minutes"] + entry["default"]["expected_minutes"]) / 2
        return -round(smallest_power(entry), 2), expected

    chosen = [e for e in entries if eligible(e)]
    if not chosen:
        raise ValueError("power: no candidate design meets the rule")
    return min(chosen, key=key)


# ----------------------------------------------------------------------------- tables for docs/sweeps.md


def design_label(design: Design) -> str:
    spending = "OBF" if design.spending == "obrien-fleming" else "Pocock"
    return f"{spending} {','.join(map(str, design.looks))}" if len(design.looks) > 1 else f"fixed {design.looks[0]}"


def candidates_table(entries: list[dict]) -> list[str]:
    lines = ["| design (looks at interval seeds) | critical values | power F1 / F2 / F3-OOD / F3-down (pessimistic) "
             "| same, default noise | expected min (pess. / default) | expected runs | worst runs / min |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        pess, default = e["pessimistic"], e["default"]
        power = lambda r: " / ".join(f"{r['decided_by_look'][f][-1]:.2f}" for f in FINDINGS)  # noqa: E731
        lines.append(f"| {design_label(e['design'])}{' ✓' if eligible(e) else ''} | "
                     f"{', '.join(f'{c:.2f}' for c in e['design'].critical_values)} | {power(pess)} | "
                     f"{power(default)} | {pess['expected_minutes']:.1f} / {default['expected_minutes']:.1f} | "
                     f"{pess['expected_runs']:.0f} / {default['expected_runs']:.0f} | "
                     f"{pess['worst_runs']} / {pess['worst_minutes']:.1f} |")
    return lines


def looks_table(entry: dict) -> list[str]:
    design = entry["design"]
    header = " | ".join(f"by look {k + 1} ({n} seeds)" for k, n in enumerate(design.looks))
    lines = [f"| finding | noise | effect (sd) | {header} | P(reproduced) |",
             "|---|---|---|" + "---|" * len(design.looks) + "---|"]
    for scenario in ("pessimistic", "default"):
        for f in FINDINGS:
            effect = entry["effects"][scenario][f]
            text = f"{effect.mean:+.4f} ({effect.sd:.4f})"
            if effect.in_domain_mean is not None:
                text += f"; in-domain {effect.in_domain_mean:+.4f} ({effect.in_domain_sd:.4f})"
            cells = " | ".join(f"{p:.2f}" for p in entry[scenario]["decided_by_look"][f])
            lines.append(f"| {f} | {scenario} | {text} | {cells} | {entry[scenario]['reproduced'][f]:.2f} |")
    return lines


def main() -> None:
    effects = measured_effects()
    plan = default_plan()
    entries = evaluate(candidate_designs(), plan, effects)
    chosen = choose_design(entries)
    print("\n".join(candidates_table(entries)))
    print(f"\nchosen: {design_label(chosen['design'])}; DESIGN in code: {DESIGN.describe()}\n")
    final = {"design": DESIGN, "effects": effects, **{s: operating_characteristics(DESIGN, plan, effects[s])
                                                      for s in effects}}
    print("\n".join(looks_table(final)))
    for scenario in effects:
        r = final[scenario]
        print(f"{scenario}: expected {r['expected_runs']:.0f} runs, {r['expected_minutes']:.1f} min; worst "
              f"{r['worst_runs']} runs, {r['worst_minutes']:.1f} min")


if __name__ == "__main__":
    main()
