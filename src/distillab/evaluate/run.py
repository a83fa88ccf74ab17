"""`distillab eval`: perplexity of one checkpoint on named sets, written to eval.json.

Set names:
    validation            the held-out split of the data the checkpoint was trained on
    train                 a sample of that training stream (evenly spaced windows)
    packaged:NAME         a packaged corpus (e.g. packaged:milton), every document
    files:GLOB            local files (text / jsonl / parquet), every document
    hf:PATH[:SPLIT]       an HF dataset or local dataset directory
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from distillab.checkpoint import read_meta, verify_checkpoint
from distillab.config import CorpusConfig
from distillab.data.shards import load_prepared, prepare_corpus_tokens, write_json_atomic
from distillab.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from distillab.errors import DataError
from distillab.evaluate.perplexity import perplexity
from distillab.runtime import resolve_device, setup_runtime
from distillab.teacher import load_causal_lm


def corpus_for_set(name: str) -> CorpusConfig:
    kind, _, rest = name.partition(":")
    if kind == "packaged" and rest:
        return CorpusConfig(source="packaged", name=rest)
    if kind == "files" and rest:
        return CorpusConfig(source="files", name=None, paths=[rest])
    if kind == "hf" and rest:
        path, _, split = rest.partition(":")
        return CorpusConfig(source="hf", name=None, path=path, split=split or "train")
    raise DataError(
        f"--sets: unknown set {name!r}; use validation, train, packaged:NAME, files:GLOB or hf:PATH[:SPLIT]"
    )


def evaluate_checkpoint(
    checkpoint: str | Path,
    sets: list[str],
    seq_len: int = 256,
    max_windows: int | None = 64,
    batch_size: int = 8,
    out: str | Path | None = None,
    device: str = "auto",
    threads: int | None = None,
    log=print,
) -> dict:
    setup_runtime(threads)
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise DataError(f"{checkpoint}: checkpoint directory not found")
    if (checkpoint / "manifest.json").exists():
        verify_checkpoint(checkpoint)
    meta = read_meta(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    fingerprint = tokenizer_fingerprint(tokenizer)
    torch_device = resolve_device(device)
    model = load_causal_lm(checkpoint, torch_device, key="--checkpoint")
    model.eval()
    data = None
    results = {}
    started = time.perf_counter()
    for name in sets:
        if name in ("validation", "train"):
            if data is None:
                if not meta.get("data_dir"):
                    raise DataError(
                        f"{checkpoint}: no distillab.json naming its training data, so set {name!r} is unknown; "
                        "evaluate on packaged:/files:/hf: sets instead"
                    )
                data = load_prepared(Path(meta["data_dir"]))
                if data.fingerprint != fingerprint:
                    raise DataError(f"{checkpoint}: its tokenizer differs from the one of {meta['data_dir']}")
            tokens = data.tokens(name)
        else:
            tokens = prepare_corpus_tokens(corpus_for_set(name), tokenizer, log=log)
        set_started = time.perf_counter()
        result = perplexity(model, tokens, seq_len, max_windows, batch_size, torch_device, len(tokenizer), desc=name)
        result["seconds"] = time.perf_counter() - set_started
        result["tokens_per_s"] = result["tokens"] / max(result["seconds"], 1e-9)
        results[name] = result
        log(f"eval: {name}: loss {result['loss']:.4f}, ppl {result['ppl']:.2f} over {result['tokens']:,} tokens")
    report = {
        "checkpoint": str(checkpoint.resolve()),
        "tokenizer_fingerprint": fingerprint,
        "data_content_sha256": meta.get("data_content_sha256"),
        "step": meta.get("step"),
        "tokens": meta.get("tokens"),
        "settings": {"seq_len": seq_len, "max_windows": max_windows, "batch_size": batch_size},
        "torch_version": torch.__version__,
        "seconds": time.perf_counter() - started,
        "sets": results,
    }
    out_path = Path(out) if out else checkpoint / "eval.json"
    write_json_atomic(out_path, report)
    log(f"eval: wrote {out_path}")
    return report
