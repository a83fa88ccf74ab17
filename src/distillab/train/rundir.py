"""A run directory (its files: `distillab.layout.RunLayout`) and what binds a run to it.

Resuming binds a run to its inputs: the newest verified checkpoint records the results
config, the tokenizer fingerprint and the training data's content hash, and any difference in
a key that changes training (operational keys may change) is refused, naming the key.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import yaml

from distillab.artefact import MANIFEST
from distillab.config import OPERATIONAL_KEYS, RunConfig, dump_yaml, first_difference, flatten, results_view
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
                existing = flatten(yaml.safe_load(recorded.read_text()) or {})
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

    def record_config(self, is_main: bool) -> None:
        """config.yaml, written once the run is bound to its inputs (so a refused command leaves none)."""
        if is_main:
            write_text_atomic(self.files.config, dump_yaml(self.config))

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


def check_inputs(meta: dict, config: RunConfig, data, source: Path, check_config: bool = True) -> None:
    """Refuse to continue a checkpoint's trajectory on other inputs: config, tokenizer or data.

    (A WSD branch point's config is checked by the trainer, which allows another budget.)"""
    recorded = meta.get("results_config")
    if recorded is not None and check_config:
        refuse_differences(recorded, config, f"the checkpoint {source}")
    if meta.get("tokenizer_fingerprint") not in (None, data.fingerprint):
        raise DataError(f"data: the tokenizer differs from the one {source} was trained with (the corpus or the "
                        "tokenizer settings changed); restore them, or start a new run_dir")
    if meta.get("data_content_sha256") not in (None, data.manifest["content_sha256"]):
        raise DataError(f"data.corpus: its content changed since {source} was written; restore the corpus, or start "
                        "a new run_dir")
