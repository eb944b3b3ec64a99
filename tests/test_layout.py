"""The package's shape: small modules with one job each, and an import graph without a circle (a circle makes the
import order matter, and an import inside a function is how one hides; both count here)."""

import ast
from pathlib import Path


PACKAGE_ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
MAX_TRAINER_LINES = 700  # GRPOTrainer's overrides live in one class, as TRL's own trainers do; the rest in mixins
LONGER_ALLOWED = {"pbsd_trl.trainer"}
MAX_FUNCTION_LINES = 80
# Functions over the limit, each to be split; the set may only shrink
LONG_FUNCTIONS_TO_SPLIT: set[str] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((PACKAGE_ROOT / "pbsd_trl").rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """Every pbsd_trl module `name` imports, at module level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for dependency in sorted(graph[module]):
            if state.get(dependency) == "open":
                return stack[stack.index(dependency) :] + [dependency]
            if dependency not in state and (circle := visit(dependency)):
                return circle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module)):
            return circle
    return None


def test_the_circle_finder_finds_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_no_circle():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    assert graph["pbsd_trl.trainer"], "the import scan found nothing: it is broken"
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_modules_stay_small():
    lengths = {
        name: len(path.read_text().splitlines()) for name, path in MODULES.items() if name not in LONGER_ALLOWED
    }
    assert len(lengths) > 40, "the module scan found too few modules: it is broken"
    too_long = {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"split these by job: {too_long}"


def test_the_trainer_stays_readable():
    lines = len(MODULES["pbsd_trl.trainer"].read_text().splitlines())
    assert lines <= MAX_TRAINER_LINES, f"pbsd_trl/trainer.py has {lines} lines: move a job into a mixin of its own"


def test_functions_stay_short():
    lengths = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert len(lengths) > 300, "the function scan found too few functions: it is broken"
    too_long = {f: n for f, n in lengths.items() if n > MAX_FUNCTION_LINES and f not in LONG_FUNCTIONS_TO_SPLIT}
    assert not too_long, f"split these (over {MAX_FUNCTION_LINES} lines): {too_long}"
    split_already = {f for f in LONG_FUNCTIONS_TO_SPLIT if lengths.get(f, 0) <= MAX_FUNCTION_LINES}
    assert not split_already, f"take these off LONG_FUNCTIONS_TO_SPLIT: {split_already}"


def test_the_core_does_not_import_the_demo_kit():
    """`pbsd_trl.recipes` (tasks, tiny models, evaluation, reports) is for the examples, tests and benchmarks: the
    trainer and everything it imports must work without it. Only the command lines under `scripts/` may use it."""
    recipes = {name for name in MODULES if name.startswith("pbsd_trl.recipes")}
    assert "pbsd_trl.recipes.tiny.shipped" in recipes, "the module scan missed the demo kit: it is broken"
    core = {name for name in MODULES if name not in recipes and not name.startswith("pbsd_trl.scripts")}
    uses = {name: imported_modules(name, MODULES[name]) & recipes for name in core}
    assert not {name: found for name, found in uses.items() if found}, "the core imports the demo kit"


BENCHMARKS = PACKAGE_ROOT / "benchmarks"
# A script may import its own report module; everything else the scripts share comes from the harness
BENCHMARK_IMPORTS_ALLOWED = {"learning_tuned": {"learning_tuned_report"}}


def benchmark_imports(path: Path, local: set[str]) -> set[str]:
    """The modules of `benchmarks/` (scripts and harness modules) that `path` imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return {module for module in found if module.split(".")[0] in local}


def test_benchmark_scripts_share_the_harness_and_not_each_other():
    scripts = {p.stem: p for p in BENCHMARKS.glob("*.py")}
    local = set(scripts) | {"harness"}
    assert {"learning_tuned", "step_cost", "learning"} <= set(scripts), "the benchmark scan is broken"
    for name, path in scripts.items():
        imported = benchmark_imports(path, local)
        others = {m for m in imported if m.split(".")[0] != "harness"} - BENCHMARK_IMPORTS_ALLOWED.get(name, set())
        assert not others, (
            f"benchmarks/{name}.py imports {sorted(others)}: move what it needs into benchmarks/harness/"
        )
        assert any(m.startswith("harness") for m in imported), f"benchmarks/{name}.py does not use the harness"
    for path in (BENCHMARKS / "harness").glob("*.py"):
        scripts_used = {m for m in benchmark_imports(path, local) if m.split(".")[0] != "harness"}
        assert not scripts_used, f"benchmarks/harness/{path.name} imports the scripts {sorted(scripts_used)}"
