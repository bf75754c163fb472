"""The package's import graph: one way (cli -> engine/train/serve -> model -> ops), no cycle at
module level, the model and ops free of the native kernels (installed from outside through
``bamba.native.accelerate``), and no process-wide hooks from importing any of it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import bamba

ROOT = Path(bamba.__file__).parent
SEAM = {"bamba.native", "bamba.native.seam"}  # what may reach the kernels and the model
# what the kernels may import: the protocols, and memory that knows no model
PROTOCOLS = {"bamba.cache_protocol", "bamba.linear_protocol", "bamba.huge_pages"}


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(module: str, names: list[str]) -> set[str]:
    """The bamba modules an import statement loads (``from pkg import mod`` names mod)."""
    found = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
    if module in MODULES and len(found) < len(names):
        found.add(module)
    return found


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str, top_level_only: bool) -> set[str]:
    """The bamba modules ``name`` imports: at module level (not under TYPE_CHECKING), or
    anywhere in it."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = []
    if top_level_only:
        stack = list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.Try, ast.If)) and not _is_type_checking(node):
                stack += node.body + node.orelse + getattr(node, "finalbody", []) + \
                    [s for h in getattr(node, "handlers", []) for s in h.body]
            else:
                nodes.append(node)
    else:
        nodes = list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "bamba"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.split(".")[0] == "bamba":
            found |= _resolve(node.module, [a.name for a in node.names])
    return {m for m in found if m in MODULES} - {name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_module_level_import_graph_has_no_cycle():
    graph = {name: imports(name, top_level_only=True) for name in MODULES}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_ops_import_nothing_of_ours_but_ops():
    for name in (n for n in MODULES if n.startswith("bamba.ops")):
        outside = {m for m in imports(name, top_level_only=False)
                   if not m.startswith("bamba.ops")}
        assert not outside, f"{name} imports {outside}"


def test_the_model_is_torch_only():
    found = imports("bamba.model", top_level_only=False)
    allowed = {"bamba.cache_protocol", "bamba.config", "bamba.checkpoint_writer",
               "bamba.generation_defaults"}
    assert all(m in allowed or m.startswith("bamba.ops") for m in found), found
    assert "native" not in MODULES["bamba.model"].read_text()


def test_only_the_seam_reaches_both_the_model_and_the_kernels():
    """The kernel modules know no modules of the model; only the seam imports both."""
    for name in (n for n in MODULES if n.startswith("bamba.native") and n not in SEAM):
        found = imports(name, top_level_only=False)
        assert all(m.startswith("bamba.native") or m in PROTOCOLS for m in found), \
            f"{name} imports {found}"
    for name in (n for n in MODULES if not n.startswith("bamba.native")):
        assert not (imports(name, top_level_only=False) & (set(MODULES) - SEAM)
                    & {n for n in MODULES if n.startswith("bamba.native.")}), \
            f"{name} reaches a kernel module past the seam"


def test_importing_the_package_installs_no_global_hooks():
    """No nn.Module registration or forward hooks from importing every module, or from
    accelerating a model (a fresh interpreter: this one's state is the other tests')."""
    modules = sorted(n for n in MODULES if not n.endswith("__main__"))
    code = f"""
import importlib
import torch.nn.modules.module as m
for name in {modules!r}:
    importlib.import_module(name)
from bamba.config import preset
from bamba.model import BambaLM
from bamba.native import accelerate
accelerate(BambaLM(preset("tiny")))
hooks = [m._global_module_registration_hooks, m._global_parameter_registration_hooks,
         m._global_buffer_registration_hooks, m._global_forward_hooks,
         m._global_forward_pre_hooks, m._global_backward_hooks, m._global_backward_pre_hooks]
print(sum(len(h) for h in hooks))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "0"
