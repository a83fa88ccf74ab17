"""Intervals over seeds that stay valid when the number of seeds depends on the data seen so far.

The demo adds seeds while a finding is inconclusive. A 95 % Student-t interval re-checked after
every added seed is then wrong far more often than 5 % (optional stopping: the chance that *some*
look excludes the truth grows with the number of looks). This module replaces it with a
**group-sequential design with Lan-DeMets alpha spending, O'Brien-Fleming-type spending function**
(Lan & DeMets 1983, Biometrika 70:659), reported as **repeated confidence intervals** (Jennison &
Turnbull 1984, Controlled Clinical Trials 5:33; "Group Sequential Methods with Applications to
Clinical Trials", 2000, ch. 9), with Student-t statistics whose critical values are calibrated by
simulation.

The design (fixed in code before any demo ran on it; `DESIGN`, chosen by the simulation of
`distillab.study.power`, see docs/sweeps.md):

- Values: one per seed (a finding's pooled paired gain), in seed order, assumed independent and
  normal with unknown mean mu and unknown sd.
- Looks at the seed counts in `looks` (5, 10, 15); at most `max_seeds` = 15 seeds are used.
- At look k with n_k seeds: interval = mean +- c_k * sd / sqrt(n_k) (sd = sample sd, n_k - 1 df).
- Error spending, per side: beta(t) at information fraction t = n_k / max_seeds, with beta(1) =
  alpha/2 = 0.025: the O'Brien-Fleming-type function 1 - Phi(z_{1-alpha/2} / sqrt(t)) (DESIGN's),
  or the Pocock-type alpha/2 ln(1 + (e - 1) t). c_k is chosen so that
  P(T_j <= c_j for j < k, T_k > c_k) = beta(t_k) - beta(t_{k-1}), where
  T_k = (mean_k - mu) / (sd_k / sqrt(n_k)).

Why this is exact up to Monte Carlo error for normal values: (T_1, ..., T_K) is a function of
the standardised values (x_i - mu) / sd only, so its joint law does not depend on mu or sd. The
c_k are therefore found once by simulating standard normal sequences
(`calibrate_critical_values`, numpy), with the spending scaled down by three Monte Carlo
standard errors of the total so that sampling error in the calibration cannot push the true
one-sided rate above alpha/2. By symmetry the lower side has the same rate, so

    P(mu is inside the interval at every look) >= 1 - alpha = 95 %,

and because this holds for all looks at once, the interval at *any* stopping look covers mu with
probability >= 95 % whatever rule chose that look: stopping when a decision is reached, at an
opt-in time cap, or at the maximum. A conclusion "mu > 0" (or "mu < 0") drawn from an interval is
wrong only if the interval misses mu on that side: probability <= alpha/2 = 2.5 %.

Heavier tails: t-statistics of symmetric heavier-tailed values (Student t with few df, Laplace)
over-cover in `tests/test_sequential.py`; strongly skewed values are not covered by the
guarantee. The runtime functions (`repeated_interval`, `sequential_decision`) use only the
standard library; the calibration needs numpy (installed with torch).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable

from distillab.errors import DistillabError

def check_fraction(t: float) -> None:
    if not 0 <= t <= 1:
        raise DistillabError(f"sequential: information fraction {t} is outside [0, 1]")


def obrien_fleming_spending(t: float, alpha: float) -> float:
    """Cumulative one-sided error spent at information fraction t in [0, 1] (Lan-DeMets O'Brien-Fleming
    type, per side of a two-sided level-alpha design): 1 - Phi(z_{1-alpha/2} / sqrt(t)); 0 at t = 0."""
    check_fraction(t)
    if t == 0:
        return 0.0
    normal = NormalDist()
    return 1.0 - normal.cdf(normal.inv_cdf(1 - alpha / 2) / math.sqrt(t))


def pocock_spending(t: float, alpha: float) -> float:
    """Cumulative one-sided error spent at information fraction t in [0, 1] (Lan-DeMets Pocock type,
    per side of a two-sided level-alpha design): alpha/2 * ln(1 + (e - 1) t); alpha/2 at t = 1. It
    spends early looks far more than the O'Brien-Fleming type, so early looks can decide."""
    check_fraction(t)
    return alpha / 2 * math.log(1 + (math.e - 1) * t)


SPENDING = {"obrien-fleming": obrien_fleming_spending, "pocock": pocock_spending}
SPENDING_NAMES = {"obrien-fleming": "the O'Brien-Fleming-type function", "pocock": "the Pocock-type function"}


def design_name(spending: str) -> str:
    return (f"group-sequential design, Lan-DeMets alpha spending with {SPENDING_NAMES[spending]}, repeated "
            "confidence intervals from Student-t statistics (critical values calibrated by simulation)")


@dataclass(frozen=True)
class Design:
    """A fixed group-sequential design: looks (seed counts), two-sided alpha, the spending function and
    the critical value per look.

    Invariants: looks strictly increase, the first is >= 2, `critical_values` has one entry per look,
    `spending` names a function of `SPENDING`. `replications` and `rng_seed` record the simulation the
    critical values came from (`calibrate_critical_values(looks, alpha, replications, rng_seed,
    spending)` reproduces them)."""

    looks: tuple[int, ...]
    alpha: float
    critical_values: tuple[float, ...]
    replications: int
    rng_seed: int
    spending: str = "obrien-fleming"

    def __post_init__(self):
        check_looks(self.looks)
        if len(self.critical_values) != len(self.looks):
            raise DistillabError("sequential: one critical value per look is needed")
        if self.spending not in SPENDING:
            raise DistillabError(f"sequential: unknown spending function {self.spending!r}; use "
                                 f"{', '.join(SPENDING)}")

    @property
    def max_seeds(self) -> int:
        return self.looks[-1]

    @property
    def first_look(self) -> int:
        return self.looks[0]

    def critical_value(self, n: int) -> float:
        if n not in self.looks:
            raise DistillabError(f"sequential: {n} seeds is not a look of the design (looks: {list(self.looks)})")
        return self.critical_values[self.looks.index(n)]

    def look_at_or_below(self, n: int) -> int | None:
        """The largest look <= n (None below the first look)."""
        reached = [look for look in self.looks if look <= n]
        return reached[-1] if reached else None

    def describe(self) -> str:
        looks = ", ".join(str(n) for n in self.looks)
        values = ", ".join(f"{n}: {c:.2f}" for n, c in zip(self.looks, self.critical_values))
        return (f"{design_name(self.spending)}; looks at {looks} seeds (at most {self.max_seeds}); overall two-sided error "
                f"{self.alpha:g} ({100 * (1 - self.alpha):g} % simultaneous coverage over all looks, at most "
                f"{100 * self.alpha / 2:g} % wrong-sign conclusions); critical values (seeds: c) {values}")


def check_looks(looks: tuple[int, ...]) -> None:
    if list(looks) != sorted(set(looks)) or looks[0] < 2:
        raise DistillabError(f"sequential: looks must be increasing seed counts >= 2, got {list(looks)}")


def calibration_targets(looks: tuple[int, ...], alpha: float, replications: int,
                        spending: str = "obrien-fleming") -> list[float]:
    """Cumulative one-sided error to have spent by each look: the spending function at n / max_seeds,
    scaled down by three Monte Carlo standard errors of alpha/2 (conservative)."""
    half = alpha / 2
    scale = (half - 3 * math.sqrt(half * (1 - half) / replications)) / half
    return [scale * SPENDING[spending](n / looks[-1], alpha) for n in looks]


def simulated_t_statistics(looks: tuple[int, ...], replications: int, rng_seed: int):
    """(replications x looks) array of T_k for standard normal sequences (float32, made in chunks)."""
    import numpy as np

    rng = np.random.default_rng(rng_seed)
    out = np.empty((replications, len(looks)), dtype=np.float32)
    chunk = 250_000
    for start in range(0, replications, chunk):
        z = rng.standard_normal((min(chunk, replications - start), looks[-1]))
        sums, squares = np.cumsum(z, axis=1), np.cumsum(z * z, axis=1)
        for k, n in enumerate(looks):
            mean = sums[:, n - 1] / n
            var = (squares[:, n - 1] - n * mean * mean) / (n - 1)
            out[start:start + len(z), k] = mean / np.sqrt(var / n)
    return out


def calibrate_critical_values(looks: tuple[int, ...], alpha: float, replications: int,
                              rng_seed: int, spending: str = "obrien-fleming") -> tuple[float, ...]:
    """Critical values c_k by simulation: at each look, the smallest value (rounded up to 0.01) such that
    the fraction of simulated sequences crossing above it for the first time is at most the spending
    increment. Rounding up keeps every increment at or below its target."""
    import numpy as np

    check_looks(looks)
    stats = simulated_t_statistics(looks, replications, rng_seed)
    alive = np.ones(replications, dtype=bool)
    values, spent = [], 0
    for k, target in enumerate(calibration_targets(looks, alpha, replications, spending)):
        allowed = int(math.floor(target * replications)) - spent
        column = np.sort(stats[alive, k].astype(np.float64))[::-1]
        c = float(column[allowed]) if allowed < len(column) else float(column[-1])
        c = math.ceil(c * 100) / 100
        crossing = alive & (stats[:, k] > c)
        spent += int(crossing.sum())
        alive &= ~crossing
        values.append(c)
    return tuple(values)


# Chosen by `distillab.study.power.choose_design` (docs/sweeps.md) and computed by
# calibrate_critical_values(DESIGN_LOOKS, 0.05, 2_000_000, 20261120, "obrien-fleming") before any demo
# ran on it; tests/test_sequential.py recomputes them. Compare a fixed-n 95 % t-interval at 15 seeds: 2.14.
# (The first sequential demo used looks 3, 4, ..., 8 with c = 26.90, 7.76, 4.70, 3.62, 3.06, 2.73.)
DESIGN_LOOKS = (5, 10, 15)
DESIGN = Design(looks=DESIGN_LOOKS, alpha=0.05, critical_values=(9.6, 2.99, 2.25), replications=2_000_000,
                rng_seed=20261120, spending="obrien-fleming")


def repeated_interval(values: list[float], design: Design = DESIGN) -> dict:
    """The repeated confidence interval of the mean of `values` (seed order) at the look len(values).

    Keys as `distillab.study.stats.mean_ci` (mean, lo, hi, n, sd) plus `critical_value`. len(values) must be
    a look of the design."""
    n = len(values)
    c = design.critical_value(n)
    if any(v is None or math.isnan(v) for v in values):
        raise DistillabError("sequential: a value is missing (None/NaN); pass complete seeds only")
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = c * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "sd": sd, "critical_value": c}


def sequential_decision(series: dict[str, list[float]], decide: Callable[[dict[str, dict]], str | None],
                        design: Design = DESIGN) -> dict:
    """Walk the looks in order over per-seed values and stop at the first look where `decide` returns a
    decision (a string; None = undecided), exactly as the adaptive loop that adds seeds would have.

    `series`: quantity name -> values per seed, all the same length, in seed order (the order seeds
    were added). Seeds beyond `design.max_seeds` are not used. Returns {"decision" (None if
    undecided), "cis" (name -> repeated interval at the look shown, {} if no look is reached),
    "look" (1-based index of that look, None if none), "n_seeds" (seeds in the intervals),
    "n_available", "decided" (bool), "at_max" (the last look was reached undecided)}."""
    lengths = {len(v) for v in series.values()}
    if len(lengths) != 1:
        raise DistillabError(f"sequential: every quantity needs the same seeds, got lengths {sorted(lengths)}")
    (available,) = lengths
    result = {"decision": None, "cis": {}, "look": None, "n_seeds": 0, "n_available": available,
              "decided": False, "at_max": False}
    for index, n in enumerate(design.looks, start=1):
        if n > available:
            break
        cis = {name: repeated_interval(values[:n], design) for name, values in series.items()}
        decision = decide(cis)
        result.update(cis=cis, look=index, n_seeds=n)
        if decision is not None:
            result.update(decision=decision, decided=True)
            return result
    result["at_max"] = result["n_seeds"] == design.max_seeds
    return result
