"""The package layout is the architecture: one package per stage, and imports only ever run down the stages.

Read from the source with `ast` (every import, also the lazy ones inside functions), so a new module that
reaches up a stage, or two modules that import each other, fail here before a reader is misled by the tree.
The same map is drawn in docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gymnb"

# stage -> level; a module may import its own stage and stages of a lower level, never one of its level or above
LEVELS = {
    "core": 0,        # config, errors, wire contract, HTTP plumbing, model loading, JSONL, statistics
    "policy": 1,      # the OpenAI-compatible policy server: server, chat, splice, engine, prefix cache
    "gym": 1,         # the NeMo-Gym-compatible environment servers
    "realstack": 1,   # drivers of the real NeMo Gym and the real vLLM
    "rollouts": 2,    # collecting rollouts from an environment
    "tokens": 3,      # the token toolkit: continuity, divergence, drift, token view
    "train": 4,       # the reference GRPO loop
    "validation": 5,  # the five layers' checks, the notebook runner, the report, the benchmark verdicts
    "bench": 5,       # speed benchmarks
    "cli": 6,         # the `gymnb` dispatcher
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str:
    return module.split(".")[1]


def gymnb_imports(path: Path) -> set[str]:
    """Every gymnb module `path` imports, at the top or inside a function (`from gymnb.x import y` counts
    gymnb.x.y when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("gymnb.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gymnb"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return found - {"gymnb"}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: gymnb_imports(path) for name, path in MODULES.items() if name != "gymnb"}


def test_the_top_of_the_package_holds_only_stages():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith((".", "_"))}
    assert tops == set(LEVELS), f"top of gymnb/ must be the stages {sorted(LEVELS)}; found {sorted(tops)}"
    assert all(stage_of(name) in LEVELS for name in GRAPH)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_run_down_the_stages(module):
    stage = stage_of(module)
    upward = sorted(dst for dst in GRAPH[module]
                    if stage_of(dst) != stage and LEVELS[stage_of(dst)] >= LEVELS[stage])
    assert not upward, f"{module} (stage {stage}) imports {upward}: a stage may use only lower stages"


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph: every component is one module."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dst in GRAPH.get(node, ()):
            if dst not in GRAPH:
                continue
            if dst not in index:
                visit(dst)
                low[node] = min(low[node], low[dst])
            elif dst in on_stack:
                low[node] = min(low[node], index[dst])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_graph_sees_lazy_imports(tmp_path):
    """The oracle itself: an import inside a function is found, and `from pkg import module` names the module."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from gymnb.policy import server\n    import gymnb.core.wire\n")
    assert gymnb_imports(source) == {"gymnb.policy.server", "gymnb.core.wire"}
