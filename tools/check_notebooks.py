"""Check the stored chapters: executed in order, paired with jupytext, free of widget state.

A notebook that was never executed passes strict nbval while comparing nothing,
so every code cell must carry an execution count, counting 1, 2, 3 ... from the
top as a fresh kernel leaves them. Each `.ipynb` must also match its paired
py:percent file exactly.

Figures must render in JupyterLab, in GitHub's notebook view and on Colab. A markdown image link to a
local file (`![](../figures/x.png)`) does not resolve on Colab, which opens the notebook without the
repository's other files, so chapters show figures as code-cell outputs (inline PNG) instead.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# Image targets in markdown: ![alt](target "title") and <img src="target">.
MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)|<img\b[^>]*?\bsrc\s*=\s*[\"']([^\"']+)", re.IGNORECASE)
# Targets that need none of the repository's files: web addresses and inline data.
PORTABLE_IMAGE = re.compile(r"^(https?:|data:image/)", re.IGNORECASE)


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


def local_image_problems(path: Path) -> list[str]:
    """Report each markdown cell that shows an image from a local file."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        for match in MARKDOWN_IMAGE.finditer(source):
            target = match.group(1) or match.group(2)
            if not PORTABLE_IMAGE.match(target):
                problems.append(
                    f"{path.name}: markdown cell {index} shows the local image {target}, which does not load "
                    "on Colab; draw the figure in a code cell (matplotlib inline PNG) instead"
                )
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
        problems += execution_problems(path) + pairing_problems(path) + local_image_problems(path)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"notebooks: {len(notebooks)} chapters executed in order, paired, with no local image links")
    return 0


if __name__ == "__main__":
    sys.exit(main())
