"""Make the learner notebooks from the solution notebooks: ``solutions/`` is the one source of truth.

In a solution notebook's code cells:

* a block between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` becomes, at the same indentation,
  ``raise NotImplementedError(...)`` -- the stub :func:`minivllm.course.check` recognises;
* a line ending in ``# solutions only`` is dropped (e.g. ``course.require_solutions()``).

Outputs are cleared, except in cells marked ``# NBVAL_CHECK_OUTPUT``, whose stored outputs nbval
compares (they must not depend on the exercises).

    python -m minivllm.course.exercises            # rewrite notebooks/ from solutions/
    python -m minivllm.course.exercises --check    # exit 1 if notebooks/ is out of date
"""

import argparse
import json
import sys
from pathlib import Path

BEGIN, END, SOLUTIONS_ONLY = "### BEGIN SOLUTION", "### END SOLUTION", "# solutions only"
CHECKED = "# NBVAL_CHECK_OUTPUT"
STUB = 'raise NotImplementedError("exercise: replace this line with your code")'


def strip_solutions(source: str) -> str:
    """The learner's version of one code cell's source."""
    out, inside = [], False
    for line in source.splitlines(keepends=True):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"nested {BEGIN!r} in:\n{source}")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# YOUR CODE HERE\n{indent}{STUB}\n")
        elif stripped == END:
            if not inside:
                raise ValueError(f"{END!r} without {BEGIN!r} in:\n{source}")
            inside = False
        elif not inside and not line.rstrip().endswith(SOLUTIONS_ONLY):
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN!r} without {END!r} in:\n{source}")
    return "".join(out).rstrip("\n")


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def clean_cell(cell: dict, *, learner: bool) -> dict:
    """A cell as stored: outputs only where nbval compares them, no execution counts."""
    source = _source(cell)
    new = {"cell_type": cell["cell_type"], "metadata": {}, "source": None}
    if "id" in cell:
        new["id"] = cell["id"]
    if cell["cell_type"] == "code":
        keep = CHECKED in source
        if learner:
            source = strip_solutions(source)
        new["execution_count"] = None
        new["outputs"] = [dict(o, **({"execution_count": None} if "execution_count" in o else {}))
                          for o in cell.get("outputs", [])] if keep else []
    new["source"] = _lines(source)
    return new


def make_notebook(nb: dict, *, learner: bool) -> dict:
    return {
        "cells": [clean_cell(c, learner=learner) for c in nb["cells"]],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def expected_files(root: Path) -> dict[Path, str]:
    """Every stored notebook as it should be: solutions cleaned, learner versions generated."""
    files = {}
    for sol in sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(sol.read_text())
        files[sol] = dumps(make_notebook(nb, learner=False))
        files[root / "notebooks" / sol.name] = dumps(make_notebook(nb, learner=True))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report notebooks that are out of date")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2])
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files(args.root).items():
        if not path.exists() or path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.write_text(text)
    learner = {p.name for p in (args.root / "notebooks").glob("*.ipynb")}
    orphans = sorted(learner - {p.name for p in (args.root / "solutions").glob("*.ipynb")})
    for p in stale:
        print(("out of date: " if args.check else "wrote ") + str(p.relative_to(args.root)))
    for name in orphans:
        print(f"notebooks/{name} has no solutions/{name}")
    return 1 if (args.check and stale) or orphans else 0


if __name__ == "__main__":
    sys.exit(main())
