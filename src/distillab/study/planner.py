"""`distillab plan GRID --from SWEEP_DIR`: what a grid's students will gain, before they train.

The law (`distillab.study.law`) is fitted on the finished runs of one or more sweeps; the grid is
expanded into its runs exactly as `distillab sweep` would (`distillab.sweep.plan`), and for every
planned student cell (student, tokens, teacher, α; its seeds) the plan gives:

- the predicted held-out loss and the gain over its baseline (in-domain, OOD, overall), with a 95 %
  interval of the expected gain and a prediction interval for the mean over the cell's seeds;
- the gain over its compute-matched baseline (the law's loss at the matched budget minus the
  student's), and the predicted gain per PFLOP (student training + teacher inference);
- the cells whose outcome the fit already predicts within the grid's verdict margin (the one-seed
  prediction interval of the overall gain is narrower than ±margin): running them adds little;
- the findings F1, F2, F3-OOD as the law predicts them on this grid, and the few runs that would
  most narrow those still open (the variance of the finding's predicted quantity after one more
  run, from the bootstrap covariance of the gain law's coefficients: a linear-Gaussian update).

Teachers measured in the sources (same model and tokens, same data) enter with their measured loss;
others with the supervised law's. When the grid's data are not the sources' (another corpus,
tokenizer or sequence length) or its students, teachers, α or objective lie outside the fitted
region, the plan says so loudly: the numbers are then an extrapolation, not a prediction.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np

from distillab.errors import DataError, DistillabError
from distillab.layout import SweepLayout
from distillab.shipped import find
from distillab.study.law import HELD_OUT, FittedLaw, fit_law, gain_features, in_family

DATA_KEYS = ("corpus", "tokenizer", "validation_fraction", "packing")


# ----------------------------------------------------------------------------- the sources


def read_rows(sweep_dir: Path) -> list[dict]:
    """A sweep's result rows: recomputed from its runs where plan.json is there, else its results.csv."""
    sweep_dir = Path(sweep_dir)
    files = SweepLayout(sweep_dir)
    if files.plan.exists() and files.runs.is_dir():
        from distillab.study.results import add_gains_and_labels, collect_rows

        spec = json.loads(files.plan.read_text()).get("spec", {})
        return add_gains_and_labels(collect_rows(sweep_dir), spec.get("label_tolerance", 0.02))
    table = files.results_csv
    if not table.exists():
        raise DataError(f"plan --from {sweep_dir}: neither plan.json with runs/ nor results.csv is there; give a sweep "
                        "directory (`distillab sweep` / `distillab demo` output, or docs/results/<name>)")
    from distillab.study.results import read_table

    return read_table(table)


def source_data(sweep_dir: Path) -> dict | None:
    """The data settings (corpus, tokenizer, split, packing, seq_len) a sweep's runs used: from plan.json, or for a
    committed demo from demo.json's size; None when they cannot be told."""
    files = SweepLayout(sweep_dir)
    if files.plan.exists():
        runs = json.loads(files.plan.read_text()).get("runs", [])
        if runs:
            return data_identity(runs[0]["config"])
    from distillab.study.demo import STUDIES, study_grid

    if files.demo_result.exists():
        size = json.loads(files.demo_result.read_text()).get("size")
        if size in STUDIES:
            return data_identity(study_grid(STUDIES[size])["base"])
    if files.scaling_result.exists():  # one size of `demo --scaling`: the base study with that student
        from distillab.study.scaling import scaling_study

        state = json.loads(files.scaling_result.read_text())
        studies = [scaling_study(state["student"], base) for base in STUDIES]
        # written before scaling.json named its study: the default demo's, the only base `demo --scaling` had
        study = next((s for s in studies if s.name == state.get("study", f"{STUDIES['default'].name}-scaling-"
                                                                         f"{state['student']}")), None)
        if study is not None:
            return data_identity(study_grid(study)["base"])
    return None


def expand_sources(sources: list[str | Path]) -> list[Path]:
    """The sweep directories of `--from`: each as given, but a `demo --scaling` output (a directory of
    one subdirectory per size, each with its scaling.json) stands for its sizes."""
    out = []
    for path in map(Path, sources):
        files = SweepLayout(path)
        sizes = sorted(p.parent for p in path.glob(f"*/{files.scaling_result.name}"))
        out += sizes if sizes and not files.plan.exists() and not files.results_csv.exists() else [path]
    return out


def data_identity(config: dict) -> dict:
    """What makes two runs' held-out losses comparable: their data settings and sequence length."""
    from distillab.config import config_from_dict

    values = {"name": "identity", "run_dir": "unused", "data": config.get("data", {}),
              "train": {"seq_len": config.get("train", {}).get("seq_len", 256)}}
    resolved = config_from_dict(values)
    data = resolved.data
    return {"corpus": repr(data.corpus), "vocab_size": data.tokenizer.vocab_size,
            "tokenizer": repr(data.tokenizer), "validation_fraction": data.validation_fraction,
            "packing": data.packing, "seq_len": resolved.train.seq_len}


# ----------------------------------------------------------------------------- the grid


def load_plan_grid(grid: str):
    """A grid YAML, or a demo study by name (`default`, `full`, `quick`, or `scaling:<student rung>`)."""
    from distillab.sweep import grid_from_dict, load_grid

    if find(grid) is not None:  # a file, or a shipped grid by name (paper/exp1)
        return load_grid(grid)
    from distillab.study.demo import STUDIES, study_grid

    if grid in STUDIES:
        return grid_from_dict(study_grid(STUDIES[grid]))
    if grid.startswith("scaling:"):
        from distillab.study.scaling import scaling_study

        return grid_from_dict(study_grid(scaling_study(grid.split(":", 1)[1])))
    raise DistillabError(f"plan: {grid!r} is neither a grid file nor a demo study (default, full, quick, "
                         "scaling:<student rung>)")


def planned_rows(spec) -> tuple[list[dict], dict, list[str]]:
    """The grid's runs as result rows (pending), the data identity of its runs, and notes on runs left out."""
    from distillab.study.results import run_row
    from distillab.sweep import plan

    rows, notes = [], []
    with tempfile.TemporaryDirectory() as scratch:
        runs = plan(spec, Path(scratch))
        identity = data_identity(runs[0].config) if runs else {}
        by_id = {run.id: run for run in runs}
        for run in runs:
            try:
                row = run_row({"id": run.id, "role": run.role, "config": run.config, "info": run.info}, Path(scratch))
            except DistillabError as error:
                notes.append(f"{run.role} {run.info.get('model')} (teacher {run.info.get('teacher_model')}): not "
                             f"predicted ({error})")
                continue
            if row["role"] == "student" and not row.get("matched_tokens") and run.depends_on:
                row["matched_tokens"] = matched_budget(run, by_id[run.depends_on[0]])
            rows.append(row)
    return rows, identity, notes


def matched_budget(student, teacher) -> int:
    """The compute-matched budget of a planned student whose grid plans no such baseline (the sweep's rule)."""
    from distillab.config import config_from_dict
    from distillab.flops import compute_matched_tokens
    from distillab.models import resolve_spec

    cfg, teacher_cfg = config_from_dict(student.config), config_from_dict(teacher.config)
    t = cfg.train
    return compute_matched_tokens(resolve_spec(cfg.model), resolve_spec(teacher_cfg.model),
                                  cfg.data.tokenizer.vocab_size, t.seq_len, t.token_budget,
                                  t.batch_size * t.seq_len * t.grad_accum * t.processes)


# ----------------------------------------------------------------------------- predictions per cell


def measured_losses(source_rows: list[dict]) -> tuple[dict, dict]:
    """From the sources' finished runs: {(teacher model, tokens, seed): held-out loss} and {(student model,
    tokens): mean held-out loss of its plain baselines}."""
    teachers, baselines = {}, {}
    for r in source_rows:
        loss = r.get(f"loss/{HELD_OUT}")
        if r.get("status", "done") != "done" or loss is None:
            continue
        if r["role"] == "teacher":
            teachers[(r["model"], int(r["tokens"]), r["init_seed"])] = loss
        elif r["role"] == "baseline" and r.get("kind") != "compute-matched" and not r.get("matched_teacher"):
            baselines.setdefault((r["model"], int(r["tokens"])), []).append(loss)
    return teachers, {key: float(np.mean(v)) for key, v in baselines.items()}


def student_cells(planned: list[dict]) -> list[dict]:
    """Planned students grouped into cells (student model, tokens, teacher, α, objective): one entry per cell."""
    by_id = {r["run_id"]: r for r in planned}
    cells: dict[tuple, dict] = {}
    for r in planned:
        if r["role"] != "student" or r.get("teacher_id") not in by_id:
            continue
        key = (r["model"], r["tokens"], r["teacher_id"], r["alpha"], r["objective_key"])
        cell = cells.setdefault(key, {"row": r, "teacher": by_id[r["teacher_id"]], "seeds": 0, "run_ids": []})
        cell["seeds"] += 1
        cell["run_ids"].append(r["run_id"])
    return list(cells.values())


def predict_cells(law: FittedLaw, cells: list[dict], measured: tuple[dict, dict] | None) -> list[dict]:
    """Each cell's predictions (`FittedLaw.predict`), in cell order; cells outside the fitted objective family
    get `outside` and no numbers."""
    teachers, baselines = measured or ({}, {})
    inside = [c for c in cells if in_family(c["row"], law.family)]
    for cell in cells:
        if not in_family(cell["row"], law.family):
            r = cell["row"]
            cell["outside"] = (f"objective {r.get('divergence')}, T {r.get('temperature'):g}, top-k {r.get('top_k')} is "
                               f"not the fitted family ({law.family['divergence']}, T {law.family['temperature']:g}, "
                               f"top-k {law.family['top_k']})")
    if not inside:
        return cells
    column = {name: np.array([value(c) for c in inside], dtype=float) for name, value in {
        "N": lambda c: c["row"]["non_embedding_parameters"], "D": lambda c: c["row"]["tokens"],
        "alpha": lambda c: c["row"]["alpha"], "TN": lambda c: c["teacher"]["non_embedding_parameters"],
        "TD": lambda c: c["teacher"]["tokens"],
        "TL": lambda c: teachers.get((c["teacher"]["model"], c["teacher"]["tokens"], c["teacher"]["init_seed"]),
                                     np.nan),
        "BL": lambda c: baselines.get((c["row"]["model"], c["row"]["tokens"]), np.nan),
        "seeds": lambda c: c["seeds"],
        "matched": lambda c: c["row"].get("matched_tokens") or c["row"]["tokens"]}.items()}
    one = law.predict(column["N"], column["D"], column["alpha"], column["TL"], column["TN"], column["TD"],
                      column["BL"], n_seeds=1, matched_D=column["matched"])
    mean = law.predict(column["N"], column["D"], column["alpha"], column["TL"], column["TN"], column["TD"],
                       column["BL"], n_seeds=column["seeds"], matched_D=column["matched"])
    for i, cell in enumerate(inside):
        cell["teacher_measured"] = not math.isnan(column["TL"][i])
        cell["baseline_measured"] = not math.isnan(column["BL"][i])
        cell["features"] = gain_features(column["alpha"][i], one["gap"][i])
        cell["predicted"] = pick(mean, i)
        cell["one_seed"] = pick(one, i)
        flops = cell["row"]["train_flops"] + cell["row"]["teacher_inference_flops"]
        cell["flops"] = flops
        overall = (mean.get("overall") or mean["in_domain"])["gain"][i]
        cell["gain_per_pflop"] = overall / (flops / 1e15) if flops else None
    return cells


def pick(prediction: dict, i: int) -> dict:
    """Entry i of every array in a `FittedLaw.predict` result."""
    def take(value):
        if isinstance(value, dict):
            return {k: take(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return tuple(float(v[i]) for v in value)
        return float(np.asarray(value)[i])
    return {key: take(value) for key, value in prediction.items()}


# ----------------------------------------------------------------------------- the findings, as the law predicts them


def best_cells(cells: list[dict]) -> dict[tuple, dict]:
    """Per (student setting, teacher): the cell of the α with the best predicted overall gain (ties: smaller α)."""
    best: dict[tuple, dict] = {}
    for cell in (c for c in cells if "predicted" in c):
        key = (cell["row"]["model"], cell["row"]["tokens"], cell["teacher"]["run_id"])
        score = (overall(cell)["gain"], -cell["row"]["alpha"])
        if key not in best or score > (overall(best[key])["gain"], -best[key]["row"]["alpha"]):
            best[key] = cell
    return best


def overall(cell: dict) -> dict:
    return cell["predicted"].get("overall") or cell["predicted"]["in_domain"]


def stronger_pairs(best: list[dict]) -> list[tuple[dict, dict]]:
    """Neighbouring teachers on the size axis (same tokens) and the token axis (same model), where the larger
    one is predicted (or measured) stronger: (weaker cell, stronger cell)."""
    pairs = []
    for fixed, along in (("tokens", "non_embedding_parameters"), ("model", "tokens")):
        lines: dict = {}
        for cell in best:
            lines.setdefault(cell["teacher"][fixed], []).append(cell)
        for members in lines.values():
            members.sort(key=lambda c: c["teacher"][along])
            for small, large in zip(members, members[1:]):
                if large["teacher"][along] > small["teacher"][along] and \
                        large["predicted"]["teacher_loss"] < small["predicted"]["teacher_loss"]:
                    pairs.append((small, large))
    return pairs


def finding_terms(name: str, best: list[dict]) -> list[tuple[str, float, np.ndarray]]:
    """A finding's predicted quantity as Σ weight x (features . θ_target): [(target, weight, features)]."""
    if name == "F1":
        weak = [c for c in best if c["predicted"]["gap"] < 0]
        return [(t, 0.5 / len(weak), c["features"]) for c in weak for t in ("in_domain", "ood")]
    if name == "F2":
        pairs = stronger_pairs(best)
        return [(t, sign * 0.5 / len(pairs), c["features"]) for weak, strong in pairs
                for sign, c in ((-1, weak), (1, strong)) for t in ("in_domain", "ood")]
    return [(t, sign / len(best), c["features"]) for c in best for sign, t in ((1, "ood"), (-1, "in_domain"))]


FINDINGS = {"F1": "overall gain at the best α, mean over teachers weaker than the student",
            "F2": "gain(stronger) − gain(weaker) at each one's best α, mean over neighbouring pairs",
            "F3-OOD": "OOD − in-domain gain at the best α, mean over teachers"}


def coefficient_samples(law: FittedLaw, targets: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(point, replicates) of the stacked gain coefficients of `targets`."""
    point = np.concatenate([law.point.theta[t] for t in targets])
    boots = np.array([np.concatenate([r.theta[t] for t in targets]) for r in law.replicates
                      if all(t in r.theta for t in targets)])
    return point, boots


def finding_vector(terms: list, targets: tuple[str, ...]) -> np.ndarray:
    width = len(terms[0][2])
    c = np.zeros(width * len(targets))
    for target, weight, features in terms:
        c[targets.index(target) * width:(targets.index(target) + 1) * width] += weight * features
    return c


def predicted_findings(law: FittedLaw, cells: list[dict], margin: float) -> list[dict]:
    """Per student setting: F1, F2, F3-OOD as linear functionals c of the (in-domain, OOD) coefficients, with their
    interval (multiplier x bootstrap sd) and whether the verdict rule would already decide them."""
    from distillab.study.verdicts import rule_gain_expected, rule_no_gain_expected

    targets = ("in_domain", "ood")
    if not all(t in law.point.theta for t in targets):
        return []
    point, boots = coefficient_samples(law, targets)
    settings: dict[tuple, list[dict]] = {}
    for key, cell in best_cells(cells).items():
        settings.setdefault(key[:2], []).append(cell)
    out = []
    for (model, tokens), best in sorted(settings.items(), key=lambda kv: str(kv[0])):
        for name, what in FINDINGS.items():
            terms = finding_terms(name, best) if best else []
            if not terms:
                out.append({"student": model, "tokens": tokens, "finding": name, "what": what, "askable": False})
                continue
            c = finding_vector(terms, targets)
            value, sd = float(c @ point), float(np.std(boots @ c, ddof=1))
            half = law.multiplier() * sd
            ci = {"mean": value, "lo": value - half, "hi": value + half}
            rule = rule_no_gain_expected(margin) if name == "F2" else rule_gain_expected(margin)
            out.append({"student": model, "tokens": tokens, "finding": name, "what": what, "askable": True,
                        "ci": ci, "sd": sd, "decision": rule({"gain": ci}), "vector": c})
    return out


def variance_after(sigma: np.ndarray, c: np.ndarray, h: np.ndarray, noise: np.ndarray) -> float:
    """Var(c . θ) after observing y = h θ + e, e ~ N(0, noise), when θ ~ N(·, sigma): the linear-Gaussian update
    c Σ c − (h Σ c)ᵀ (h Σ hᵀ + noise)⁻¹ (h Σ c)."""
    hs = h @ sigma @ c
    return float(c @ sigma @ c - hs @ np.linalg.solve(h @ sigma @ h.T + noise, hs))


def narrowing_runs(law: FittedLaw, cells: list[dict], findings: list[dict], top: int) -> list[dict]:
    """The cells whose next run most narrows the open findings: score = Σ over open findings of the fraction of
    the finding's variance one more run would remove; best first (at most `top`)."""
    open_findings = [f for f in findings if f["askable"] and f["decision"] is None]
    if not open_findings:
        return []
    targets = ("in_domain", "ood")
    _, boots = coefficient_samples(law, targets)
    g = max(law.clusters, 2)
    sigma = np.cov(boots, rowvar=False) * g / (g - 1)  # the cluster bootstrap's small-sample factor
    noise = np.diag([law.noise[t].sigma2 + law.noise[t].tau2 for t in targets])
    scored = []
    for cell in (c for c in cells if "features" in c):
        x, zero = cell["features"], np.zeros_like(cell["features"])
        h = np.array([np.concatenate([x, zero]), np.concatenate([zero, x])])
        effects = {}
        for f in open_findings:
            before = float(f["vector"] @ sigma @ f["vector"])
            effects[f["finding"]] = (math.sqrt(before), math.sqrt(max(variance_after(sigma, f["vector"], h, noise), 0)))
        score = sum(1 - (after / before) ** 2 for before, after in effects.values() if before > 0)
        scored.append({"cell": cell, "score": score, "effects": effects})
    scored.sort(key=lambda s: -s["score"])
    return scored[:top]


def predictable_cells(cells: list[dict], margin: float) -> list[dict]:
    """Cells whose one-seed prediction interval of the overall gain lies within ±margin of its prediction."""
    out = []
    for cell in (c for c in cells if "one_seed" in c):
        gain = cell["one_seed"].get("overall") or cell["one_seed"]["in_domain"]
        if (gain["pi"][1] - gain["pi"][0]) / 2 <= margin:
            out.append(cell)
    return out


# ----------------------------------------------------------------------------- the plan


def extrapolation_notes(law: FittedLaw, cells: list[dict], grid_data: dict, sources: dict) -> list[str]:
    """Every way the grid leaves what the law was fitted on, in plain words (empty: a prediction inside it)."""
    notes = []
    unknown = [name for name, identity in sources.items() if identity is None]
    if unknown:
        notes.append(f"the data of {', '.join(unknown)} cannot be told (no plan.json or demo.json): the grid's data "
                     "are assumed to be theirs")
    for name, identity in sources.items():
        if identity is not None and identity != grid_data:
            changed = ", ".join(k for k in identity if identity[k] != grid_data.get(k))
            notes.append(f"the grid's data differ from {name}'s ({changed}): held-out losses of different data or "
                         "tokenizers are not on one scale, so every number below is a guess about another setting")
    inside = [c for c in cells if "predicted" in c]
    if inside:
        notes += law.extrapolation([c["row"]["non_embedding_parameters"] for c in inside],
                                   [c["row"]["tokens"] for c in inside], [c["row"]["alpha"] for c in inside],
                                   [c["predicted"]["gap"] for c in inside])
        teachers = {(c["teacher"]["model"], c["teacher"]["tokens"]) for c in inside if not c["teacher_measured"]}
        if teachers:
            notes.append(f"{len(teachers)} teacher(s) not measured in the sources: their losses come from the "
                         "supervised law" + (" far outside its fitted sizes" if any(
                             n > 10 * law.domain["N"][1] for n in [c["teacher"]["non_embedding_parameters"]
                                                                   for c in inside]) else ""))
    outside = [c for c in cells if "outside" in c]
    if outside:
        notes.append(f"{len(outside)} cell(s) use an objective the law was not fitted on: not predicted")
    return notes


def plan_grid(grid: str, sources: list[str | Path], replicates: int = 200, seed: int = 0, top: int = 5,
              validate: bool = False) -> dict:
    """Fit the law on the sources' rows and predict every student cell of `grid` (see the module docstring)."""
    if not sources:
        raise DistillabError("plan: give at least one --from SWEEP_DIR to fit the law on")
    spec = load_plan_grid(grid)
    sources = expand_sources(sources)
    source_rows, identities = [], {}
    for path in sources:
        source_rows += read_rows(Path(path))
        identities[str(path)] = source_data(Path(path))
    law = fit_law(source_rows, replicates=replicates, seed=seed)
    planned, grid_data, skipped = planned_rows(spec)
    same_data = all(identity == grid_data for identity in identities.values())
    cells = predict_cells(law, student_cells(planned), measured_losses(source_rows) if same_data else None)
    findings = predicted_findings(law, cells, spec.verdict_margin)
    return {"grid": grid, "name": spec.name, "sources": [str(p) for p in sources], "law": law, "cells": cells,
            "findings": findings, "narrowing": narrowing_runs(law, cells, findings, top),
            "predictable": predictable_cells(cells, spec.verdict_margin), "margin": spec.verdict_margin,
            "warnings": extrapolation_notes(law, cells, grid_data, identities), "skipped": skipped,
            "summary_verdicts": source_verdicts(sources) if same_data else [],
            "validation": validation_of(source_rows, replicates, seed) if validate else None}


def validation_of(rows: list[dict], replicates: int, seed: int) -> tuple:
    """The law's validation on the sources (`distillab.study.validation`): largest size held out, leave one teacher out."""
    from distillab.study.validation import largest_size_check, leave_one_teacher_out

    return largest_size_check(rows, replicates, seed), leave_one_teacher_out(rows, replicates, seed)


def source_verdicts(sources: list) -> list[dict]:
    """The sources' own verdicts (summary.json), for reading beside the predicted ones."""
    out = []
    for path in sources:
        summary = SweepLayout(path).summary
        if summary.exists():
            for setting in json.loads(summary.read_text()).get("verdicts", {}).get("settings", []):
                out += [{"source": str(path), "student": setting["student"], "finding": v["finding"],
                         "verdict": v["verdict"], "ci": v["ci"]} for v in setting["verdicts"]]
    return out


# ----------------------------------------------------------------------------- the plan as markdown


def fmt(value: float | None, digits: int = 4, signed: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:{'+' if signed else ''}.{digits}f}"


def fmt_interval(entry: dict, key: str = "ci", digits: int = 4) -> str:
    value = entry.get("gain", entry.get("value"))
    lo, hi = entry[key]
    return f"{fmt(value, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def law_lines(law: FittedLaw) -> list[str]:
    lines = ["## The law", "",
             "L~(N, D) = E + A·(N/N0)^−a + B·(D/D0)^−b (supervised, every α = 0 run); "
             "student loss = L~_S − G, G = θ1·α + θ2·α·Δ + θ3·α² + θ4·α·Δ² + θ5·α²·Δ, Δ = L~_S − L_T "
             "(`distillab.study.law`).",
             f"Fitted on {law.domain['supervised_points']} α = 0 runs and {law.domain['students']} students in "
             f"{law.domain['cells']} cells; objective {law.family['divergence']}, T {law.family['temperature']:g}; "
             f"N0 = {law.point.supervised.N0:,.0f}, D0 = {law.point.supervised.D0:,.0f}. Intervals: "
             f"{len(law.replicates)} bootstrap refits (seeds resampled within settings), ± "
             f"{law.multiplier():.2f} sd (G = {law.clusters} seeds).", "",
             "| part | term | estimate | 95 % interval |", "|---|---|---:|---|"]
    for p in law.parameters():
        lines.append(f"| {p['part']} | {p['name']} | {p['estimate']:.4g} | [{p['lo']:.4g}, {p['hi']:.4g}] |")
    noise = "; ".join(f"{k}: σ {math.sqrt(v.sigma2):.4f}, τ {math.sqrt(v.tau2):.4f}" for k, v in law.noise.items())
    return lines + ["", f"Noise per run (σ, seeds) and lack of fit per cell (τ), nats: {noise}.", ""]


def cell_label(cell: dict) -> str:
    r, t = cell["row"], cell["teacher"]
    return f"{r['model']} @ {r['tokens']:,} ← {t['model']} @ {t['tokens']:,}, α {r['alpha']:g}"


def cells_lines(cells: list[dict]) -> list[str]:
    lines = ["## Every planned student cell", "",
             "Gains in nats (positive: distillation helped), expected value [95 % interval]; the student's loss with "
             "a prediction interval for the mean of the cell's seeds. Teacher loss: measured (m) or from the "
             "supervised law (law). Per PFLOP: overall gain / (student training + teacher inference FLOPs).", "",
             "| student | tokens | teacher | teacher tokens | teacher loss | α | seeds | loss [PI] | in-domain gain "
             "| OOD gain | overall gain | vs compute-matched | nats / PFLOP |",
             "|---|---:|---|---:|---:|---:|---:|---|---|---|---|---|---:|"]
    for c in cells:
        r, t = c["row"], c["teacher"]
        head = f"| {r['model']} | {r['tokens']:,} | {t['model']} | {t['tokens']:,} | "
        if "predicted" not in c:
            lines.append(head + f"— | {r['alpha']:g} | {c['seeds']} | not predicted: {c.get('outside', '')} "
                                "| | | | | |")
            continue
        p = c["predicted"]
        source = "m" if c["teacher_measured"] else "law"
        gains = " | ".join(fmt_interval(p[k]) if k in p else "—" for k in ("in_domain", "ood", "overall"))
        lines.append(head + f"{p['teacher_loss']:.4f} ({source}) | {r['alpha']:g} | {c['seeds']} | "
                     f"{fmt_interval(p['loss'], 'pi', 3)} | {gains} | {fmt_interval(p['matched'])} | "
                     f"{c['gain_per_pflop']:.3g} |")
    return lines + [""]


def findings_lines(result: dict) -> list[str]:
    lines = ["## The findings on this grid, predicted", "",
             "Each finding's quantity (the verdicts' rule, `distillab.study.verdicts`) computed from the law at each "
             f"teacher's best predicted α; open = the rule (margin {result['margin']:g} nats) does not decide it "
             "from the predicted interval.", "",
             "| student | tokens | finding | quantity | predicted [95 % interval] | stage |", "|---|---:|---|---|---|---|"]
    for f in result["findings"]:
        if not f["askable"]:
            lines.append(f"| {f['student']} | {f['tokens']:,} | {f['finding']} | {f['what']} | — | cannot be asked |")
            continue
        ci = f["ci"]
        stage = f"predicted {f['decision']}" if f["decision"] else "open"
        lines.append(f"| {f['student']} | {f['tokens']:,} | {f['finding']} | {f['what']} | {fmt(ci['mean'])} "
                     f"[{fmt(ci['lo'])}, {fmt(ci['hi'])}] | {stage} |")
    if result["summary_verdicts"]:
        lines += ["", "The sources' own verdicts (measured): " + "; ".join(
            f"{v['finding']} ({v['student']}) {v['verdict']}" for v in result["summary_verdicts"]) + "."]
    return lines + [""]


def runs_lines(result: dict) -> list[str]:
    lines = ["## The runs that would most narrow the open findings", ""]
    if not result["narrowing"]:
        lines += ["No finding is open on this grid by the law's prediction (or none can be asked).", ""]
    else:
        lines += ["One more seed of the cell; the sd of each open finding's quantity before → after (linear-Gaussian "
                  "update of the gain law's coefficients; its noise: σ² + τ² of one run).", "",
                  "| rank | cell | score | open findings: sd before → after | FLOPs |", "|---:|---|---:|---|---:|"]
        for i, s in enumerate(result["narrowing"], 1):
            effects = "; ".join(f"{name} {b:.4f} → {a:.4f}" for name, (b, a) in s["effects"].items())
            lines.append(f"| {i} | {cell_label(s['cell'])} | {s['score']:.3f} | {effects} | {s['cell']['flops']:.3g} |")
        lines.append("")
    lines += ["## The runs the fit already predicts within the margin", "",
              f"One-seed prediction interval of the overall gain within ±{result['margin']:g} nats of the prediction: "
              "their outcome is known well enough that running them adds little to a verdict.", ""]
    predictable = result["predictable"]
    lines += [f"- {cell_label(c)}: {fmt_interval(c['one_seed'].get('overall') or c['one_seed']['in_domain'], 'pi')}"
              for c in predictable] or ["None."]
    return lines + [""]


def plan_markdown(result: dict) -> str:
    lines = [f"# distillab plan: {result['name']} (grid {result['grid']})", "",
             f"Law fitted on: {', '.join(result['sources'])}.", ""]
    if result["warnings"]:
        lines += ["> **WARNING — EXTRAPOLATION.** These predictions leave what the law was fitted on:", ">"]
        lines += [f"> - {note}" for note in result["warnings"]]
        lines += [">", "> Read them as a guess about the direction of effects, not as numbers to budget on.", ""]
    lines += law_lines(result["law"])
    if result.get("validation"):
        from distillab.study.validation import validation_lines

        lines += validation_lines(*result["validation"])
    lines += findings_lines(result) + runs_lines(result) + cells_lines(result["cells"])
    if result["skipped"]:
        lines += ["Runs not predicted:", ""] + [f"- {note}" for note in result["skipped"]] + [""]
    return "\n".join(lines) + "\n"
