"""Peak memory of the KD loss, forward + backward, at a large vocabulary (CPU, measured).

    python benchmarks/loss_memory.py [--vocab 128256] [--tokens 8192] [--hidden 2048] [--out FILE]

Each variant runs in a fresh process that first allocates the inputs every implementation
needs (student and teacher final hidden states, both output layers, the labels) and then
measures the peak resident memory (ru_maxrss) of one forward + backward of the loss. Reported:
the peak above the inputs, per variant.

    plain   logits = h @ W^T for student and teacher, then log_softmax / cross_entropy / KL with
            autograd (the textbook implementation)
    fused   distillab's fused loss on materialised logits (the logits, then chunked loss terms with
            the gradient written into the logits' memory)
    head    distillab's fused LM-head path (`Head` inputs): logits are never materialised
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def run_variant(variant: str, vocab: int, tokens: int, hidden: int) -> dict:
    import torch
    import torch.nn.functional as F

    from distillab.losses import Head, distillation_loss, run_fused
    from distillab.losses.objective import KDObjective

    torch.manual_seed(0)
    h = (torch.randn(tokens, hidden) * 0.5).requires_grad_(True)
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_(True)
    h_t, w_t = torch.randn(tokens, hidden) * 0.5, torch.randn(vocab, hidden) * 0.02
    labels = torch.randint(0, vocab, (tokens,))
    before = current_rss_mb()
    if variant == "plain":
        logits = h @ w.T
        with torch.no_grad():
            teacher = h_t @ w_t.T
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True, reduction="sum") / tokens
        loss = 0.5 * F.cross_entropy(logits, labels) + 0.5 * kl
    elif variant == "fused":
        logits = h @ w.T
        with torch.no_grad():
            teacher = h_t @ w_t.T
        loss = distillation_loss(logits, teacher, labels, alpha=0.5, overwrite_logits=True).total
    else:
        loss = run_fused(Head(h, w), Head(h_t, w_t), labels, KDObjective(alpha=0.5).at(0, 1)).total
    loss.backward()
    return {"variant": variant, "vocab": vocab, "tokens": tokens, "hidden": hidden, "inputs_mb": before,
            "peak_mb": rss_mb(), "peak_above_inputs_mb": rss_mb() - before, "loss": float(loss)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--variants", nargs="*", default=["head", "fused", "plain"])
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.vocab, args.tokens, args.hidden)))
        return 0
    results = []
    for variant in args.variants:
        done = subprocess.run([sys.executable, __file__, "--variant", variant, "--vocab", str(args.vocab), "--tokens",
                               str(args.tokens), "--hidden", str(args.hidden)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{variant}: failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout))
        r = results[-1]
        print(f"{variant:6s} peak above inputs {r['peak_above_inputs_mb']:9,.0f} MB  (inputs {r['inputs_mb']:,.0f} MB, "
              f"loss {r['loss']:.6f})", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
