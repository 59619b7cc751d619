"""The learner's workspace: every component a learner writes and passes its check is saved as a small module.

``course.check(..., component="top_p_mask")`` calls :func:`record` when the learner's version matches the
reference. The file holds the function's source, the source of the notebook functions and kernels it calls,
and the imports and constants it reads, so it runs outside the notebook. ``minivllm.learner`` reads the
folder back (``LLM(learner=True)``, ``minivllm serve --learner``) and builds the engine from it.

Where: ``workspace/`` next to the notebook (the kernel's working directory), or ``$MINIVLLM_WORKSPACE``.
Left out: components that are classes, and functions that read notebook state other than modules, constants,
functions and kernels (such a file fails its check at load time and the package's version is used).
"""

import ast
import datetime as _dt
import inspect
import textwrap
import os
import types
from pathlib import Path

from minivllm.learner import API_VERSION, COMPONENTS

_SIMPLE = (int, float, str, bool, type(None))


def workspace_dir() -> Path:
    """``$MINIVLLM_WORKSPACE``, else ``workspace/`` in the notebook's folder (what ``minivllm.learner`` reads)."""
    return Path(os.environ.get("MINIVLLM_WORKSPACE", Path.cwd() / "workspace"))


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _python_function(obj):
    """The Python function behind ``obj`` (a numba kernel keeps it as ``py_func``, the simulator as ``fn``)."""
    for attr in ("py_func", "fn"):
        inner = getattr(obj, attr, None)
        if isinstance(inner, types.FunctionType):
            return inner
    return obj if isinstance(obj, types.FunctionType) else None


def source_with_dependencies(fn) -> str:
    """``fn``'s source, preceded by what it needs from its notebook: imports, constants, functions and kernels."""
    imports: dict[str, str] = {}
    constants: dict[str, str] = {}
    sources: list[str] = []
    seen: set[int] = set()
    home = _python_function(fn).__module__  # the notebook ("__main__"), or the module fn was defined in

    def local(value) -> bool:
        inner = _python_function(value)
        return inner is not None and inner.__module__ == home

    def visit(obj) -> None:
        func = _python_function(obj)
        if func is None or id(func) in seen:
            return
        seen.add(id(func))
        source = inspect.getsource(func)
        names = _code_names(func.__code__)  # the body's globals
        names |= {n.id for n in ast.walk(ast.parse(textwrap.dedent(source))) if isinstance(n, ast.Name)}  # annotations too
        for name in sorted(names):
            if name not in func.__globals__ or name in imports or name in constants:
                continue
            value = func.__globals__[name]
            if isinstance(value, types.ModuleType):
                imports[name] = (f"import {value.__name__}" if name == value.__name__
                                 else f"import {value.__name__} as {name}")
            elif isinstance(value, _SIMPLE) or (isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value)):
                constants[name] = f"{name} = {value!r}"
            elif local(value):
                visit(value)
            elif getattr(value, "__module__", None) and getattr(value, "__qualname__", "").isidentifier():
                alias = "" if value.__qualname__ == name else f" as {name}"
                imports[name] = f"from {value.__module__} import {value.__qualname__}{alias}"
            elif type(value).__module__ == "torch" and type(value).__name__ == "dtype":
                imports.setdefault("torch", "import torch")
                constants[name] = f"{name} = {value!r}"
        sources.append(source)

    visit(fn)
    head = list(imports.values())
    if any("numba" in line for line in head):  # kernels first: it picks numba's backend (GPU or simulator)
        head.insert(0, "import kernels  # noqa: F401")
    return "\n".join([*head, "", *constants.values(), "", "", "\n\n".join(sources)]).strip() + "\n"


def record(component: str, fn, notebook: str = "") -> Path | None:
    """Save ``fn`` as the learner's ``component``; None (and a line saying why) if its source cannot be read."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; known: {sorted(COMPONENTS)}")
    try:
        body = source_with_dependencies(fn)
    except (OSError, TypeError) as e:
        print(f"   (not saved to the workspace: the source of {component} cannot be read: {e})")
        return None
    name = _python_function(fn).__name__
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    text = (f"# minivllm learner component {component!r} (phase {COMPONENTS[component].phase}), "
            f"recorded {stamp}{' from ' + notebook if notebook else ''}\n"
            f"API_VERSION = {API_VERSION}\n\n{body}\n\nCOMPONENT = {name}\n")
    folder = workspace_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{component}.py"
    path.write_text(text)
    print(f"   saved to your engine: {path} (LLM(learner=True), minivllm serve --learner)")
    return path
