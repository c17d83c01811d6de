"""The layout's measures of experiments/ (issue 34's targets), read from the source (AST only; nothing is
imported or run).

    python scripts/layout_metrics.py [--stage experiments.lora_default] [--verbose]

Prints: the lines of experiments/ (as ``wc -l`` counts them) and how many are docstrings, comments and blank lines;
files over 450 lines; the longest import chain inside experiments/ (a stage included, deferred imports counted, as
tests/test_layout.py draws the graph); the functions that take a ``session`` and how often they reach into it; and,
for one stage, the lines to read along its call path — the functions and classes of experiments/ reached by
static calls from its ``main`` (names resolved through each module's imports; a class counts whole; calls into
miniqwen, lora and data are not followed) — with the classes among them.
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_layout import graph, longest_chain, modules  # noqa: E402

MAX_FILE_LINES = 450


def line_counts(files: list[Path]) -> dict[str, int]:
    total = docs = comments = blank = 0
    for path in files:
        src = path.read_text()
        total += src.count("\n")
        blank += sum(1 for line in src.splitlines() if not line.strip())
        comments += sum(1 for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT)
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and ast.get_docstring(node):
                docs += node.body[0].end_lineno - node.body[0].lineno + 1
    return {"lines": total, "docstring": docs, "comment": comments, "blank": blank}


def session_takers(files: list[Path]) -> tuple[int, int]:
    """(functions with a ``session`` parameter, attribute reads on it inside them)."""
    count = reads = 0
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "session" in [
                    a.arg for a in node.args.args + node.args.kwonlyargs]:
                count += 1
                reads += sum(1 for n in ast.walk(node) if isinstance(n, ast.Attribute)
                             and isinstance(n.value, ast.Name) and n.value.id == "session")
    return count, reads


class CallPath:
    """The functions and classes of experiments/ reached by static calls from ``start`` = (module, name)."""

    def __init__(self):
        self.known = {m: p for m, p in modules().items() if m.startswith("experiments")}
        self.trees = {m: ast.parse(p.read_text()) for m, p in self.known.items()}

    @lru_cache(None)
    def defs(self, module: str) -> dict[str, ast.AST]:
        return {n.name: n for n in self.trees[module].body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}

    @lru_cache(None)
    def imports(self, module: str) -> dict[str, tuple[str, str | None]]:
        package = module if self.known[module].name == "__init__.py" else module.rpartition(".")[0]
        out = {}
        for node in ast.walk(self.trees[module]):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                for alias in node.names:
                    if f"{target}.{alias.name}" in self.trees:
                        out[alias.asname or alias.name] = (f"{target}.{alias.name}", None)
                    elif target in self.trees:
                        out[alias.asname or alias.name] = (target, alias.name)
        return out

    def resolve(self, module: str, name: str, depth: int = 0):
        if name in self.defs(module):
            return module, name
        target = self.imports(module).get(name)
        if target is None or target[1] is None or depth > 5:
            return target
        return self.resolve(target[0], target[1], depth + 1)

    def walk(self, start: tuple[str, str]) -> list[tuple[str, str, ast.AST]]:
        todo, reached = [start], {}
        while todo:
            module, name = todo.pop()
            node = self.defs(module).get(name) if module in self.trees else None
            if node is None or (module, name) in reached:
                continue
            reached[(module, name)] = node
            for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
                f, target = call.func, None
                if isinstance(f, ast.Name):
                    target = self.resolve(module, f.id)
                elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                    owner = self.resolve(module, f.value.id)
                    target = self.resolve(owner[0], f.attr) if owner and owner[1] is None else owner
                callbacks = [self.resolve(module, a.id) for a in call.args if isinstance(a, ast.Name)]
                todo += [t for t in [target, *callbacks] if t and t[1]]
        return [(m, n, node) for (m, n), node in sorted(reached.items())]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default="experiments.lora_default")
    p.add_argument("--verbose", action="store_true", help="list every function and class on the call path")
    a = p.parse_args()
    files = sorted((ROOT / "experiments").rglob("*.py"))
    counts = line_counts(files)
    print(f"experiments/: {counts['lines']} lines ({counts['docstring']} docstring, {counts['comment']} comment, "
          f"{counts['blank']} blank)")
    long = {str(f.relative_to(ROOT)): n for f in files if (n := f.read_text().count("\n")) > MAX_FILE_LINES}
    print(f"files over {MAX_FILE_LINES} lines: {long or 'none'}")
    inside = {m: {t for t in ts if t.startswith("experiments")} for m, ts in graph().items()
              if m.startswith("experiments")}
    chain = longest_chain(inside)
    print(f"longest import chain: {len(chain)} modules ({' -> '.join(chain)}); "
          f"{sum(len(t) for t in inside.values())} import arrows")
    print("functions taking a session: {} ({} reads of it)".format(*session_takers(files)))
    reached = CallPath().walk((a.stage, "main"))
    size = {(m, n): node.end_lineno - (node.decorator_list[0].lineno if node.decorator_list else node.lineno) + 1
            for m, n, node in reached}
    classes = [f"{m.rpartition('.')[2]}.{n}" for m, n, node in reached if isinstance(node, ast.ClassDef)]
    print(f"{a.stage} call path: {len(reached)} functions and classes in {len({m for m, _, _ in reached})} files, "
          f"{sum(size.values())} lines; {len(classes)} classes: {', '.join(classes)}")
    if a.verbose:
        for (m, n), lines in sorted(size.items(), key=lambda kv: -kv[1]):
            print(f"  {lines:5d}  {m}.{n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
