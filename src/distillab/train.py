"""The one training loop, for teachers (alpha = 0, no teacher signal) and students alike.

    step:  for each micro-batch: student forward -> teacher signal -> distillation_loss
           -> backward (weighted by the micro-batch's share of target tokens)
           clip -> AdamW -> next learning rate
    every log_every steps: one line in metrics.jsonl
    every eval_every steps and at the end: perplexity on the configured sets
    every checkpoint_every steps: an atomic, resumable checkpoint

Running `train` on a run directory that has checkpoints resumes from the newest complete one.
Batches depend only on (data seed, position) and weights only on (init seed, updates), so an
interrupted and resumed run ends bit-identical to an uninterrupted one on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from distillab import __version__
from distillab.checkpoint import (
    list_checkpoints,
    load_trainer_state,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
)
from distillab.config import RunConfig, TrainConfig, dump_yaml, stable_hash, to_dict
from distillab.data.loader import WindowStream
from distillab.data.shards import PreparedData, prepare_data, write_json_atomic
from distillab.errors import ConfigError
from distillab.evaluate.perplexity import perplexity
from distillab.losses import distillation_loss
from distillab.models import ModelSpec, build_model, resolve_spec
from distillab.progress import progress_bar
from distillab.runtime import all_reduce_sum, autocast, barrier, init_distributed, resolve_device, setup_runtime
from distillab.teacher import OnlineTeacher, TeacherSignal

# Keys that change how a run is operated or logged but not what it computes: a resumed run may
# change these; any other difference from the run directory's config.yaml is an error.
OPERATIONAL_KEYS = {
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.threads",
    "train.device",
    "train.keep_steps",
    "eval.max_windows",
    "eval.batch_size",
    "eval.sets",
    "eval.seq_len",
    "data.cache_dir",
    "run_dir",
}


# ----------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Plan:
    steps: int
    tokens_per_step: int
    warmup_steps: int
    decay_start: int  # first step of the final decay (wsd); == warmup_steps for cosine


def make_plan(train: TrainConfig) -> Plan:
    tokens_per_step = train.batch_size * train.seq_len * train.grad_accum * train.processes
    steps = max(1, train.token_budget // tokens_per_step)
    warmup = train.warmup_steps if train.warmup_steps is not None else int(round(train.warmup_fraction * steps))
    warmup = min(warmup, steps - 1)
    if train.schedule == "wsd":
        decay_start = steps - max(1, int(round(train.decay_fraction * steps)))
        decay_start = max(decay_start, warmup)
    else:
        decay_start = warmup
    return Plan(steps, tokens_per_step, warmup, decay_start)


def learning_rate(step: int, plan: Plan, train: TrainConfig) -> float:
    """Learning rate for 0-based `step`: linear warmup, then cosine (or stable + linear decay) to min."""
    peak = train.lr
    low = train.min_lr_ratio * peak
    if step < plan.warmup_steps:
        return peak * (step + 1) / plan.warmup_steps
    if train.schedule == "wsd" and step < plan.decay_start:
        return peak
    span = max(1, plan.steps - 1 - plan.decay_start)
    progress = min(1.0, (step - plan.decay_start) / span)
    if train.schedule == "wsd":
        return peak + (low - peak) * progress
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms and biases do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps, foreach=True)


# ----------------------------------------------------------------------------- run directory


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def results_config(config: RunConfig) -> dict:
    """The part of the config that decides the results (for hashes and resume checks)."""
    return {k: v for k, v in _flatten(to_dict(config)).items() if k not in OPERATIONAL_KEYS}


def config_hash(config: RunConfig) -> str:
    return stable_hash(results_config(config))


def check_run_dir(run_dir: Path, config: RunConfig) -> None:
    """Refuse to resume a run directory that was started with a config that computes something else."""
    existing_path = run_dir / "config.yaml"
    if existing_path.exists():
        existing = _flatten(yaml.safe_load(existing_path.read_text()) or {})
        current = results_config(config)
        for key, value in current.items():
            if key in existing and existing[key] != value:
                raise ConfigError(
                    key,
                    f"is {value!r} but the run in {run_dir} was started with {existing[key]!r}; "
                    "use a new run_dir or delete the old one",
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = existing_path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_yaml(config))
    os.replace(tmp, existing_path)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past the resumed step, so the log reads as one uninterrupted run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a line cut short by a crash, and everything after it
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


# Keys in which a WSD branch may differ from the trunk it starts from.
BRANCH_KEYS = {"train.token_budget", "train.branch_from", "name"}


def _check_branch_point(source: Path, config: RunConfig, plan: Plan) -> Path:
    """The checkpoint to branch from, after checking it is this run's own trajectory so far."""
    from distillab.checkpoint import read_meta, verify_checkpoint

    try:
        verify_checkpoint(source)
    except Exception as exc:
        raise ConfigError("train.branch_from", str(exc)) from None
    meta = read_meta(source)
    trunk = meta.get("results_config") or {}
    mine = results_config(config)
    for key in sorted(set(trunk) | set(mine)):
        if key not in BRANCH_KEYS and trunk.get(key) != mine.get(key):
            raise ConfigError(
                "train.branch_from",
                f"{source} comes from a run with {key}={trunk.get(key)!r}, this run has {mine.get(key)!r}; "
                "a branch may differ from its trunk only in train.token_budget",
            )
    if meta.get("step") != plan.decay_start:
        raise ConfigError(
            "train.branch_from",
            f"{source} is at step {meta.get('step')} but this run's decay starts at step {plan.decay_start}; "
            "keep the trunk's checkpoint at that step (train.keep_steps)",
        )
    return source


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    tokens: int
    eval: dict
    completed: bool


class _StopRequest:
    """SIGTERM (e.g. a cluster preempting the job) asks for a checkpoint at the end of the step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def evaluate_sets(model, data: PreparedData, config: RunConfig, device, sets=None) -> dict:
    seq_len = config.eval.seq_len or config.train.seq_len
    results = {}
    for name in sets or config.eval.sets:
        split = "validation" if name == "validation" else "train"
        results[name] = perplexity(
            model,
            data.tokens(split),
            seq_len,
            config.eval.max_windows,
            config.eval.batch_size,
            device,
            data.vocab_size,
            desc=f"eval {name}",
        )
    return results


def _run_meta(config: RunConfig, spec: ModelSpec, data: PreparedData, step: int, tokens: int) -> dict:
    return {
        "distillab_version": __version__,
        "run_name": config.name,
        "role": "student" if config.kd.alpha > 0 else "lm",
        "config_hash": config_hash(config),
        "results_config": results_config(config),
        "model": dataclasses.asdict(spec),
        "step": step,
        "tokens": tokens,
        "tokenizer_fingerprint": data.fingerprint,
        "data_dir": str(data.path.resolve()),
        "data_content_sha256": data.manifest["content_sha256"],
        "teacher": config.kd.teacher,
        "alpha": config.kd.alpha,
        "temperature": config.kd.temperature,
        "top_k": config.kd.top_k,
        "hard_labels": config.kd.hard_labels,
    }


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    teacher: TeacherSignal | None,
    alpha: float,
    temperature: float,
    grad_clip: float,
    device: torch.device,
    precision: str = "float32",
    top_k: int | None = None,
    hard_labels: bool = False,
    world: int = 1,
) -> dict:
    """One optimizer step over micro-batches; each is weighted by its share of the target tokens.

    With `world` > 1 processes (model wrapped in DistributedDataParallel), the share is of the
    target tokens of all processes, and gradients are synchronised on the last micro-batch only.
    """
    import contextlib

    from distillab.runtime import all_reduce_sum

    local_targets = sum(int((labels >= 0).sum()) for _, labels in batches)
    step_targets = int(all_reduce_sum([float(local_targets)], world, device)[0])
    sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    for index, (inputs, labels) in enumerate(batches):
        last = index == len(batches) - 1
        sync = contextlib.nullcontext() if world == 1 or last else model.no_sync()
        inputs, labels = inputs.to(device), labels.to(device)
        # the teacher runs first: its transient activations are freed before the student's
        # forward allocates the ones it keeps for backward (measured faster on the CPU)
        teacher_logits = teacher.logits(inputs) if teacher is not None else None
        with sync:
            with autocast(device, precision):
                student_logits = model(input_ids=inputs, use_cache=False).logits
            out = distillation_loss(
                student_logits, teacher_logits, labels, alpha=alpha, temperature=temperature, overwrite_logits=True,
                top_k=top_k, hard_labels=hard_labels,
            )
            share = out.n_tokens / step_targets
            # DistributedDataParallel averages gradients over processes; the sum is wanted
            (out.total * (share * world)).backward()
        sums["loss"] += float(out.total.detach()) * share
        sums["ce"] += float(out.ce) * share
        sums["kd"] += float(out.kd) * share
        del student_logits, teacher_logits, out
    totals = all_reduce_sum([sums["loss"], sums["ce"], sums["kd"]], world, device)
    sums.update(loss=totals[0], ce=totals[1], kd=totals[2])
    parameters = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sums["grad_norm"] = float(grad_norm)
    sums["targets"] = step_targets
    return sums


def train(config: RunConfig, *, stop_after_steps: int | None = None, log=print) -> TrainResult:
    """Train (or resume) the run described by `config`; return where it ended."""
    t_cfg, kd = config.train, config.kd
    device = resolve_device(t_cfg.device)
    rank, world, local_rank = init_distributed(device.type)
    if world != t_cfg.processes:
        raise ConfigError("train.processes", f"is {t_cfg.processes} but {world} processes were started; "
                          f"launch with torchrun --nproc_per_node {t_cfg.processes} (or set train.processes={world})")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    threads = t_cfg.threads or (max(1, (os.cpu_count() or 1) // world) if world > 1 else None)
    setup_runtime(threads)
    is_main = rank == 0
    if not is_main:
        log = lambda *args, **kwargs: None  # noqa: E731
    run_dir = config.resolved_run_dir
    if kd.alpha > 0 and not Path(kd.teacher or "").exists():
        raise ConfigError("kd.teacher", f"{kd.teacher} does not exist; train the teacher first")
    if is_main:
        check_run_dir(run_dir, config)
    barrier(world)
    final_dir = run_dir / "final"
    summary_path = run_dir / "summary.json"
    if (final_dir / "manifest.json").exists() and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        log(f"train: {run_dir} is already complete ({summary['steps']} steps)")
        return TrainResult(run_dir, final_dir, summary["steps"], summary["tokens"], summary.get("eval", {}), True)

    data = prepare_data(config.data, log)
    tokenizer = data.tokenizer
    spec = resolve_spec(config.model)
    model = build_model(spec, data.vocab_size, t_cfg.seq_len, t_cfg.init_seed, tokenizer.eos_token_id).to(device)
    teacher: TeacherSignal | None = None
    if kd.top_k is not None and kd.top_k > data.vocab_size:
        raise ConfigError("kd.top_k", f"is {kd.top_k} but the vocabulary has {data.vocab_size} tokens")
    if kd.alpha > 0:
        teacher = OnlineTeacher(kd.teacher, tokenizer, device, t_cfg.precision)
    optimizer = make_optimizer(model, t_cfg)
    stream = WindowStream(data.tokens("train"), t_cfg.seq_len, t_cfg.data_seed)
    plan = make_plan(t_cfg)
    epochs = stream.epochs(plan.steps * t_cfg.batch_size * t_cfg.grad_accum * world)
    if epochs > 1:
        log(f"train: the budget covers {epochs:.2f} epochs of the training split (data repeats)")

    checkpoints = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    step = tokens = sequences = 0
    def restore(source: Path) -> dict:
        from safetensors.torch import load_file

        state = load_trainer_state(source)
        weights = load_file(str(source / "model.safetensors"), device=str(device))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if spec.tie_embeddings else set()
        if unexpected or set(missing) - tied:
            raise ConfigError("model", f"checkpoint {source} does not match the configured model")
        if spec.tie_embeddings:
            model.tie_weights()
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        return state

    existing = list_checkpoints(checkpoints)
    restored_window = None
    if existing:
        state = restore(existing[-1][1])
        step, tokens, sequences = state["step"], state["tokens"], state["sequences"]
        restored_window = state.get("log_window")
        if is_main:
            _truncate_metrics(metrics_path, step)
        log(f"train: resuming {run_dir} from step {step} ({tokens:,} tokens)")
    elif t_cfg.branch_from:
        source = _check_branch_point(Path(t_cfg.branch_from), config, plan)
        state = restore(source)
        step, tokens, sequences = state["step"], state["tokens"], state["sequences"]
        if is_main:
            _truncate_metrics(metrics_path, -1)
        log(f"train: branching from {source} at step {step} (this run's decay starts there)")
    elif is_main:
        _truncate_metrics(metrics_path, -1)
    barrier(world)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        stepper = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        stepper = model

    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"train: {config.name}: {spec.name} ({spec.non_embedding_parameters():,} non-embedding / {n_params:,} "
        f"parameters), {plan.steps} steps x {plan.tokens_per_step:,} tokens"
        + (f", alpha={kd.alpha} T={kd.temperature}" + (f" top_k={kd.top_k}" if kd.top_k else "")
           + (" hard labels" if kd.hard_labels else "") + f" teacher={kd.teacher}" if teacher else ", LM only")
    )

    def checkpoint_state() -> dict:
        return {
            "step": step,
            "tokens": tokens,
            "sequences": sequences,
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            # the partial logging window, so a resumed run logs the same averages
            "log_window": dict(window),
        }

    def write_checkpoint() -> None:
        if is_main:
            save_checkpoint(step_dir(checkpoints, step), model, tokenizer, _run_meta(config, spec, data, step, tokens),
                            checkpoint_state())
            prune_checkpoints(checkpoints, t_cfg.keep_checkpoints, protected=t_cfg.keep_steps)
        barrier(world)

    model.train()
    last_eval: dict = {}
    window = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0}
    if restored_window:
        window.update(restored_window)
    bar = progress_bar(total=plan.steps, initial=step, desc=f"train {config.name}", unit="step", disable=not is_main)
    micro_batch = t_cfg.batch_size
    import contextlib

    metrics_file = open(metrics_path, "a") if is_main else contextlib.nullcontext()
    with metrics_file as metrics, _StopRequest() as stop:
        while step < plan.steps:
            started = time.perf_counter()
            lr = learning_rate(step, plan, t_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # micro-batch i of process r holds global micro-batch i * world + r
            batches = [stream.batch(sequences + (i * world + rank) * micro_batch, micro_batch)
                       for i in range(t_cfg.grad_accum)]
            sums = train_step(stepper, optimizer, batches, teacher, kd.alpha, kd.temperature, t_cfg.grad_clip,
                              device, t_cfg.precision, top_k=kd.top_k, hard_labels=kd.hard_labels, world=world)
            grad_norm, step_targets = sums["grad_norm"], sums["targets"]
            step += 1
            tokens += step_targets
            sequences += micro_batch * t_cfg.grad_accum * world
            elapsed = time.perf_counter() - started
            for key in ("loss", "ce", "kd"):
                window[key] += sums[key]
            window["steps"] += 1
            window["tokens"] += step_targets
            window["seconds"] += elapsed
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", tok_s=f"{step_targets / elapsed:,.0f}")

            is_last = step == plan.steps
            do_eval = step % t_cfg.eval_every == 0 or is_last
            if step % t_cfg.log_every == 0 or do_eval or is_last:
                row = {
                    "step": step,
                    "tokens": tokens,
                    "loss": window["loss"] / window["steps"],
                    "ce": window["ce"] / window["steps"],
                    "kd": window["kd"] / window["steps"],
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": window["tokens"] / window["seconds"],
                }
                window = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0}
                if do_eval and is_main:
                    last_eval = evaluate_sets(model, data, config, device)
                    for name, result in last_eval.items():
                        row[f"eval/{name}/loss"] = result["loss"]
                        row[f"eval/{name}/ppl"] = result["ppl"]
                    model.train()
                if is_main:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                if do_eval:
                    barrier(world)
            if is_last:
                break
            requested = all_reduce_sum([1.0 if stop.requested else 0.0], world, device)[0] > 0
            stop_now = requested or (stop_after_steps is not None and step >= stop_after_steps)
            if step % t_cfg.checkpoint_every == 0 or stop_now or step in t_cfg.keep_steps:
                write_checkpoint()
            if stop_now:
                bar.close()
                reason = "SIGTERM" if requested else f"stop_after_steps={stop_after_steps}"
                log(f"train: stopped at step {step} ({reason}); run again to resume")
                return TrainResult(run_dir, None, step, tokens, last_eval, False)
    bar.close()
    if not is_main:
        barrier(world)
        return TrainResult(run_dir, final_dir, step, tokens, last_eval, True)

    save_checkpoint(final_dir, model, tokenizer, _run_meta(config, spec, data, step, tokens))
    summary = {
        "name": config.name,
        "steps": step,
        "tokens": tokens,
        "model": spec.name,
        "non_embedding_parameters": spec.non_embedding_parameters(),
        "parameters": n_params,
        "alpha": kd.alpha,
        "temperature": kd.temperature,
        "teacher": kd.teacher,
        "eval": last_eval,
        "config_hash": config_hash(config),
    }
    write_json_atomic(summary_path, summary)
    prune_checkpoints(checkpoints, t_cfg.keep_checkpoints, protected=t_cfg.keep_steps)
    barrier(world)
    evals = ", ".join(f"{name} loss {r['loss']:.4f} (ppl {r['ppl']:.2f})" for name, r in last_eval.items())
    log(f"train: {config.name} done: {step} steps, {tokens:,} tokens; {evals}; model in {final_dir}")
    return TrainResult(run_dir, final_dir, step, tokens, last_eval, True)
