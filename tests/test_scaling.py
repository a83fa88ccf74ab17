"""`distillab demo --scaling`: the sizes' studies follow the default demo's design, and the trend arithmetic."""

import math

import numpy as np
import scipy.stats
import pytest

from distillab.study.demo import STUDIES, study_grid
from distillab.models import LADDER
from distillab.study.scaling import (QUICK_STUDENTS, SCALING_STUDENTS, cpu_rungs, scaling_study, trend,
                               trend_sentence)
from distillab.sweep import grid_from_dict, plan


def test_the_sizes_span_at_least_four_times_in_parameters():
    sizes = [LADDER[r].non_embedding_parameters() for r in SCALING_STUDENTS]
    assert len(sizes) >= 3 and max(sizes) / min(sizes) >= 4 and sizes == sorted(sizes)


@pytest.mark.parametrize("rung", SCALING_STUDENTS)
def test_each_size_repeats_the_default_demos_design(rung, tmp_path):
    default, study = STUDIES["default"], scaling_study(rung)
    student = LADDER[rung].non_embedding_parameters()
    ratio = default.student_tokens / LADDER[default.student].non_embedding_parameters()
    assert study.student_tokens / student == pytest.approx(ratio, rel=0.05)  # ~24 tokens per parameter
    rungs = cpu_rungs()
    i = rungs.index(rung)
    assert study.ladder == (rungs[i - 2], rungs[i - 1], rungs[i + 1], rungs[i + 2])
    assert study.token_axis == ((rungs[i + 1], default.token_axis[0][1]),)
    for key in ("corpus", "vocab", "seq_len", "batch_size", "alphas", "sets", "tasks", "limit", "max_windows",
                "max_interval_seeds", "lr"):
        assert getattr(study, key) == getattr(default, key), key
    runs = plan(grid_from_dict(study_grid(study)), tmp_path)
    assert any(r.info.get("baseline_kind") == "compute-matched" for r in runs)
    largest = max(r.config["train"]["token_budget"] for r in runs)
    assert largest <= 2_399_431  # the default demo's Shakespeare training split: no run repeats data


def test_the_largest_size_is_the_default_demo_itself(tmp_path):
    ids = sorted(r.id for r in plan(grid_from_dict(study_grid(scaling_study("cpu-27k"))), tmp_path))
    assert ids == sorted(r.id for r in plan(grid_from_dict(study_grid(STUDIES["default"])), tmp_path))


def test_quick_sizes_follow_the_quick_demo():
    for rung in QUICK_STUDENTS:
        study = scaling_study(rung, "quick")
        assert study.vocab == STUDIES["quick"].vocab and study.alphas == STUDIES["quick"].alphas


def test_trend_is_the_weighted_least_squares_slope():
    points = [(math.log(n), m, sd, k) for n, m, sd, k in
              [(3516, 0.010, 0.02, 3), (6736, 0.020, 0.01, 5), (13944, 0.025, 0.015, 4), (26784, 0.04, 0.01, 8)]]
    t = trend(points)
    x, y = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    w = np.array([p[3] / p[2] ** 2 for p in points])
    slope = np.polyfit(x, y, 1, w=np.sqrt(w))[0]  # polyfit weights multiply residuals
    assert t["slope"] == pytest.approx(slope, rel=1e-9)
    se = 1 / math.sqrt(float((w * (x - np.average(x, weights=w)) ** 2).sum()))
    assert t["hi"] - t["slope"] == pytest.approx(scipy.stats.t.ppf(0.975, 2) * se)  # the fewest seeds, 3, less one
    assert trend([(1.0, 0.1, 0.01, 3)]) is None


def test_trend_sentences_read_the_claims_direction():
    up = {"slope": 0.01, "lo": 0.005, "hi": 0.015, "sizes": 3}
    flat = {"slope": 0.01, "lo": -0.005, "hi": 0.025, "sizes": 3}
    assert "toward" in trend_sentence("F1", up, "nats").split("evidence points")[1]
    assert "away from" in trend_sentence("F2", up, "nats")  # F2 claims a saturating (non-positive) difference
    assert "neither way" in trend_sentence("F3-OOD", flat, "nats")
    assert "no trend" in trend_sentence("F1", None, "nats")

