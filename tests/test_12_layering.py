"""The package's layers: which parts may import which (checked in a fresh interpreter each).

    kernels            import nothing of minivllm (they are the course's standalone phase 01-08 modules)
    cache, scheduler   import no model code and no kernels (block ids and token counts only)
    engine             imports neither the server nor the course helpers
    product modules    never import minivllm.course (the notebooks' helpers), not even inside a function
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def modules_of(package: str) -> list[str]:
    base = ROOT / package
    names = []
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def loaded_after_import(modules: list[str]) -> set[str]:
    """The ``minivllm``/``kernels`` modules in ``sys.modules`` after importing ``modules`` in a new interpreter."""
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('minivllm', 'kernels'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def offenders(loaded: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if m == forbidden or any(m == f or m.startswith(f + ".") for f in forbidden))


def test_kernels_import_nothing_of_minivllm():
    loaded = loaded_after_import([m for m in modules_of("kernels") if not m.endswith("__main__")])
    assert "kernels.rmsnorm" in loaded  # the check saw the kernels
    assert offenders(loaded, ("minivllm",)) == []


@pytest.mark.parametrize("module", ["minivllm.cache", "minivllm.scheduler"])
def test_cache_and_scheduler_import_no_model_code(module):
    loaded = loaded_after_import([module])
    assert module in loaded
    assert offenders(loaded, ("minivllm.model", "kernels", "minivllm.runner", "minivllm.engine")) == []


def test_engine_imports_neither_server_nor_course():
    loaded = loaded_after_import(["minivllm.engine", "minivllm.llm"])
    assert "minivllm.runner" in loaded and "minivllm.scheduler" in loaded
    assert offenders(loaded, ("minivllm.server", "minivllm.course")) == []


def test_no_product_module_imports_the_course():
    product = [m for m in modules_of("minivllm") if not m.startswith("minivllm.course")]
    for name in product:  # statically: imports inside functions count too
        path = ROOT / (name.replace(".", "/") + ("/__init__.py" if (ROOT / name.replace(".", "/")).is_dir() else ".py"))
        for node in ast.walk(ast.parse(path.read_text())):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [t for t in targets if t == "minivllm.course" or t.startswith("minivllm.course.")]
            assert not bad, f"{path.relative_to(ROOT)}:{node.lineno} imports {bad[0]}"
    loaded = loaded_after_import([m for m in product if not m.endswith("__main__")])
    assert "minivllm.server.app" in loaded
    assert offenders(loaded, ("minivllm.course",)) == []
