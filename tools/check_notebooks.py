"""Check the stored chapters: executed in order, paired with jupytext, free of widget state.

A notebook that was never executed passes strict nbval while comparing nothing,
so every code cell must carry an execution count, counting 1, 2, 3 ... from the
top as a fresh kernel leaves them. Each `.ipynb` must also match its paired
py:percent file exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def execution_problems(path: Path) -> list[str]:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    expected = 1
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        count = cell.get("execution_count")
        if count != expected:
            problems.append(f"{path.name}: code cell {index} has execution count {count}, expected {expected}")
            break
        expected += 1
    if "widgets" in notebook.get("metadata", {}):
        problems.append(f"{path.name}: saved widget state in metadata; run `make execute` (it strips it)")
    return problems


def pairing_problems(path: Path) -> list[str]:
    paired = path.with_suffix(".py")
    if not paired.exists():
        return [f"{path.name}: paired file {paired.name} is missing; run `jupytext --sync {path}`"]
    converted = subprocess.run(
        [sys.executable, "-m", "jupytext", "--to", "py:percent", "--output", "-", str(path)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout
    if converted != paired.read_text(encoding="utf-8"):
        return [f"{path.name}: {paired.name} is out of sync; run `jupytext --sync {path}`"]
    return []


def main() -> int:
    notebooks = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        print("no chapters found in notebooks/")
        return 1
    problems = []
    for path in notebooks:
        problems += execution_problems(path) + pairing_problems(path)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"notebooks: {len(notebooks)} chapters executed in order and paired")
    return 0


if __name__ == "__main__":
    sys.exit(main())
