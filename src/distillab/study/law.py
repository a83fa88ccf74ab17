"""A fitted distillation law: a student's held-out loss from what is known before it trains.

Inputs of a prediction: the student's non-embedding parameters N and training tokens D, the
teacher's measured held-out loss L_T (or, for a teacher not trained yet, the supervised law's
prediction from its own N and D), the mixing weight α and the objective (divergence, T, top-k).

Two parts, fitted on one sweep's result rows (or several sweeps on the same data):

    supervised   L~(N, D) = E + A·(N/N0)^(-a) + B·(D/D0)^(-b)
                 Busbridge et al.'s supervised law ("Distillation Scaling Laws", 2025,
                 arXiv 2502.08606, eq. 1) with its outer exponent γ fixed at 1 (Hoffmann et al.'s
                 form): CPU sweeps hold about ten distinct (N, D) points, too few for six
                 parameters. Fitted on every α = 0 run: teachers, baselines, compute-matched
                 baselines. N0, D0 are the geometric means of the fitted points (conditioning only).
    distilled    L_S = L~_S − G(α, Δ),   Δ = L~_S − L_T  (the gap: positive = teacher stronger)
                 G = θ1·α + θ2·α·Δ + θ3·α² + θ4·α·Δ² + θ5·α²·Δ

Why this form and not Busbridge's distilled law. Their law (eq. 8) is fitted at α = 1 (pure
distillation) and T = 1; it bounds the student by the teacher (L_S >= L_T), which fails for
mixed objectives: at α = 0.05 a student beats a teacher 0.5 nats worse than itself. What we keep
from it is its structure: the student's size and tokens act on the distilled loss through L~_S,
and the teacher acts through its loss relative to L~_S, not through its size. G is then the
lowest-order expansion in α and Δ that (i) is 0 at α = 0 for every teacher (a student with
α = 0 is its baseline), (ii) lets the α-slope depend on the gap and bend with it (θ4: a slope that
saturates or turns over as the teacher gets much stronger is Busbridge's "capacity gap"; θ4 may
come out of either sign), and (iii) lets large α cost more with a weaker teacher (θ5: the
measured demos lose ~0.2 nats per unit α with the weakest teacher at α = 0.05, ~0.36 at α = 0.5).
It is linear in θ, so its fit is exact and its bootstrap cheap. One G per gain target: the
in-domain loss gain, the OOD loss gain (mean over OOD sets) and their mean ("overall", the verdicts'
quantity) are fitted separately.

Only one objective family is fitted at a time (the rows' divergence, T and top-k; the demos:
forward KL, T = 1, full vocabulary). A student of another family is not predicted.

Intervals (resampling seeds and runs). The seeded runs of a student setting (model, tokens:
students, their baselines and compute-matched baselines) are resampled by seed, whole seeds at a
time, within each setting; single-seed runs (teachers) get a wild residual bootstrap (residual ×
a random sign). Each replicate refits both parts; the gap of a fitted student uses its setting's
baseline mean over the replicate's seeds. An interval is estimate ± t(0.975, G − 1) ·
sqrt(G / (G − 1)) · bootstrap sd, G the fewest seeds of any setting (the bootstrap within a setting
of G seeds shrinks variances by (G − 1)/G), with t's degrees of freedom Σ over settings of (seeds − 1).
Calibrated on data simulated from the law with a shared per-seed effect on gains (as the committed
demos show): 300 simulated studies of 3 settings × 6 seeds, coverage near 95 % for every parameter
(`tests/test_law.py`). A prediction interval for the mean gain of n new seeds adds the seed
noise σ²/n (pooled within-cell variance of the fitted gains) and the lack of fit τ² (variance of
cell-mean residuals beyond what seed noise explains) to the bootstrap variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from distillab.errors import DistillabError
from distillab.study.stats import t_quantile_975

HELD_OUT = "validation"
TARGETS = ("in_domain", "ood", "overall")  # overall = mean of the in-domain and OOD gains (the verdicts' quantity)
GAIN_TERMS = ("α", "α·Δ", "α²", "α·Δ²", "α²·Δ")
SUPERVISED_TERMS = ("E", "A", "a", "B", "b")
EXPONENT_RANGE = (0.02, 2.5)


def gain_features(alpha, gap) -> np.ndarray:
    """The columns of G's linear model, one row per (α, Δ)."""
    alpha, gap = np.asarray(alpha, dtype=float), np.asarray(gap, dtype=float)
    return np.stack([alpha, alpha * gap, alpha ** 2, alpha * gap ** 2, alpha ** 2 * gap], axis=-1)


@dataclass(frozen=True)
class SupervisedLaw:
    """L~(N, D) = E + A (N/N0)^-a + B (D/D0)^-b; E, A, B >= 0."""

    E: float
    A: float
    a: float
    B: float
    b: float
    N0: float
    D0: float

    def loss(self, N, D) -> np.ndarray:
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A * (N / self.N0) ** -self.a + self.B * (D / self.D0) ** -self.b

    def values(self) -> dict:
        return {"E": self.E, "A": self.A, "a": self.a, "B": self.B, "b": self.b}


@dataclass(frozen=True)
class Law:
    """One fit: the supervised law and a gain model θ per target."""

    supervised: SupervisedLaw
    theta: dict  # target -> np.ndarray of len(GAIN_TERMS)

    def gain(self, target: str, alpha, gap) -> np.ndarray:
        return gain_features(alpha, gap) @ self.theta[target]


# ----------------------------------------------------------------------------- fitting


def nnls_batched(xtx: np.ndarray, xty: np.ndarray, yty: float) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative least squares for a batch of 3-column problems given their normal equations:
    the best feasible solution over all active sets (exact for NNLS: its optimum is the least-squares
    solution on its own support). Returns (coefficients (G, 3), residual sums of squares (G,))."""
    batch = xtx.shape[0]
    best = np.full(batch, np.inf)
    coef = np.zeros((batch, 3))
    ridge = 1e-12 * np.trace(xtx, axis1=1, axis2=2)[:, None, None]
    for mask in range(1, 8):
        support = [i for i in range(3) if mask >> i & 1]
        sub = xtx[:, support][:, :, support] + ridge * np.eye(len(support))
        beta = np.linalg.solve(sub, xty[:, support][:, :, None])[:, :, 0]
        full = np.zeros((batch, 3))
        full[:, support] = beta
        sse = yty - 2 * (full * xty).sum(axis=1) + (full * (xtx @ full[:, :, None])[:, :, 0]).sum(axis=1)
        better = (beta >= 0).all(axis=1) & (sse < best)
        best = np.where(better, sse, best)
        coef[better] = full[better]
    return coef, best


def supervised_sse(n, d, losses, weights, a, b):
    """For R (re)weightings at once: scaled sizes n, d, losses and weights (R, points); exponent grids a, b
    (R, G). Returns the NNLS (E, A, B) (R, G, 3) and the weighted residual sums of squares (R, G)."""
    replicates, grid = a.shape
    x = np.stack([np.ones((replicates, grid, n.shape[1])), n[:, None, :] ** -a[:, :, None],
                  d[:, None, :] ** -b[:, :, None]], axis=-1)
    xw = x * weights[:, None, :, None]
    xtx = np.swapaxes(xw, 2, 3) @ x
    xty = (np.swapaxes(xw, 2, 3) @ losses[:, None, :, None])[..., 0]
    yty = np.repeat(np.sum(weights * losses * losses, axis=1), grid)
    coef, sse = nnls_batched(xtx.reshape(-1, 3, 3), xty.reshape(-1, 3), yty)
    return coef.reshape(replicates, grid, 3), sse.reshape(replicates, grid)


def fit_supervised(N, D, loss, weights=None, start: SupervisedLaw | None = None) -> SupervisedLaw:
    """Weighted least squares of L~ over (E, A, B) >= 0 and exponents in EXPONENT_RANGE: variable
    projection (exact NNLS for given exponents) on a log grid of (a, b), refined twice around the best.
    With `start` (a bootstrap replicate's point fit) its N0, D0 are kept and the first grid spans ±4 coarse
    steps around its exponents."""
    loss = np.asarray(loss, dtype=float)
    weights = np.ones_like(loss) if weights is None else np.asarray(weights, dtype=float)
    return fit_supervised_batch(N, D, loss[None], weights[None], start)[0]


# exponent grid points per axis: the first grid, over EXPONENT_RANGE; each grid around a best point
COARSE, AROUND = 25, 9
# (replicates x grid points x points) per batch of `fit_supervised_batch`: ~100 MB of design arrays (x and x·w)
BATCH_ELEMENTS = 2_000_000


def fit_supervised_batch(N, D, losses, weights, start: SupervisedLaw | None = None) -> list[SupervisedLaw]:
    """`fit_supervised` on R (re)weightings of the same points at once (losses and weights (R, points)):
    the bootstrap's refits in a few array operations instead of one small fit each."""
    N, D, losses, weights = (np.asarray(v, dtype=float) for v in (N, D, losses, weights))
    if ((weights > 0).sum(axis=1) < 3).any():
        raise DistillabError("law: fewer than 3 α = 0 runs with a held-out loss; nothing to fit the supervised law on")
    grid = (COARSE if start is None else AROUND) ** 2
    chunk = max(1, BATCH_ELEMENTS // (grid * N.size))
    return [law for first in range(0, len(losses), chunk)
            for law in fit_supervised_chunk(N, D, losses[first:first + chunk], weights[first:first + chunk], start)]


def fit_supervised_chunk(N, D, losses, weights, start: SupervisedLaw | None) -> list[SupervisedLaw]:
    """`fit_supervised_batch` on one chunk of reweightings."""
    if start is None:
        keep = weights > 0
        N0, D0 = (np.array([np.exp(np.average(np.log(x[k]), weights=w[k])) for k, w in zip(keep, weights)])
                  for x in (N, D))
    else:  # a replicate keeps the point fit's references, so that its A and B mean the same
        N0, D0 = np.full(len(losses), start.N0), np.full(len(losses), start.D0)
    n, d = N[None, :] / N0[:, None], D[None, :] / D0[:, None]
    lo, hi = (math.log(v) for v in EXPONENT_RANGE)
    step = (hi - lo) / (COARSE - 1)
    if start is None:
        first_a = first_b = np.linspace(lo, hi, COARSE)
    else:
        first_a, first_b = (np.clip(np.linspace(math.log(v) - 4 * step, math.log(v) + 4 * step, AROUND), lo, hi)
                            for v in (start.a, start.b))
    log_a, log_b = np.tile(first_a, (len(losses), 1)), np.tile(first_b, (len(losses), 1))
    rows = np.arange(len(losses))
    for _ in range(3):
        grid_a = np.repeat(np.exp(log_a), log_b.shape[1], axis=1)  # (R, ka * kb), a varying slowest
        grid_b = np.tile(np.exp(log_b), (1, log_a.shape[1]))
        coef, sse = supervised_sse(n, d, losses, weights, grid_a, grid_b)
        best = np.argmin(sse, axis=1)
        best_a, best_b = np.log(grid_a[rows, best]), np.log(grid_b[rows, best])
        log_a = np.clip(np.linspace(best_a - step, best_a + step, AROUND, axis=1), lo, hi)
        log_b = np.clip(np.linspace(best_b - step, best_b + step, AROUND, axis=1), lo, hi)
        step /= 4
    return [SupervisedLaw(float(E), float(A), float(grid_a[r, i]), float(B), float(grid_b[r, i]), float(N0[r]),
                          float(D0[r]))
            for r, (i, (E, A, B)) in enumerate(zip(best, coef[rows, best]))]


def fit_gain(alpha, gap, gain, weights=None) -> np.ndarray:
    """Weighted least squares of G's coefficients."""
    x = gain_features(alpha, gap)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=float)
    root = np.sqrt(w)[:, None]
    theta, *_ = np.linalg.lstsq(x * root, np.asarray(gain, dtype=float) * root[:, 0], rcond=None)
    return theta


# ----------------------------------------------------------------------------- the data a fit uses


@dataclass
class FitData:
    """Arrays of one fit. Supervised points: every finished α = 0 run. Student points: every finished
    student of the fitted objective family with a gain. `cluster` = (setting index, seed index) of a
    seeded run; -1 for a single-seed run (teachers)."""

    sup_N: np.ndarray
    sup_D: np.ndarray
    sup_loss: np.ndarray
    sup_cluster: np.ndarray  # (n, 2) int
    baseline_of: np.ndarray  # per supervised point: its setting index if it is a plain baseline, else -1
    st_alpha: np.ndarray
    st_teacher_loss: np.ndarray
    st_setting: np.ndarray  # setting index of each student
    st_cell: np.ndarray  # cell index (setting, teacher, alpha) of each student
    st_gain: dict  # target -> array (NaN where missing)
    st_cluster: np.ndarray  # (n, 2)
    settings: list  # [(model, tokens, N, D)]
    seeds_per_setting: list  # [number of distinct seeds]
    family: dict  # divergence, temperature, top_k
    cells: list  # [(setting index, teacher id, alpha)]


def fitted_family(students: list[dict]) -> dict:
    """The one objective family (divergence, T, top-k) the fit uses: the commonest among the students."""
    counts: dict[tuple, int] = {}
    for r in students:
        key = (r.get("divergence") or "forward_kl", float(r.get("temperature") or 1.0), r.get("top_k"))
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        raise DistillabError("law: no finished student with a paired gain; nothing to fit the distillation law on")
    divergence, temperature, top_k = max(counts, key=counts.get)
    return {"divergence": divergence, "temperature": temperature, "top_k": top_k}


def in_family(row: dict, family: dict) -> bool:
    return ((row.get("divergence") or "forward_kl") == family["divergence"]
            and float(row.get("temperature") or 1.0) == family["temperature"] and row.get("top_k") == family["top_k"])


def gain_of(row: dict, target: str) -> float | None:
    """A student row's gain for one target; overall = mean of the in-domain and OOD gains present."""
    if target != "overall":
        value = row.get(f"gain/{target}")
        return None if value is None else float(value)
    parts = [float(row[f"gain/{t}"]) for t in ("in_domain", "ood") if row.get(f"gain/{t}") is not None]
    return sum(parts) / len(parts) if parts else None


def fit_data(rows: list[dict]) -> FitData:
    """The arrays a fit needs from result rows (`distillab.study.results` rows, any sweep or several)."""
    done = [r for r in rows if r.get("status", "done") == "done" and r.get(f"loss/{HELD_OUT}") is not None]
    students = [r for r in done if r["role"] == "student" and r.get("gain/in_domain") is not None]
    family = fitted_family(students)
    by_id = {r["run_id"]: r for r in done}
    students = [r for r in students if in_family(r, family) and r.get("teacher_id") in by_id]
    student_tokens = {r["model"]: int(r["tokens"]) for r in students}
    strata: dict[tuple, int] = {}
    seeds: dict[tuple, int] = {}

    def stratum(row) -> int:
        """A seeded run's setting: its model at its students' tokens (a compute-matched baseline joins its
        students' setting), else its own (model, tokens)."""
        return strata.setdefault((row["model"], student_tokens.get(row["model"], int(row["tokens"]))), len(strata))

    def cluster(row) -> tuple[int, int]:
        setting = stratum(row)
        return setting, seeds.setdefault((setting, row["init_seed"], row["data_seed"]), len(seeds))

    st_cluster = [cluster(r) for r in students]
    supervised = [r for r in done if r["role"] in ("teacher", "baseline")]
    sup_cluster = [cluster(r) if r["role"] == "baseline" else (-1, -1) for r in supervised]
    baseline_of = [stratum(r) if r["role"] == "baseline" and int(r["tokens"]) == student_tokens.get(r["model"])
                   and r.get("kind") != "compute-matched" else -1 for r in supervised]
    cells: dict[tuple, int] = {}
    st_cell = [cells.setdefault((stratum(r), r["teacher_id"], float(r["alpha"])), len(cells)) for r in students]
    params = {r["model"]: float(r["non_embedding_parameters"]) for r in done}
    settings = sorted(strata, key=strata.get)
    return FitData(
        sup_N=np.array([float(r["non_embedding_parameters"]) for r in supervised]),
        sup_D=np.array([float(r["tokens"]) for r in supervised]),
        sup_loss=np.array([float(r[f"loss/{HELD_OUT}"]) for r in supervised]),
        sup_cluster=np.array(sup_cluster, dtype=int).reshape(-1, 2), baseline_of=np.array(baseline_of, dtype=int),
        st_alpha=np.array([float(r["alpha"]) for r in students]),
        st_teacher_loss=np.array([float(by_id[r["teacher_id"]][f"loss/{HELD_OUT}"]) for r in students]),
        st_setting=np.array([c[0] for c in st_cluster], dtype=int), st_cell=np.array(st_cell, dtype=int),
        st_gain={t: np.array([np.nan if gain_of(r, t) is None else gain_of(r, t) for r in students]) for t in TARGETS},
        st_cluster=np.array(st_cluster, dtype=int).reshape(-1, 2),
        settings=[(m, t, params[m], float(t)) for m, t in settings],
        seeds_per_setting=[len({k for k in seeds if k[0] == i}) for i in range(len(settings))],
        family=family, cells=sorted(cells, key=cells.get))


# ----------------------------------------------------------------------------- one fit, and its bootstrap


def setting_baselines(data: FitData, weights: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Per setting: the weighted mean held-out loss of its plain baselines (NaN without one)."""
    out = np.full(len(data.settings), np.nan)
    for s in range(len(data.settings)):
        mine = (data.baseline_of == s) & (weights > 0)
        if mine.any():
            out[s] = np.average(losses[mine], weights=weights[mine])
    return out


def fit_once(data: FitData, sup_weights: np.ndarray, st_weights: np.ndarray, sup_loss: np.ndarray,
             supervised: SupervisedLaw | None = None) -> Law:
    """Both parts on one (re)weighting of the rows (the supervised part fitted here unless given); a target
    with fewer students than terms is left out."""
    if supervised is None:
        supervised = fit_supervised(data.sup_N, data.sup_D, sup_loss, sup_weights)
    baselines = setting_baselines(data, sup_weights, sup_loss)
    fallback = supervised.loss([s[2] for s in data.settings], [s[3] for s in data.settings])
    student_loss = np.where(np.isnan(baselines), fallback, baselines)[data.st_setting]
    gap = student_loss - data.st_teacher_loss
    theta = {}
    for target in TARGETS:
        ok = ~np.isnan(data.st_gain[target]) & (st_weights > 0)
        if len(np.unique(data.st_cell[ok])) >= len(GAIN_TERMS):
            theta[target] = fit_gain(data.st_alpha[ok], gap[ok], data.st_gain[target][ok], st_weights[ok])
    return Law(supervised, theta)


def unit_weights(data: FitData) -> tuple[np.ndarray, np.ndarray]:
    return np.ones(len(data.sup_loss)), np.ones(len(data.st_alpha))


def seed_counts(data: FitData, rng: np.random.Generator) -> np.ndarray:
    """How often each seed is drawn when every setting's seeds are resampled with replacement."""
    clusters = np.concatenate([data.sup_cluster, data.st_cluster])
    clusters = np.unique(clusters[clusters[:, 1] >= 0], axis=0)
    counts = np.zeros(int(clusters[:, 1].max()) + 1 if len(clusters) else 0)
    for setting in np.unique(clusters[:, 0]):
        ids = clusters[clusters[:, 0] == setting, 1]
        np.add.at(counts, rng.choice(ids, size=len(ids)), 1)
    return counts


def resample(data: FitData, point: Law, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One bootstrap replicate's data: seeds resampled within settings, single-seed runs' residuals
    sign-flipped. Returns (supervised weights, student weights, supervised losses)."""
    counts = seed_counts(data, rng)
    seeded = data.sup_cluster[:, 1] >= 0
    sup_weights = np.where(seeded, counts[np.maximum(data.sup_cluster[:, 1], 0)], 1.0)
    fitted = point.supervised.loss(data.sup_N, data.sup_D)
    signs = rng.choice([-1.0, 1.0], size=len(fitted))
    sup_loss = np.where(seeded, data.sup_loss, fitted + signs * (data.sup_loss - fitted))
    return sup_weights, counts[data.st_cluster[:, 1]], sup_loss


def bootstrap(data: FitData, point: Law, replicates: int, rng: np.random.Generator) -> list[Law]:
    """`replicates` refits on resampled data (drawn in order from `rng`), their supervised parts in one batch
    started from the point fit's."""
    draws = [resample(data, point, rng) for _ in range(replicates)]
    if not draws:
        return []
    sup_weights, st_weights, sup_losses = (np.stack(v) for v in zip(*draws))
    supervised = fit_supervised_batch(data.sup_N, data.sup_D, sup_losses, sup_weights, start=point.supervised)
    return [fit_once(data, *draw, fit) for draw, fit in zip(draws, supervised)]


@dataclass
class Noise:
    """Seed noise of one run (sigma2) and the fit's lack of fit at the cell-mean level (tau2)."""

    sigma2: float
    tau2: float


def cell_noise(values: np.ndarray, fitted: np.ndarray, cells: np.ndarray, parameters: int) -> Noise:
    """sigma2: pooled within-cell variance of `values`; tau2: variance of cell-mean residuals beyond sigma2 / n."""
    within, dof, residuals, expected = 0.0, 0, [], []
    for cell in np.unique(cells):
        mine = cells == cell
        if not mine.any():
            continue
        mean = values[mine].mean()
        within += float(((values[mine] - mean) ** 2).sum())
        dof += int(mine.sum()) - 1
        residuals.append(mean - fitted[mine].mean())
        expected.append(1.0 / mine.sum())
    sigma2 = within / dof if dof > 0 else 0.0
    spare = len(residuals) - parameters
    excess = float(np.sum(np.square(residuals))) / spare - sigma2 * float(np.mean(expected)) if spare > 0 else 0.0
    return Noise(sigma2, max(excess, 0.0))


def fit_noise(data: FitData, law: Law) -> dict:
    """Noise of the supervised points (cells: distinct (N, D)) and of each target's gains (cells: setting, teacher, α)."""
    _, sup_cells = np.unique(np.stack([data.sup_N, data.sup_D], axis=1), axis=0, return_inverse=True)
    out = {"supervised": cell_noise(data.sup_loss, law.supervised.loss(data.sup_N, data.sup_D), sup_cells.ravel(),
                                    len(SUPERVISED_TERMS))}
    baselines = setting_baselines(data, np.ones(len(data.sup_loss)), data.sup_loss)
    gap = baselines[data.st_setting] - data.st_teacher_loss
    for target, theta in law.theta.items():
        ok = ~np.isnan(data.st_gain[target])
        out[target] = cell_noise(data.st_gain[target][ok], gain_features(data.st_alpha[ok], gap[ok]) @ theta,
                                 data.st_cell[ok], len(GAIN_TERMS))
    return out


@dataclass
class FittedLaw:
    """A point fit, its bootstrap replicates, the noise, and the region of the data it was fitted on."""

    point: Law
    replicates: list
    noise: dict
    seeds: list  # seeds of each fitted setting (the bootstrap's clusters per stratum)
    domain: dict
    family: dict

    @property
    def clusters(self) -> int:
        """G: the fewest seeds of any fitted setting."""
        return min(self.seeds) if self.seeds else 1

    def multiplier(self) -> float:
        """t(0.975, Σ(G_s − 1)) · sqrt(G / (G − 1)): the resampled seeds of every setting, less one per setting,
        are the degrees of freedom; G/(G − 1) undoes the bootstrap's shrinkage within a setting of G seeds.
        1.96 where no setting has 2 seeds (then the intervals are not trustworthy)."""
        g, dof = self.clusters, sum(n - 1 for n in self.seeds)
        return t_quantile_975(dof) * math.sqrt(g / (g - 1)) if g >= 2 and dof >= 1 else 1.96

    def parameters(self) -> list[dict]:
        """Every parameter: estimate and interval (estimate +- multiplier x bootstrap sd)."""
        rows = []
        law_values = [("supervised", k, self.point.supervised.values()[k],
                       [r.supervised.values()[k] for r in self.replicates]) for k in SUPERVISED_TERMS]
        for target, theta in self.point.theta.items():
            law_values += [(target, term, float(theta[i]), [r.theta[target][i] for r in self.replicates
                                                            if target in r.theta]) for i, term in enumerate(GAIN_TERMS)]
        for part, name, value, boot in law_values:
            sd = float(np.std(boot, ddof=1)) if len(boot) > 1 else float("nan")
            half = self.multiplier() * sd
            rows.append({"part": part, "name": name, "estimate": value, "sd": sd, "lo": value - half,
                         "hi": value + half})
        return rows

    def predict(self, N, D, alpha, teacher_loss=None, teacher_N=None, teacher_D=None, baseline_loss=None,
                n_seeds=1, matched_D=None) -> dict:
        """Predictions for students (arrays broadcast together).

        teacher_loss: the teacher's measured held-out loss, NaN where it is not measured (then the supervised
        law predicts it from teacher_N, teacher_D). baseline_loss: the student baseline's measured mean, NaN
        (or None) to take the supervised law's. Returns per target: gain, ci (lo, hi) of the expected gain,
        pi (lo, hi) for the mean gain of `n_seeds` new seeds; loss (the student's held-out loss) and, given the
        compute-matched budget matched_D, matched (the gain over that baseline), each as {value, ci, pi}."""
        N, D, alpha = (np.asarray(v, dtype=float) for v in (N, D, alpha))
        shape = np.broadcast(N, D, alpha).shape
        teacher_loss = np.full(shape, np.nan) if teacher_loss is None else np.asarray(teacher_loss, dtype=float)
        baseline_loss = np.full(shape, np.nan) if baseline_loss is None else np.asarray(baseline_loss, dtype=float)
        teacher_N = np.full(shape, np.nan) if teacher_N is None else np.asarray(teacher_N, dtype=float)
        teacher_D = np.full(shape, np.nan) if teacher_D is None else np.asarray(teacher_D, dtype=float)

        def evaluate(law: Law) -> dict:
            student = np.where(np.isnan(baseline_loss), law.supervised.loss(N, D), baseline_loss)
            teacher = np.where(np.isnan(teacher_loss), law.supervised.loss(teacher_N, teacher_D), teacher_loss)
            gap = student - teacher
            out = {"baseline": student, "teacher": teacher, "gap": gap}
            out.update({target: law.gain(target, alpha, gap) for target in law.theta})
            return out

        point = evaluate(self.point)
        boots = [evaluate(r) for r in self.replicates]
        k = self.multiplier()
        n = np.asarray(n_seeds, dtype=float)
        result = {"baseline": point["baseline"], "teacher_loss": point["teacher"], "gap": point["gap"]}
        for target in self.point.theta:
            spread = np.var([b[target] for b in boots if target in b], axis=0, ddof=1)
            noise = self.noise[target]
            ci = k * np.sqrt(spread)
            pi = k * np.sqrt(spread + noise.tau2 + noise.sigma2 / n)
            result[target] = {"gain": point[target], "ci": (point[target] - ci, point[target] + ci),
                              "pi": (point[target] - pi, point[target] + pi)}
        if "in_domain" in result:
            sup, gain = self.noise["supervised"], self.noise["in_domain"]
            noise = sup.tau2 + sup.sigma2 / n + gain.tau2 + gain.sigma2 / n
            loss = point["baseline"] - point["in_domain"]
            kept = [(law, b) for law, b in zip(self.replicates, boots) if "in_domain" in b]
            result["loss"] = self.interval(loss, [b["baseline"] - b["in_domain"] for _, b in kept], noise)
            if matched_D is not None:  # the compute-matched baseline's loss (the law's) minus the student's
                value = self.point.supervised.loss(N, matched_D) - loss
                result["matched"] = self.interval(value, [law.supervised.loss(N, matched_D) - b["baseline"]
                                                          + b["in_domain"] for law, b in kept], noise)
        return result

    def interval(self, value: np.ndarray, samples: list, noise) -> dict:
        """value with ci (bootstrap only) and pi (bootstrap + `noise` variance)."""
        spread = np.var(samples, axis=0, ddof=1)
        ci, pi = self.multiplier() * np.sqrt(spread), self.multiplier() * np.sqrt(spread + noise)
        return {"value": value, "ci": (value - ci, value + ci), "pi": (value - pi, value + pi)}

    def extrapolation(self, N, D, alpha, gap) -> list[str]:
        """Plain-words notes where (N, D, α, Δ) leave the fitted region (empty inside it)."""
        notes = []
        for name, values, key, unit in (("student parameters N", N, "N", ""), ("student tokens D", D, "D", ""),
                                        ("α", alpha, "alpha", ""), ("teacher gap Δ", gap, "gap", " nats")):
            lo, hi = self.domain[key]
            values = np.asarray(values, dtype=float)
            slack = 1e-9 * max(abs(lo), abs(hi), 1.0)
            outside = (values < lo - slack) | (values > hi + slack)
            if outside.any():
                factor = ""
                if key in ("N", "D"):
                    ratio = max(float(np.max(values)) / hi, lo / float(np.min(values)))
                    factor = f", up to {ratio:,.3g}x beyond it"
                notes.append(f"{name}: fitted on [{lo:,.4g}, {hi:,.4g}]{unit}; {int(outside.sum())} asked outside"
                             f"{factor}")
        return notes


def fit_law(rows: list[dict], replicates: int = 200, seed: int = 0) -> FittedLaw:
    """Fit both parts on `rows` and bootstrap them (`replicates` refits, seeded)."""
    data = fit_data(rows)
    point = fit_once(data, *unit_weights(data), data.sup_loss)
    boots = bootstrap(data, point, replicates, np.random.default_rng(seed))
    baselines = setting_baselines(data, np.ones(len(data.sup_loss)), data.sup_loss)
    gap = baselines[data.st_setting] - data.st_teacher_loss
    domain = {"N": (float(data.sup_N.min()), float(data.sup_N.max())),
              "D": (float(data.sup_D.min()), float(data.sup_D.max())),
              "alpha": (float(data.st_alpha.min()), float(data.st_alpha.max())),
              "gap": (float(np.nanmin(gap)), float(np.nanmax(gap))),
              "student_N": sorted({s[2] for s in data.settings}), "cells": len(data.cells),
              "students": len(data.st_alpha), "supervised_points": len(data.sup_loss)}
    return FittedLaw(point, boots, fit_noise(data, point), [n for n in data.seeds_per_setting if n > 0], domain,
                     data.family)
