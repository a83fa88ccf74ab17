"""The package's shape, read from its source: module-level imports form no cycle, no module imports
another's private name, the teacher cache does not reach back up to the teacher signals, and
the names of run and sweep files are spelled in `distillab.layout` only."""

import ast
import re
from pathlib import Path

SRC = Path(__file__).parent.parent / "src"
PACKAGE = SRC / "distillab"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def top_level_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import executed when the module is imported (not those
    inside functions or under `if TYPE_CHECKING`)."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def edges() -> dict[str, set[str]]:
    """module -> the distillab modules it imports at module level (a package's __init__ runs first)."""
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, names in top_level_imports(path):
            if not module.startswith("distillab"):
                continue
            targets = {f"{module}.{n}" if f"{module}.{n}" in MODULES else module for n in names} or {module}
            for target in targets:
                parts = target.split(".")
                graph[name] |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & set(MODULES) - ancestors(name)
    return graph


def ancestors(name: str) -> set[str]:
    """The module and the packages it is inside (their __init__ is already running when it runs)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_module_level_imports_form_no_cycle():
    graph = edges()
    assert graph["distillab.config"] >= {"distillab.errors", "distillab.losses.objective"}  # the walk sees imports
    assert not cycles(graph)


def test_no_private_name_is_imported_across_modules():
    offenders = [f"{name}: {module}.{n}" for name, path in MODULES.items() for module, names in top_level_imports(path)
                 for n in names if module.startswith("distillab") and n.startswith("_") and n != "__version__"]
    assert not offenders, offenders


def test_the_teacher_cache_does_not_import_the_teacher_signals():
    for name, path in MODULES.items():
        if name.startswith("distillab.cache"):
            assert "distillab.teacher" not in edges()[name], name


def test_run_and_sweep_file_names_are_spelled_in_the_layout_only():
    files = ("final|runs|checkpoints|tensorboard|submitit|status.json|summary.json|config.yaml|metrics.jsonl|"
             "eval.json|worker.log|launch.yaml|plan.json|demo_state.json|demo.json|report.md|report.html|"
             "results.csv|results.parquet|manifest.json").replace(".", r"\.")
    joined = re.compile(rf"""(/\s*|Path\(\s*)["']({files})["']""")
    step = re.compile(r"""f["']step_\{""")
    homes = {"distillab.layout": "runs and sweeps", "distillab.artefact": "manifest.json",
             "distillab.data.packing": "a packing plan's own plan.json"}
    offenders = [f"{name}: {m.group(0)}" for name, path in MODULES.items() if name not in homes
                 for pattern in (joined, step) for m in pattern.finditer(path.read_text())]
    assert not offenders, offenders
