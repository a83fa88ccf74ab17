"""`distillab sweep GRID --rehearse`: every run of a grid on this machine's CPUs, sizes shrunk.

A rehearsal is the grid's own sweep (plan, teacher caches, training, evaluation, the SFT stage,
the mechanism analysis, the report) run through the code a real launch runs, with only sizes
changed, so a preset that would crash, or differ from what it claims, does so here first:

    models      each rung becomes a tiny twin (2 layers) that keeps its family (Llama / Qwen3:
                qk-norm), tying, output rows (a Qwen3 rung's 151,936 stay 151,936) and grouped
                query attention, its width growing with the rung's size so teacher-student
                relations (smaller, equal, larger) hold; hub checkpoints (`teachers.members[].path`)
                become twins saved as plain HF directories
    budgets     the grid's distinct token budgets, in order, become 2, 3, 4, ... steps of 4
                sequences of 128 tokens (so 10B < 50B stays so, and every run checkpoints mid-run);
                evaluation windows, batches and the SFT stage shrink likewise
    data        each hub corpus becomes a packaged one (the first Python's standard library, the
                next Milton), tokenized by a byte-level BPE trained on it and padded to the grid's
                vocabulary size (`rehearsal_tokenizer`: 128,256 ids, the Llama-3 special tokens
                at 128,000+, so the SFT chat template works); a model's rows may exceed it, as the
                paper's Qwen3 rows do
    evaluation  the hub OOD sets become the offline Milton set, the hub downstream tasks one
                offline task on a few items, the SFT data packaged chat records, the analysis a
                window of Milton
    layout      the grid's parallelism on 2 CPU processes with gloo (FSDP where it says fsdp);
                the output layer fused into the loss wherever the full-size run fuses it
    caches      the full-size plan's cache decisions (`kd.cache: auto`), repeated exactly

Process start-up dominates a run this small (importing torch and transformers into two fresh
processes costs more than the training), so the two processes are started once per rehearsal
(`Gang`): the driver is rank 0 and runs each run as a sweep worker does; its training, where a
real launch starts `torchrun`, is handed to the gang, whose two ranks load the run's launch file
and call the same `distillab.train.train`. Everything else is the sweep's own code.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from pathlib import Path

from distillab.artefact import AtomicDirectory, entry_lock
from distillab.config import CorpusConfig, load_config
from distillab.data.sources import corpus_identity, iter_documents
from distillab.data.tokenizer import NO_LENGTH_LIMIT
from distillab.errors import ConfigError, DistillabError
from distillab.evaluate.sets import PAPER_OOD
from distillab.files import default_cache_dir, stable_hash
from distillab.layout import RunLayout
from distillab.models import LADDER, build_model, resolve_spec
from distillab.sweep.grid import grid_from_dict
from distillab.train.step import HEAD_FUSION_ELEMENTS, HEAD_FUSION_ENV

SEQ_LEN = 128  # tokens per rehearsal sequence (SFT too: a chat turn in the Llama 3 template fits)
BPE_MERGES = 1024  # trained tokens of the rehearsal tokenizer; the rest of its ids are never produced
CORPORA = (CorpusConfig(source="packaged", name="python-stdlib", limit=60),
           CorpusConfig(source="packaged", name="milton"))
OOD_SET = "milton"
OFFLINE_TASK = "copa"
TASK_ITEMS = 2
CHAT_CORPUS = CorpusConfig(source="packaged", name="trivia-chat", limit=24)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                   *[f"<|reserved_special_token_{i}|>" for i in range(3, 248)]]


# ----------------------------------------------------------------------------- the tokenizer


def rehearsal_tokenizer(vocab_size: int, corpus: CorpusConfig, cache_dir: Path) -> Path:
    """An HF tokenizer directory of exactly `vocab_size` ids: a byte-level BPE of BPE_MERGES tokens
    trained on `corpus`, ids up to vocab_size - 256 that no text produces (vocabulary entries no merge
    builds), and the 256 Llama-3 special tokens (eos <|end_of_text|>). Content-addressed, built once."""
    key = stable_hash({"rehearsal_tokenizer": 1, "vocab_size": vocab_size, "bpe": BPE_MERGES,
                       "corpus": corpus_identity(corpus)})
    out = Path(cache_dir) / "rehearsal" / "tokenizers" / key
    with entry_lock(out):
        if not out.exists():
            with AtomicDirectory(out) as tmp:
                build_tokenizer(vocab_size, (d.text for d in iter_documents(corpus, cache_dir)), tmp)
    return out


def build_tokenizer(vocab_size: int, texts, out: Path) -> None:
    """The tokenizer of `rehearsal_tokenizer`, saved into the directory `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = LLAMA3_SPECIALS if vocab_size >= BPE_MERGES + len(LLAMA3_SPECIALS) else LLAMA3_SPECIALS[:2]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_MERGES, min_frequency=2, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]
    first_special = vocab_size - len(specials)
    for i in range(len(vocab), first_special):
        vocab[f"\u2400{i}"] = i  # outside the byte-level alphabet: no merge ever builds it
    state["added_tokens"] = [{"id": first_special + j, "content": text, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True} for j, text in enumerate(specials)]
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                   bos_token=specials[0], eos_token=specials[1], model_max_length=NO_LENGTH_LIMIT)
    if len(fast) != vocab_size:
        raise DistillabError(f"rehearsal tokenizer: built {len(fast)} ids, wanted {vocab_size}")
    fast.save_pretrained(str(out))


# ----------------------------------------------------------------------------- the twin grid


def grid_models(values: dict) -> list[str]:
    """Every ladder rung a grid names (pool, students, members, pairs, baselines)."""
    names = set(values.get("teachers", {}).get("models", [])) | set(values.get("students", {}).get("models", []))
    for section in (values.get("teachers", {}).get("members", []), values.get("students", {}).get("members", []),
                    values.get("baseline_members", []), values.get("kd", {}).get("pairs", [])):
        names |= {m["model"] for m in section if "model" in m}
    return sorted(names, key=lambda n: (LADDER[n].non_embedding_parameters(), n))


def twin_model(name: str, rank: int) -> dict:
    """Model overrides of a rung's twin: 2 layers, width growing with its `rank` among the grid's rungs;
    family, tying, rows and grouped-query attention (kv heads < heads) kept."""
    spec = LADDER[name]
    d_model = 16 + 8 * rank
    return {"name": name, "layers": 2, "d_model": d_model, "heads": 4, "kv_heads": 2 if spec.kv_heads < spec.heads
            else 4, "head_dim": 8, "ffn": 2 * d_model}


def token_budgets(values) -> list[int]:
    """Every token budget the grid names (anywhere in it: pool, students, members, teacher references)."""
    found = []
    if isinstance(values, dict):
        for key, value in values.items():
            if key == "tokens":
                found += value if isinstance(value, list) else [value]
            else:
                found += token_budgets(value)
    elif isinstance(values, list):
        for value in values:
            found += token_budgets(value)
    return found


def replace_budgets(values, steps: dict[int, int], tokens_per_step: int):
    """A copy of the grid values with every budget b replaced by steps[b] x tokens_per_step."""
    if isinstance(values, dict):
        return {key: ([steps[v] * tokens_per_step for v in value] if isinstance(value, list)
                      else steps[value] * tokens_per_step) if key == "tokens"
                else replace_budgets(value, steps, tokens_per_step) for key, value in values.items()}
    if isinstance(values, list):
        return [replace_budgets(v, steps, tokens_per_step) for v in values]
    return values


def corpus_map(values: dict) -> dict[str, dict]:
    """{stable hash of a hub corpus the grid reads: the packaged corpus standing in for it}, in order."""
    found = []
    for section in (values.get("base", {}), values.get("teachers", {}).get("overrides", {}),
                    values.get("students", {}).get("overrides", {})):
        corpus = section.get("data", {}).get("corpus")
        if corpus is not None and stable_hash(corpus) not in found:
            found.append(stable_hash(corpus))
    if len(found) > len(CORPORA):
        raise ConfigError("data.corpus", f"a rehearsal stands in for at most {len(CORPORA)} corpora")
    return {key: vars(CORPORA[i]).copy() for i, key in enumerate(found)}


def shrink_run(section: dict, corpora: dict, tokenizer: Path | None) -> dict:
    """A grid's run-config section (base, or a pool's overrides) at rehearsal size."""
    section = copy.deepcopy(section)
    data = section.get("data")
    if data is not None:
        if "corpus" in data:
            data["corpus"] = corpora[stable_hash(data["corpus"])]
        if tokenizer is not None and "tokenizer" in data:
            data["tokenizer"] = {**data["tokenizer"], "path": str(tokenizer)}
        if "validation_fraction" in data:
            data["validation_fraction"] = 0.1
        data.pop("cache_dir", None)
    train = section.get("train")
    if train is not None:
        several = train.get("processes", 1) > 1
        train.update({"seq_len": SEQ_LEN, "batch_size": 1, "grad_accum": 2 if train.get("grad_accum", 1) > 1 else 1,
                      "device": "cpu", "threads": 1, "checkpoint_every": 2, "eval_every": 1000, "log_every": 1,
                      **({"processes": 2} if several else {})})
        train.pop("token_budget", None)
    if "eval" in section:
        section["eval"].update({"seq_len": SEQ_LEN, "max_windows": 1, "batch_size": 1})
    return section


def shrink_sft(stage: dict, base_dir: Path) -> dict:
    """The grid's SFT stage at rehearsal size: packaged chat records, a few 64-token steps; its chat
    template path made absolute (relative to the grid file's repository)."""
    if not stage:
        return stage
    stage = copy.deepcopy(stage)
    stage.setdefault("data", {})["corpus"] = vars(CHAT_CORPUS).copy()
    stage["data"]["validation_fraction"] = 0.1
    stage.setdefault("train", {}).update({"seq_len": SEQ_LEN, "batch_size": 2, "grad_accum": 1, "device": "cpu",
                                          "threads": 1, "eval_every": 1000, "checkpoint_every": 1, "log_every": 1})
    stage.setdefault("eval", {}).update({"max_windows": 1, "batch_size": 1})
    sft = stage.setdefault("sft", {})
    sft["steps"] = 2
    template = sft.get("chat_template")
    if template and not Path(template).is_absolute():
        roots = [*Path(base_dir).resolve().parents, *Path(__file__).resolve().parents]  # the grid's repo, this one
        candidates = [Path(template), *(root / template for root in roots)]
        sft["chat_template"] = str(next((p.resolve() for p in candidates if p.exists()), Path(template)))
    return stage


def shrink_eval(section: dict) -> dict:
    """The grid's evaluation at rehearsal size: hub sets and tasks replaced by offline ones."""
    section = copy.deepcopy(section)
    sets = [OOD_SET if name == "paper-ood" or name in PAPER_OOD else name for name in section.get("sets", [])]
    section["sets"] = list(dict.fromkeys(sets))
    if section.get("tasks"):
        section.update(tasks=[OFFLINE_TASK], limit=TASK_ITEMS)
    section.update(seq_len=SEQ_LEN, max_windows=1, batch_size=1)
    if section.get("analysis") is not None:
        section["analysis"] = {"set": OOD_SET, "seq_len": 32, "max_windows": 1, "batch_size": 1}
    return section


def rehearsal_values(values: dict, grid_path: Path, cache_dir: Path, out: Path) -> dict:
    """The rehearsal twin of a grid's values (see the module docstring)."""
    values = copy.deepcopy(values)
    corpora = corpus_map(values)
    base_data = values.get("base", {}).get("data", {})
    vocab = int(base_data.get("tokenizer", {}).get("vocab_size", 4096))
    first_corpus = CorpusConfig(**corpora[stable_hash(base_data["corpus"])]) if "corpus" in base_data else CORPORA[0]
    tokenizer = rehearsal_tokenizer(vocab, first_corpus, cache_dir)
    models = grid_models(values)
    twins = {name: {k: v for k, v in twin_model(name, rank).items() if k != "name"} for rank, name in enumerate(models)}
    budgets = sorted(set(token_budgets({k: values.get(k) for k in ("teachers", "students", "baseline_members", "kd")})))
    steps = {budget: 2 + i for i, budget in enumerate(budgets)}
    base = shrink_run(values.get("base", {}), corpora, tokenizer)
    train = base.get("train", {})
    per_step = train.get("batch_size", 1) * SEQ_LEN * train.get("grad_accum", 1) * train.get("processes", 1)
    for key in ("teachers", "students", "baseline_members", "kd"):
        if key in values:
            values[key] = replace_budgets(values[key], steps, per_step)
    for pool in ("teachers", "students"):
        if values.get(pool, {}).get("overrides"):
            values[pool]["overrides"] = shrink_run(values[pool]["overrides"], corpora, None)
    for member in values.get("teachers", {}).get("members", []):
        if member.get("path"):
            member["path"] = str(external_twin(member["model"], twins[member["model"]], tokenizer, out / "external"))
    values.update(name=f"{values.get('name', 'grid')}-rehearsal", base=base, rung_overrides=twins,
                  eval=shrink_eval(values.get("eval", {})), sft=shrink_sft(values.get("sft", {}), Path(grid_path)))
    return values


def external_twin(rung: str, overrides: dict, tokenizer_dir: Path, out: Path) -> Path:
    """A hub checkpoint's twin: an untrained model of the rung's twin shape with the rehearsal
    tokenizer, saved as a plain HF directory (what a downloaded hub model is)."""
    from distillab.config import ModelConfig
    from distillab.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    spec = resolve_spec(ModelConfig(name=rung, **overrides))
    directory = Path(out) / rung
    if not (directory / "config.json").exists():
        model = build_model(spec, len(tokenizer), SEQ_LEN, seed=0, eos_token_id=tokenizer.eos_token_id)
        model.save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))
    return directory


def fuses_at_full_size(values: dict) -> bool:
    """Whether the grid's full-size runs fuse the output layer into the loss (so the twins must too)."""
    train, data = values.get("base", {}).get("train", {}), values.get("base", {}).get("data", {})
    rows = max([data.get("tokenizer", {}).get("vocab_size", 4096)]
               + [LADDER[name].vocab_rows or 0 for name in grid_models(values)])
    return train.get("batch_size", 16) * train.get("seq_len", 256) * rows >= HEAD_FUSION_ELEMENTS


# ----------------------------------------------------------------------------- two processes, started once


def restore_environment(saved: dict) -> None:
    """Put environment variables back as `saved` ({name: value, or None for unset}) recorded them."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gang_member(rank: int, world: int, port: int, environment: dict, timeout_s: float, launches, ready) -> None:
    """Ranks 1.. of a gang: say `ready` once imported, join the group, then train every launch file rank 0
    sends on `launches`, until it sends None (or rank 0's process is gone)."""
    import datetime

    import torch.distributed as dist

    from distillab.train import train

    os.environ.update(environment)
    ready.put(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    while (launch := next_launch(launches)) is not None:
        try:
            train(load_config(launch), log=lambda *args, **kwargs: None)
        except Exception:  # rank 0 runs the same code and reports the error
            pass
    dist.destroy_process_group()


def next_launch(launches) -> str | None:
    """The next launch file rank 0 sends, however long rank 0 works alone in between (evaluation, the
    SFT stage, a machine asleep): the wait is outside the process group, whose collectives time out;
    None when rank 0 says so or its process is gone."""
    import multiprocessing
    import queue

    while True:
        try:
            return launches.get(timeout=5)
        except queue.Empty:
            if not multiprocessing.parent_process().is_alive():
                return None


class Gang:
    """`world` processes with a gloo process group, started once: this process is rank 0, the others
    wait for launch files. `train(config_values)` is what `torchrun` is to a real launch: every rank
    loads the run's launch file and calls `distillab.train.train`. The launch files travel outside
    the group (a queue per member), so only training itself is under the group's timeout; rank 0 joins
    the group once every member has said it is ready, so starting Python and torch is not under it either."""

    def __init__(self, world: int = 2, timeout_s: float = 600.0):
        import datetime
        import multiprocessing

        import torch.distributed as dist

        self.world, port = world, free_port()
        environment = {k: os.environ[k] for k in ("DISTILLAB_CACHE", "DISTILLAB_PROGRESS", HEAD_FUSION_ENV)
                       if k in os.environ}
        context = multiprocessing.get_context("spawn")
        self.launches, self.ready = [context.Queue() for _ in range(1, world)], context.Queue()
        self.members = [context.Process(target=gang_member, daemon=True,
                                        args=(rank, world, port, environment, timeout_s, launches, self.ready))
                        for rank, launches in zip(range(1, world), self.launches)]
        for member in self.members:
            member.start()
        self.wait_until_ready()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))

    def wait_until_ready(self) -> None:
        """Return once every member has imported what it trains with (or raise if one exited)."""
        import queue

        waiting = len(self.members)
        while waiting:
            try:
                self.ready.get(timeout=5)
                waiting -= 1
            except queue.Empty:
                self.check_members()

    def check_members(self) -> None:
        """Raise a one-line error when a member has exited: the group's collectives would only time out."""
        gone = [(rank, member.exitcode) for rank, member in enumerate(self.members, 1) if not member.is_alive()]
        if gone:
            raise DistillabError(f"rehearsal: the gang's rank {gone[0][0]} exited (code {gone[0][1]}); the runs left "
                                 "cannot train on its processes: run the rehearsal again (finished runs are kept)")

    def train(self, config_values: dict) -> Path:
        """Train one run on every rank (its launch file written as `train_with_torchrun` writes it)."""
        import yaml

        from distillab.train import train

        self.check_members()
        layout = RunLayout(config_values["run_dir"])
        layout.path.mkdir(parents=True, exist_ok=True)
        launch = layout.launch
        launch.write_text(yaml.safe_dump(config_values, sort_keys=False))
        for launches in self.launches:
            launches.put(str(launch))
        saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        os.environ.update(WORLD_SIZE=str(self.world), RANK="0", LOCAL_RANK="0")
        try:
            return train(load_config(launch)).final_dir
        finally:
            restore_environment(saved)

    def close(self) -> None:
        import torch.distributed as dist

        for launches in self.launches:
            launches.put(None)
        if dist.is_initialized():
            dist.destroy_process_group()
        for member in self.members:
            member.join(timeout=60)


class GangWorkers:
    """The sweep's worker interface (`distillab.sweep.execute.LocalWorkers`) over a gang: each run is
    executed here, as a worker would, its training on the gang."""

    def __init__(self, sweep_dir: Path, gang: Gang):
        self.sweep_dir, self.gang = Path(sweep_dir), gang

    def __call__(self, run_id: str):
        from concurrent.futures import Future

        from distillab.sweep.execute import Job, run_logged

        future = Future()
        try:
            run_logged(str(self.sweep_dir), run_id, 1, launcher=self.gang.train)
            future.set_result(None)
        except Exception as exc:  # recorded in the run's status.json by execute_run
            future.set_exception(exc)
        return Job(future)


# ----------------------------------------------------------------------------- the rehearsal


def rehearse(grid_path: str | Path, out: str | Path, log=print) -> dict:
    """Rehearse the grid in `grid_path` into `out`: plan it at full size (for its cache decisions), then
    run its twin grid end to end on a gang of 2 CPU processes; returns {status, seconds, report}."""
    from distillab.config import read_yaml_mapping
    from distillab.report import write_report
    from distillab.sweep.execute import run_sweep
    from distillab.sweep.plan import cache_plan, plan

    started = time.perf_counter()
    grid_path, out = Path(grid_path), Path(out).resolve()
    values = read_yaml_mapping(grid_path, what="grid")
    decisions = cache_plan(plan(grid_from_dict(values), out / "full-size-plan"))
    cache_dir = Path(os.environ["DISTILLAB_CACHE"]) if os.environ.get("DISTILLAB_CACHE") else default_cache_dir()
    spec = grid_from_dict(rehearsal_values(values, grid_path, cache_dir, out))
    saved = {key: os.environ.get(key) for key in (HEAD_FUSION_ENV, "DISTILLAB_PROGRESS")}
    os.environ.update({HEAD_FUSION_ENV: "0"} if fuses_at_full_size(values) else {}, DISTILLAB_PROGRESS="0")
    try:
        gang = Gang(2)
        try:
            status = run_sweep(spec, out, pool=GangWorkers(out, gang), cache_decisions=decisions, log=log)
        finally:
            gang.close()
    finally:
        restore_environment(saved)
    report = write_report(out)
    seconds = time.perf_counter() - started
    log(f"rehearsal: {spec.name}: {sum(s == 'done' for s in status.values())} of {len(status)} runs done in "
        f"{seconds:.0f} s; report in {report}")
    return {"status": status, "seconds": seconds, "report": report, "spec": spec}
