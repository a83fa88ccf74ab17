"""Honest validation of the fitted law (`distillab.study.law`) against two naive predictors.

Each check fits on some runs and predicts the mean gain of held-out (student setting, teacher, α)
cells, with a 95 % prediction interval for the mean of the cell's seeds:

    largest size    fit on every student size but the largest; predict the largest's cells (its
                    teachers' measured losses are inputs; its baselines are not: the law's L~)
    leave one teacher out
                    within each student size: fit on the other teachers' students (and every α = 0
                    run of that size), predict the left-out teacher's cells

Predictors, each fitted on the same cells:

    law             `FittedLaw.predict` (prediction interval: bootstrap + lack of fit + seed noise / n)
    mean            the mean gain of the fitted cells (interval: Student-t prediction interval of one
                    more cell mean)
    linear in gap   OLS of the cell mean gain on the measured gap (student baseline − teacher loss);
                    its OLS prediction interval. It is given the held-out size's measured baseline,
                    which the law is not: an advantage, kept to make the comparison hard for the law.

Reported per check, target and predictor: cells, mean absolute error, root mean square error, bias,
coverage of the 95 % intervals and their mean half-width. Whatever they are.
"""

from __future__ import annotations

import math

import numpy as np

from distillab.study.law import HELD_OUT, fit_law, gain_of, in_family
from distillab.study.stats import t_quantile_975

PREDICTORS = ("law", "mean", "linear in gap")
VALIDATION_TARGETS = ("in_domain", "overall")


def observed_cells(rows: list[dict], targets=VALIDATION_TARGETS) -> list[dict]:
    """Finished students grouped into (student model, tokens, teacher, α) cells: observed mean gains, seeds, the
    teacher's measured loss and the student setting's measured baseline mean."""
    done = {r["run_id"]: r for r in rows if r.get("status", "done") == "done"}
    baselines: dict[tuple, list[float]] = {}
    for r in done.values():
        if r["role"] == "baseline" and r.get("kind") != "compute-matched" and r.get(f"loss/{HELD_OUT}") is not None:
            baselines.setdefault((r["model"], int(r["tokens"])), []).append(r[f"loss/{HELD_OUT}"])
    cells: dict[tuple, dict] = {}
    for r in done.values():
        teacher = done.get(r.get("teacher_id"))
        if r["role"] != "student" or teacher is None or teacher.get(f"loss/{HELD_OUT}") is None:
            continue
        key = (r["model"], int(r["tokens"]), r["teacher_id"], float(r["alpha"]))
        cell = cells.setdefault(key, {"model": r["model"], "tokens": int(r["tokens"]), "teacher_id": r["teacher_id"],
                                      "teacher": f"{teacher['model']} @ {int(teacher['tokens']):,}",
                                      "alpha": float(r["alpha"]), "N": float(r["non_embedding_parameters"]),
                                      "teacher_loss": teacher[f"loss/{HELD_OUT}"], "row": r,
                                      "gains": {t: [] for t in targets}})
        for t in targets:
            if gain_of(r, t) is not None:
                cell["gains"][t].append(gain_of(r, t))
    for cell in cells.values():
        losses = baselines.get((cell["model"], cell["tokens"]), [])
        cell["baseline"] = float(np.mean(losses)) if losses else math.nan
        cell["gap"] = cell["baseline"] - cell["teacher_loss"]
        cell["n"] = max(len(v) for v in cell["gains"].values())
        cell["mean"] = {t: float(np.mean(v)) if v else math.nan for t, v in cell["gains"].items()}
    return list(cells.values())


def naive_predictions(fitted: list[dict], held_out: list[dict], target: str) -> dict:
    """(prediction, half-width) per held-out cell for the two naive predictors."""
    y = np.array([c["mean"][target] for c in fitted])
    x = np.array([c["gap"] for c in fitted])
    k = len(y)
    mean, sd = float(y.mean()), float(y.std(ddof=1))
    out = {"mean": [(mean, t_quantile_975(k - 1) * sd * math.sqrt(1 + 1 / k)) for _ in held_out]}
    design = np.stack([np.ones(k), x], axis=1)
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ beta
    s2 = float(residual @ residual) / (k - 2)
    inverse = np.linalg.inv(design.T @ design)
    linear = []
    for c in held_out:
        z = np.array([1.0, c["gap"]])
        linear.append((float(z @ beta), t_quantile_975(k - 2) * math.sqrt(s2 * (1 + z @ inverse @ z))))
    out["linear in gap"] = linear
    return out


def law_predictions(law, held_out: list[dict], use_baseline: bool) -> dict[str, list[tuple[float, float]]]:
    """Per target: (prediction, half-width of the 95 % prediction interval of the cell mean) per held-out cell."""
    baseline = [c["baseline"] if use_baseline else math.nan for c in held_out]
    p = law.predict([c["N"] for c in held_out], [c["tokens"] for c in held_out], [c["alpha"] for c in held_out],
                    teacher_loss=[c["teacher_loss"] for c in held_out], baseline_loss=baseline,
                    n_seeds=[c["n"] for c in held_out])
    missing = [(math.nan, math.nan)] * len(held_out)
    return {t: [(float(g), float(hi - g)) for g, hi in zip(p[t]["gain"], p[t]["pi"][1])] if t in p else missing
            for t in VALIDATION_TARGETS}


def score(held_out: list[dict], predictions: list[tuple[float, float]], target: str) -> dict:
    observed = np.array([c["mean"][target] for c in held_out])
    value = np.array([p[0] for p in predictions])
    half = np.array([p[1] for p in predictions])
    ok = ~np.isnan(observed) & ~np.isnan(value)
    error = value[ok] - observed[ok]
    if not ok.any():
        return {"cells": 0}
    return {"cells": int(ok.sum()), "mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error ** 2).mean())),
            "bias": float(error.mean()), "coverage": float((np.abs(error) <= half[ok]).mean()),
            "half_width": float(half[ok].mean())}


def compare(rows: list[dict], fitted: list[dict], held_out: list[dict], use_baseline: bool, replicates: int,
            seed: int) -> dict:
    """{target: {predictor: score}} for one split."""
    by_law = law_predictions(fit_law(rows, replicates=replicates, seed=seed), held_out, use_baseline)
    out = {}
    for target in VALIDATION_TARGETS:
        predictions = {**naive_predictions(fitted, held_out, target), "law": by_law[target]}
        out[target] = {name: score(held_out, predictions[name], target) for name in PREDICTORS}
    return out


def pool(results: list[dict]) -> dict:
    """Scores of several splits pooled cell-weighted: {target: {predictor: score}}."""
    out: dict = {}
    for target in VALIDATION_TARGETS:
        out[target] = {}
        for name in PREDICTORS:
            parts = [r[target][name] for r in results if r[target][name].get("cells")]
            n = sum(p["cells"] for p in parts)
            if not n:
                out[target][name] = {"cells": 0}
                continue
            def weighted(key, parts=parts, n=n):
                return sum(p[key] * p["cells"] for p in parts) / n

            out[target][name] = {"cells": n, "mae": weighted("mae"),
                                 "rmse": math.sqrt(sum(p["rmse"] ** 2 * p["cells"] for p in parts) / n),
                                 "bias": weighted("bias"), "coverage": weighted("coverage"),
                                 "half_width": weighted("half_width")}
    return out


def settings_of(rows: list[dict]) -> list[tuple[str, int, float]]:
    """Student settings (model, tokens, parameters), smallest first."""
    found = {(r["model"], int(r["tokens"]), float(r["non_embedding_parameters"])) for r in rows
             if r["role"] == "student"}
    return sorted(found, key=lambda s: (s[2], s[1]))


def rows_without_setting(rows: list[dict], model: str, tokens: int) -> list[dict]:
    """Every row but a student setting's students and baselines, and the teachers only its students used."""
    used_elsewhere = {r.get("teacher_id") for r in rows if r["role"] == "student" and r["model"] != model}
    mine = {r.get("teacher_id") for r in rows if r["role"] == "student" and r["model"] == model}
    return [r for r in rows if not (r["role"] in ("student", "baseline") and r["model"] == model)
            and not (r["role"] == "teacher" and r["run_id"] in mine - used_elsewhere)]


def largest_size_check(rows: list[dict], replicates: int = 100, seed: int = 0) -> dict | None:
    """Fit on all student sizes but the largest, predict the largest's cells; None with fewer than 2 sizes."""
    settings = settings_of(rows)
    if len(settings) < 2:
        return None
    model, tokens, params = settings[-1]
    fitted_rows = rows_without_setting(rows, model, tokens)
    cells = observed_cells(rows)
    held_out = [c for c in cells if (c["model"], c["tokens"]) == (model, tokens)]
    fitted = [c for c in cells if (c["model"], c["tokens"]) != (model, tokens)]
    return {"held_out": f"{model} @ {tokens:,}", "scores": compare(fitted_rows, fitted, held_out, False, replicates,
                                                                  seed), "cells": held_out}


def leave_one_teacher_out(rows: list[dict], replicates: int = 100, seed: int = 0) -> dict:
    """Within each student size: per teacher, fit without its students and predict its cells; scores pooled
    over teachers per size and over all sizes."""
    per_size = {}
    cells = observed_cells(rows)
    for model, tokens, _ in settings_of(rows):
        mine = [r for r in rows if r["model"] == model or r["role"] == "teacher"]
        size_cells = [c for c in cells if (c["model"], c["tokens"]) == (model, tokens)]
        results = []
        for teacher in sorted({c["teacher_id"] for c in size_cells}):
            fit_rows = [r for r in mine if not (r["role"] == "student" and r.get("teacher_id") == teacher)]
            fit_rows = [r for r in fit_rows if r["role"] != "teacher" or r["run_id"] in {
                x.get("teacher_id") for x in fit_rows if x["role"] == "student"} or r["run_id"] == teacher]
            held_out = [c for c in size_cells if c["teacher_id"] == teacher]
            fitted = [c for c in size_cells if c["teacher_id"] != teacher]
            results.append(compare(fit_rows, fitted, held_out, True, replicates, seed))
        per_size[f"{model} @ {tokens:,}"] = pool(results)
    return {"per_size": per_size, "pooled": pool(list(per_size.values()))} if per_size else {}


def validation_lines(largest: dict | None, loto: dict) -> list[str]:
    """The validation table in markdown."""
    lines = ["## Validation of the law", "",
             "Predicted vs observed mean gain (nats) of held-out (teacher, α) cells; 95 % prediction intervals for "
             "the mean of each cell's seeds. Naive predictors: the mean gain of the fitted cells, and the gain "
             "linear in the measured teacher–student loss gap (given the measured baseline even where the law is "
             "not).", "",
             "| check | target | predictor | cells | MAE | RMSE | bias | coverage of 95 % PI | mean PI half-width |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    checks = []
    if largest:
        checks.append((f"largest size held out ({largest['held_out']})", largest["scores"]))
    for size, scores in (loto.get("per_size") or {}).items():
        checks.append((f"leave one teacher out, {size}", scores))
    if loto.get("per_size") and len(loto["per_size"]) > 1:
        checks.append(("leave one teacher out, all sizes", loto["pooled"]))
    for check, scores in checks:
        for target, by_predictor in scores.items():
            for name, s in by_predictor.items():
                if not s.get("cells"):
                    lines.append(f"| {check} | {target} | {name} | 0 | — | — | — | — | — |")
                    continue
                lines.append(f"| {check} | {target} | {name} | {s['cells']} | {s['mae']:.4f} | {s['rmse']:.4f} | "
                             f"{s['bias']:+.4f} | {s['coverage']:.2f} | {s['half_width']:.4f} |")
    if not checks:
        lines.append("| — | | | 0 | | | | | |")
    return lines + [""]
