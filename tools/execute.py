"""Run chapters top to bottom in a fresh kernel each, store the outputs, and sync the pairs.

    python tools/execute.py                      # every chapter, in numeric order
    python tools/execute.py notebooks/02_*.ipynb  # only these
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 900


def sync(path: Path) -> None:
    """Bring the pair up to date from whichever file was edited last; outputs stay in the .ipynb."""
    subprocess.run([sys.executable, "-m", "jupytext", "--sync", "--quiet", str(path)], check=True, cwd=ROOT)


def execute(path: Path) -> float:
    sync(path)
    # Later cells import from nanovllm_lib, so the library must match the notebook before it runs.
    subprocess.run([sys.executable, str(ROOT / "tools" / "export.py")], check=True, cwd=ROOT)
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    elapsed = time.perf_counter() - start
    # Saved widget state changes on every run and is not needed to read the chapter.
    notebook.metadata.pop("widgets", None)
    nbformat.write(notebook, path)
    sync(path)
    return elapsed


def main(argv: list[str]) -> int:
    paths = [Path(arg).resolve() for arg in argv] or sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        print(f"executing {path.name} ...", flush=True)
        print(f"  done in {execute(path):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
