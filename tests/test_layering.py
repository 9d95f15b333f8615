"""The package's imports run one way (docs: DESIGN.md): read from the source of every module, lazy imports inside
functions included, so that a layering mistake fails here rather than in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "qwen15"
CORE = {
    "qwen15.errors",
    "qwen15.atomic",
    "qwen15.paths",
    "qwen15.model_config",
    "qwen15.model",
    "qwen15.tokenizer",
    "qwen15.chat_template",
    "qwen15.hf_folder",
    "qwen15.hf_checkpoint",
}
UPPER = (
    "qwen15.train",
    "qwen15.parallel",
    "qwen15.data",
    "qwen15.commands",
    "qwen15.demo",
    "qwen15.mindspore",
    "qwen15.serve",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lazy_exports(path: Path) -> dict[str, str]:
    """A package __init__'s `_LAZY = {name: module}` table (names it hands out on first use)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    lazy = {name: lazy_exports(p) for name, p in modules.items() if p.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in modules:
                        targets.add(sub)
                    elif alias.name in lazy.get(node.module, {}):
                        targets.add(lazy[node.module][alias.name])
                    else:
                        targets.add(node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


GRAPH = import_graph()


def test_the_graph_is_read():
    assert "qwen15.model_config" in GRAPH["qwen15.model"]
    assert "qwen15.model" in GRAPH["qwen15.fuse"]
    assert len(GRAPH) > 50


@pytest.mark.parametrize("module", sorted(CORE))
def test_core_imports_only_core(module):
    assert GRAPH[module] <= CORE, f"{module} imports {sorted(GRAPH[module] - CORE)}"


def test_nothing_below_imports_from_above():
    for module, targets in GRAPH.items():
        if module.startswith("qwen15.parallel"):
            bad = {t for t in targets if t.startswith(("qwen15.train", "qwen15.data", "qwen15.commands"))}
            assert not bad, f"{module} imports {sorted(bad)}"
        if not module.startswith(UPPER):  # the inference layer (generation, chat, quantize ...) and the core
            bad = {t for t in targets if t.startswith(UPPER)}
            assert not bad, f"{module} imports {sorted(bad)}"
        if not module.startswith("qwen15.commands") and module != "qwen15.cli":
            assert not {t for t in targets if t.startswith("qwen15.commands")}, module


def test_no_import_cycles():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_no_module_imports_private_names_of_another():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qwen15"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module_name(path)} imports {private} from {node.module}"
