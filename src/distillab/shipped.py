"""The configs shipped with distillab (the examples and the paper's presets), found by name.

They live in the repository's `configs/`; `src/distillab/configs` links to it, so a source
checkout and an installed wheel (where they are package data) read the same files. A config
argument (`distillab train`, `sft`, `data prepare`, `teacher cache`, `sweep`, `plan`) is

    a file that exists            run.yaml, ../grids/mine.yaml       (always wins)
    a shipped config by name      examples/teacher, paper/exp1       (no suffix: NAME.yaml)
    a repository path             configs/examples/teacher.yaml      (works from any directory)

Invariant: a path that exists is never shadowed by a shipped config; a name that resolves
nowhere is a one-line ConfigError naming every place looked and the shipped names.
"""

from __future__ import annotations

import os
from pathlib import Path

from distillab.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent / "configs"
REPOSITORY_PREFIX = "configs/"  # how the README and docs spell a shipped config's path


def candidates(name: str) -> list[Path]:
    """Where a config argument that is not an existing file may be found among the shipped ones."""
    text = name.replace(os.sep, "/")
    if text.startswith(REPOSITORY_PREFIX):
        return [SHIPPED / text[len(REPOSITORY_PREFIX):]]
    if not Path(text).suffix and not Path(text).is_absolute():
        return [SHIPPED / f"{text}.yaml"]
    return []


def find(name: str | Path) -> Path | None:
    """The file `name` refers to (see the module docstring), or None."""
    given = Path(os.path.expanduser(str(name)))
    if given.is_file():
        return given
    return next((path for path in candidates(str(name)) if path.is_file()), None)


def shipped_names() -> list[str]:
    """Every shipped YAML by the name that selects it, e.g. `examples/teacher`."""
    return sorted(str(p.relative_to(SHIPPED).with_suffix("")) for p in SHIPPED.rglob("*.yaml"))


def locate(name: str | Path, what: str = "config") -> Path:
    """The file `name` refers to, or a one-line ConfigError saying where it looked."""
    found = find(name)
    if found is not None:
        return found
    looked = [str(Path(os.path.expanduser(str(name))).absolute())] + [str(p) for p in candidates(str(name))]
    raise ConfigError(str(name), f"{what} file not found (looked in {', '.join(looked)}); shipped configs, "
                                 f"usable by name: {', '.join(shipped_names())}")
