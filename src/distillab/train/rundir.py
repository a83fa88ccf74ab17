"""A run directory (its files: `distillab.layout.RunLayout`) and what binds a run to it.

Resuming binds a run to its inputs: the newest verified checkpoint records the results
config, the tokenizer fingerprint, the training data's content hash and the content of what
else the run reads (`bound_inputs`: the teacher's weights, the teacher cache's manifest, the
weights an SFT run starts from, its chat template), and any difference in a key that changes
training (operational keys may change) is refused, naming the key. A finished run is held to
the same record (its `final/`), under the run's lock: rerunning it with anything changed is
refused, not reported "already complete".
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import yaml

from distillab.artefact import MANIFEST, weights_sha256
from distillab.config import (OPERATIONAL_KEYS, RunConfig, first_difference, flatten, load_yaml, results_view,
                              to_dict)
from distillab.errors import ConfigError, DataError
from distillab.files import check_writable, exclusive_lock, write_json_atomic, write_text_atomic
from distillab.layout import STEP, RunLayout


class RunDirectory:
    def __init__(self, config: RunConfig):
        self.config = config
        self.path = config.resolved_run_dir
        self.files = RunLayout(self.path)
        self.checkpoints, self.final, self.summary_path = self.files.checkpoints, self.files.final, self.files.summary

    def completed_summary(self) -> dict | None:
        """The summary of a finished run (final model written, summary says done), else None."""
        if not ((self.final / MANIFEST).exists() and self.summary_path.exists()):
            return None
        try:
            summary = json.loads(self.summary_path.read_text())
        except json.JSONDecodeError:
            return None
        return summary if summary.get("status", "done") == "done" else None

    def has_progress(self) -> bool:
        """Whether the directory holds anything to resume (a checkpoint or a final model)."""
        return any(STEP.match(p.name) for p in self.checkpoints.glob("*")) or self.final.exists()

    def check_before_writing(self) -> None:
        """Read-only checks: writable, and (when there is progress) the same recorded config."""
        check_writable(self.path, "run_dir")
        recorded = self.files.config
        if recorded.exists() and self.has_progress():
            try:
                existing = flatten(load_yaml(recorded.read_text()) or {})
            except yaml.YAMLError:
                existing = {}
            refuse_differences(existing, self.config, f"the run in {self.path}")

    @contextlib.contextmanager
    def claim(self, is_main: bool):
        """Hold the run's lock (main process); refused at once when another process holds it."""
        if not is_main:
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.files.lock, f"run directory {self.path}"):
            yield

    def record_config(self, is_main: bool, model_name: str) -> None:
        """config.yaml, written once the run is bound to its inputs (so a refused command leaves none).

        An SFT run's model comes from `sft.init_from`, not from `model.*` (which stays unset): its
        config.yaml names that model in a comment instead of recording the unused defaults."""
        if not is_main:
            return
        values, header = to_dict(self.config), ""
        if self.config.sft.init_from:
            del values["model"]
            header = f"# model: {model_name}, taken from sft.init_from (an SFT config leaves model.* unset)\n"
        write_text_atomic(self.files.config, header + yaml.safe_dump(values, sort_keys=False))

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.summary_path, summary)


# How a global batch is laid out over processes and micro-batches: a run may resume under
# another layout of the same global batch (e.g. 2 FSDP processes -> 1 process with grad_accum 2);
# it then continues the same trajectory up to floating-point summation order.
LAYOUT_KEYS = frozenset({"train.batch_size", "train.grad_accum", "train.processes", "train.parallel",
                         "train.nodes"})


def global_batch(values: dict) -> int:
    return values["train.batch_size"] * values.get("train.grad_accum", 1) * values.get("train.processes", 1)


def refuse_differences(recorded: dict, config: RunConfig, where: str, allowed: set = frozenset()) -> None:
    """ConfigError naming the first results key whose value differs from what `where` recorded
    (the layout keys may differ together when the global batch does not)."""
    current = results_view(config)
    if "train.batch_size" in recorded and global_batch(recorded) == global_batch(current):
        allowed = set(allowed) | LAYOUT_KEYS
    difference = first_difference({k: v for k, v in recorded.items() if k not in OPERATIONAL_KEYS}, config, allowed)
    if difference is not None:
        key, was, now = difference
        raise ConfigError(key, f"is {now!r} but {where} was started with {was!r}; use a new run_dir or delete the "
                               "old one")


# What a run reads besides its config, tokenizer and data, bound by content (`bound_inputs`):
# recorded name -> (the config key that names it, what it is).
BOUND_INPUTS = {
    "teacher_weights_sha256": ("kd.teacher", "the teacher's weights"),
    "teacher_cache_sha256": ("kd.cache", "the teacher cache (its manifest, which holds every shard's sha256)"),
    "init_weights_sha256": ("sft.init_from", "the weights of the checkpoint it fine-tunes"),
    "chat_template_sha256": ("sft.chat_template", "the chat template"),
}


def bound_inputs(config: RunConfig, data, distills: bool, cache_manifest_sha256: str | None) -> dict:
    """The content of what the run reads beyond config, tokenizer and data (names: `BOUND_INPUTS`).

    Weights are named by the sha256 of their files (`weights_sha256`: a distillab checkpoint's
    manifest, whose files were verified when the run loaded it; other directories hashed once,
    remembered by file size and time); the chat template by the one prepared chat data records."""
    from distillab.models import model_directory

    inputs = {}
    if distills:
        inputs["teacher_weights_sha256"] = weights_sha256(model_directory(config.kd.teacher))
    if cache_manifest_sha256:
        inputs["teacher_cache_sha256"] = cache_manifest_sha256
    if config.sft.init_from:
        inputs["init_weights_sha256"] = weights_sha256(model_directory(config.sft.init_from))
    chat = data.manifest.get("chat")
    if chat:
        inputs["chat_template_sha256"] = chat["template_sha256"]
    return inputs


def refuse_changed_inputs(recorded: dict, current: dict, source: Path) -> None:
    """ConfigError naming the first bound input whose content differs from what `source` recorded."""
    for name, (key, what) in BOUND_INPUTS.items():
        was, now = recorded.get(name), current.get(name)
        if was is not None and was != now:
            now_text = f"now {now[:12]}…" if now else "now none"
            raise ConfigError(key, f"{what} changed since {source} was written (sha256 {was[:12]}…, {now_text}); "
                                   "restore it, or start a new run_dir")


def check_inputs(meta: dict, config: RunConfig, data, source: Path, check_config: bool = True,
                 inputs: dict | None = None) -> None:
    """Refuse to continue a checkpoint's trajectory on other inputs: config, tokenizer, data, or the
    content of the teacher, its cache, the SFT start and chat template (`inputs`, from `bound_inputs`).

    (A WSD branch point's config is checked by the trainer, which allows another budget.)"""
    recorded = meta.get("results_config")
    if recorded is not None and check_config:
        refuse_differences(recorded, config, f"the checkpoint {source}")
    if inputs is not None:
        refuse_changed_inputs(meta.get("inputs") or {}, inputs, source)
    if meta.get("tokenizer_fingerprint") not in (None, data.fingerprint):
        raise DataError(f"data: the tokenizer differs from the one {source} was trained with (the corpus or the "
                        "tokenizer settings changed); restore them, or start a new run_dir")
    if meta.get("data_content_sha256") not in (None, data.manifest["content_sha256"]):
        raise DataError(f"data.corpus: its content changed since {source} was written; restore the corpus, or start "
                        "a new run_dir")
