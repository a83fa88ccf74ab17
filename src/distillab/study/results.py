"""A sweep's results as rows: one per run, with settings, evaluations, compute, gains and labels.

Gains are paired: each student is compared with the baseline that has its model, token
budget and seeds (same initial weights, same batches). For a loss, gain = baseline - student
(positive: distillation helped); for an accuracy, gain = student - baseline. Aggregates:
in-domain and OOD gain = mean loss gain over the sets of that domain; downstream gain = mean
accuracy gain over tasks. With an SFT stage, the fine-tuned models' evaluations are columns
`sft_loss/<set>`, `sft_acc/<task>` and the student's gains over its fine-tuned baseline
`gain_sft/...`, beside the gains before fine-tuning.

Relationship labels of a (teacher, student) pair:
    by_loss    strong-to-weak if the teacher's held-out loss is below the student baseline's by
               more than the tolerance, weak-to-strong if above by more, else same-level (the
               per-row column of the results table; the verdicts use the noise-aware band of
               `label_by_prediction_interval`)
    by_params  by non-embedding parameters (teacher more / equal / fewer)
    by_tokens  by training tokens
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from distillab.config import ModelConfig, config_from_dict
from distillab.files import write_text_atomic
from distillab.flops import teacher_inference_flops, trained_tokens, training_flops
from distillab.models import resolve_spec
from distillab.layout import RunLayout, SweepLayout
from distillab.signals.describe import describe_signal
from distillab.study.stats import mean_ci, prediction_interval
from distillab.sweep.execute import read_plan, read_status

HELD_OUT = "validation"


def label_by_loss(teacher_loss: float, baseline_loss: float, tolerance: float) -> str:
    if teacher_loss < baseline_loss - tolerance:
        return "strong-to-weak"
    if teacher_loss > baseline_loss + tolerance:
        return "weak-to-strong"
    return "same-level"


def label_by_prediction_interval(teacher_loss: float, baseline_losses: list[float], tolerance: float) -> str:
    """Teacher vs student by held-out loss with a noise-aware band: weak-to-strong (the teacher is weaker)
    if its loss is above the 95 % Student-t prediction interval of one new baseline seed's loss,
    strong-to-weak if below it, same-level inside. With fewer than 2 baselines the band falls back to
    +-tolerance around the baseline mean (`label_by_loss`); with none the label is "unknown"."""
    band = prediction_interval(baseline_losses)
    if band["mean"] is None:
        return "unknown"
    if band["lo"] is None:
        return label_by_loss(teacher_loss, band["mean"], tolerance)
    if teacher_loss > band["hi"]:
        return "weak-to-strong"
    if teacher_loss < band["lo"]:
        return "strong-to-weak"
    return "same-level"


def label_by_size(teacher: float, student: float) -> str:
    if teacher > student:
        return "strong-to-weak"
    if teacher < student:
        return "weak-to-strong"
    return "same-level"


def run_row(run: dict, sweep_dir: Path) -> dict:
    """One planned run's settings, status and compute (without evaluations)."""
    cfg = config_from_dict(run["config"])
    spec = resolve_spec(cfg.model)
    status = read_status(sweep_dir, run["id"])
    info, objective = run["info"], cfg.kd.objective()
    vocab = cfg.data.tokenizer.vocab_size
    teacher = resolve_spec(ModelConfig(name=info["teacher_model"])) if info.get("teacher_model") else None
    return {
        "run_id": run["id"], "role": run["role"], "status": status.get("status", "pending"),
        "error": status.get("error"), "model": info["model"],
        "non_embedding_parameters": spec.non_embedding_parameters(), "tokens": info["tokens"],
        "init_seed": cfg.train.init_seed, "data_seed": cfg.train.data_seed,
        "teacher_id": info.get("teacher"), "teacher_model": info.get("teacher_model"),
        "teacher_tokens": info.get("teacher_tokens"),
        "teacher_kind": info.get("teacher_kind") if run["role"] != "teacher" else None,
        "kind": info.get("teacher_kind") if run["role"] == "teacher" else info.get("baseline_kind"),
        "alpha": cfg.kd.alpha, "temperature": cfg.kd.temperature, "divergence": cfg.kd.divergence,
        "top_k": cfg.kd.top_k, "objective": objective.setting().label(with_alpha=False),
        "objective_key": objective.setting().key(), "cached_teacher": bool(info.get("cached")),
        "teacher_signal": describe_signal(cfg.kd, bool(info.get("teacher_cache"))),
        "teachers": "+".join(info["teachers"]) if info.get("teachers") else info.get("teacher_model"),
        "matched_tokens": info.get("matched_tokens"), "matched_teacher": info.get("matched_teacher"),
        "trained_tokens": trained_tokens(cfg), "train_flops": training_flops(cfg, vocab),
        "teacher_inference_flops": teacher_inference_flops(teacher, vocab, cfg, info.get("teacher_cache")),
    }


def collect_rows(sweep_dir: Path) -> list[dict]:
    """One row per run with its settings, eval results and compute (and its SFT model's, `sft_` columns)."""
    rows, planned = [], read_plan(sweep_dir)
    for run in planned["runs"]:
        row = run_row(run, sweep_dir)
        files = RunLayout(run["config"]["run_dir"])
        row.update(eval_columns(files.evaluation))
        if planned.get("sft"):
            row.update(eval_columns(files.sft(planned["sft"]).evaluation, "sft_"))
        rows.append(row)
    return rows


def eval_columns(eval_path: Path, prefix: str = "") -> dict:
    """loss / ppl / domain per set and acc / acc_stderr per task of one eval.json, names prefixed."""
    report = json.loads(eval_path.read_text()) if eval_path.exists() else {}
    columns = {}
    for name, result in report.get("sets", {}).items():
        columns.update({f"{prefix}loss/{name}": result["loss"], f"{prefix}ppl/{name}": result["ppl"],
                        f"{prefix}domain/{name}": result.get("domain")})
    for name, result in report.get("tasks", {}).items():
        columns.update({f"{prefix}acc/{name}": result["value"], f"{prefix}acc_stderr/{name}": result["stderr"]})
    return columns


def sft_view(row: dict) -> dict:
    """A row's SFT-model columns under their plain names (`sft_loss/x` -> `loss/x`)."""
    return {key[4:]: value for key, value in row.items() if key.startswith("sft_")}


def paired_gains(row: dict, baseline: dict, prefix: str) -> dict:
    """A student's gains over one baseline: per set (loss: baseline - student), per task (accuracy:
    student - baseline), and the means by domain ({prefix}/in_domain, /ood, /downstream)."""
    gains: dict = {}
    domains: dict[str, list[float]] = {"in-domain": [], "ood": []}
    tasks = []
    for key, value in row.items():
        if value is None or baseline.get(key) is None:
            continue
        if key.startswith("loss/"):
            gains[f"{prefix}/{key[5:]}"] = gain = baseline[key] - value
            if row.get(f"domain/{key[5:]}") in domains:
                domains[row[f"domain/{key[5:]}"]].append(gain)
        elif key.startswith("acc/"):
            gains[f"{prefix}_acc/{key[4:]}"] = gain = value - baseline[key]
            tasks.append(gain)
    gains[f"{prefix}/in_domain"] = statistics.fmean(domains["in-domain"]) if domains["in-domain"] else None
    gains[f"{prefix}/ood"] = statistics.fmean(domains["ood"]) if domains["ood"] else None
    gains[f"{prefix}/downstream"] = statistics.fmean(tasks) if tasks else None
    return gains


def add_gains_and_labels(rows: list[dict], tolerance: float) -> list[dict]:
    """Each student's gains over its plain baseline (same model, budget and seeds) and, where the grid
    has one, over its compute-matched baseline (gain_matched/...); the size and token labels. (The
    label by measured loss, `label_by_loss`, is the verdicts' noise-aware one: `verdicts.label_teachers`.)
    `tolerance` is kept for callers; the labels here do not use it."""
    by_id = {r["run_id"]: r for r in rows}
    # a student's matched baselines; hand-picked baseline members (controls, other seeds) are never matched
    baselines = {(r["model"], r["tokens"], r["init_seed"], r["data_seed"]): r for r in rows
                 if r["role"] == "baseline" and r.get("kind") != "member"}
    for row in (r for r in rows if r["role"] == "student"):
        seeds = (row["init_seed"], row["data_seed"])
        baseline = baselines.get((row["model"], row["tokens"], *seeds))
        matched = baselines.get((row["model"], row.get("matched_tokens"), *seeds))
        teacher = by_id.get(row["teacher_id"])
        row["baseline_id"] = baseline["run_id"] if baseline else None
        row["matched_baseline_id"] = matched["run_id"] if matched else None
        if teacher:
            row["label_by_params"] = label_by_size(teacher["non_embedding_parameters"], row["non_embedding_parameters"])
            row["label_by_tokens"] = label_by_size(teacher["tokens"], row["tokens"])
            row["teacher_loss/validation"] = teacher.get(f"loss/{HELD_OUT}")
        if baseline:
            row.update(paired_gains(row, baseline, "gain"))
        if baseline and sft_view(row):  # the same pair after both were fine-tuned
            row.update(paired_gains(sft_view(row), sft_view(baseline), "gain_sft"))
        if matched:
            row.update(paired_gains(row, matched, "gain_matched"))
    return rows


def write_table(rows: list[dict], sweep_dir: Path) -> tuple[Path, Path | None]:
    """results.csv (and results.parquet where pyarrow is installed), one row per run."""
    import io

    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in columns})
    csv_path = SweepLayout(sweep_dir).results_csv
    write_text_atomic(csv_path, text.getvalue())
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return csv_path, None
    parquet_path = SweepLayout(sweep_dir).results_parquet
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), parquet_path)
    return csv_path, parquet_path


INTEGER_COLUMNS = ("non_embedding_parameters", "tokens", "init_seed", "data_seed", "teacher_tokens", "top_k",
                   "matched_tokens", "trained_tokens")
TEXT_COLUMNS = ("run_id", "teacher_id", "baseline_id", "matched_baseline_id", "matched_teacher", "error")


def read_table(path: str | Path) -> list[dict]:
    """The rows of a results.csv as `write_table` got them: empty cells None, counts int, other numbers
    float, True / False bool, ids and text as text."""
    def typed(column: str, text: str):
        if text == "":
            return None
        if column in TEXT_COLUMNS:
            return text
        if column in INTEGER_COLUMNS:
            return int(float(text))
        if text in ("True", "False"):
            return text == "True"
        try:
            return float(text)
        except ValueError:
            return text

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found; it is written by `distillab sweep` or `distillab report`")
    with open(path, newline="") as handle:
        return [{column: typed(column, text) for column, text in row.items()} for row in csv.DictReader(handle)]


GROUP_KEYS = ("model", "tokens", "teacher_model", "teacher_tokens", "teacher_kind", "alpha", "objective_key")


def summarize(rows: list[dict]) -> list[dict]:
    """Seed-aggregated gains per (student model, tokens, teacher, alpha, objective)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["role"] == "student" and row.get("baseline_id"):
            groups.setdefault(tuple(row[k] for k in GROUP_KEYS), []).append(row)
    out = []
    for key, members in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        entry = dict(zip(GROUP_KEYS, key))
        entry["objective"] = members[0]["objective"]
        entry["label_by_loss"] = members[0].get("label_by_loss")
        for metric in ("in_domain", "ood", "downstream"):
            entry[metric] = mean_ci([m.get(f"gain/{metric}") for m in members])
            entry[f"matched_{metric}"] = mean_ci([m.get(f"gain_matched/{metric}") for m in members])
            entry[f"sft_{metric}"] = mean_ci([m.get(f"gain_sft/{metric}") for m in members])
        out.append(entry)
    return out
