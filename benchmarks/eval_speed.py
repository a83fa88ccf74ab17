"""Evaluation speed: perplexity tokens/s and seconds per 1,000 multiple-choice items.

    python benchmarks/eval_speed.py [--models cpu-1m cpu-10m] [--items 200]

Models are freshly initialised rungs (speed does not depend on the weights) saved with the
Shakespeare tokenizer (vocabulary 4,096); multiple-choice items run through the real
lm-evaluation-harness on the offline tasks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from distillab.config import CorpusConfig, DataConfig, TokenizerConfig
from distillab.data.shards import prepare_data
from distillab.evaluate.downstream import run_tasks
from distillab.evaluate.perplexity import perplexity
from distillab.models import LADDER, build_model
from distillab.runtime import setup_runtime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cpu-1m", "cpu-10m"])
    parser.add_argument("--tasks", nargs="+", default=["piqa", "hellaswag", "arc_easy"])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/eval_speed.json")
    args = parser.parse_args()
    setup_runtime(None)
    data = prepare_data(DataConfig(corpus=CorpusConfig(source="packaged", name="shakespeare"),
                                   tokenizer=TokenizerConfig(vocab_size=4096), validation_fraction=0.08))
    results = []
    for name in args.models:
        model = build_model(LADDER[name], data.vocab_size, 256, seed=0, eos_token_id=data.tokenizer.eos_token_id)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            data.tokenizer.save_pretrained(tmp)
            started = time.perf_counter()
            ppl = perplexity(model.eval(), data.tokens("validation"), 256, 64, 8, "cpu", data.vocab_size)
            ppl_seconds = time.perf_counter() - started
            row = {"model": name, "perplexity_tokens_per_s": ppl["tokens"] / ppl_seconds, "tasks": {}}
            for task in args.tasks:
                out = run_tasks(Path(tmp), [task], Path(data.path).parent.parent, limit=args.items, batch_size=32)[task]
                row["tasks"][task] = {"items": out["n"], "seconds": out["seconds"],
                                      "seconds_per_1000_items": out["seconds"] / out["n"] * 1000}
        results.append(row)
        print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("| model | perplexity tok/s | " + " | ".join(f"{t} s / 1,000 items" for t in args.tasks) + " |")
    print("|---|---:|" + "---:|" * len(args.tasks))
    for row in results:
        cells = " | ".join(f"{row['tasks'][t]['seconds_per_1000_items']:.0f}" for t in args.tasks)
        print(f"| {row['model']} | {row['perplexity_tokens_per_s']:,.0f} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
