"""Imports point down: every module of ``w2wkit/`` and ``cli/`` against one layer table.

The table (:data:`LAYERS`) is the README's "What is where" table (a test compares them). A
module may import modules of its own layer or of a lower one, and no two modules may import
each other, directly or through others (no cycle). The evaluation/world wing still breaks
both rules in places that other steps of issue 19 remove; each such import is listed in
:data:`KNOWN` with its reason. The test fails on a violation that is not listed *and* on a
listed one that no longer occurs, so the list only shrinks. The core (layers 0-4) and the
CLI have none.

What counts as an import
------------------------
Every ``import`` and ``from ... import`` statement anywhere in a module, parsed with
:mod:`ast` (nothing is imported): at the top, inside functions (lazy imports) and under
``if TYPE_CHECKING:``. Besides:

- ``from P import name`` where ``P``'s ``__init__`` re-exports ``name`` lazily through a
  ``_LAZY`` table (``from w2wkit import WeightSpace``) is an import of the module that
  defines it (``w2wkit.space``); ``from w2wkit import __version__`` is one of the root
  package, layer 0, which imports nothing when it loads.
- Importing ``a.b.c`` first runs the ``__init__`` of the package ``a.b`` (unless the
  importer lives in it), so that counts as an import of ``a.b`` too.
- ``TYPE_CHECKING`` imports count for the direction rule (a lower layer does not even name
  a higher layer's types) but not for the cycle rule: they never run, so a type-only back
  reference (``persist`` annotating ``WeightSpace`` while ``space`` imports ``persist``)
  cannot form an import cycle.
- Imports by a computed name (entry points: third-party formats and concept packs) are not
  seen. The built-in formats are an explicit list (``w2wkit.formats._builtin``), so the
  registry's imports of them are.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> the package it is installed as.
SOURCES = {"w2wkit": "w2wkit", "cli": "w2wkit.cli"}

#: Layer of each module; a package entry covers its submodules unless they have their own.
LAYERS: dict[str, int] = {
    # 0 - foundations: version, errors, strict JSON, atomic output, progress bar, device resolver
    "w2wkit": 0,
    "w2wkit.errors": 0,
    "w2wkit.jsonio": 0,
    "w2wkit.atomic": 0,
    "w2wkit.progress": 0,
    "w2wkit.devices": 0,
    "w2wkit.cluster": 0,
    # 1 - LoRA files <-> canonical Adapter
    "w2wkit.adapter": 1,
    "w2wkit.stio": 1,
    "w2wkit.names": 1,
    "w2wkit.pickles": 1,
    "w2wkit.formats": 1,
    # 2 - layout, collections, attribute labels
    "w2wkit.layout": 2,
    "w2wkit.collection": 2,
    "w2wkit.labels": 2,
    # 3 - the space: solvers, its saved file, named directions and edits, the w2w importer
    "w2wkit.solvers": 3,
    "w2wkit.floor": 3,
    "w2wkit.edits": 3,
    "w2wkit.persist": 3,
    "w2wkit.space": 3,
    "w2wkit.clusterfit": 3,
    "w2wkit.importers": 3,
    # 4 - learning directions (probes, disentanglement); synthetic collections
    "w2wkit.directions": 4,
    "w2wkit.probes": 4,
    "w2wkit.synthetic": 4,
    # 5 - concept packs
    "w2wkit.concepts": 5,
    # 6 - diffusion engine (pipelines, LoRA bank, sampler, DreamBooth loop); renderer, inversion
    "w2wkit.diffusion": 6,
    "w2wkit.render": 6,
    "w2wkit.invert": 6,
    "w2wkit.training": 6,
    "w2wkit.train_cluster": 6,
    # 7 - the miniature world (never imports the evaluation); tiny test pipelines
    "w2wkit.world": 7,
    "w2wkit.testing": 7,
    # 8 - evaluation, baselines, report, demo; calibrated strengths; the web app
    "w2wkit.evaluation": 8,
    "w2wkit.baselines": 8,
    "w2wkit.report": 8,
    "w2wkit.demo": 8,
    "w2wkit.calibrate": 8,
    "w2wkit.ui": 8,
    # 9 - command line
    "w2wkit.cli": 9,
}
#: The core: layers up to this one, and the CLI, have no entry in KNOWN.
CORE_TOP = 4
CLI = LAYERS["w2wkit.cli"]

#: Violations still to remove, (importer, imported) -> why it is there (none are left).
KNOWN: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the sources."""
    out = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def layer(module: str) -> int:
    """The layer of ``module``: its own entry, else its closest package's."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(module)


def _lazy_table(module: str) -> dict[str, str]:
    """A package's ``_LAZY`` re-exports (name -> defining module), empty when it has none."""
    for node in TREES[module].body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            return dict(ast.literal_eval(node.value))
    return {}


LAZY = {m: _lazy_table(m) for m in MODULES if MODULES[m].name == "__init__.py"}


def _known_prefix(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.AST, type_only: bool = False):
    """Every import statement under ``tree``, with whether it sits under TYPE_CHECKING."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, type_only
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _statements(ast.Module(body=[stmt], type_ignores=[]), True)
            for stmt in child.orelse:
                yield from _statements(ast.Module(body=[stmt], type_ignores=[]), type_only)
        else:
            yield from _statements(child, type_only)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules of the sources an import statement in ``module`` names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return [m for m in map(_known_prefix, names) if m]
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    out = []
    for alias in node.names:
        if f"{base}.{alias.name}" in MODULES:
            out.append(f"{base}.{alias.name}")
        elif alias.name in LAZY.get(base, {}):
            out.append(LAZY[base][alias.name])
        elif (found := _known_prefix(base)) is not None:
            out.append(found)
    return out


def _imports(module: str, tree: ast.AST):
    """``(imported module, line, type-only)`` for every import under ``tree`` in ``module``."""
    for node, type_only in _statements(tree):
        for target in _targets(module, node):
            # importing a.b.c runs the __init__ of every package above it first
            parts = target.split(".")
            for n in range(1, len(parts) + 1):
                imported = ".".join(parts[:n])
                if imported == module or module.startswith(imported + "."):
                    continue  # itself, or a package it lives in (already loaded)
                if imported in MODULES:
                    yield imported, node.lineno, type_only


def _edges() -> dict[tuple[str, str], tuple[int, bool]]:
    """(importer, imported) -> (first line, whether every such import is type-only)."""
    edges: dict[tuple[str, str], tuple[int, bool]] = {}
    for module, tree in TREES.items():
        for imported, lineno, type_only in _imports(module, tree):
            line, only = edges.get((module, imported), (lineno, True))
            edges[(module, imported)] = (min(line, lineno), only and type_only)
    return edges


EDGES = _edges()


def _cycle_edges(edges) -> set[tuple[str, str]]:
    """The run-time imports that lie on an import cycle (both ends in one strong component)."""
    graph = defaultdict(list)
    for (a, b), (_, type_only) in edges.items():
        if not type_only:
            graph[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    component: dict[str, int] = {}

    def visit(v: str) -> None:  # Tarjan; the graph is small enough to recurse
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
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component[w] = index[v]
                if w == v:
                    break

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return {
        (a, b)
        for (a, b), (_, type_only) in edges.items()
        if not type_only and component[a] == component[b]
    }


def _violations(edges) -> dict[tuple[str, str], str]:
    """(importer, imported) -> what is wrong with it."""
    out = {}
    for (a, b), (line, type_only) in edges.items():
        if layer(b) > layer(a):
            kind = "type-only import" if type_only else "import"
            out[(a, b)] = f"{kind} from a higher layer ({layer(a)} -> {layer(b)}), line {line}"
    for a, b in _cycle_edges(edges):
        what = out.get((a, b), f"line {edges[(a, b)][0]}")
        out[(a, b)] = f"on an import cycle; {what}"
    return out


def _fmt(items) -> str:
    return "\n".join(f"  {a} -> {b}: {why}" for (a, b), why in sorted(items))


def test_every_module_has_a_layer_and_every_entry_a_module():
    missing = [m for m in MODULES if not any(m == k or m.startswith(k + ".") for k in LAYERS)]
    assert not missing, f"modules without a layer in LAYERS: {missing}"
    stale = [k for k in LAYERS if k not in MODULES]
    assert not stale, f"LAYERS entries naming no module: {stale}"


def test_imports_point_down_and_form_no_cycle():
    found = _violations(EDGES)
    new = {k: v for k, v in found.items() if k not in KNOWN}
    assert not new, "imports from a higher layer or on a cycle:\n" + _fmt(new.items())


def test_known_violations_only_shrink():
    found = _violations(EDGES)
    gone = {k: v for k, v in KNOWN.items() if k not in found}
    assert not gone, "KNOWN entries that no longer occur (delete them):\n" + _fmt(gone.items())


def test_the_core_and_the_cli_have_no_known_violations():
    core = {
        k: v for k, v in KNOWN.items() if layer(k[0]) <= CORE_TOP or k[0].startswith("w2wkit.cli")
    }
    assert not core, "the core must stay free of violations:\n" + _fmt(core.items())


@pytest.mark.parametrize(
    ("importer", "source", "imported", "at_run_time"),
    [
        # a lazy (function-level) import and a lazy package re-export are seen
        (
            "w2wkit.space",
            "def f():\n    from w2wkit import Collection\n",
            "w2wkit.collection",
            True,
        ),
        # importing a submodule runs its package's __init__
        ("w2wkit.space", "import w2wkit.formats.kohya\n", "w2wkit.formats", True),
        # a TYPE_CHECKING import is an edge, but not a run-time one
        (
            "w2wkit.persist",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .space import X\n",
            "w2wkit.space",
            False,
        ),
    ],
)
def test_the_parser_sees_lazy_relative_and_type_only_imports(
    importer, source, imported, at_run_time
):
    seen = {m: t for m, _, t in _imports(importer, ast.parse(source))}
    assert imported in seen
    assert seen[imported] is (not at_run_time)


def test_a_new_upward_import_or_cycle_is_caught():
    # the circle this test was written against: the space saving through persist, which
    # imported the space back at call time, and the space editing through directions
    edges = dict(EDGES)
    edges[("w2wkit.persist", "w2wkit.space")] = (1, False)
    edges[("w2wkit.space", "w2wkit.directions")] = (2, False)
    found = _violations(edges)
    assert "cycle" in found[("w2wkit.persist", "w2wkit.space")]
    assert "higher layer (3 -> 4)" in found[("w2wkit.space", "w2wkit.directions")]


def _readme_layers() -> dict[str, int]:
    """The README's "What is where" table as module -> layer."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## What is where", 1)[1].split("\n## ", 1)[0]
    out = {}
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].isdigit():
            continue
        for token in re.findall(r"`([^`]+)`", cells[2]):
            if not token.endswith((".py", "/")):
                continue  # a name in a remark, not a file
            if token.startswith("cli/"):
                parts = ["w2wkit", "cli", *token[4:].split("/")]
            else:
                parts = ["w2wkit", *token.removeprefix("w2wkit/").split("/")]
            parts = [p.removesuffix(".py") for p in parts if p and p != "__init__.py"]
            out[".".join(parts)] = int(cells[0])
    return out


def test_the_readme_table_is_this_table():
    assert _readme_layers() == LAYERS
