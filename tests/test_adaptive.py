"""Which runs the adaptive seed loop asks for next, on hand-made rows."""

from conftest import LOOKS_3_TO_8, TEACHERS, verdict_grid

from distillab.study.adaptive import seeds_to_add, undecided_findings
from distillab.study.verdicts import DECIDED, NOT_ASKABLE, OPEN

SWING = {1: 0.0, 2: 0.0, 3: 0.08, 4: -0.06, 5: 0.01, 6: 0.07, 7: -0.05, 8: 0.03, 9: -0.08, 10: 0.06}


def plan(rows):
    (entry,) = seeds_to_add(rows, tolerance=0.02, margin=0.02, design=LOOKS_3_TO_8)
    return entry


def cells(entry):
    return sorted((r["role"], r.get("teacher_id"), r.get("alpha"), r["init_seed"]) for r in entry["runs"])


def tuning_prefers_small_alpha(t, seed, alpha):
    return ({0.1: 0.03, 0.5: -0.02}[alpha],) * 2


def test_the_tuning_seeds_come_first():
    entry = plan(verdict_grid(tuning_prefers_small_alpha, seeds=(1,)))
    expected = [("baseline", None, None, 2)] + sorted(("student", t, a, 2) for t in TEACHERS for a in (0.1, 0.5))
    assert cells(entry) == expected
    # one missing tuning cell is asked for alone
    rows = [r for r in verdict_grid(tuning_prefers_small_alpha, seeds=(1, 2)) if r["run_id"] != "ss-2-0.5"]
    assert cells(plan(rows)) == [("student", "ss", 0.5, 2)]
    request = plan(rows)["runs"][0]
    assert (request["temperature"], request["divergence"], request["data_seed"]) == (1.0, "forward_kl", 2)


def test_after_tuning_every_teacher_gets_the_first_look_at_its_tuned_alpha():
    entry = plan(verdict_grid(tuning_prefers_small_alpha, seeds=(1, 2)))
    expected = [("baseline", None, None, s) for s in (3, 4, 5)]
    expected += [("student", t, 0.1, s) for t in TEACHERS for s in (3, 4, 5)]
    assert cells(entry) == sorted(expected)
    assert entry["findings"]["F1"]["stage"] == OPEN and entry["findings"]["F1"]["next_look"] == 3


def gains_f1_open(t, seed, alpha):
    """F3-OOD decided (OOD - in-domain = 0.05 on every seed), F2 decided (no difference between teachers,
    inside the margin), F1 open (overall gain swings)."""
    return SWING[seed] + (alpha == 0.5) * -0.1, SWING[seed] + 0.05 + (alpha == 0.5) * -0.1


def test_only_the_open_findings_teachers_get_the_next_seed():
    rows = verdict_grid(gains_f1_open, seeds=(1, 2, 3, 4, 5))
    entry = plan(rows)
    stages = {name: f["stage"] for name, f in entry["findings"].items()}
    assert stages == {"F1": OPEN, "F2": DECIDED, "F3-OOD": DECIDED, "F3-downstream": NOT_ASKABLE}
    weak = ("ss", "sl", "bs")  # bl is stronger than the student: F1 does not concern it
    assert cells(entry) == sorted([("baseline", None, None, 6)] + [("student", t, 0.1, 6) for t in weak])
    assert entry["findings"]["F1"]["next_look"] == 4
    assert undecided_findings(rows, 0.02, 0.02, LOOKS_3_TO_8) == [("s", 100, "lm", "F1")]


def test_existing_seeds_are_reused_and_a_failed_seed_is_skipped():
    rows = verdict_grid(gains_f1_open, seeds=(1, 2, 3, 4, 5, 6))
    rows = [r for r in rows if not (r["init_seed"] == 6 and r.get("teacher_id") in ("sl", "bs"))]
    assert cells(plan(rows)) == [("student", "bs", 0.1, 6), ("student", "sl", 0.1, 6)]
    next(r for r in rows if r["run_id"] == "ss-6-0.1")["status"] = "failed"
    assert cells(plan(rows)) == sorted([("baseline", None, None, 7)] + [("student", t, 0.1, 7)
                                                                         for t in ("ss", "sl", "bs")])


def test_nothing_is_asked_for_when_every_finding_is_decided_or_at_the_maximum():
    settled = verdict_grid(lambda t, s, a: (0.05 + s / 1000, 0.1 + s / 1000), seeds=(1, 2, 3, 4, 5))
    entry = plan(settled)
    assert entry["runs"] == [] and undecided_findings(settled, 0.02, 0.02, LOOKS_3_TO_8) == []
    at_max = verdict_grid(gains_f1_open, seeds=tuple(range(1, 11)))  # 8 interval seeds: the maximum
    entry = plan(at_max)
    assert entry["runs"] == [] and entry["findings"]["F1"]["stage"] == "at max"
