"""The design simulation (`distillab.study.power`): its inputs recomputed from the committed demos, its rules
against the verdict code, its probabilities against exact float64 integrals, and the design it chose."""

import csv
import hashlib
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from distillab.study.power import (
    CHOICE_INPUTS,
    CHOICE_SOURCES,
    FINDINGS,
    LIMIT_MINUTES,
    POWER,
    Effect,
    default_plan,
    finding_values,
    measured_effects,
    operating_characteristics,
    rule_outcomes,
    simulate_finding,
)
from distillab.study.sequential import DESIGN, Design
from distillab.study.verdicts import NOT_REPRODUCED, REPRODUCED, rule_downstream, rule_gain_expected, rule_no_gain_expected

RESULTS = Path(__file__).parent.parent / "docs" / "results"


def committed(name: str) -> Path:
    """A committed demo's results.csv, if it is still the one the design was chosen from."""
    path = RESULTS / f"demo-{name}" / "results.csv"
    if hashlib.sha256(path.read_bytes()).hexdigest() != CHOICE_SOURCES[name]:
        pytest.skip(f"docs/results/demo-{name} was regenerated after the design was chosen (inputs pinned)")
    return path


def test_f1_values_of_the_full_demo_recomputed_from_its_results_csv():
    # F1 per interval seed = mean over the weaker teachers (cpu-14k, cpu-27k; both tuned to alpha 0.2 on
    # seeds 1-2) of (in-domain gain + OOD gain) / 2, straight from the CSV columns
    rows = list(csv.DictReader(open(committed("full"))))
    teachers = {r["run_id"]: r["model"] for r in rows if r["role"] == "teacher"}
    expected = []
    for seed in range(3, 11):
        overall = [(float(r["gain/in_domain"]) + float(r["gain/ood"])) / 2 for r in rows
                   if r["role"] == "student" and int(r["init_seed"]) == seed and float(r["alpha"]) == 0.2
                   and teachers[r["teacher_id"]] in ("cpu-14k", "cpu-27k")]
        assert len(overall) == 2
        expected.append(statistics.fmean(overall))
    assert finding_values(committed("full"))["F1"]["gain"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", ["default", "full"])
def test_the_pinned_inputs_are_the_committed_demos_values(name):
    values = finding_values(committed(name))
    for finding in FINDINGS:
        for quantity, pinned in CHOICE_INPUTS[name][finding].items():
            assert values[finding][quantity] == pytest.approx(pinned, abs=1e-6), (finding, quantity)


def test_effects_are_the_full_demos_means_with_either_demos_noise():
    effects = measured_effects()
    full, default = CHOICE_INPUTS["full"]["F1"]["gain"], CHOICE_INPUTS["default"]["F1"]["gain"]
    assert effects["pessimistic"]["F1"].mean == effects["default"]["F1"].mean == pytest.approx(statistics.fmean(full))
    assert effects["pessimistic"]["F1"].sd == pytest.approx(max(statistics.stdev(full), statistics.stdev(default)))
    assert effects["default"]["F1"].sd == pytest.approx(statistics.stdev(default))
    down = effects["pessimistic"]["F3-downstream"]
    assert down.in_domain_mean == pytest.approx(statistics.fmean(CHOICE_INPUTS["full"]["F3-downstream"]["in_domain"]))
    assert set(effects["default"]) == set(FINDINGS)


def random_intervals(rng, n):
    lo = rng.normal(0, 0.03, n)
    return lo, lo + rng.exponential(0.03, n)


@pytest.mark.parametrize("finding", FINDINGS)
def test_vectorised_rules_are_the_verdict_rules(finding):
    rng = np.random.default_rng(3)
    gain, in_domain = random_intervals(rng, 2000), random_intervals(rng, 2000)
    reproduced, not_reproduced = rule_outcomes(finding, gain, in_domain, margin=0.02)
    library = {"F1": rule_gain_expected(0.02), "F3-OOD": rule_gain_expected(0.02), "F2": rule_no_gain_expected(0.02),
               "F3-downstream": rule_downstream}[finding]
    for i in range(2000):
        cis = {"gain": {"lo": gain[0][i], "hi": gain[1][i]},
               "in_domain": {"lo": in_domain[0][i], "hi": in_domain[1][i]}}
        decision = library(cis)
        assert (reproduced[i], not_reproduced[i]) == (decision == REPRODUCED, decision == NOT_REPRODUCED), (i, cis)


def noncentral_t_upper(c: float, df: int, delta: float) -> float:
    """P(T > c) for the noncentral t (df, delta), by float64 quadrature over the chi-square:
    T = (Z + delta) / sqrt(V / df), so P(T > c) = E_V[1 - Phi(c sqrt(V / df) - delta)]."""
    v = np.linspace(1e-9, 60 * df, 400_001)
    log_density = (df / 2 - 1) * np.log(v) - v / 2 - (df / 2) * math.log(2) - math.lgamma(df / 2)
    tail = 0.5 * np.vectorize(math.erfc)((c * np.sqrt(v / df) - delta) / math.sqrt(2))
    return float(np.trapezoid(np.exp(log_density) * tail, v))


def test_one_look_decision_probability_is_the_noncentral_t_integral():
    # a single look at n seeds with margin 0: decided iff |mean| / (sd / sqrt n) > c
    n, c, mean, sd = 6, 2.57, 0.01, 0.012
    design = Design(looks=(n,), alpha=0.05, critical_values=(c,), replications=1, rng_seed=0)
    delta = mean * math.sqrt(n) / sd
    exact = noncentral_t_upper(c, n - 1, delta) + (1 - noncentral_t_upper(-c, n - 1, delta))
    reps = 40_000
    simulated = simulate_finding(Effect("F1", mean, sd), design, reps, np.random.default_rng(1), margin=0.0)
    decided = (simulated["look"] == 0).mean()
    assert decided == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / reps))
    assert simulated["reproduced"].mean() == pytest.approx(noncentral_t_upper(c, n - 1, delta), abs=0.01)


def test_the_design_meets_the_rule_it_was_chosen_by():
    """At the committed demos' effects and noise, DESIGN decides every finding with >= POWER at the
    pessimistic noise, and its worst case fits LIMIT_MINUTES at the project machine's speed."""
    plan = default_plan()
    effects = measured_effects()
    result = operating_characteristics(DESIGN, plan, effects["pessimistic"], replications=5_000)
    assert min(p[-1] for p in result["decided_by_look"].values()) >= POWER, result["decided_by_look"]
    assert result["worst_minutes"] <= LIMIT_MINUTES and result["worst_runs"] == plan.max_runs()
    assert len(plan.tuning) < result["expected_runs"] <= result["worst_runs"]
    # every finding reaches the first look in the worst case: the first look's round is in the plan
    assert plan.looks[0] == DESIGN.first_look


@pytest.mark.slow
def test_the_rule_chooses_the_design_in_code():
    from distillab.study.power import candidate_designs, choose_design, evaluate

    chosen = choose_design(evaluate(candidate_designs(), default_plan(), measured_effects()))["design"]
    assert (chosen.looks, chosen.spending) == (DESIGN.looks, DESIGN.spending)
