"""Teacher signals through the one training loop: sampled (online and from a sampled cache), several
teachers (mixture and routing, online and from caches), and a hub teacher at a revision, offline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distillab.capture import capture_teacher_cache
from distillab.config import config_from_dict
from distillab.data.loader import Batch
from distillab.data.shards import prepare_data
from distillab.errors import ConfigError
from distillab.models import model_directory
from distillab.signals.several import DocumentRouter, routed
from distillab.train import train

from conftest import tiny_run

QUIET = dict(log=lambda *a: None)
READERS = [(42, 32)]


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory, cache_dir) -> Path:
    folder = tmp_path_factory.mktemp("teacher-b")
    return train(config_from_dict(tiny_run(folder, cache_dir, "teacher-b", train={"init_seed": 7, "threads": 1})),
                 **QUIET).final_dir


@pytest.fixture(scope="module")
def student(tmp_path_factory, cache_dir, tiny_teacher):
    folder = tmp_path_factory.mktemp("signal-students")

    def make(name, **kd):
        return config_from_dict(tiny_run(folder, cache_dir, name, train={"threads": 1},
                                         kd={"teacher": str(tiny_teacher), "alpha": 0.5, **kd}))
    return make


def losses(run) -> list[float]:
    rows = [json.loads(line) for line in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "ce" in row]


def test_sampled_online_and_from_a_sampled_cache(student, tiny_teacher, tmp_path):
    online = train(student("sampled-online", samples=16), **QUIET)
    path = capture_teacher_cache(tiny_teacher, student("capture"), 16, out=tmp_path / "sampled", coding="sampled",
                                 threads=1, readers=READERS, **QUIET)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["coding"]["name"] == "sampled" and manifest["bytes_per_token"] < 40
    cached = train(student("sampled-cached", samples=16, cache=str(path)), **QUIET)
    full = train(student("full"), **QUIET)
    # the same draws per window online and cached (log-probs rounded to 1/128 nat: the logged value only)
    np.testing.assert_allclose(losses(cached), losses(online), rtol=2e-3)
    assert losses(online) != losses(full)
    with pytest.raises(ConfigError, match="kd.samples"):
        train(student("wrong-m", samples=8, cache=str(path)), **QUIET)
    with pytest.raises(ConfigError, match="not draws"):
        top = capture_teacher_cache(tiny_teacher, student("capture"), 4, out=tmp_path / "top", threads=1,
                                    readers=READERS, **QUIET)
        train(student("top-as-sampled", samples=16, cache=str(top)), **QUIET)


def test_a_mixture_or_routing_of_one_teacher_twice_is_that_teacher(student, tiny_teacher):
    single = losses(train(student("single"), **QUIET))
    twice = losses(train(student("twice", teachers=[str(tiny_teacher)], teacher_weights=[0.3, 0.7]), **QUIET))
    routed_twice = losses(train(student("routed-twice", teachers=[str(tiny_teacher)], teacher_mix="route"), **QUIET))
    np.testing.assert_allclose(twice, single, rtol=1e-5)
    np.testing.assert_allclose(routed_twice, single, rtol=1e-5)


def test_two_teachers_online_and_from_caches(student, tiny_teacher, second_teacher, tmp_path):
    """A two-teacher student runs online (mixture, route) and from caches (sampled mixture, routed top-K)."""
    two = dict(teachers=[str(second_teacher)], teacher_weights=[0.5, 0.5])
    mixture = train(student("mix-online", **two), **QUIET)
    assert mixture.completed and losses(mixture) != losses(train(student("one"), **QUIET))
    caches = [capture_teacher_cache(t, student("capture"), 16, out=tmp_path / f"s{i}", coding="sampled", threads=1,
                                    readers=READERS, **QUIET) for i, t in enumerate((tiny_teacher, second_teacher))]
    sampled_online = train(student("mix-sampled-online", samples=16, **two), **QUIET)
    sampled_cached = train(student("mix-sampled-cached", samples=16, cache=str(caches[0]), caches=[str(caches[1])],
                                   **two), **QUIET)
    np.testing.assert_allclose(losses(sampled_cached), losses(sampled_online), rtol=2e-3)
    tops = [capture_teacher_cache(t, student("capture"), 8, out=tmp_path / f"k{i}", threads=1, readers=READERS,
                                  coding="float32", **QUIET) for i, t in enumerate((tiny_teacher, second_teacher))]
    route_online = train(student("route-online", top_k=8, teacher_mix="route", **two), **QUIET)
    route_cached = train(student("route-cached", top_k=8, teacher_mix="route", cache=str(tops[0]),
                                 caches=[str(tops[1])], **two), **QUIET)
    np.testing.assert_allclose(losses(route_cached), losses(route_online), rtol=1e-5)
    summary = json.loads((Path(route_cached.run_dir) / "summary.json").read_text())
    assert "2 teachers, routed per document" in summary["objective_label"]
    with pytest.raises(ConfigError, match="mixture of top-K caches"):
        student("mix-top", top_k=8, cache=str(tops[0]), caches=[str(tops[1])], **two)


def test_the_router_gives_each_document_one_teacher(student):
    data = prepare_data(student("router").data, lambda *a: None)
    tokens, eos = np.asarray(data.tokens("train")), data.tokenizer.eos_token_id
    router = DocumentRouter(tokens, eos, 32, "concat", (0.5, 0.5))
    window_ids = torch.tensor([0, 3, 17, 40])
    batch = Batch(torch.zeros(4, 32, dtype=torch.long), torch.zeros(4, 32, dtype=torch.long), window_ids)
    documents = router.documents(batch)
    for row, w in enumerate(window_ids.tolist()):
        for t in range(32):  # the eos tokens up to and including the input position
            assert documents[row, t] == int((tokens[: w * 32 + t + 1] == eos).sum())
    route = router.route(batch)
    same_document = documents[:, 1:] == documents[:, :-1]
    assert (route[:, 1:] == route[:, :-1])[torch.from_numpy(same_document)].all()
    dense = [torch.zeros(4, 32, 5), torch.ones(4, 32, 5)]
    assert torch.equal(routed(dense, route)[..., 0], route.float())


def test_a_hub_teacher_at_a_revision_is_found_offline(tmp_path, tiny_teacher, monkeypatch):
    """The HF cache layout (models--org--name/refs/<revision> -> snapshots/<commit>/), written by hand
    as the hub client writes it: an intermediate checkpoint is named by its branch."""
    import shutil

    root = tmp_path / "hub" / "models--suite--tiny"
    for revision, commit in (("main", "a" * 40), ("step100", "b" * 40)):
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / revision).write_text(commit)
        shutil.copytree(tiny_teacher, root / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_directory("suite/tiny", revision="step100").name == "b" * 40
    assert model_directory("suite/tiny").name == "a" * 40
    with pytest.raises(ConfigError, match="step999"):
        model_directory("suite/tiny", revision="step999")


@pytest.mark.slow
def test_a_sweep_with_two_teachers_at_once_and_a_teacher_of_another_tokenizer(tmp_path, cache_dir):
    """Planned, run and reported: a mixture of the pool's two teachers, and an external teacher with its
    own tokenizer (ALM); results.csv and the report name each student's signal."""
    from distillab.report import write_report
    from distillab.sweep import load_grid, plan, run_sweep
    from test_sweep import grid_file

    other = train(config_from_dict(tiny_run(tmp_path, cache_dir, "other-tokenizer", train={"threads": 1},
                                            data={"tokenizer": {"vocab_size": 300}})), **QUIET).final_dir
    grid = load_grid(grid_file(
        tmp_path, cache_dir, teachers={"models": ["cpu-0.1m"], "tokens": [1024], "seeds": [42, 44],
                                       "members": [{"path": str(other), "model": "cpu-0.1m", "tokens": 1024,
                                                    "seed": 7}]},
        kd={"pairs": [{"model": "cpu-0.1m", "tokens": 1024, "seed": 42, "alpha": [0.5]},
                      {"model": "cpu-0.1m", "tokens": 1024, "seed": 44, "alpha": [0.5]},
                      {"model": "cpu-0.1m", "tokens": 1024, "seed": 7, "alpha": [0.5],
                       "objective": {"divergence": "alm"}}],
            "teacher_sets": [{"members": [{"model": "cpu-0.1m", "tokens": 1024, "seed": 42},
                                          {"model": "cpu-0.1m", "tokens": 1024, "seed": 44}],
                              "weights": [0.5, 0.5], "alpha": [0.5]}]}))
    runs = plan(grid, tmp_path / "sweep")
    group = [r for r in runs if r.config["kd"].get("teachers")]
    assert len(group) == 1 and len(group[0].depends_on) == 2
    assert set(run_sweep(grid, tmp_path / "sweep", workers=1, log=lambda *a: None).values()) == {"done"}
    report = write_report(tmp_path / "sweep").read_text()
    assert "## Teacher signals" in report and "2 teachers, mixture" in report and "own tokenizer (ALM)" in report
    import csv

    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    signals = {r["teacher_signal"] for r in rows if r["role"] == "student"}
    assert signals == {"online full", "online full of 2 teachers, mixed", "online own tokenizer (ALM)"}
