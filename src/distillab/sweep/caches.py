"""Teacher caches a sweep plans by itself (`kd.cache: auto`, the default).

A teacher that serves two or more students whose objective a top-K cache serves exactly (a
top-k truncation, with or without the tail bucket, or hard labels; not top-p, not the full
vocabulary) gets one cache: K = the largest k among them (1 for hard labels only), over the
windows those students read (the union over their data seeds and lengths), in
`SWEEP/caches/<hash>/`. Each such student's `kd.cache` names that directory and its plan entry
carries the capture settings (`info["teacher_cache"]`); whichever of them starts first captures the cache
(`distillab.capture.capture_for_run`), the others wait on its lock and read it. A
student's run id does not change: `kd.cache: auto` is what it asked for.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from distillab.config import ModelConfig, RunConfig, results_view
from distillab.files import stable_hash
from distillab.flops import captured_tokens, teacher_inference_flops
from distillab.models import ModelSpec, resolve_spec
from distillab.train.schedule import make_plan


def cache_k(cfg: RunConfig) -> int | None:
    """The K a cache needs to serve this run's objective exactly; None if none does (or `kd.cache`
    is not auto, or the run does not distil)."""
    objective = cfg.kd.objective()
    if cfg.kd.cache != "auto" or not objective.distills or cfg.kd.top_p is not None:
        return None
    if objective.entry.argmax_teacher:
        return 1
    return objective.top_k


def reader(cfg: RunConfig) -> tuple[int, int]:
    """(data seed, sequences trained): what decides the windows a run reads."""
    train = cfg.train
    plan = make_plan(train)
    return train.data_seed, plan.steps * train.batch_size * train.grad_accum * train.processes


def capture_group(cfg: RunConfig) -> str:
    """Students whose caches can be one: the same teacher, data, packing and sequence length."""
    view = results_view(cfg)
    return stable_hash({"teacher": cfg.kd.teacher, "seq_len": view["train.seq_len"],
                        **{k: v for k, v in view.items() if k.startswith("data.")}})


def assign_caches(runs: list, sweep_dir: Path) -> list[dict]:
    """Give every student a cache serves, of a teacher serving >= 2 of them, its cache (in place:
    `kd.cache` and `info["teacher_cache"]`). Returns the caches: dir, top_k, readers, students, teacher."""
    groups = defaultdict(list)
    for run in runs:
        k = cache_k(run.settings) if run.role == "student" else None
        if k is not None:
            groups[capture_group(run.settings)].append((run, k))
    caches = []
    for members in groups.values():
        if len(members) < 2:
            continue
        top_k = max(k for _, k in members)
        readers = sorted({reader(run.settings) for run, _ in members})
        first = members[0][0]
        directory = Path(sweep_dir) / "caches" / stable_hash([capture_group(first.settings), top_k, readers])[:16]
        cache = {"dir": str(directory), "top_k": top_k, "readers": [list(r) for r in readers],
                 "students": [run.id for run, _ in members], "teacher": first.settings.kd.teacher,
                 "teacher_run": first.depends_on[0] if first.depends_on else None}
        for run, _ in members:
            run.use_cache(str(directory), {"dir": cache["dir"], "top_k": top_k, "readers": cache["readers"],
                                           "students": len(members)})
        caches.append(cache)
    return caches


def format_caches(runs: list) -> list[str]:
    """The dry run's lines on planned caches: teacher, K, students, storage and FLOPs saved."""
    by_dir: dict[str, list] = defaultdict(list)
    for run in runs:
        if run.info.get("teacher_cache"):
            by_dir[run.info["teacher_cache"]["dir"]].append(run)
    if not by_dir:
        return []
    by_id = {r.id: r for r in runs}
    lines = ["", "teacher caches (kd.cache: auto; each captured once, by the first of its students to start):"]
    for directory, students in by_dir.items():
        cache, cfg = students[0].info["teacher_cache"], students[0].settings
        teacher = teacher_spec(students[0], by_id)
        vocab, tokens = cfg.data.tokenizer.vocab_size, captured_tokens(cache, cfg.train.seq_len)
        online = sum(teacher_inference_flops(teacher, vocab, s.settings) for s in students)
        capture = teacher_inference_flops(teacher, vocab, cfg, cache) * len(students)
        lines.append(f"  {Path(directory).name}  teacher {students[0].info.get('teacher', '-')[:12]}  top-{cache['top_k']}"
                     f"  {len(students)} students  <= {tokens:,} tokens: <= {tokens * (8 * cache['top_k'] + 4) / 1e6:,.1f}"
                     f" MB (float32 bound; compact is smaller)  teacher inference {capture / 1e15:.4f} PFLOP instead "
                     f"of {online / 1e15:.4f} (saves {(online - capture) / 1e15:.4f})")
    return lines


def teacher_spec(student, by_id: dict) -> ModelSpec | None:
    """The shape of a student's teacher: its run's model, or an external teacher's rung (None for
    other roles)."""
    if student.role != "student":
        return None
    if student.depends_on:
        return resolve_spec(by_id[student.depends_on[0]].settings.model)
    return resolve_spec(ModelConfig(name=student.info["teacher_model"]))
