"""The shape of the package: no import cycles, imports point the documented way, and the serving
path stays light (no offline transforms, no torch._dynamo / sympy / fastapi / ray / transformers
behind `import miaotui` or the CLI parser)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "miaotui"
RUNTIME = ("model", "engine", "load", "kernels")
"""Subpackages that serving runs on: they know nothing of the layers above them."""
ABOVE = ("transforms", "server", "eval", "parallel")
HEAVY = ("torch._dynamo", "sympy", "fastapi", "ray", "transformers", "uvicorn")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """miaotui module -> the miaotui modules it imports, anywhere in the file (a function-level
    import is still a dependency)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names if a.name.startswith("miaotui")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if not node.module.startswith("miaotui"):
                    continue
                for a in node.names:  # `from miaotui.x import y` may import module x.y
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in modules else resolve(node.module))
        graph[mod] = deps - {mod, ""}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_function_level_imports():
    graph = import_graph()
    assert "miaotui.transforms.pipeline" in graph["miaotui.loader"]  # imported in load_model
    assert "miaotui.server.cli" in graph["miaotui.cli"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_runtime_does_not_import_the_layers_above():
    bad = [
        f"{mod} imports {dep}"
        for mod, deps in import_graph().items()
        if mod.split(".")[1:2] and mod.split(".")[1] in RUNTIME
        for dep in sorted(deps)
        if dep.split(".")[1:2] and dep.split(".")[1] in ABOVE
    ]
    assert not bad, "\n".join(bad)


def _modules_after(code: str) -> dict:
    """Run `code` in a fresh interpreter; which of the watched modules it imported."""
    watched = HEAVY + ("miaotui.transforms",)
    script = (
        "import json, sys\n"
        + code
        + f"\nprint(json.dumps({{m: m in sys.modules for m in {watched!r}}}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_and_cli_parser_stay_light():
    loaded = _modules_after(
        "import miaotui\nfrom miaotui.cli import build_parser\n"
        "build_parser().parse_args(['generate', 'hi'])"
    )
    assert not any(loaded.values()), {m for m, v in loaded.items() if v}


@pytest.mark.slow
def test_generating_with_the_default_model_skips_transforms_and_dynamo():
    """The `miaotui generate` path: default model, native weights, a forward pass on the
    kernels (their build imports torch.utils.cpp_extension, which must not pull dynamo in)."""
    loaded = _modules_after(
        "from miaotui import LLM, SamplingParams\n"
        "llm = LLM(weights='native', threads=1, max_model_len=256)\n"
        "out = llm.generate(['Hello'], SamplingParams(max_tokens=2))\n"
        "assert len(out[0].token_ids) == 2"
    )
    assert not loaded["miaotui.transforms"]
    assert not loaded["torch._dynamo"] and not loaded["sympy"]


def test_python_dash_m_miaotui_is_the_cli():
    for cmd in (["-m", "miaotui", "--help"], ["-m", "miaotui.cli", "--help"]):
        out = subprocess.run(
            [sys.executable, *cmd], capture_output=True, text=True, timeout=120, check=False
        )
        assert out.returncode == 0, out.stderr[-2000:]
        for name in ("generate", "serve", "quantize", "prune", "eval", "bench", "compare"):
            assert name in out.stdout


def test_serve_declares_the_parallel_flags():
    from miaotui.cli import build_parser
    from miaotui.server.cli import cmd_serve

    a = build_parser().parse_args(["serve", "-tp", "2", "-pp", "1", "-dp", "1"])
    assert a.func is cmd_serve
    assert (a.tensor_parallel_size, a.pipeline_parallel_size, a.data_parallel_size) == (2, 1, 1)


def test_a_missing_dependency_is_one_clear_line(monkeypatch, capsys):
    from miaotui.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now fails
    assert main(["serve", "--threads", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("miaotui: error: `serve` needs the package 'uvicorn'"), err
    assert len(err.splitlines()) == 1
