"""Small statistics used by reports and verdicts: means with Student-t intervals over seeds, and a
Student-t prediction interval for one new seed's value.

These are fixed-n intervals. Where the number of seeds depends on the data seen so far (the
demo adds seeds while a verdict is open) use `distillab.study.sequential` instead."""

from __future__ import annotations

import math
import statistics

from scipy.stats import t as student_t


def t_quantile_975(df: int) -> float:
    """The two-sided 95 % Student-t quantile with `df` degrees of freedom (exact, any df)."""
    return float(student_t.ppf(0.975, df))


def mean_ci(values: list[float]) -> dict:
    """Mean with a 95 % confidence interval (Student t) over seeds; None and NaN values are left out."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    n = len(values)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "sd": None}
    mean = statistics.fmean(values)
    if n == 1:
        return {"mean": mean, "lo": None, "hi": None, "n": 1, "sd": None}
    sd = statistics.stdev(values)
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "sd": sd}


def prediction_interval(values: list[float]) -> dict:
    """95 % Student-t prediction interval for one new observation from the distribution of `values`:
    mean +- t_{0.975, m-1} * sd * sqrt(1 + 1/m) (m = number of values, normal model). None and NaN are
    left out; with fewer than 2 values lo/hi are None. Keys: mean, lo, hi, n, sd, half."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    m = len(values)
    if m < 2:
        mean = statistics.fmean(values) if values else None
        return {"mean": mean, "lo": None, "hi": None, "n": m, "sd": None, "half": None}
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = t_quantile_975(m - 1) * sd * math.sqrt(1 + 1 / m)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": m, "sd": sd, "half": half}


def format_ci(ci: dict | None, digits: int = 4, signed: bool = True) -> str:
    """'+0.0123 [-0.0010, +0.0256] (n=3)' (signed, for gains; unsigned for losses); '+0.0123 (n=2)'
    without an interval; '—' for nothing."""
    if not ci or ci["mean"] is None:
        return "—"
    f = f"{{:{'+' if signed else ''}.{digits}f}}".format
    if ci["lo"] is None:
        return f"{f(ci['mean'])} (n={ci['n']})"
    return f"{f(ci['mean'])} [{f(ci['lo'])}, {f(ci['hi'])}] (n={ci['n']})"
