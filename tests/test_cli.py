"""The command line as a whole: every verb's --help, one meaning per flag, old spellings refused,
and the exit codes docs/reliability.md documents."""

import argparse
import re
from pathlib import Path

import pytest

from distillab.cli import Renamed, build_parser, main
from distillab.shipped import SHIPPED, find
from distillab.sweep.grid import DEVICE_PEAK_FLOPS

ROOT = Path(__file__).resolve().parents[1]

# Every flag that more than one verb has, with the one thing it means: its help must say so
# (a pattern), and an `extra` check on the action where the spelling matters. A flag a second
# verb takes up must be added here, with the meaning it already has.
MEANINGS = {
    "--set": ("a KEY=VALUE override of the config / grid", r"^override a (config|grid) value by its dotted key",
              lambda a: a.metavar == "KEY=VALUE" and a.dest == "overrides" and isinstance(a, argparse._AppendAction)),
    "--sets": ("evaluation sets", r"evaluation set", lambda a: a.metavar == "SET"),
    "--device": ("the device the command runs on", r"^the device this command runs on", lambda a: a.default == "auto"),
    "--threads": ("CPU threads", r"^CPU threads", lambda a: a.type is int),
    "--batch-size": ("items per forward pass / step", r"(per forward pass|per step)", lambda a: a.type is int),
    "--seq-len": ("a length in tokens", r"(length|sequence)", lambda a: a.type is int),
    "--max-windows": ("windows per set", r"windows", lambda a: a.type is int),
    "--vocab-size": ("vocabulary size", r"^vocabulary size", lambda a: a.type is int),
    "--out": ("where the command writes", r"(directory|file|here)", lambda a: a.dest == "out"),
    "--json": ("print JSON", r"JSON", lambda a: isinstance(a, argparse._StoreTrueAction)),
    "--dry-run": ("run nothing, print the plan", r"(run|train) nothing", lambda a: isinstance(a, argparse._StoreTrueAction)),
    "--gpu": ("the GPU a memory plan is checked against", r"GPU's memory", lambda a: a.choices),
    "--stop-after": ("checkpoint and stop after N steps", r"^checkpoint and stop", lambda a: a.type is int),
    "--workers": ("runs at once", r"^runs (at once|side by side)", lambda a: a.type is int),
    "--teacher": ("the teacher model", r"teacher", lambda a: True),
    "--model": ("the model(s) worked on", r"(rung|checkpoint)", lambda a: True),
    "--help": ("help", r"^show this help", lambda a: True),
}

OLD_SPELLINGS = [  # (arguments, what the one-line error must name)
    (["analyze", "--model", "a=x", "--out", "o", "--set", "wikitext103"], "--sets"),
    (["eval", "--checkpoint", "x", "--set", "validation"], "--sets"),
    (["sweep", "examples/grid_small", "--dry-run", "--device", "h100"], "--estimate-for"),
    (["teacher", "cache", "--teacher", "t", "--data", "run.yaml", "--top-k", "4"], "positional"),
]


def parsers(parser: argparse.ArgumentParser, path: tuple = ()):
    """(verb path, parser) of the program and every verb and sub-verb."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, path + (name,))


def visible_flags(parser):
    return [(flag, a) for a in parser._actions if a.help != argparse.SUPPRESS for flag in a.option_strings
            if flag.startswith("--")]


ALL = list(parsers(build_parser()))


def test_the_walk_reaches_every_verb():
    verbs = {" ".join(path) for path, _ in ALL}
    assert {"data prepare", "data list", "teacher cache", "train", "sft", "eval", "analyze", "models", "bench",
            "sweep", "report", "plan", "demo"} <= verbs


@pytest.mark.parametrize("path", [path for path, _ in ALL], ids=lambda p: " ".join(p) or "distillab")
def test_every_help_renders_through_main(path, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*path, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: distillab") and "--help" in out


def test_each_flag_means_one_thing_across_verbs():
    seen: dict[str, list[str]] = {}
    for path, parser in ALL:
        for flag, action in visible_flags(parser):
            seen.setdefault(flag, []).append(" ".join(path))
            assert action.help, f"{' '.join(path)} {flag}: no help text"
            if flag in MEANINGS:
                meaning, pattern, extra = MEANINGS[flag]
                where = f"{' '.join(path)} {flag} should mean {meaning!r}"
                assert re.search(pattern, action.help), f"{where}; its help: {action.help!r}"
                assert extra(action), where
    shared = {flag for flag, verbs in seen.items() if len(verbs) > 1}
    assert shared <= set(MEANINGS), f"flags of several verbs without a meaning in MEANINGS: {shared - set(MEANINGS)}"
    assert set(MEANINGS) <= set(seen)  # no stale entries


def test_positionals_are_named_alike():
    """A run config is the first positional wherever a verb takes one (train, sft, data prepare,
    teacher cache), a grid the first of sweep and plan."""
    for path, parser in ALL:
        positionals = [a.dest for a in parser._actions if not a.option_strings
                       and not isinstance(a, argparse._SubParsersAction)]
        if any(a.dest == "overrides" for a in parser._actions):
            assert positionals[:1] in (["config"], ["grid"]), path


def test_help_names_only_config_files_that_exist():
    """Every configs/... path and every shipped name (examples/X, paper/X) a help text names resolves."""
    names = set()
    for path, parser in ALL:
        text = parser.format_help()
        names |= set(re.findall(r"configs/[\w./-]+\.(?:yaml|jinja)", text))
        names |= set(re.findall(r"\b(?:examples|paper)/[\w/-]+\b", text))
    assert {"examples/teacher", "examples/grid_small", "paper/exp1"} <= names
    for name in names:
        assert find(name) is not None and Path(find(name)).is_relative_to(SHIPPED), name


def test_the_estimate_hardware_listed_in_help_is_the_one_known():
    sweep = dict(ALL)[("sweep",)]
    action, = [a for a in sweep._actions if "--estimate-for" in a.option_strings]
    listed = set(re.findall(r"[\w-]+", action.help.split("--mfu:")[1].split("(default")[0]))
    assert listed == set(DEVICE_PEAK_FLOPS)


@pytest.mark.parametrize("argv, new", OLD_SPELLINGS, ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]))
def test_an_old_spelling_is_one_line_naming_the_new(argv, new, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and err.startswith("distillab: error:") and new in err
    renamed = [a for _, p in ALL for a in p._actions if isinstance(a, Renamed)]
    assert len(renamed) == len(OLD_SPELLINGS)


def test_no_flag_is_abbreviated(capsys):
    """`--set` never silently stands for `--sets` (nor `--dry` for `--dry-run`)."""
    with pytest.raises(SystemExit) as exit:
        main(["sweep", "examples/grid_small", "--dry"])
    assert exit.value.code == 2 and "unrecognized arguments: --dry" in capsys.readouterr().err


def test_exit_codes_are_the_documented_ones(tmp_path, capsys):
    """docs/reliability.md: 2 for a usage error and for a config error (one line); 0 when done."""
    assert "| 2 | an error in one line" in (ROOT / "docs" / "reliability.md").read_text()
    with pytest.raises(SystemExit) as usage:
        main(["train"])  # the config is missing
    assert usage.value.code == 2 and "required: config" in capsys.readouterr().err
    assert main(["train", "examples/teacher", "--set", "kd.alpha=1.5", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == "distillab: error: config error: kd.alpha: must be in [0, 1], got 1.5\n"
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["sweep", "examples/grid_small", "--dry-run", "--estimate-for", "h100",
                 "--out", str(tmp_path / "s")]) == 0


def test_sweep_set_overrides_grid_keys(tmp_path, capsys):
    """`sweep --set` changes the grid: one alpha instead of two halves the students."""
    def planned(*extra):
        assert main(["sweep", "examples/grid_small", "--dry-run", "--out", str(tmp_path / "s"), *extra]) == 0
        return re.search(r"(\d+) runs \((\d+) teachers, (\d+) baselines, (\d+) students\)", capsys.readouterr().out)

    both, one = planned(), planned("--set", "kd.alpha=[0.5]")
    assert both.group(2, 3) == one.group(2, 3) and int(both.group(4)) == 2 * int(one.group(4))
    assert main(["sweep", "examples/grid_small", "--dry-run", "--set", "kd.nonsense=1"]) == 2
    assert "kd.nonsense" in capsys.readouterr().err
