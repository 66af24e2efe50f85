"""Structure rules anyone can rerun, so the layering does not erode one convenient shortcut at a time:

- no module outside tests is over 400 lines (a file a reader can hold in mind);
- no code imports another module's private name (`from a import _b`) or reads one across modules (`x._b` where
  this file defines no `_b`): a private name may change with its module, and the reader of that module must be
  able to trust that nobody else depends on it (tests, which may look inside what they test, are not checked);
- no route function in server/api/routes/ is over 40 lines (translation and logic belong beside the routes).

Offenders that predate a rule are listed below with the issue that removes them; the lists may only shrink (a
listed offender that is fixed must leave its list, or the test fails).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("prompt_core", "prompt_store", "server", "training", "scripts")  # every first-party package but tests
MAX_MODULE_LINES = 400
MAX_ROUTE_LINES = 40
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}  # public despite the underscore

# "path: expression" of each private name read across modules today
PRIVATE_ALLOWED = {
    # the benchmark warms xgrammar's tokenizer info on its own; wants a public GrammarCache method (engine owner)
    "scripts/bench_outputs.py: engine.grammars._get_compiler",
}
# "path: function" of each route function over MAX_ROUTE_LINES today
LONG_ROUTES_ALLOWED: set[str] = set()


def code_files() -> list[Path]:
    return sorted(p for pkg in CODE for p in (ROOT / pkg).rglob("*.py"))


def rel(path: Path, root: Path = ROOT) -> str:
    return path.relative_to(root).as_posix()


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def chain_root(node: ast.expr) -> ast.expr:
    """`a` of `a.b.c` (or of `a(...).b`)."""
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def private_uses(path: Path, root: Path = ROOT) -> set[str]:
    """Another first-party module's private names that this file imports or reads, as "path: use"."""
    tree = ast.parse(path.read_text(), str(path))
    ours, libraries, defined, found = set(), set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            first_party = node.level > 0 or (node.module or "").split(".")[0] in (*CODE, "tests")
            for alias in node.names:
                if first_party and private(alias.name):
                    found.add(f"from {'.' * node.level}{node.module or ''} import {alias.name}")
                (ours if first_party else libraries).add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.asname or alias.name.split(".")[0]
                (ours if alias.name.split(".")[0] in CODE else libraries).add(name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and private(node.attr)) or node.attr in NAMEDTUPLE_API:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue  # its own attribute (a held object's, `self.runner._x`, is checked below)
        base = chain_root(node.value)
        if isinstance(base, ast.Name) and base.id in libraries - ours:
            continue  # a library's own private API (torch.ops.aten._int_mm): not a module of ours
        if isinstance(node.value, ast.Name) and node.value.id in ours:
            found.add(ast.unparse(node))  # a first-party module's private name
        elif node.attr not in defined:  # an object's private attribute that this file never defines
            found.add(ast.unparse(node))
    return {f"{rel(path, root)}: {use}" for use in found}


def is_route(d: ast.expr) -> bool:
    """`@router.get(...)`, `@router.post(...)`, ...: FastAPI's route decorators."""
    return isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and isinstance(d.func.value, ast.Name) \
        and d.func.value.id == "router"


def long_routes(path: Path, root: Path = ROOT) -> dict[str, int]:
    """Route functions over MAX_ROUTE_LINES, as "path: name", with their length from `def` to the end."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(map(is_route, node.decorator_list)):
            if (lines := node.end_lineno - node.lineno + 1) > MAX_ROUTE_LINES:
                out[f"{rel(path, root)}: {node.name}"] = lines
    return out


def test_no_module_outside_tests_is_over_400_lines():
    sizes = {rel(p): len(p.read_text().splitlines()) for p in code_files()}
    assert len(sizes) > 100, "the scan found the packages"
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_module_imports_or_reads_a_private_name_of_another():
    found = set().union(*(private_uses(p) for p in code_files()))
    assert found - PRIVATE_ALLOWED == set(), "new private names read across modules"
    assert PRIVATE_ALLOWED - found == set(), "fixed: remove these from PRIVATE_ALLOWED"


def test_no_route_function_is_over_40_lines():
    found = {}
    for path in sorted((ROOT / "server" / "api" / "routes").glob("*.py")):
        found |= long_routes(path)
    assert set(found) - LONG_ROUTES_ALLOWED == set(), found
    assert LONG_ROUTES_ALLOWED - set(found) == set(), "fixed: remove these from LONG_ROUTES_ALLOWED"


def test_the_scanners_find_what_they_look_for(tmp_path):
    """Both scanners on a probe: an import of a private name, reads through another object and another module, a
    library's private API and the file's own private attribute; a 41-line route and a 41-line helper."""
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nfrom server.engine import engine\nfrom .x import _hidden\n"
                     "class A:\n    def __init__(self):\n        self._mine = 1\n"
                     "    def f(self, a):\n        return a._mine, self.runner._stop, engine._helper, torch._C\n")
    assert private_uses(probe, tmp_path) == {"probe.py: from .x import _hidden", "probe.py: self.runner._stop",
                                             "probe.py: engine._helper"}
    body = "    x = 1\n" * 39 + "    return x\n"
    probe.write_text(f"@router.post('/a')\ndef route():\n{body}\ndef helper():\n{body}")
    assert long_routes(probe, tmp_path) == {"probe.py: route": 41}
