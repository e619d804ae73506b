"""The import graph of ``sophiavl_mcore/``: no import cycles, no upward imports.

The graph: one node per module (``pkg/__init__.py`` is the package's node), one edge per
intra-package import found by :mod:`ast` — ``import``, ``from … import`` (absolute or
relative) and ``importlib.import_module("literal")``, at module level *and* inside
functions (a lazy import still ties two modules together; it only hides the tie from
``python -c "import …"``). Imports under ``if TYPE_CHECKING:`` are left out (they never
run). ``from pkg import name`` points at ``pkg.name`` when that is a module, else at
``pkg``; ``from sophiavl_mcore import _C`` (the C++ extension) points at the root
package. Implicit imports of parent packages are not edges.

Rule 1, no cycles: no chain of edges leads from a module back to itself — between
sub-packages or inside one. Each cycle is reported as a chain ``a -> b -> … -> a``.

Rule 2, layering: every module belongs to a *unit* — its sub-package
(``sophiavl_mcore.rewards.demo`` → ``rewards``), its top-level module
(``sophiavl_mcore.planner`` → ``planner``) or the root package (``sophiavl_mcore``, with
``_C``). :data:`LAYERS` orders the units, lowest first. A module may import its own unit
and units of *lower* layers only; units in the same layer are peers and must not import
each other. A unit missing from :data:`LAYERS` is an error, so a new sub-package gets a
place on purpose. The order below is the one the code has (decided from the real imports):

    0  sophiavl_mcore (root, _C), atomic, checks, config, lazy, logging   leaves: no intra-package imports
    1  parallel, data          process groups / layouts; records, prompts, images
    2  models, rollout         Megatron builders (-> parallel); rollout engines (-> parallel.host)
    3  checkpoint, rewards     all on-disk state: HF<->Megatron, training checkpoints, HF export
                               (-> models, parallel); reward stage (-> data, rollout)
    4  weight_sync, planner, eval  engine sync (-> checkpoint, rollout); planner; benchmarks (-> rewards)
    5  trainer                 the GRPO/SFT loops (-> everything below)
    6  cli                     the command line shared by the entry points
    7  train, trm_train        entry points
    8  testing                 fixtures for tests/benchmarks: may import anything

``testing/`` sits on top and is a leaf: nothing else may import it — except the edges
named in :data:`ALLOWED_TESTING_IMPORTS`, from the job entry points (:data:`ENTRY_POINTS`)
to the stand-in resolution (``model.tiny`` / ``rewards.trm.tiny`` recipes).

:data:`KNOWN_VIOLATIONS` lists edges that break a rule today and whose fix lies in a file
this check's change could not touch; each names the fix. They are exempt from both
rules (so a cycle they close is not reported), and :func:`test_exceptions_are_not_stale`
fails once such an edge is gone, so the list only shrinks. Add to it only with a reason.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE = "sophiavl_mcore"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE

LAYERS: tuple[frozenset[str], ...] = (
    frozenset({PACKAGE, "atomic", "checks", "config", "lazy", "logging"}),
    frozenset({"parallel", "data"}),
    frozenset({"models", "rollout"}),
    frozenset({"checkpoint", "rewards"}),
    frozenset({"weight_sync", "planner", "eval"}),
    frozenset({"trainer"}),
    frozenset({"cli"}),
    frozenset({"train", "trm_train"}),
    frozenset({"testing"}),
)

_P = PACKAGE + "."

#: The job entry points, the only package modules that may import ``testing/``.
ENTRY_POINTS = frozenset({_P + "train", _P + "trm_train"})

ALLOWED_TESTING_IMPORTS: dict[tuple[str, str], str] = {
    (_P + "train", _P + "testing.stand_ins"):
        "model.tiny / rewards.trm.tiny recipes (tiny_cpu.yaml): the entry point builds the "
        "stand-ins and hands the trainer ordinary paths",
}

KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
}


# ------------------------------------------------------------------------ the checker


def discover(package_dir: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under ``package_dir``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest known module that ``name`` starts with (None: not in the package)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: Mapping[str, Path], package: str) -> set[str]:
    """Intra-package modules that ``module`` imports (anywhere but TYPE_CHECKING blocks)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        if name == package or name.startswith(package + "."):
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}"
                add(full if full in modules else source)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if name == "import_module" and isinstance(first, ast.Constant) and isinstance(first.value, str):
                add(first.value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    modules = discover(package_dir, package)
    return {m: imports_of(m, p, modules, package) for m, p in modules.items()}


def _without(graph: Mapping[str, Iterable[str]], edges: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    drop = set(edges)
    return {a: {b for b in targets if (a, b) not in drop} for a, targets in graph.items()}


def _components(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _shortest_cycle(graph: Mapping[str, set[str]], start: str, members: set[str]) -> list[str]:
    """Shortest path start -> … -> start inside one component (BFS)."""
    parent: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w not in members:
                    continue
                if w == start:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(parent[chain[-1]])
                    return [*reversed(chain), start]
                if w not in seen:
                    seen.add(w)
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle")


def find_cycles(graph: Mapping[str, set[str]]) -> list[str]:
    """One readable chain per cycle group (strongly connected component)."""
    reports = []
    for comp in _components(graph):
        if len(comp) < 2:
            continue
        chain = _shortest_cycle(graph, comp[0], set(comp))
        extra = f"  (cycle group of {len(comp)}: {', '.join(comp)})" if len(comp) > len(chain) - 1 else ""
        reports.append(" -> ".join(chain) + extra)
    return reports


def unit_of(module: str, package: str) -> str:
    return package if module == package else module[len(package) + 1:].split(".")[0]


def layer_violations(graph: Mapping[str, set[str]], layers: Iterable[Iterable[str]],
                     package: str) -> list[str]:
    """Every edge that imports a peer unit or a higher layer, and every unplaced unit."""
    rank = {unit: i for i, units in enumerate(layers) for unit in units}
    problems = []
    unplaced = sorted({unit_of(m, package) for m in graph} - set(rank))
    if unplaced:
        problems.append(f"units missing from LAYERS: {', '.join(unplaced)}")
    for a in sorted(graph):
        ua = unit_of(a, package)
        for b in sorted(graph[a]):
            ub = unit_of(b, package)
            if ua == ub or ua not in rank or ub not in rank:
                continue
            if rank[ub] > rank[ua]:
                problems.append(f"upward import: {a} (layer {rank[ua]}, {ua}) -> {b} "
                                f"(layer {rank[ub]}, {ub})")
            elif rank[ub] == rank[ua]:
                problems.append(f"peer import: {a} ({ua}) -> {b} ({ub}), both in layer {rank[ua]}")
    return problems


def check(package_dir: Path, package: str, layers: Iterable[Iterable[str]],
          exempt: Iterable[tuple[str, str]] = ()) -> tuple[list[str], list[str]]:
    """(cycles, layering problems) of a package, ignoring the ``exempt`` edges."""
    graph = _without(import_graph(package_dir, package), exempt)
    return find_cycles(graph), layer_violations(graph, layers, package)


# ------------------------------------------------------------------------ the tests


def _exempt() -> list[tuple[str, str]]:
    return [*ALLOWED_TESTING_IMPORTS, *KNOWN_VIOLATIONS]


def test_no_import_cycles() -> None:
    cycles, _ = check(PACKAGE_DIR, PACKAGE, LAYERS, _exempt())
    assert not cycles, "import cycles in sophiavl_mcore/:\n  " + "\n  ".join(cycles)


def test_no_upward_imports() -> None:
    _, problems = check(PACKAGE_DIR, PACKAGE, LAYERS, _exempt())
    assert not problems, "layering broken in sophiavl_mcore/ (see LAYERS):\n  " + "\n  ".join(problems)


def test_exceptions_are_not_stale() -> None:
    """Every allowed / known edge still exists (a fixed one must leave the lists)."""
    graph = import_graph(PACKAGE_DIR, PACKAGE)
    gone = [f"{a} -> {b}" for a, b in _exempt() if b not in graph.get(a, ())]
    assert not gone, "edges no longer in the code; remove them from the lists:\n  " + "\n  ".join(gone)
    into_testing = [(a, b) for a, b in ALLOWED_TESTING_IMPORTS
                    if unit_of(b, PACKAGE) != "testing" or unit_of(a, PACKAGE) == "testing"]
    assert not into_testing, f"ALLOWED_TESTING_IMPORTS holds non-testing edges: {into_testing}"


def test_testing_is_imported_only_by_the_entry_points() -> None:
    graph = import_graph(PACKAGE_DIR, PACKAGE)
    importers = sorted(a for a, bs in graph.items() if unit_of(a, PACKAGE) != "testing"
                       and any(unit_of(b, PACKAGE) == "testing" for b in bs))
    assert set(importers) <= ENTRY_POINTS, (
        f"only {sorted(ENTRY_POINTS)} may import sophiavl_mcore.testing; also: "
        f"{sorted(set(importers) - ENTRY_POINTS)}")
    assert importers, "the entry points resolve the tiny stand-ins through testing.stand_ins"


def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_reports_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The same checker on a synthetic package with known faults finds exactly them."""
    _write(tmp_path / "toy", {
        "__init__.py": "",
        "low/__init__.py": "",
        # upward: low -> high, hidden inside a function
        "low/base.py": "def f():\n    from toy.high.top import g\n    return g\n",
        "low/ok.py": "from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from toy.high.top import g  # never runs: no edge\n",
        "high/__init__.py": "",
        "high/top.py": "from toy.low import ok\n\ndef g():\n    return ok\n",
        # a cycle inside one sub-package: a -> b (relative, module level) -> a (lazy)
        "high/a.py": "from . import b\n",
        "high/b.py": "def h():\n    import toy.high.a\n    return toy.high.a\n",
        # importlib with a literal is an edge too
        "high/c.py": "import importlib\nimportlib.import_module('toy.low.ok')\n",
    })
    layers = [{"toy", "low"}, {"high"}]
    graph = import_graph(tmp_path / "toy", "toy")
    assert graph["toy.low.ok"] == set()  # the TYPE_CHECKING import is not an edge
    assert graph["toy.high.c"] == {"toy.low.ok"}
    cycles, problems = check(tmp_path / "toy", "toy", layers)
    assert cycles == ["toy.high.a -> toy.high.b -> toy.high.a"]
    assert problems == ["upward import: toy.low.base (layer 0, low) -> toy.high.top (layer 1, high)"]

    # exempting the faulty edges clears them; a peer import and an unplaced unit are caught
    cycles, problems = check(tmp_path / "toy", "toy", layers,
                             [("toy.high.b", "toy.high.a"), ("toy.low.base", "toy.high.top")])
    assert cycles == [] and problems == []
    _write(tmp_path / "toy", {"side/__init__.py": "from toy.low import base\n",
                              "low/peer.py": "import toy.side\n"})
    _, problems = check(tmp_path / "toy", "toy", [{"toy", "low", "side"}, {"high"}],
                        [("toy.high.b", "toy.high.a"), ("toy.low.base", "toy.high.top")])
    assert problems == ["peer import: toy.low.peer (low) -> toy.side (side), both in layer 0",
                        "peer import: toy.side (side) -> toy.low.base (low), both in layer 0"]
    _, problems = check(tmp_path / "toy", "toy", layers,
                        [("toy.high.b", "toy.high.a"), ("toy.low.base", "toy.high.top")])
    assert problems[0] == "units missing from LAYERS: side"
