"""The one training loop, for teachers (no teacher signal) and students alike, in phases.

    train(config)
      setup_parallelism      process group, device, threads
      RunDirectory checks    writable; the recorded config, when there is progress to resume
      Trainer.build          data, model, teacher signal, optimizer, schedule; every check that
                             can fail runs here, before anything is written to the run directory
                             (an SFT run, `sft.init_from` set: the checkpoint to fine-tune and its
                             chat data, `distillab.sft`)
      RunDirectory.claim     one writer per run directory; under it, a finished run is reported
                             "already complete" only when its final model was made from the same
                             config and inputs (else refused), so a run that finished while this
                             process was loading is never trained again
      Trainer.restore        the newest verified checkpoint (or a WSD branch point), bound to
                             the same config, tokenizer, data, teacher, teacher cache and chat
                             template; then config.yaml
      Trainer.fit            train_step, log, evaluate, checkpoint ... until the budget is spent
      Trainer.finish         the final model and summary.json (only when every check passed)
      release_then_close     the model freed, then the process group closed (in this order)

Batches depend only on (data seed, position) and weights only on (init seed, updates), so an
interrupted and resumed run ends bit-identical to an uninterrupted one on the CPU.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from distillab import __version__
from distillab.checkpoint import load_trainer_state, prune_checkpoints, read_meta, step_dir
from distillab.config import RunConfig, first_difference, results_config
from distillab.data.loader import Batch, model_inputs
from distillab.data.packing import training_stream
from distillab.data.shards import PreparedData, prepare_data
from distillab.errors import CheckpointError, ConfigError
from distillab.evaluate.perplexity import evaluate_prepared_sets
from distillab.files import stable_hash
from distillab.models import ModelSpec, query_norm_factors, resolve_spec
from distillab.losses.objective import KDObjective
from distillab.progress import progress_bar
from distillab.sft import start_sft
from distillab.signals.build import build_signal, check_covers, online_teachers
from distillab.teacher import CachedTeacher
from distillab.train.guard import NonFiniteError, NonFiniteGuard
from distillab.train.metrics import LogWindow, MetricsSink, NoMetrics
from distillab.train.checkpointer import Checkpointer
from distillab.train.parallel import SingleProcess
from distillab.train.rundir import RunDirectory, bound_inputs, check_inputs
from distillab.train.schedule import Plan, learning_rate, make_optimizer, make_plan
from distillab.train.step import StepResult, fuse_head, train_step
from distillab.train.world import setup_parallelism

# Keys in which a WSD branch may differ from the trunk it starts from.
BRANCH_KEYS = {"train.token_budget", "train.branch_from", "name"}
# Logits within this of one another at every position of a window: a model collapsed onto
# uniform guessing (random initial weights spread them by far more).
COLLAPSE_LOGITS = 1e-4


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    tokens: int
    eval: dict
    completed: bool


class StopRequest:
    """SIGTERM (e.g. a cluster preempting the job) asks for a checkpoint at the end of the step."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self.handle)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def check_branch(meta: dict, config: RunConfig, source: Path) -> None:
    """A WSD branch continues its trunk's own trajectory: the same config but for the budget."""
    difference = first_difference(meta.get("results_config") or {}, config, BRANCH_KEYS)
    if difference is not None:
        key, was, now = difference
        raise ConfigError("train.branch_from", f"{source} comes from a run with {key}={was!r}, this run has {now!r}; "
                                               "a branch may differ from its trunk only in train.token_budget")


def cached_objective(objective: KDObjective, teacher: CachedTeacher, log) -> KDObjective:
    """From a cache of the top K, an untruncated soft objective is the top-K one (kd.top_k = K)."""
    if objective.truncated or objective.entry.argmax_teacher:
        return objective
    log(f"train: kd.top_k is unset; from the teacher cache it is the cache's K = {teacher.top_k} (renormalised)")
    return dataclasses.replace(objective, top_k=teacher.top_k)


def config_warnings(config: RunConfig, plan: Plan) -> list[str]:
    """Settings that are valid but probably not what was meant: each one line naming the key."""
    t, kd, warnings = config.train, config.kd, []
    if t.warmup_steps is not None and t.warmup_steps >= plan.steps:
        warnings.append(f"train.warmup_steps: {t.warmup_steps} is not shorter than the run's {plan.steps} steps, so "
                        "the learning rate is still warming up at the end and never decays")
    for name in ("alpha_schedule", "temperature_schedule"):
        schedule = getattr(kd, name)
        if schedule.shape == "constant" and (schedule.start is not None or schedule.end is not None):
            warnings.append(f"kd.{name}.start/end: ignored with kd.{name}.shape=constant (the value holds throughout); "
                            "set the shape to linear, cosine or wsd for them to apply")
    return warnings


def config_hash(config: RunConfig) -> str:
    return stable_hash(results_config(config))


class Trainer:
    """A run's state and its phases. `train()` below is the whole lifecycle in order."""

    def __init__(self, config: RunConfig, parallel: SingleProcess, data: PreparedData, spec: ModelSpec, stepper,
                 optimizer, teacher, stream, plan: Plan, log, objective: KDObjective):
        self.config, self.parallel, self.data, self.spec = config, parallel, data, spec
        self.stepper, self.optimizer, self.teacher, self.stream, self.plan = stepper, optimizer, teacher, stream, plan
        self.model = parallel.unwrap(stepper)
        self.checkpointer = Checkpointer(parallel, config.train.async_checkpoint)
        self.objective = objective
        self.guard = NonFiniteGuard(config.train.nonfinite)
        self.log = log
        self.step = self.tokens = self.sequences = 0
        self.window = LogWindow()
        self.last_eval: dict = {}
        self.start_eval: dict = {}  # an SFT run: the held-out losses of the model it starts from
        cache_sha256 = teacher.cache.manifest_sha256 if isinstance(teacher, CachedTeacher) else None
        self.inputs = bound_inputs(config, data, teacher is not None, cache_sha256)

    # ------------------------------------------------------------------------- build

    @classmethod
    def build(cls, config: RunConfig, parallel: SingleProcess, log=print) -> "Trainer":
        """Everything a run needs, checked: data, model, teacher signal, optimizer, schedule."""
        if config.sft.init_from:
            return cls.build_sft(config, parallel, log)
        t = config.train
        data = prepare_data(config.data, log)
        spec = resolve_spec(config.model)
        objective = config.kd.objective()
        if spec.vocab_rows is not None and spec.vocab_rows < data.vocab_size:
            raise ConfigError("model.vocab_size", f"is {spec.vocab_rows} but the tokenizer has {data.vocab_size} "
                                                  "tokens")
        rows = spec.rows(data.vocab_size)  # the loss runs over every output row, as baselines' CE does
        if objective.top_k is not None and objective.top_k > rows:
            raise ConfigError("kd.top_k", f"is {objective.top_k} but the model has {rows} output rows")
        teacher = build_signal(config.kd, data, parallel.device, t.precision, t.seq_len, objective.distills,
                               config.data.packing, rows)
        for online in online_teachers(teacher):
            online.model = parallel.prepare_teacher(online.model)
        stepper = parallel.build_model(spec, data.vocab_size, t.seq_len, t.init_seed, data.tokenizer.eos_token_id,
                                       t.activation_checkpointing, t.compile, config.model.parametrisation)
        stream = training_stream(data, t.seq_len, t.data_seed, config.data.packing, log)
        plan = make_plan(t)
        sequences = plan.steps * t.batch_size * t.grad_accum * parallel.world
        if stream.epochs(sequences) > 1:
            log(f"train: the budget covers {stream.epochs(sequences):.2f} epochs of the training split (data repeats)")
        check_covers(teacher, stream, sequences)
        if isinstance(teacher, CachedTeacher):
            objective = cached_objective(objective, teacher, log)
        for warning in config_warnings(config, plan):
            log(f"warning: {warning}")
        return cls(config, parallel, data, spec, stepper, make_optimizer(stepper, t), teacher, stream, plan, log,
                   objective)

    @classmethod
    def build_sft(cls, config: RunConfig, parallel: SingleProcess, log=print) -> "Trainer":
        """An SFT run: the checkpoint to fine-tune, its packed chat data, `sft.steps` steps, no teacher."""
        t = config.train
        start = start_sft(config, parallel.device, log)
        stepper = parallel.prepare_model(start.model, t.activation_checkpointing, t.compile)
        plan = make_plan(t, steps=config.sft.steps)
        epochs = start.stream.epochs(plan.steps * t.batch_size * t.grad_accum * parallel.world)
        log(f"sft: {config.sft.init_from}, {plan.steps} steps over {start.stream.n_windows:,} windows of packed "
            f"conversations ({epochs:.2f} epochs)")
        for warning in config_warnings(config, plan):
            log(f"warning: {warning}")
        return cls(config, parallel, start.data, start.spec, stepper, make_optimizer(stepper, t), None,
                   start.stream, plan, log, config.kd.objective())

    # ------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """What a resumed run needs besides weights, optimizer state and RNG (the checkpointer's)."""
        return {"step": self.step, "tokens": self.tokens, "sequences": self.sequences,
                "log_window": self.window.state_dict(), "skipped_steps": self.guard.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens, self.sequences = state["step"], state["tokens"], state["sequences"]
        self.window = LogWindow(state.get("log_window"))
        self.guard.skipped = state.get("skipped_steps", 0)

    def export_factors(self) -> dict[str, float]:
        """Weights folded into the HF model written (final/, `distillab export`), so it is a plain HF one
        (`distillab.models.query_norm_factors`); step checkpoints hold the weights as trained."""
        return query_norm_factors(self.model, self.config.model.parametrisation)

    def meta(self) -> dict:
        """What produced a checkpoint: written into its distillab.json."""
        t = self.config.train
        return {"distillab_version": __version__, "run_name": self.config.name,
                "role": self.role(), "config_hash": config_hash(self.config),
                "results_config": results_config(self.config), "model": dataclasses.asdict(self.spec),
                "step": self.step, "tokens": self.tokens, "tokenizer_fingerprint": self.data.fingerprint,
                "data_dir": str(self.data.path.resolve()), "data_content_sha256": self.data.manifest["content_sha256"],
                "train_stream": self.stream_record(), "inputs": self.inputs,
                "teacher": self.config.kd.teacher, "objective": self.objective.as_dict()}

    def role(self) -> str:
        return "sft" if self.config.sft.init_from else "student" if self.objective.distills else "lm"

    def stream_record(self) -> dict:
        """What replays this run's training sequences: window length, data seed, sequences seen (and
        the packing, when documents or conversations are packed)."""
        t = self.config.train
        record = {"seq_len": t.seq_len, "data_seed": t.data_seed, "sequences": self.sequences}
        if self.stream.packing != "concat":
            record["packing"] = self.stream.packing
        return record

    # ------------------------------------------------------------------------- restore

    def already_complete(self, run: RunDirectory) -> TrainResult | None:
        """A finished run's result, when its final model was made from this config and these inputs
        (else a one-line refusal naming what changed); None when the run is not finished.
        Called under the run's lock, so a run that finished while this process was loading counts."""
        summary = run.completed_summary()
        if summary is None:
            return None
        check_inputs(read_meta(run.final), self.config, self.data, run.final, inputs=self.inputs)
        self.log(f"train: {run.path} is already complete ({summary['steps']} steps)")
        return TrainResult(run.path, run.final, summary["steps"], summary["tokens"], summary.get("eval", {}), True)

    def restore(self, run: RunDirectory) -> None:
        """Continue from the newest verified checkpoint, or branch from a trunk, or start fresh (an
        SFT run first scores the model it starts from)."""
        if self.config.sft.init_from and (self.parallel.is_main or self.parallel.collective_forward):
            self.start_eval = self.evaluate()
            self.log("sft: before fine-tuning: " + ", ".join(f"{name} loss {r['loss']:.4f}"
                                                             for name, r in self.start_eval.items()))
        found = self.checkpointer.latest(run.checkpoints, log=self.log)
        if found is not None:
            step, source = found
            self.load_from(source, verified=True)
            self.log(f"train: resuming {run.path} from step {self.step} ({self.tokens:,} tokens)")
        elif self.config.train.branch_from:
            source = Path(self.config.train.branch_from)
            self.load_from(source, branch=True)
            self.log(f"train: branching from {source} at step {self.step} (this run's decay starts there)")

    def load_from(self, source: Path, branch: bool = False, verified: bool = False) -> None:
        """Load a checkpoint (on every process, into this run's layout) after checking it belongs to
        this run's trajectory."""
        key = "train.branch_from" if branch else "run_dir"
        try:
            if not verified:
                self.checkpointer.verify(source)
        except CheckpointError as exc:
            raise ConfigError(key, str(exc)) from None
        meta = read_meta(source)
        if branch:
            check_branch(meta, self.config, source)
        check_inputs(meta, self.config, self.data, source, check_config=not branch,
                     inputs=None if branch else self.inputs)
        state = load_trainer_state(source)
        if branch and state["step"] != self.plan.decay_start:
            raise ConfigError("train.branch_from", f"{source} is at step {state['step']} but this run's decay starts at "
                                                   f"step {self.plan.decay_start}; keep the trunk's checkpoint at that "
                                                   "step (train.keep_steps)")
        self.checkpointer.load(source, self.stepper, self.optimizer, state, self.export_factors())
        self.load_state_dict(state)

    # ------------------------------------------------------------------------- one step

    def batches(self) -> list[Batch]:
        """This process's micro-batches of the current step: global micro-batch i * world + rank."""
        t, world, rank = self.config.train, self.parallel.world, self.parallel.rank
        return [self.stream.batch(self.sequences + (i * world + rank) * t.batch_size, t.batch_size)
                for i in range(t.grad_accum)]

    def train_one_step(self, diagnostics: bool) -> StepResult:
        t = self.config.train
        lr = learning_rate(self.step, self.plan, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        result = train_step(self.stepper, self.optimizer, self.batches(), self.objective, self.teacher, self.parallel,
                            step=self.step, steps=self.plan.steps, grad_clip=t.grad_clip, precision=self.parallel.autocast_precision(t.precision),
                            guard=self.guard, diagnostics=diagnostics)
        self.step += 1
        self.tokens += result.targets
        self.sequences += t.batch_size * t.grad_accum * self.parallel.world
        return result

    def log_row(self, result: StepResult, lr: float) -> dict:
        now = self.objective.at(self.step - 1, self.plan.steps)
        row = {"step": self.step, "tokens": self.tokens, **self.window.row(), "lr": lr,
               "grad_norm": result.grad_norm}
        if self.objective.distills:
            row.update(alpha=now.alpha, temperature=now.temperature)
        if self.guard.skipped:
            row["skipped_steps"] = self.guard.skipped
        return row

    def evaluate(self) -> dict:
        """Held-out perplexity on the configured sets (main process only)."""
        self.last_eval = evaluate_prepared_sets(self.model, self.data, self.config, self.parallel.device,
                                                self.stream_record(), self.stream)
        self.model.train()
        return self.last_eval

    def save_checkpoint(self, run: RunDirectory) -> None:
        """A resumable checkpoint of this step, each process writing its shards (weights checked finite,
        and not collapsed, first)."""
        NonFiniteGuard.check_weights(self.step, self.model, "checkpoint")
        self.check_not_collapsed("checkpoint")
        t = self.config.train
        self.checkpointer.save(step_dir(run.checkpoints, self.step), self.stepper, self.optimizer, self.state_dict(),
                               self.model, self.data.tokenizer, self.meta(),
                               then=lambda: prune_checkpoints(run.checkpoints, t.keep_checkpoints, t.keep_steps))

    # ------------------------------------------------------------------------- the loop

    def fit(self, run: RunDirectory, stop_after_steps: int | None = None,
            on_step: Callable[[int], None] | None = None) -> TrainResult:
        """Train until the budget is spent (or a stop is asked); then finish."""
        t, main = self.config.train, self.parallel.is_main
        self.describe()
        metrics = MetricsSink(run.path, self.step, t.tensorboard, t.wandb_project, self.config.name,
                              results_config(self.config), self.log, self.config.eval.sets) if main else NoMetrics()
        bar = progress_bar(total=self.plan.steps, initial=self.step, desc=f"train {self.config.name}", unit="step",
                           disable=not main)
        self.stepper.train()
        try:
            with StopRequest() as stop:
                while self.step < self.plan.steps:
                    stopped = self.run_step(run, metrics, bar, stop, stop_after_steps)
                    if on_step is not None:
                        on_step(self.step)
                    if stopped:
                        return TrainResult(run.path, None, self.step, self.tokens, self.last_eval, False)
        finally:
            bar.close()
            metrics.close()
        return self.finish(run)

    def run_step(self, run: RunDirectory, metrics, bar, stop: StopRequest, stop_after_steps: int | None) -> bool:
        """One step with its logging, evaluation and checkpoint; True when the run must stop here."""
        t = self.config.train
        started, lr = time.perf_counter(), learning_rate(self.step, self.plan, t)
        is_last = self.step + 1 == self.plan.steps
        do_eval = (self.step + 1) % t.eval_every == 0 or is_last
        do_log = (self.step + 1) % t.log_every == 0 or do_eval
        result = self.train_one_step(diagnostics=do_log)
        self.window.add(dataclasses.asdict(result), result.targets, time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{result.targets / (time.perf_counter() - started):,.0f}")
        if do_log:
            row = self.log_row(result, lr)
            if do_eval and (self.parallel.is_main or self.parallel.collective_forward):
                NonFiniteGuard.check_weights(self.step, self.model, "evaluation")
                self.check_not_collapsed("evaluation")
                row.update({f"eval/{name}/{k}": r[k] for name, r in self.evaluate().items() for k in ("loss", "ppl")})
            metrics.write(row)
            if do_eval:
                self.agree_not_diverged(final=False)
        if is_last:
            return False
        requested = self.parallel.all_reduce_sum([1.0 if stop.requested else 0.0])[0] > 0
        stop_now = requested or (stop_after_steps is not None and self.step >= stop_after_steps)
        if self.step % t.checkpoint_every == 0 or stop_now or self.step in t.keep_steps:
            self.save_checkpoint(run)
        if stop_now:
            self.checkpointer.wait()
            reason = "SIGTERM" if requested else f"stop_after_steps={stop_after_steps}"
            self.log(f"train: stopped at step {self.step} ({reason}); run again to resume")
        return stop_now

    def describe(self) -> None:
        n_params = sum(p.numel() for p in self.model.parameters())
        teacher = (f", {self.objective.label()}, teacher {self.teacher.description}" if self.teacher else
                   ", SFT on assistant tokens" if self.role() == "sft" else ", LM only")
        fused = ", LM head fused into the loss" if fuse_head(self.model, self.batches()[0]) else ""
        self.log(f"train: {self.config.name}: {self.spec.name} ({self.spec.non_embedding_parameters():,} non-embedding "
                 f"/ {n_params:,} parameters), {self.plan.steps} steps x {self.plan.tokens_per_step:,} tokens{teacher}"
                 f"{fused}")

    # ------------------------------------------------------------------------- finish

    def finish(self, run: RunDirectory) -> TrainResult:
        """The final model and summary, once the weights and the held-out loss pass their checks."""
        NonFiniteGuard.check_weights(self.step, self.model, "final model")
        self.check_not_collapsed("final model")
        self.checkpointer.wait()
        self.agree_not_diverged(final=True)
        self.checkpointer.write_final(run.final, self.model, self.data.tokenizer, self.meta(), self.export_factors())
        if self.parallel.is_main:
            run.write_summary(self.summary())
            prune_checkpoints(run.checkpoints, self.config.train.keep_checkpoints, self.config.train.keep_steps)
        self.parallel.barrier()
        evals = ", ".join(f"{name} loss {r['loss']:.4f} (ppl {r['ppl']:.2f})" for name, r in self.last_eval.items())
        self.log(f"train: {self.config.name} done: {self.step} steps, {self.tokens:,} tokens; {evals}; "
                 f"model in {run.final}")
        return TrainResult(run.path, run.final, self.step, self.tokens, self.last_eval, True)

    def agree_not_diverged(self, final: bool) -> None:
        """`check_not_diverged` on the main process (which holds the evaluation), its verdict on all."""
        error = None
        if self.parallel.is_main:
            try:
                self.check_not_diverged(final)
            except NonFiniteError as exc:
                error = str(exc)
        error = self.parallel.broadcast_object(error)
        if error is not None:
            raise NonFiniteError(error)

    def check_not_diverged(self, final: bool) -> None:
        """A held-out loss 1 nat worse than guessing uniformly is a diverged run (weights blown up),
        not a model: checked at every evaluation. The final model must moreover be better than
        uniform (after 10 steps). An SFT run starts from a trained model that may be worse than
        uniform on new data: it has diverged when its held-out loss is more than 1 nat above where
        it started. (A model collapsed onto uniform guessing is caught sooner, `check_not_collapsed`.)"""
        uniform = math.log(self.data.vocab_size)
        for name, result in self.last_eval.items():
            loss, start = result["loss"], self.start_eval.get(name)
            if start:
                worse, than = loss > start["loss"] + 1.0, f"more than 1 nat above its {start['loss']:.4f} at the start"
            else:
                worse = loss > uniform + 1.0 or (final and self.step >= 10 and loss >= uniform)
                than = f"no better than guessing uniformly ({uniform:.4f})"
            if not math.isfinite(loss) or worse:
                raise NonFiniteError(f"training diverged: after {self.step} steps the {name} loss is {loss:.4f} nats, "
                                     f"{than}; lower train.lr (the last good checkpoint is kept, final is not written)")

    @torch.no_grad()
    def check_not_collapsed(self, when: str) -> None:
        """Before every checkpoint and evaluation: a model whose logits on the first training window
        are the same for every token (within `COLLAPSE_LOGITS`) at every position has collapsed onto
        uniform guessing; it stops the run so it is never kept as a "last good" checkpoint. (Random
        initial weights never give equal logits; a trained model is far from it.)"""
        probe = self.stream.batch(0, 1).to(self.parallel.device)
        logits = self.model(**model_inputs(probe)).logits[..., : self.data.vocab_size].float()
        spread = float((logits.amax(-1) - logits.amin(-1)).max())
        if spread < COLLAPSE_LOGITS:
            raise NonFiniteError(f"training diverged by step {self.step}: the model's outputs are uniform over the "
                                 f"vocabulary at every position (it collapsed to a constant), so the {when} is not "
                                 "written; lower train.lr (the last good checkpoint is kept)")

    def summary(self) -> dict:
        return {"name": self.config.name, "status": "done", "steps": self.step, "tokens": self.tokens,
                "model": self.spec.name, "non_embedding_parameters": self.spec.non_embedding_parameters(),
                "parameters": sum(p.numel() for p in self.model.parameters()), "objective": self.objective.as_dict(),
                "objective_label": self.objective.label(), "teacher": self.config.kd.teacher,
                "skipped_steps": self.guard.skipped, "eval": self.last_eval, "config_hash": config_hash(self.config),
                "inputs": self.inputs,
                **({"sft": {"init_from": self.config.sft.init_from, "eval_before": self.start_eval}}
                   if self.start_eval else {})}


def train(config: RunConfig, *, stop_after_steps: int | None = None, log=print,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train (or resume) the run described by `config`; return where it ended.

    `on_step(step)` is called after every completed step (its checkpoint written): tests use
    it to crash a run at a chosen step.
    """
    parallel = setup_parallelism(config.train)
    if not parallel.is_main:
        log = lambda *args, **kwargs: None  # noqa: E731
    try:
        return train_on(parallel, config, stop_after_steps, log, on_step)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # its frames hold the trainer: see release_then_close
        raise
    finally:
        release_then_close(parallel)


def train_on(parallel: SingleProcess, config: RunConfig, stop_after_steps, log, on_step) -> TrainResult:
    """`train` on processes already set up: every reference to the trainer (its model) lives in this frame."""
    run = RunDirectory(config)
    run.check_before_writing()
    trainer = Trainer.build(config, parallel, log)
    with run.claim(parallel.is_main):
        parallel.barrier()
        done = trainer.already_complete(run)
        if done is not None:
            return done
        trainer.restore(run)
        run.record_config(parallel.is_main, trainer.spec.name)
        return trainer.fit(run, stop_after_steps, on_step)


def release_then_close(parallel: SingleProcess) -> None:
    """Free the run's model, then close the processes. Order matters under DDP: its C++ reducer holds a
    reference to the process group, and were it the last one, the group's destructor would join gloo's
    threads while holding the GIL, while a thread finishing the last collective waits for the GIL to free
    that collective's tensors: a hang at the end of a run, seen on a busy machine. Freed first (the
    trainer's frames are gone or cleared; `gc.collect` takes its reference cycles), the group is last
    held by Python and `destroy_process_group` frees it with the GIL released. (The collection, ~0.25 s,
    runs only when a group is about to be destroyed.)"""
    if parallel.uses_process_group and parallel.owns_group:
        gc.collect()
    parallel.close()
