"""A sweep's results as rows: one per run, with settings, evaluations, compute, gains and labels.

Gains are paired: each student is compared with the baseline that has its model, token
budget and seeds (same initial weights, same batches). For a loss, gain = baseline - student
(positive: distillation helped); for an accuracy, gain = student - baseline. Aggregates:
in-domain and OOD gain = mean loss gain over the sets of that domain; downstream gain = mean
accuracy gain over tasks.

Relationship labels of a (teacher, student) pair:
    by_loss    strong-to-weak if the teacher's held-out loss is below the student baseline's by
               more than the tolerance, weak-to-strong if above by more, else same-level
    by_params  by non-embedding parameters (teacher more / equal / fewer)
    by_tokens  by training tokens
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from distillab.config import ModelConfig, config_from_dict
from distillab.errors import DataError
from distillab.files import write_text_atomic
from distillab.flops import teacher_inference_flops, trained_tokens, training_flops
from distillab.models import resolve_spec
from distillab.objective import KDObjective
from distillab.stats import mean_ci

HELD_OUT = "validation"


def label_by_loss(teacher_loss: float, baseline_loss: float, tolerance: float) -> str:
    if teacher_loss < baseline_loss - tolerance:
        return "strong-to-weak"
    if teacher_loss > baseline_loss + tolerance:
        return "weak-to-strong"
    return "same-level"


def label_by_size(teacher: float, student: float) -> str:
    if teacher > student:
        return "strong-to-weak"
    if teacher < student:
        return "weak-to-strong"
    return "same-level"


def read_plan(sweep_dir: Path) -> dict:
    plan_path = Path(sweep_dir) / "plan.json"
    if not plan_path.exists():
        raise DataError(f"{plan_path}: not found; run `distillab sweep GRID --out {sweep_dir}` first")
    return json.loads(plan_path.read_text())


def run_row(run: dict) -> dict:
    """One planned run's settings, status and compute (without evaluations)."""
    cfg = config_from_dict(run["config"])
    spec = resolve_spec(cfg.model)
    run_dir = Path(run["config"]["run_dir"])
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
    info, objective = run["info"], KDObjective.from_config(cfg.kd)
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
        "trained_tokens": trained_tokens(cfg), "train_flops": training_flops(cfg, vocab),
        "teacher_inference_flops": teacher_inference_flops(teacher, vocab, cfg, bool(info.get("cached"))),
    }


def collect_rows(sweep_dir: Path) -> list[dict]:
    """One row per run with its settings, eval results and compute."""
    rows = []
    for run in read_plan(sweep_dir)["runs"]:
        row = run_row(run)
        eval_path = Path(run["config"]["run_dir"]) / "final" / "eval.json"
        report = json.loads(eval_path.read_text()) if eval_path.exists() else {}
        for name, result in report.get("sets", {}).items():
            row[f"loss/{name}"] = result["loss"]
            row[f"ppl/{name}"] = result["ppl"]
            row[f"domain/{name}"] = result.get("domain")
        for name, result in report.get("tasks", {}).items():
            row[f"acc/{name}"] = result["value"]
            row[f"acc_stderr/{name}"] = result["stderr"]
        rows.append(row)
    return rows


def add_gains_and_labels(rows: list[dict], tolerance: float) -> list[dict]:
    by_id = {r["run_id"]: r for r in rows}
    # a student's matched baseline; hand-picked baseline members (controls, other seeds) are never matched
    baselines = {(r["model"], r["tokens"], r["init_seed"], r["data_seed"]): r for r in rows
                 if r["role"] == "baseline" and r.get("kind") != "member"}
    for row in rows:
        if row["role"] != "student":
            continue
        baseline = baselines.get((row["model"], row["tokens"], row["init_seed"], row["data_seed"]))
        teacher = by_id.get(row["teacher_id"])
        row["baseline_id"] = baseline["run_id"] if baseline else None
        if teacher:
            row["label_by_params"] = label_by_size(teacher["non_embedding_parameters"], row["non_embedding_parameters"])
            row["label_by_tokens"] = label_by_size(teacher["tokens"], row["tokens"])
            row["teacher_loss/validation"] = teacher.get(f"loss/{HELD_OUT}")
        if not baseline:
            continue
        if teacher and teacher.get(f"loss/{HELD_OUT}") is not None and baseline.get(f"loss/{HELD_OUT}") is not None:
            row["label_by_loss"] = label_by_loss(teacher[f"loss/{HELD_OUT}"], baseline[f"loss/{HELD_OUT}"], tolerance)
        domains: dict[str, list[float]] = {"in-domain": [], "ood": []}
        for key in list(row):
            if key.startswith("loss/") and baseline.get(key) is not None and row[key] is not None:
                name = key[5:]
                gain = baseline[key] - row[key]
                row[f"gain/{name}"] = gain
                domain = row.get(f"domain/{name}")
                if domain in domains:
                    domains[domain].append(gain)
            if key.startswith("acc/") and baseline.get(key) is not None and row[key] is not None:
                row[f"gain_acc/{key[4:]}"] = row[key] - baseline[key]
        task_gains = [row[k] for k in row if k.startswith("gain_acc/")]
        row["gain/in_domain"] = statistics.fmean(domains["in-domain"]) if domains["in-domain"] else None
        row["gain/ood"] = statistics.fmean(domains["ood"]) if domains["ood"] else None
        row["gain/downstream"] = statistics.fmean(task_gains) if task_gains else None
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
    csv_path = Path(sweep_dir) / "results.csv"
    write_text_atomic(csv_path, text.getvalue())
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return csv_path, None
    parquet_path = Path(sweep_dir) / "results.parquet"
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), parquet_path)
    return csv_path, parquet_path


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
        out.append(entry)
    return out
