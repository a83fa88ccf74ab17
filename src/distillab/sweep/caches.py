"""Teacher caches a sweep plans by itself (`kd.cache: auto`, the default).

A teacher that serves two or more students whose objective a top-K cache serves exactly (a
top-k truncation, with or without the tail bucket, or hard labels; not top-p, not the full
vocabulary) gets one cache: K = the largest k among them (1 for hard labels only), over the
windows those students read (the union over their data seeds and lengths), in
`SWEEP/caches/<hash>/`. Two limits keep a plan storable: K at most `MAX_CACHED_FRACTION` of the
student's output rows (a cache of a large share of the vocabulary is the dense teacher again),
and all of a sweep's caches together within a disk budget (`cache_disk_budget` in the grid or
`--cache-budget`; default: the free space where the sweep writes). Where the largest k does not
fit, K is the largest k that still serves two students and fits; students with a larger k run
their teacher online. Each such student's `kd.cache` names that directory and its plan entry
carries the capture settings (`info["teacher_cache"]`); whichever of them starts first captures the cache
(`distillab.capture.capture_for_run`), the others wait on its lock and read it. A
student's run id does not change: `kd.cache: auto` is what it asked for.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from pathlib import Path

from distillab.cache.coding import byte_width
from distillab.config import ModelConfig, RunConfig, results_view
from distillab.errors import ConfigError
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
    if cfg.kd.teachers or cfg.kd.samples is not None or objective.entry.aligned is not None:
        return None  # several teachers, draws and other tokenizers are served online (or by kd.cache: DIR)
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


# A cache holds at most this share of the student's output rows per position; beyond it the
# students run their teacher online (the cache would be about the dense teacher's size).
MAX_CACHED_FRACTION = 0.05
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15}


def parse_bytes(value, key: str = "cache_disk_budget") -> int:
    """1000000, "500GB", "2.5 TB" -> bytes (decimal units), or a ConfigError naming `key`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTP]?B?)\s*", str(value).upper())
    if not match or match.group(2) not in UNITS:
        raise ConfigError(key, f"must be a size such as 500GB or 2TB (decimal units) or a number of bytes, "
                               f"got {value!r}")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def free_space(sweep_dir: Path) -> int:
    """Free bytes on the file system that will hold `sweep_dir` (its nearest existing parent)."""
    path = Path(sweep_dir).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def cache_bytes(tokens: int, top_k: int, rows: int) -> int:
    """An upper bound on a compact-coded cache: per token K ids (byte planes of the id width) and
    K 2-byte log-prob codes before compression, plus the tail and rank."""
    return tokens * (top_k * (byte_width(rows - 1) + 2) + 4)


def student_rows(cfg: RunConfig) -> int:
    return resolve_spec(cfg.model).rows(cfg.data.tokenizer.vocab_size)


def planned_k(members: list[tuple], rows: int, budget: int) -> tuple[int | None, int, dict[int, str]]:
    """(K, bytes, why) of a group's cache: the largest k among `members` ((run, k) pairs) that is at
    most MAX_CACHED_FRACTION of `rows`, serves two of them and fits `budget` (K None when none does);
    `why`: for each larger k, why it is not cached."""
    why = {}
    for k in sorted({k for _, k in members}, reverse=True):
        served = [run for run, kk in members if kk <= k]
        if len(served) < 2:
            break
        if k > MAX_CACHED_FRACTION * rows:
            why[k] = f"top-{k} is over {MAX_CACHED_FRACTION:.0%} of the {rows:,} output rows"
            continue
        size = cache_bytes(capture_tokens(served), k, rows)
        if size > budget:
            why[k] = f"top-{k} would need {human_bytes(size)} over a disk budget of {human_bytes(budget)}"
            continue
        return k, size, why
    return None, 0, why


def capture_tokens(runs: list) -> int:
    """At most the tokens a cache for these students captures (see `distillab.flops.captured_tokens`)."""
    readers = sorted({reader(run.settings) for run in runs})
    seq_len = runs[0].settings.train.seq_len
    return captured_tokens({"readers": readers}, seq_len)


def human_bytes(n: float) -> str:
    for unit in ("PB", "TB", "GB", "MB", "KB"):
        if n >= UNITS[unit]:
            return f"{n / UNITS[unit]:,.1f} {unit}"
    return f"{n:,.0f} B"


def assign_caches(runs: list, sweep_dir: Path, budget: int | None = None,
                  decisions: list[int | None] | None = None) -> list[dict]:
    """Give students a cache serves, of a teacher serving >= 2 of them, its cache (in place:
    `kd.cache` and `info["teacher_cache"]`) within MAX_CACHED_FRACTION and the disk `budget` (default:
    free space where the sweep writes); students left out get `info["online_because"]`.
    `decisions` (K or None per student, in order): take those instead of deciding (a rehearsal
    repeats the full-size plan's decisions). Returns the caches: dir, top_k, readers, students, teacher."""
    budget = free_space(sweep_dir) if budget is None else budget
    students = [run for run in runs if run.role == "student"]
    forced = dict(zip((run.id for run in students), decisions)) if decisions is not None else None
    groups = defaultdict(list)
    for run in students:
        k = cache_k(run.settings)
        if k is not None:
            groups[capture_group(run.settings)].append((run, k))
    caches = []
    for members in groups.values():
        if forced is not None:
            chosen = [forced[run.id] for run, _ in members if forced[run.id] is not None]
            top_k, why = (max(chosen) if chosen else None), {k: "the full-size plan runs it online" for _, k in members}
        else:
            top_k, size, why = planned_k(members, student_rows(members[0][0].settings), budget)
            budget -= size
        served = [run for run, k in members if top_k is not None and k <= top_k and
                  (forced is None or forced[run.id] is not None)]
        for run, k in members:
            if run not in served:
                run.info["online_because"] = why.get(k, "no other student shares its cache")
        if len(served) >= 2 or (forced is not None and served):
            caches.append(make_cache(served, top_k, sweep_dir))
    return caches


def make_cache(served: list, top_k: int, sweep_dir: Path) -> dict:
    """One planned cache serving `served`; their configs and infos name it."""
    readers = sorted({reader(run.settings) for run in served})
    first = served[0]
    directory = Path(sweep_dir) / "caches" / stable_hash([capture_group(first.settings), top_k, readers])[:16]
    cache = {"dir": str(directory), "top_k": top_k, "readers": [list(r) for r in readers],
             "students": [run.id for run in served], "teacher": first.settings.kd.teacher,
             "teacher_run": first.depends_on[0] if first.depends_on else None}
    for run in served:
        run.use_cache(str(directory), {"dir": cache["dir"], "top_k": top_k, "readers": cache["readers"],
                                       "students": len(served)})
    return cache


def format_caches(runs: list) -> list[str]:
    """The dry run's lines on planned caches (teacher, K, students, storage and FLOPs saved) and on
    students a cache could serve that run their teacher online, and why."""
    by_dir: dict[str, list] = defaultdict(list)
    for run in runs:
        if run.info.get("teacher_cache"):
            by_dir[run.info["teacher_cache"]["dir"]].append(run)
    online = defaultdict(int)
    for run in runs:
        if run.info.get("online_because"):
            online[run.info["online_because"]] += 1
    lines = []
    if by_dir:
        lines += ["", "teacher caches (kd.cache: auto; each captured once, by the first of its students to start):"]
    by_id = {r.id: r for r in runs}
    for directory, students in by_dir.items():
        cache, cfg = students[0].info["teacher_cache"], students[0].settings
        teacher = teacher_spec(students[0], by_id)
        vocab, tokens = cfg.data.tokenizer.vocab_size, captured_tokens(cache, cfg.train.seq_len)
        online_flops = sum(teacher_inference_flops(teacher, vocab, s.settings) for s in students)
        capture = teacher_inference_flops(teacher, vocab, cfg, cache) * len(students)
        size = cache_bytes(tokens, cache["top_k"], student_rows(students[0].settings))
        lines.append(f"  {Path(directory).name}  teacher {students[0].info.get('teacher', '-')[:12]}  top-{cache['top_k']}"
                     f"  {len(students)} students  <= {tokens:,} tokens: <= {human_bytes(size)} (compact, before "
                     f"compression)  teacher inference {capture / 1e15:.4f} PFLOP instead of {online_flops / 1e15:.4f} "
                     f"(saves {(online_flops - capture) / 1e15:.4f})")
    if online:
        lines += ["", "students a teacher cache could serve that run their teacher online (kd.cache: auto):"]
        lines += [f"  {count} students: {why}" for why, count in online.items()]
    return lines


def teacher_spec(student, by_id: dict) -> ModelSpec | None:
    """The shape of a student's teacher: its run's model, or an external teacher's rung (None for
    other roles)."""
    if student.role != "student":
        return None
    if student.depends_on:
        return resolve_spec(by_id[student.depends_on[0]].settings.model)
    return resolve_spec(ModelConfig(name=student.info["teacher_model"]))
