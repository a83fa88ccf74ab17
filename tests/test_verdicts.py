"""Verdict rules on hand-made result rows: leave-one-seed-out alpha tuning and each finding's decision."""

import statistics

import pytest

from distillab.verdicts import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    decide,
    teacher_evidence,
    tune_alpha_leave_one_seed_out,
    verdict_sections,
)

T975 = {2: 4.303, 3: 3.182, 4: 2.776}


def teacher(run_id, model, params, tokens, loss):
    return {"run_id": run_id, "role": "teacher", "model": model, "non_embedding_parameters": params,
            "tokens": tokens, "init_seed": 42, "data_seed": 42, "loss/validation": loss}


def baseline(seed, loss):
    return {"run_id": f"b{seed}", "role": "baseline", "model": "s", "non_embedding_parameters": 300, "tokens": 100,
            "init_seed": seed, "data_seed": seed, "loss/validation": loss}


def student(teacher_id, seed, alpha, in_domain, ood, downstream=None):
    return {"run_id": f"{teacher_id}-{seed}-{alpha}", "role": "student", "model": "s", "tokens": 100,
            "non_embedding_parameters": 300, "init_seed": seed, "data_seed": seed, "teacher_id": teacher_id,
            "alpha": alpha, "objective_key": "lm", "objective": "forward KL, T 1", "baseline_id": f"b{seed}",
            "gain/in_domain": in_domain, "gain/ood": ood, "gain/downstream": downstream}


def test_alpha_is_tuned_on_the_other_seeds_only():
    # seed 1 alone is best at alpha 0.5, but seeds 2 and 3 prefer 0.1: seed 1 is scored at 0.1
    overall = {(1, 0.1): 0.01, (1, 0.5): 0.30, (2, 0.1): 0.05, (2, 0.5): 0.00, (3, 0.1): 0.04, (3, 0.5): 0.02}
    rows = [student("t", seed, alpha, value, value) for (seed, alpha), value in overall.items()]
    alphas, gains = tune_alpha_leave_one_seed_out(rows)
    assert alphas["1"] == 0.1
    assert gains["1"]["overall"] == pytest.approx(0.01)


def test_alpha_choice_uses_the_mean_over_other_seeds():
    overall = {(1, 0.1): 0.00, (1, 0.5): 0.10, (2, 0.1): 0.05, (2, 0.5): 0.00, (3, 0.1): 0.04, (3, 0.5): -0.02}
    rows = [student("t", seed, alpha, value, value) for (seed, alpha), value in overall.items()]
    alphas, gains = tune_alpha_leave_one_seed_out(rows)
    # seed 2: others (1, 3) -> 0.1: 0.02, 0.5: 0.04 -> 0.5 ; seed 3: others (1, 2) -> 0.1: 0.025, 0.5: 0.05 -> 0.5
    assert alphas == {"1": 0.1, "2": 0.5, "3": 0.5}
    assert [gains[s]["overall"] for s in ("1", "2", "3")] == pytest.approx([0.00, 0.00, -0.02])


def _grid(gain_of, seeds=(1, 2, 3), downstream=None):
    """Teachers: small@short, small@long, big@short, big@long; baseline loss 5.0 per seed."""
    rows = [teacher("ss", "small", 100, 10, 5.3), teacher("sl", "small", 100, 40, 5.2),
            teacher("bs", "big", 1000, 10, 5.1), teacher("bl", "big", 1000, 40, 4.7)]
    rows += [baseline(seed, 5.0) for seed in seeds]
    for tid in ("ss", "sl", "bs", "bl"):
        for seed in seeds:
            for alpha in (0.1, 0.5):
                in_domain, ood = gain_of(tid, seed, alpha)
                rows.append(student(tid, seed, alpha, in_domain, ood,
                                    downstream(tid, seed) if downstream else None))
    return rows


def _by_finding(rows, margin=0.02):
    evidence = teacher_evidence(rows, 0.02)
    (only,) = evidence.values()
    return {v["finding"]: v for v in decide(only, margin)}, only


def test_strength_is_measured_against_the_mean_baseline_loss():
    _, evidence = _by_finding(_grid(lambda t, s, a: (0.0, 0.0)))
    assert {e.teacher_id: e.strength for e in evidence} == {
        "ss": "weak-to-strong", "sl": "weak-to-strong", "bs": "weak-to-strong", "bl": "strong-to-weak"}


def test_f1_reproduced_when_weak_teachers_help_on_every_seed():
    noise = {1: 0.01, 2: -0.01, 3: 0.0}
    verdicts, evidence = _by_finding(_grid(lambda t, s, a: (0.05 + noise[s], 0.07 + noise[s])))
    f1 = verdicts["F1"]
    assert f1["verdict"] == REPRODUCED
    # independent: per seed, mean over the three weak teachers of (in + ood) / 2 at any alpha (all equal)
    per_seed = [statistics.fmean([(0.05 + noise[s] + 0.07 + noise[s]) / 2] * 3) for s in (1, 2, 3)]
    mean, sd = statistics.fmean(per_seed), statistics.stdev(per_seed)
    assert f1["ci"]["mean"] == pytest.approx(mean)
    assert f1["ci"]["lo"] == pytest.approx(mean - T975[2] * sd / 3 ** 0.5)


def test_f1_inconclusive_when_the_interval_spans_zero_and_not_reproduced_when_negative():
    swing = {1: 0.08, 2: -0.06, 3: 0.01}
    verdicts, _ = _by_finding(_grid(lambda t, s, a: (swing[s], swing[s])))
    assert verdicts["F1"]["verdict"] == INCONCLUSIVE
    verdicts, _ = _by_finding(_grid(lambda t, s, a: (-0.1 + swing[s] / 10, -0.1)))
    assert verdicts["F1"]["verdict"] == NOT_REPRODUCED


def test_f2_reversal_saturation_and_growth():
    noise = {1: 0.004, 2: -0.004, 3: 0.0}
    # stronger teachers (long budgets, big model) give clearly smaller gains: reversed
    strength_gain = {"ss": 0.10, "sl": 0.05, "bs": 0.06, "bl": 0.0}
    verdicts, _ = _by_finding(_grid(lambda t, s, a: (strength_gain[t] + noise[s],) * 2))
    assert verdicts["F2"]["verdict"] == REPRODUCED
    assert verdicts["F2"]["ci"]["hi"] < 0
    # every teacher gives the same gain: saturated (interval inside the margin)
    verdicts, _ = _by_finding(_grid(lambda t, s, a: (0.05 + noise[s] * (t == "bl"),) * 2))
    assert verdicts["F2"]["verdict"] == REPRODUCED
    # stronger teachers give clearly larger gains: not reproduced
    growth = {"ss": 0.0, "sl": 0.05, "bs": 0.04, "bl": 0.12}
    verdicts, _ = _by_finding(_grid(lambda t, s, a: (growth[t] + noise[s],) * 2))
    assert verdicts["F2"]["verdict"] == NOT_REPRODUCED
    # pairs: size axis at 10 and 40 tokens, token axis for small and big
    assert len(verdicts["F2"]["pairs"]) == 4


def test_f2_leaves_out_a_larger_teacher_that_is_not_stronger():
    rows = _grid(lambda t, s, a: (0.01, 0.01))
    for row in rows:
        if row["run_id"] == "bs":
            row["loss/validation"] = 5.35  # big model on few tokens: weaker than small@short
    verdicts, _ = _by_finding(rows)
    axes = sorted(p["axis"] for p in verdicts["F2"]["pairs"])
    assert axes == ["parameters", "tokens", "tokens"]
    assert "not stronger" in verdicts["F2"]["detail"]


def test_f3_ood_compares_ood_and_in_domain_gain_of_the_same_runs():
    noise = {1: 0.01, 2: -0.01, 3: 0.0}
    verdicts, _ = _by_finding(_grid(lambda t, s, a: (0.01 + noise[s], 0.06 + noise[s])))
    assert verdicts["F3-OOD"]["verdict"] == REPRODUCED  # the difference has no seed noise here
    assert verdicts["F3-OOD"]["ci"]["mean"] == pytest.approx(0.05)
    verdicts, _ = _by_finding(_grid(lambda t, s, a: (0.06 + noise[s], 0.01 + noise[s])))
    assert verdicts["F3-OOD"]["verdict"] == NOT_REPRODUCED


def test_f3_downstream_rule():
    noise = {1: 0.002, 2: -0.002, 3: 0.0}
    # accuracy up on every seed, in-domain gain not significant: reproduced
    verdicts, _ = _by_finding(_grid(lambda t, s, a: ({1: 0.05, 2: -0.05, 3: 0.0}[s], 0.0),
                                    downstream=lambda t, s: 0.03 + noise[s]))
    assert verdicts["F3-downstream"]["verdict"] == REPRODUCED
    # in-domain clearly up, accuracy not: not reproduced
    verdicts, _ = _by_finding(_grid(lambda t, s, a: (0.05 + noise[s], 0.0),
                                    downstream=lambda t, s: {1: 0.02, 2: -0.02, 3: 0.0}[s]))
    assert verdicts["F3-downstream"]["verdict"] == NOT_REPRODUCED
    # no downstream tasks: inconclusive with the reason
    verdicts, _ = _by_finding(_grid(lambda t, s, a: (0.0, 0.0)))
    assert verdicts["F3-downstream"]["verdict"] == INCONCLUSIVE
    assert "No downstream" in verdicts["F3-downstream"]["detail"]


def test_one_seed_is_never_more_than_inconclusive():
    verdicts, _ = _by_finding(_grid(lambda t, s, a: (0.2, 0.3), seeds=(1,)))
    assert {v["verdict"] for v in verdicts.values()} == {INCONCLUSIVE}


def test_markdown_section_lists_every_finding_and_the_rule():
    lines, data = verdict_sections(_grid(lambda t, s, a: (0.01, 0.02)), 0.02, 0.02)
    text = "\n".join(lines)
    for heading in ("## Verdicts", "### Teachers, measured", "### How the verdicts are decided"):
        assert heading in text
    for finding in ("F1", "F2", "F3-OOD", "F3-downstream"):
        assert f"| {finding} |" in text
    assert len(data["settings"]) == 1 and len(data["settings"][0]["verdicts"]) == 4
