"""The shape of the code, read from the source (AST only, nothing is imported): model.py stays the architecture
alone and short; the packages import one way (experiments -> miniqwen, lora, data; lora -> miniqwen), without
cycles; experiments/ is short stage scripts on a library (experiments/lib) that never imports a stage."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("miniqwen", "lora", "data", "experiments")
#: Which of the other packages each one may import.
ALLOWED = {"miniqwen": set(), "data": set(), "lora": {"miniqwen"}, "experiments": {"miniqwen", "lora", "data"}}
MODEL = ROOT / "miniqwen" / "model.py"
MAX_MODEL_LINES = 320
#: a stage script (``python -m experiments.<stage>``) reads in one sitting, as a readable script does (nanochat's run
#: 300-600 lines); what two or more stages use is in experiments/lib
MAX_STAGE_LINES = 350
#: the training loop reads as named steps: no function of experiments/lib/training longer than this
MAX_TRAINING_FUNCTION_LINES = 60
STAGES = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem != "__init__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module in the packages (a package is its ``__init__``)."""
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of the packages that ``path`` (module ``name``) imports, anywhere in the file (a deferred
    import inside a function counts: it hides a cycle, it does not remove it). ``from pkg import x`` names the
    submodule ``pkg.x`` when there is one, else ``pkg`` itself."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports(name, path, known) if m != name} for name, path in known.items()}


def test_model_has_no_torch_ops():
    tree = ast.parse(MODEL.read_text())
    uses = [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "ops"
            and isinstance(node.value, ast.Name) and node.value.id == "torch"]
    uses += [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and (node.module or "").startswith("torch") and any(a.name == "ops" for a in node.names)]
    uses += [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Import)
             and any(a.name.startswith("torch.ops") for a in node.names)]
    assert not uses, f"miniqwen/model.py uses torch.ops on lines {uses}: kernels belong outside the model file"


def test_model_file_is_short():
    lines = MODEL.read_text().count("\n")  # what `wc -l` reports
    assert lines <= MAX_MODEL_LINES, f"miniqwen/model.py has {lines} lines (at most {MAX_MODEL_LINES})"


def test_packages_import_one_way():
    wrong = sorted((name, target) for name, targets in graph().items() for target in targets
                   if target.split(".")[0] != name.split(".")[0]
                   and target.split(".")[0] not in ALLOWED[name.split(".")[0]])
    assert not wrong, f"imports against experiments -> miniqwen <- lora, data alone: {wrong}"


def test_the_library_imports_no_stage():
    stages = {f"experiments.{s}" for s in STAGES}
    wrong = sorted((name, target) for name, targets in graph().items() if name.startswith("experiments.lib")
                   for target in targets if target in stages or target == "experiments")
    assert not wrong, f"experiments/lib imports stage scripts: {wrong}"


def test_stages_import_no_other_stage():
    stages = {f"experiments.{s}" for s in STAGES}
    wrong = sorted((name, target) for name, targets in graph().items() if name in stages
                   for target in targets if target in stages)
    assert not wrong, f"stage scripts import each other (move what they share into experiments/lib): {wrong}"


def test_the_training_loop_is_named_steps():
    long = {f"{path.name}:{node.name}": node.end_lineno - node.lineno + 1
            for path in sorted((ROOT / "experiments" / "lib" / "training").glob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_TRAINING_FUNCTION_LINES}
    assert not long, f"training functions over {MAX_TRAINING_FUNCTION_LINES} lines: {long}"


def test_stage_scripts_are_short():
    long = {s: n for s in STAGES if (n := (ROOT / "experiments" / f"{s}.py").read_text().count("\n")) > MAX_STAGE_LINES}
    assert not long, f"stage scripts over {MAX_STAGE_LINES} lines: {long}"


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Cycles met by a depth-first search (each as the list of modules around it, first = last); [] if none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once explored
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_import_graph_sees_the_imports():
    """The checks above are only as good as the graph: spot-check edges that exist."""
    edges = graph()
    assert {"miniqwen.attention", "miniqwen.config", "miniqwen.flop_count", "miniqwen.kv_cache"} <= edges["miniqwen.model"]
    assert "miniqwen.flop_count" in edges["lora.layers"]
    assert "miniqwen.model" in edges["miniqwen"] and "data.chunks" in edges["data"]
    assert {"experiments.lib.cli", "experiments.lib.runs", "experiments.lib.session"} <= edges["experiments.final"]
    assert "experiments.lib.training.loop" in edges["experiments.lib.training"]
    assert "baseline" in STAGES and "report" in STAGES and "lib" not in STAGES
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


#: the deepest chain of imports inside experiments/ (a stage included), counted in modules: a reader following one
#: stage down to its leaves meets at most this many floors (issue 34's target)
MAX_IMPORT_CHAIN = 7


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    """The longest path of ``edges`` (an acyclic graph), as the list of its nodes."""
    memo: dict[str, list[str]] = {}

    def down(node: str) -> list[str]:
        if node not in memo:
            memo[node] = [node] + max((down(t) for t in sorted(edges.get(node, ()))), key=len, default=[])
        return memo[node]

    return max((down(n) for n in sorted(edges)), key=len, default=[])


def test_the_experiments_import_chain_is_short():
    inside = {name: {t for t in targets if t.startswith("experiments")}
              for name, targets in graph().items() if name.startswith("experiments")}
    chain = longest_chain(inside)
    assert len(chain) <= MAX_IMPORT_CHAIN, f"import chain of {len(chain)} modules: {' -> '.join(chain)}"
    assert longest_chain({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == ["a", "b", "c"]


def test_the_readme_layout_names_every_library_module():
    """A reader finds where a thing lives from the README's layout section: it names every module of
    experiments/lib (a subpackage by its folder)."""
    readme = (ROOT / "README.md").read_text()
    lib = ROOT / "experiments" / "lib"
    names = [p.name for p in lib.glob("*.py") if p.name != "__init__.py"] + [f"{p.name}/" for p in lib.iterdir()
                                                                             if (p / "__init__.py").is_file()]
    missing = sorted(n for n in names if n not in readme)
    assert not missing, f"README.md's layout does not name {missing}"
