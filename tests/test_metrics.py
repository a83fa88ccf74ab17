"""What a run logs besides metrics.jsonl: TensorBoard tags and hparams, and its W&B identity."""

import json
from pathlib import Path

import pytest
from conftest import tiny_run
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

from distillab.config import config_from_dict, results_config
from distillab.layout import RunLayout
from distillab.train import train
from distillab.train.metrics import MetricsSink, hparam_value, wandb_id


def events(folder: Path) -> list:
    return [event for path in sorted(folder.rglob("events.out.tfevents.*")) for event in EventFileLoader(str(path)).Load()]


def summaries(folder: Path):
    for event in events(folder):
        for value in event.summary.value:
            yield event.step, value


def hparams_of(folder: Path) -> tuple[list, list]:
    """(session start infos, experiments) of every event file under `folder`, decoded."""
    data = plugin_data_pb2.HParamsPluginData.FromString
    starts = [data(v.metadata.plugin_data.content).session_start_info for _, v in summaries(folder)
              if v.tag == "_hparams_/session_start_info"]
    experiments = [data(v.metadata.plugin_data.content).experiment for _, v in summaries(folder)
                   if v.tag == "_hparams_/experiment"]
    return starts, experiments


def test_the_sink_groups_tags_and_writes_hparams_only_when_a_run_starts(tmp_path):
    """A sink opened at step 0 and again on resume (step 4): rows under train/ and eval/, the
    hparams (lists as JSON text, None left out) once."""
    config = {"train.lr": 0.003, "kd.alpha": 0.5, "kd.teacher": None, "train.keep_steps": [2, 4], "data.x": True}
    first = MetricsSink(tmp_path, 0, config=config, log=None, eval_sets=["validation"])
    first.write({"step": 2, "loss": 5.5, "lr": 0.003, "eval/validation/loss": 5.25})
    first.close()
    again = MetricsSink(tmp_path, 4, config=config, log=None, eval_sets=["validation"])
    again.write({"step": 6, "loss": 4.5, "lr": 0.002})
    again.close()
    got = {(v.tag, step): v.tensor.float_val[0] if v.tensor.float_val else v.simple_value
           for step, v in summaries(RunLayout(tmp_path).tensorboard) if v.metadata.plugin_data.plugin_name != "hparams"}
    want = {("train/loss", 2): 5.5, ("train/lr", 2): 0.003, ("eval/validation/loss", 2): 5.25, ("train/loss", 6): 4.5,
            ("train/lr", 6): 0.002}
    assert set(got) == set(want) and all(abs(got[k] - v) <= 1e-7 * v for k, v in want.items())  # float32 there
    starts, experiments = hparams_of(RunLayout(tmp_path).tensorboard)
    assert len(starts) == 1 and len(experiments) == 1
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in starts[0].hparams.items()}
    assert values == {"train.lr": 0.003, "kd.alpha": 0.5, "train.keep_steps": "[2, 4]", "data.x": True}
    assert [m.name.tag for m in experiments[0].metric_infos] == ["train/loss", "eval/validation/loss"]


@pytest.mark.slow
def test_tensorboard_groups_tags_and_records_hparams_once(tmp_path, cache_dir):
    """A run stopped at step 4 and resumed: scalars under train/ and eval/, each row of
    metrics.jsonl there with the same value; hparams (the flat results config) written once."""
    config = config_from_dict(tiny_run(tmp_path, cache_dir, "tb", eval={"sets": ["validation", "train"]}))
    quiet = lambda *a, **k: None  # noqa: E731
    assert not train(config, stop_after_steps=4, log=quiet).completed
    assert train(config, log=quiet).completed
    run = RunLayout(tmp_path / "tb")
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    scalars = {}
    for step, value in summaries(run.tensorboard):
        if value.metadata.plugin_data.plugin_name != "hparams":
            scalars[(value.tag, step)] = value.simple_value if value.HasField("simple_value") else \
                float(value.tensor.float_val[0])
    tags = {tag for tag, _ in scalars}
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/validation/loss", "eval/train/ppl"} <= tags
    assert all(tag.startswith(("train/", "eval/")) for tag in tags), tags
    for row in rows:  # every logged value, under its grouped tag, at its step (float32 in the event file)
        for key, value in row.items():
            if key != "step" and isinstance(value, float):
                tag = key if key.startswith("eval/") else f"train/{key}"
                assert abs(scalars[(tag, row["step"])] - value) <= 1e-6 * max(1.0, abs(value)), (tag, row["step"])

    starts = [v for _, v in summaries(run.tensorboard) if v.tag == "_hparams_/session_start_info"]
    experiments = [v for _, v in summaries(run.tensorboard) if v.tag == "_hparams_/experiment"]
    assert len(starts) == 1 and len(experiments) == 1  # once, though the run was resumed
    recorded = plugin_data_pb2.HParamsPluginData.FromString(starts[0].metadata.plugin_data.content)
    expected = {k: hparam_value(v) for k, v in results_config(config).items() if v is not None}
    got = {}
    for key, value in recorded.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        got[key] = getattr(value, kind)
    assert set(got) == set(expected) and "kd.alpha" in got and "train.lr" in got
    for key, value in expected.items():
        assert got[key] == (float(value) if isinstance(value, (bool, int, float)) else value), key
    experiment = plugin_data_pb2.HParamsPluginData.FromString(experiments[0].metadata.plugin_data.content).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["train/loss", "eval/validation/loss", "eval/train/loss"]


def test_wandb_id_is_one_per_run_directory_and_survives_a_resume(tmp_path):
    """Two runs under one name get two ids; the same run directory gets the same id again (a
    resume), read back from the run directory, never derived from the name."""
    for name in ("a", "b"):
        (tmp_path / name / "student").mkdir(parents=True)
    first, again = wandb_id(tmp_path / "a" / "student"), wandb_id(tmp_path / "a" / "student")
    other = wandb_id(tmp_path / "b" / "student")
    assert first == again != other
    assert len(first) == 32 and int(first, 16) >= 0 and "student" not in first
    assert RunLayout(tmp_path / "a" / "student").wandb_id.read_text().strip() == first
