"""Verdict rules on hand-made result rows: alpha tuned on the tuning seeds, the noise-aware strength
band, and every decision branch of each finding on the sequential intervals."""

import functools
import math
import statistics

import pytest
from conftest import BASELINE_LOSS, LOOKS_3_TO_8, baseline_row, student_row, teacher_row, verdict_grid

from distillab.study.results import label_by_prediction_interval
from distillab.study.sequential import DESIGN
from distillab.study.stats import prediction_interval, t_quantile_975
from distillab.study.verdicts import (
    AT_MAX,
    DECIDED,
    INCONCLUSIVE,
    LABEL_SEEDS,
    NOT_ASKABLE,
    NOT_REPRODUCED,
    OPEN,
    REPRODUCED,
    TUNING_SEEDS,
    decide,
    label_seeds,
    ordered_seeds,
    teacher_evidence,
    tune_alpha,
    verdict_sections,
)

SMALL = {1: 0.0, 2: 0.0, 3: 0.001, 4: -0.001, 5: 0.0, 6: 0.0005, 7: -0.0005, 8: 0.0002}  # small seed noise


def t_cdf(x, df, steps=2000):
    """P(T <= x) for Student's t, by Simpson's rule over its density from 0 (written out here)."""
    density = lambda u: math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * \
        (1 + u * u / df) ** (-(df + 1) / 2)
    h = x / steps
    area = density(0) + density(x) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return 0.5 + area * h / 3


@functools.lru_cache
def t_quantile(df, p=0.975):
    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def test_t_quantiles_are_exact_for_every_df():
    assert t_quantile_975(1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)  # Cauchy
    assert t_quantile_975(2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-9)  # closed form, 2 df
    for df in (3, 4, 7, 11, 31, 60):
        assert t_quantile_975(df) == pytest.approx(t_quantile(df), rel=1e-6), df
    assert t_quantile_975(31) == pytest.approx(2.0395, abs=1e-4)  # not the normal 1.96


def by_finding(rows, margin=0.02):
    (setting,) = teacher_evidence(rows, 0.02, LOOKS_3_TO_8).values()
    return {v["finding"]: v for v in decide(setting, margin, LOOKS_3_TO_8)}, setting


def repeated_ci(values):
    """mean +- c_n sd / sqrt(n), c_n the test design's critical value at n seeds (written out here)."""
    n, mean = len(values), statistics.fmean(values)
    half = LOOKS_3_TO_8.critical_value(n) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


# ---- seeds, tuning and strength ---------------------------------------------------------------------

def test_seeds_are_ordered_numerically_and_the_first_two_tune():
    rows = [baseline_row(seed, 5.0) for seed in (10, 2, 3)] + [dict(baseline_row(4, 5.0), data_seed=9)]
    assert ordered_seeds(rows) == ["2", "3", "4/9", "10"]
    assert TUNING_SEEDS == 2 and LABEL_SEEDS == label_seeds(DESIGN) == TUNING_SEEDS + DESIGN.first_look
    assert label_seeds(LOOKS_3_TO_8) == 5


def test_alpha_is_tuned_on_the_tuning_seeds_only_and_they_stay_out_of_the_interval():
    # tuning seeds 1, 2 prefer alpha 0.1; the interval seeds would prefer 0.5: the teacher is scored at 0.1
    def gains(t, seed, alpha):
        value = {0.1: 0.3, 0.5: 0.0}[alpha] if seed <= 2 else {0.1: 0.01, 0.5: 0.2}[alpha] + SMALL[seed]
        return value, value

    _, setting = by_finding(verdict_grid(gains))
    teacher = setting.teachers[0]
    assert teacher.alpha == 0.1
    assert teacher.alpha_scores == pytest.approx({0.1: 0.3, 0.5: 0.0})
    assert set(teacher.gains_by_seed) == {"3", "4", "5"}
    assert [teacher.gains_by_seed[s]["overall"] for s in "345"] == pytest.approx([0.01 + SMALL[s] for s in (3, 4, 5)])


def test_alpha_ties_go_to_the_smaller_alpha_and_scores_are_means_over_tuning_seeds():
    overall = {(1, 0.1): 0.02, (1, 0.5): 0.04, (2, 0.1): 0.04, (2, 0.5): 0.02, (3, 0.1): -1.0, (3, 0.5): 1.0}
    rows = [student_row("t", seed, alpha, value, value) for (seed, alpha), value in overall.items()]
    alpha, scores = tune_alpha(rows, ["1", "2"])
    assert alpha == 0.1 and scores == pytest.approx({0.1: 0.03, 0.5: 0.03})
    # an alpha not finished on every tuning seed is no candidate
    rows = [r for r in rows if not (r["alpha"] == 0.1 and r["init_seed"] == 2)]
    assert tune_alpha(rows, ["1", "2"]) == (0.5, pytest.approx({0.5: 0.03}))


def test_prediction_interval_is_the_student_t_formula():
    losses = [3.395, 3.361, 3.393, 3.385]
    mean = sum(losses) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in losses) / 3)
    half = t_quantile(3) * sd * math.sqrt(1 + 1 / 4)
    band = prediction_interval(losses)
    assert (band["mean"], band["lo"], band["hi"], band["n"]) == pytest.approx((mean, mean - half, mean + half, 4))
    for loss, label in ((mean + half + 1e-4, "weak-to-strong"), (mean + half - 1e-4, "same-level"),
                        (mean - half + 1e-4, "same-level"), (mean - half - 1e-4, "strong-to-weak")):
        assert label_by_prediction_interval(loss, losses, tolerance=0.5) == label
    # fewer than 2 baselines: the fixed tolerance around the one baseline
    assert label_by_prediction_interval(3.42, [3.395], tolerance=0.02) == "weak-to-strong"
    assert label_by_prediction_interval(3.41, [3.395], tolerance=0.02) == "same-level"
    assert label_by_prediction_interval(3.41, [], tolerance=0.02) == "unknown"


def test_strength_band_uses_the_baselines_of_the_first_five_seeds():
    rows = verdict_grid(lambda t, s, a: (0.0, 0.0), seeds=(1, 2, 3, 4, 5, 6))
    next(r for r in rows if r["run_id"] == "b6")["loss/validation"] = 9.0  # a later baseline cannot move the band
    _, setting = by_finding(rows)
    losses = [BASELINE_LOSS[s] for s in (1, 2, 3, 4, 5)]
    mean, sd = statistics.fmean(losses), statistics.stdev(losses)
    assert setting.band["hi"] == pytest.approx(mean + t_quantile(4) * sd * math.sqrt(1.2))
    assert setting.band_seeds == ["1", "2", "3", "4", "5"] and setting.labels_final
    assert {e.teacher_id: e.strength for e in setting.teachers} == {
        "ss": "weak-to-strong", "sl": "weak-to-strong", "bs": "weak-to-strong", "bl": "strong-to-weak"}
    # a teacher inside the band is level with the student
    next(r for r in rows if r["run_id"] == "bs")["loss/validation"] = mean + 0.5 * t_quantile(4) * sd
    _, setting = by_finding(rows)
    assert {e.teacher_id: e.strength for e in setting.teachers}["bs"] == "same-level"


# ---- F1 ----------------------------------------------------------------------------------------------

def test_f1_reproduced_at_the_first_look_with_the_repeated_interval():
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (0.05 + SMALL[s], 0.07 + SMALL[s])))
    f1 = verdicts["F1"]
    assert (f1["verdict"], f1["stage"], f1["look"], f1["n_seeds"]) == (REPRODUCED, DECIDED, 1, 3)
    assert f1["decided_at"] == {"look": 1, "n_seeds": 3} and f1["seeds_used"] == ["3", "4", "5"]
    # per seed: mean over the three weak teachers of (in + ood) / 2 (all alphas equal)
    mean, lo, hi = repeated_ci([0.06 + SMALL[s] for s in (3, 4, 5)])
    assert (f1["ci"]["mean"], f1["ci"]["lo"], f1["ci"]["hi"]) == pytest.approx((mean, lo, hi))
    assert f1["critical_value"] == LOOKS_3_TO_8.critical_value(3)


def test_f1_decided_at_a_later_look_keeps_that_verdict():
    # seeds 3-6 spread too wide for the first two looks; seed 7 settles it; seeds 8-9 point the other way
    values = {3: 0.05, 4: 0.03, 5: 0.07, 6: 0.05, 7: 0.05, 8: -0.3, 9: -0.3}
    rows = verdict_grid(lambda t, s, a: (values.get(s, 0.0),) * 2, seeds=tuple(range(1, 10)))
    verdicts, _ = by_finding(rows)
    f1 = verdicts["F1"]
    assert repeated_ci([values[s] for s in (3, 4, 5, 6)])[1] < 0 < repeated_ci([values[s] for s in range(3, 8)])[1]
    assert (f1["verdict"], f1["look"], f1["n_seeds"], f1["decided_at"]) == (REPRODUCED, 3, 5,
                                                                            {"look": 3, "n_seeds": 5})
    assert f1["seeds"] == [str(s) for s in range(3, 10)]
    mean, lo, hi = repeated_ci([values[s] for s in range(3, 8)])
    assert (f1["ci"]["mean"], f1["ci"]["lo"], f1["ci"]["hi"]) == pytest.approx((mean, lo, hi))


def test_f1_not_reproduced_below_zero_and_inside_the_margin():
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (-0.1 + SMALL[s], -0.1)))
    assert verdicts["F1"]["verdict"] == NOT_REPRODUCED and verdicts["F1"]["ci"]["hi"] < 0
    # +0.002 +- tiny noise: the interval is above zero and inside +-0.02; above zero wins
    rows = verdict_grid(lambda t, s, a: (0.002 + SMALL[s] / 10,) * 2)
    verdicts, _ = by_finding(rows, margin=0.02)
    assert verdicts["F1"]["verdict"] == REPRODUCED and verdicts["F1"]["ci"]["hi"] < 0.02
    # around zero, narrow: inside the margin = no effect
    rows = verdict_grid(lambda t, s, a: ({3: 0.001, 4: -0.001, 5: 0.0}.get(s, 0.0),) * 2)
    verdicts, _ = by_finding(rows, margin=0.02)
    assert verdicts["F1"]["verdict"] == NOT_REPRODUCED and -0.02 <= verdicts["F1"]["ci"]["lo"] < 0


def test_f1_open_then_inconclusive_at_the_maximum():
    swing = {1: 0.0, 2: 0.0, 3: 0.08, 4: -0.06, 5: 0.01, 6: 0.07, 7: -0.05, 8: 0.03, 9: -0.08, 10: 0.06, 11: 0.0}
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (swing[s],) * 2))
    assert (verdicts["F1"]["verdict"], verdicts["F1"]["stage"]) == (INCONCLUSIVE, OPEN)
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (swing[s],) * 2, seeds=tuple(range(1, 12))))
    f1 = verdicts["F1"]
    assert (f1["verdict"], f1["stage"], f1["n_seeds"], f1["look"]) == (INCONCLUSIVE, AT_MAX, 8,
                                                                       len(LOOKS_3_TO_8.looks))
    assert "not used" in f1["detail"]  # seed 11 is beyond the maximum of 8 interval seeds


def test_below_the_first_look_nothing_is_decided():
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (0.2, 0.3), seeds=(1, 2, 3, 4)))
    assert {v["verdict"] for v in verdicts.values()} == {INCONCLUSIVE}
    f1 = verdicts["F1"]
    assert (f1["look"], f1["n_seeds"], f1["ci"]["lo"], f1["ci"]["n"], f1["stage"]) == (None, 0, None, 2, OPEN)
    assert f1["ci"]["mean"] == pytest.approx(0.25)


def test_f1_cannot_be_asked_without_a_weaker_teacher_once_the_band_is_final():
    rows = verdict_grid(lambda t, s, a: (0.05, 0.05), teachers=("bl",))
    assert by_finding(rows)[0]["F1"]["stage"] == NOT_ASKABLE
    early = [r for r in rows if r["init_seed"] != 5]  # baselines of seeds 1-4 only: the band may still move
    assert by_finding(early)[0]["F1"]["stage"] == OPEN


def test_a_seed_missing_for_one_concerned_teacher_is_left_out():
    rows = verdict_grid(lambda t, s, a: (0.05 + SMALL[s],) * 2, seeds=tuple(range(1, 7)))
    rows = [r for r in rows if not (r.get("teacher_id") == "sl" and r["init_seed"] == 4)]
    f1 = by_finding(rows)[0]["F1"]
    assert f1["seeds"] == ["3", "5", "6"]
    assert f1["ci"]["mean"] == pytest.approx(statistics.fmean(0.05 + SMALL[s] for s in (3, 5, 6)))


# ---- F2 ----------------------------------------------------------------------------------------------

def test_f2_reversal_saturation_growth_and_open():
    noise = {s: SMALL[s] / 2 for s in SMALL}
    strength_gain = {"ss": 0.10, "sl": 0.05, "bs": 0.06, "bl": 0.0}
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (strength_gain[t] + noise[s],) * 2))
    assert verdicts["F2"]["verdict"] == REPRODUCED and verdicts["F2"]["ci"]["hi"] < 0
    # per seed: mean over the 4 pairs (size @10: ss->bs, size @40: sl->bl, tokens: ss->sl, bs->bl)
    diffs = [(0.06 - 0.10) + (0.0 - 0.05) + (0.05 - 0.10) + (0.0 - 0.06)]
    assert verdicts["F2"]["ci"]["mean"] == pytest.approx(diffs[0] / 4)
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (0.05 + noise[s] * (t == "bl"),) * 2))
    assert verdicts["F2"]["verdict"] == REPRODUCED  # saturated: inside the margin
    growth = {"ss": 0.0, "sl": 0.05, "bs": 0.04, "bl": 0.12}
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (growth[t] + noise[s],) * 2))
    assert verdicts["F2"]["verdict"] == NOT_REPRODUCED
    assert len(verdicts["F2"]["pairs"]) == 4 and sorted(verdicts["F2"]["teachers"]) == ["bl", "bs", "sl", "ss"]
    swing = {1: 0, 2: 0, 3: 0.1, 4: -0.1, 5: 0.05}
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (swing[s] * (t == "bl"),) * 2))
    assert (verdicts["F2"]["verdict"], verdicts["F2"]["stage"]) == (INCONCLUSIVE, OPEN)


def test_f2_leaves_out_a_larger_teacher_that_is_not_stronger():
    rows = verdict_grid(lambda t, s, a: (0.01, 0.01))
    for row in rows:
        if row["run_id"] == "bs":
            row["loss/validation"] = 5.35  # big model on few tokens: weaker than small@short
    verdicts, _ = by_finding(rows)
    assert sorted(p["axis"] for p in verdicts["F2"]["pairs"]) == ["parameters", "tokens", "tokens"]
    assert "not stronger" in verdicts["F2"]["detail"]
    only_one = verdict_grid(lambda t, s, a: (0.01, 0.01), teachers=("ss",))
    assert by_finding(only_one)[0]["F2"]["stage"] == NOT_ASKABLE


# ---- F3 ----------------------------------------------------------------------------------------------

def test_f3_ood_reproduced_not_reproduced_and_open():
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (0.01 + SMALL[s], 0.06 + 2 * SMALL[s])))
    assert verdicts["F3-OOD"]["verdict"] == REPRODUCED
    assert verdicts["F3-OOD"]["ci"]["mean"] == pytest.approx(0.05 + statistics.fmean(SMALL[s] for s in (3, 4, 5)))
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (0.06 + SMALL[s], 0.01 + 2 * SMALL[s])))
    assert verdicts["F3-OOD"]["verdict"] == NOT_REPRODUCED
    swing = {1: 0, 2: 0, 3: 0.1, 4: -0.1, 5: 0.05}
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (0.0, swing[s])))
    assert (verdicts["F3-OOD"]["verdict"], verdicts["F3-OOD"]["stage"]) == (INCONCLUSIVE, OPEN)
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (0.01, None)))
    assert verdicts["F3-OOD"]["stage"] == NOT_ASKABLE and "No OOD" in verdicts["F3-OOD"]["detail"]


def test_f3_downstream_every_branch():
    wide = {1: 0.0, 2: 0.0, 3: 0.05, 4: -0.05, 5: 0.0}
    # accuracy up on every seed, in-domain gain not above 0: reproduced
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (wide[s], 0.0), downstream=lambda t, s: 0.03 + SMALL[s]))
    assert verdicts["F3-downstream"]["verdict"] == REPRODUCED
    assert verdicts["F3-downstream"]["in_domain"]["lo"] < 0 < verdicts["F3-downstream"]["in_domain"]["hi"]
    # accuracy down: not reproduced
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (wide[s], 0.0), downstream=lambda t, s: -0.03 + SMALL[s]))
    assert verdicts["F3-downstream"]["verdict"] == NOT_REPRODUCED
    # in-domain clearly up, accuracy not: not reproduced
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (0.05 + SMALL[s], 0.0), downstream=lambda t, s: wide[s]))
    assert verdicts["F3-downstream"]["verdict"] == NOT_REPRODUCED
    # both up: the accuracy gain is not "where in-domain does not help": open
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (0.05 + SMALL[s], 0.0),
                                          downstream=lambda t, s: 0.03 + SMALL[s]))
    assert (verdicts["F3-downstream"]["verdict"], verdicts["F3-downstream"]["stage"]) == (INCONCLUSIVE, OPEN)
    # no downstream tasks
    verdicts, _ = by_finding(verdict_grid(lambda t, s, a: (0.0, 0.0)))
    assert verdicts["F3-downstream"]["stage"] == NOT_ASKABLE
    assert "No downstream" in verdicts["F3-downstream"]["detail"]


# ---- the report section ------------------------------------------------------------------------------

def test_markdown_section_names_the_procedure_and_data_keeps_the_sequential_facts():
    lines, data = verdict_sections(verdict_grid(lambda t, s, a: (0.01 + SMALL[s], 0.02)), 0.02, 0.02, LOOKS_3_TO_8)
    text = "\n".join(lines)
    for heading in ("## Verdicts", "### Teachers, measured", "### How the verdicts are decided"):
        assert heading in text
    for finding in ("F1", "F2", "F3-OOD", "F3-downstream"):
        assert f"| {finding} |" in text
    for fact in ("Lan-DeMets", "O'Brien-Fleming", "repeated confidence intervals", "looks at 3, 4, 5, 6, 7, 8 seeds",
                 "at most 8", "overall two-sided error 0.05", "prediction interval"):
        assert fact in text, fact
    assert data["design"]["looks"] == [3, 4, 5, 6, 7, 8] and data["design"]["max_seeds"] == 8
    (setting,) = data["settings"]
    assert len(setting["verdicts"]) == 4 and setting["tuning_seeds"] == ["1", "2"]
    for v in setting["verdicts"]:
        assert {"ci", "n_seeds", "look", "decided_at", "stage", "seeds"} <= set(v)
    f1 = setting["verdicts"][0]
    assert f1["decided_at"] == {"look": 1, "n_seeds": 3} and f1["ci"]["critical_value"] == 26.9
    assert data["design"]["label_seeds"] == 5 and f1["values"]["gain"] == pytest.approx(
        [0.015 + SMALL[s] / 2 for s in (3, 4, 5)])  # the per-seed values behind the interval


def test_teacher_rows_from_another_setting_do_not_mix():
    rows = verdict_grid(lambda t, s, a: (0.01, 0.02)) + [teacher_row("x", "small", 100, 5, 5.5)]
    rows += [dict(student_row("x", 1, 0.1, 0.0, 0.0), objective_key="other", objective="reverse KL")]
    assert len(teacher_evidence(rows, 0.02, LOOKS_3_TO_8)) == 2
