"""The sequential design: its constants, its intervals, and its coverage under the adaptive seed loop.

The coverage tests simulate paired gains with a known mean, run the demo's loop (start at the
first look, add a seed while the decision is open, stop at the maximum) with vectorised numpy,
and check the final interval and the sign of the conclusion against the truth."""

import functools
import math

import numpy as np
import pytest
from conftest import LOOKS_3_TO_8

from distillab.errors import DistillabError
from distillab.study.sequential import (
    DESIGN,
    Design,
    calibrate_critical_values,
    calibration_targets,
    obrien_fleming_spending,
    pocock_spending,
    repeated_interval,
    sequential_decision,
    simulated_t_statistics,
)
from distillab.study.stats import t_quantile_975
from distillab.study.verdicts import NOT_REPRODUCED, REPRODUCED, rule_gain_expected

Z_975 = 1.959963984540054
MARGIN = 0.02


def phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_spending_is_the_obrien_fleming_type_function():
    for t in (0.1, 0.375, 0.5, 0.75, 1.0):
        assert obrien_fleming_spending(t, 0.05) == pytest.approx(1 - phi(Z_975 / math.sqrt(t)), rel=1e-9)
    assert obrien_fleming_spending(0.0, 0.05) == 0.0
    assert obrien_fleming_spending(1.0, 0.05) == pytest.approx(0.025, rel=1e-9)
    with pytest.raises(DistillabError, match="information fraction"):
        obrien_fleming_spending(1.5, 0.05)


def test_pocock_spending_is_the_lan_demets_pocock_type_function():
    for t in (0.1, 1 / 3, 0.5, 2 / 3, 1.0):
        assert pocock_spending(t, 0.05) == pytest.approx(0.025 * math.log(1 + (math.e - 1) * t), rel=1e-12)
    assert pocock_spending(0.0, 0.05) == 0.0 and pocock_spending(1.0, 0.05) == pytest.approx(0.025)
    # it spends more early than the O'Brien-Fleming type: a third of the way, ~40 % of the error vs ~1 %
    assert pocock_spending(1 / 3, 0.05) > 30 * obrien_fleming_spending(1 / 3, 0.05)
    with pytest.raises(DistillabError, match="information fraction"):
        pocock_spending(-0.1, 0.05)
    with pytest.raises(DistillabError, match="unknown spending function"):
        Design(looks=(3, 6), alpha=0.05, critical_values=(5.0, 3.0), replications=1, rng_seed=0, spending="haybittle")


def test_design_constants_are_the_recorded_calibration():
    assert DESIGN.looks == (5, 10, 15) and DESIGN.alpha == 0.05 and DESIGN.spending == "obrien-fleming"
    again = calibrate_critical_values(DESIGN.looks, DESIGN.alpha, DESIGN.replications, DESIGN.rng_seed,
                                      DESIGN.spending)
    assert again == DESIGN.critical_values
    assert list(DESIGN.critical_values) == sorted(DESIGN.critical_values, reverse=True)
    # the last look is wider than a fixed-n interval at 15 seeds (the price of the early looks), not by much
    assert t_quantile_975(14) < DESIGN.critical_values[-1] < 1.1 * t_quantile_975(14)


def t4_upper_tail(c: float) -> float:
    """P(T > c) for Student t with 4 df, exactly: 1/2 - (3/8) x (1 - c^2 / (12 (1 + c^2 / 4))),
    x = c / sqrt(1 + c^2 / 4)."""
    x = c / math.sqrt(1 + c * c / 4)
    return 0.5 - 3 / 8 * x * (1 - c * c / (12 * (1 + c * c / 4)))


def test_first_critical_value_against_the_exact_t_distribution_with_4_df():
    # the first look (5 seeds, 4 df) spends its target alone: P(T_4 > c_1) = target, to Monte Carlo error
    # (~700 crossings of 2,000,000: 4 %) and the rounding of c up to 0.01
    c = DESIGN.critical_values[0]
    target = calibration_targets(DESIGN.looks, DESIGN.alpha, DESIGN.replications, DESIGN.spending)[0]
    assert t4_upper_tail(c) == pytest.approx(target, rel=0.1)


def test_an_independent_simulation_spends_at_most_alpha_over_two_per_side():
    replications = 400_000
    t = simulated_t_statistics(DESIGN.looks, replications, rng_seed=99)
    c = np.array(DESIGN.critical_values)
    upper, either = (t > c).any(axis=1).mean(), (np.abs(t) > c).any(axis=1).mean()
    se = math.sqrt(0.025 * 0.975 / replications)
    assert 0.02 < upper <= 0.025 + 3 * se
    assert either <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / replications)


def test_repeated_interval_is_mean_plus_minus_c_sd_over_root_n():
    values = [0.012, 0.004, 0.017, 0.009, 0.011]
    mean = sum(values) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    ci = repeated_interval(values)
    half = DESIGN.critical_value(5) * sd / math.sqrt(5)
    assert (ci["mean"], ci["lo"], ci["hi"], ci["n"]) == pytest.approx((mean, mean - half, mean + half, 5))
    for bad in ([0.1, 0.2], [0.1] * 9, [0.1] * 16):
        with pytest.raises(DistillabError, match="not a look"):
            repeated_interval(bad)
    with pytest.raises(DistillabError, match="missing"):
        repeated_interval([0.1, None, 0.2, 0.3, 0.1])


def test_decision_is_taken_at_the_first_decisive_look_and_kept():
    decide, design = rule_gain_expected(margin=0.0), LOOKS_3_TO_8
    # n=3: mean 1, sd 0.1, half 26.9 * 0.1 / sqrt 3 > 1 -> open; n=4: half 7.76 * sd / 2 < mean -> above 0
    values = [1.0, 1.1, 0.9, 1.05]
    assert repeated_interval(values[:3], design)["lo"] < 0 < repeated_interval(values, design)["lo"]
    result = sequential_decision({"gain": values + [-5.0, -5.0, -5.0]}, decide, design)
    assert (result["decision"], result["look"], result["n_seeds"], result["decided"]) == (REPRODUCED, 2, 4, True)
    assert result["cis"]["gain"] == repeated_interval(values, design)


def test_undecided_runs_to_the_last_look_reached():
    noisy = [0.3, -0.2, 0.1, -0.3, 0.25, -0.1, 0.2, -0.25, 0.5] * 2
    decide = rule_gain_expected(margin=0.0)
    partial = sequential_decision({"gain": noisy[:12]}, decide)
    assert (partial["decision"], partial["look"], partial["n_seeds"], partial["at_max"]) == (None, 2, 10, False)
    full = sequential_decision({"gain": noisy}, decide)
    assert (full["look"], full["n_seeds"], full["n_available"], full["at_max"]) == (3, 15, 18, True)
    early = sequential_decision({"gain": noisy[:4]}, decide)
    assert (early["look"], early["cis"], early["n_seeds"]) == (None, {}, 0)
    with pytest.raises(DistillabError, match="same seeds"):
        sequential_decision({"gain": [1.0] * 5, "other": [1.0] * 6}, decide)


# ---- coverage of the adaptive loop, by simulation -------------------------------------------------

REPS = 10_000


@functools.cache
def pocock_design() -> Design:
    """DESIGN's looks with Pocock-type spending (calibrated here, 400,000 sequences)."""
    values = calibrate_critical_values(DESIGN.looks, 0.05, 400_000, 5, "pocock")
    return Design(DESIGN.looks, 0.05, values, 400_000, 5, "pocock")


def designs() -> dict[str, Design]:
    return {"DESIGN": DESIGN, "pocock": pocock_design(), "looks 3-8": LOOKS_3_TO_8}


def draws(rng, dist: str, mean: float, sd: float, seeds: int):
    """REPS x seeds paired gains with the given mean and sd."""
    shape = (REPS, seeds)
    if dist == "normal":
        noise = rng.standard_normal(shape)
    elif dist == "t3":  # heavier tails: Student t with 3 df, scaled to unit variance
        noise = rng.standard_t(3, shape) / math.sqrt(3)
    else:  # laplace, unit variance
        noise = rng.laplace(size=shape) / math.sqrt(2)
    return mean + sd * noise


def adaptive_loop(x, looks, critical_values, margin):
    """The demo's loop, vectorised over repetitions: at each look compute the interval for the runs still
    going, stop those the F1-type rule decides (above 0, below 0, inside +-margin), add seeds to the rest up
    to the next look, stop at the last look. Returns the final (lo, hi, n seeds)."""
    reps = x.shape[0]
    going = np.ones(reps, dtype=bool)
    lo, hi, n_final = np.zeros(reps), np.zeros(reps), np.zeros(reps, dtype=int)
    for n, c in zip(looks, critical_values):
        mean, sd = x[:, :n].mean(axis=1), x[:, :n].std(axis=1, ddof=1)
        low, high = mean - c * sd / math.sqrt(n), mean + c * sd / math.sqrt(n)
        lo[going], hi[going], n_final[going] = low[going], high[going], n
        decided = (low > 0) | (high < 0) | ((low >= -margin) & (high <= margin))
        going &= ~decided
    return lo, hi, n_final


def se(p):
    return math.sqrt(p * (1 - p) / REPS)


SCENARIOS = [(dist, mean, sd) for dist in ("normal", "t3", "laplace") for mean in (0.01, 0.0, -0.01)
             for sd in (0.005, 0.01, 0.03)]


def test_pocock_spending_early_looks_are_narrower_and_the_last_wider():
    pocock = pocock_design()
    assert pocock.critical_values[0] < DESIGN.critical_values[0] / 2
    assert pocock.critical_values[-1] > DESIGN.critical_values[-1]


@pytest.mark.parametrize("name", ["DESIGN", "pocock", "looks 3-8"])
def test_adaptive_loop_covers_the_true_mean_and_rarely_gets_the_sign_wrong(name):
    design = designs()[name]
    rng = np.random.default_rng(2026)
    for dist, mean, sd in SCENARIOS:
        x = draws(rng, dist, mean, sd, design.max_seeds)
        lo, hi, n = adaptive_loop(x, design.looks, design.critical_values, MARGIN)
        coverage = ((lo <= mean) & (mean <= hi)).mean()
        claims_positive, claims_negative = (lo > 0).mean(), (hi < 0).mean()
        label = f"{name}, {dist} mean {mean} sd {sd}: coverage {coverage:.4f}, n {n.mean():.2f}"
        assert coverage >= 0.95 - 3 * se(0.95), label
        if mean <= 0:
            assert claims_positive <= 0.025 + 3 * se(0.025), f"{label}, wrong 'above 0' {claims_positive:.4f}"
        if mean >= 0:
            assert claims_negative <= 0.025 + 3 * se(0.025), f"{label}, wrong 'below 0' {claims_negative:.4f}"


@pytest.mark.parametrize("name", ["DESIGN", "pocock"])
def test_the_vectorised_loop_is_the_library_rule(name):
    design = designs()[name]
    rng = np.random.default_rng(7)
    x = draws(rng, "normal", 0.005, 0.01, design.max_seeds)[:300]
    lo, hi, n = adaptive_loop(x, design.looks, design.critical_values, MARGIN)
    decide = rule_gain_expected(MARGIN)
    for i in range(len(x)):
        result = sequential_decision({"gain": list(x[i])}, decide, design)
        ci = result["cis"]["gain"]
        assert (result["n_seeds"], ci["lo"], ci["hi"]) == (n[i], pytest.approx(lo[i]), pytest.approx(hi[i]))
        assert result["decision"] in (REPRODUCED, NOT_REPRODUCED, None)


@pytest.mark.parametrize("name", ["DESIGN", "looks 3-8"])
def test_a_fixed_n_t_interval_rechecked_at_every_look_under_covers(name):
    # the case where stopping is driven by the interval leaving zero: no effect, noise large against the margin
    design = designs()[name]
    rng = np.random.default_rng(11)
    x = draws(rng, "normal", 0.0, 0.03, design.max_seeds)
    naive = [t_quantile_975(n - 1) for n in design.looks]
    results = {}
    for label, critical in (("naive", naive), ("sequential", design.critical_values)):
        lo, hi, _ = adaptive_loop(x, design.looks, critical, MARGIN)
        results[label] = (((lo <= 0) & (0 <= hi)).mean(), (lo > 0).mean())
    (naive_cover, naive_wrong), (seq_cover, seq_wrong) = results["naive"], results["sequential"]
    message = f"naive coverage {naive_cover:.4f} (wrong sign {naive_wrong:.4f}); sequential {seq_cover:.4f}"
    assert naive_cover + 3 * se(0.95) < 0.95, message
    assert naive_wrong - 3 * se(0.025) > 0.025, message
    assert seq_cover >= 0.95 - 3 * se(0.95) and seq_wrong <= 0.025 + 3 * se(0.025), message


def test_a_design_with_bad_looks_is_refused():
    with pytest.raises(DistillabError, match="increasing seed counts"):
        Design(looks=(4, 3), alpha=0.05, critical_values=(1.0, 1.0), replications=1, rng_seed=0)
    with pytest.raises(DistillabError, match="one critical value per look"):
        Design(looks=(3, 4), alpha=0.05, critical_values=(1.0,), replications=1, rng_seed=0)
