"""Regenerate figures/ by running the chapters that save figures there, and check that folder.

Every PNG in figures/ is written by a chapter cell (`savefig("../figures/NAME.png")`), most of them with
drawing code from nanovllm_lib (for example `nanovllm_lib.figures.draw_roadmap`). No file there is
drawn by hand, so the check rejects any file that no chapter writes.

    python tools/figures.py                              # run every chapter that writes a figure
    python tools/figures.py notebooks/04_block_tables.ipynb  # only these chapters
    python tools/figures.py --check                      # every figure has a writer, exists and is a PNG

The chapters run in a fresh kernel each, with notebooks/ as the working directory, and their stored
outputs are left as they are (`make execute` rewrites those). Figures drawn from timings change from
run to run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "figures"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A quoted file name that ends in .png, on a code line that mentions the figures folder.
FIGURE_NAME = re.compile(r"""["'](?:[^"']*/)?([\w.-]+\.png)["']""")


def code_cells(notebook: Path) -> list[str]:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return ["".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            for cell in cells if cell["cell_type"] == "code"]


def figures_written_by(notebook: Path) -> set[str]:
    """Names of the files a chapter saves into figures/, read from its code cells."""
    names = set()
    for source in code_cells(notebook):
        for line in source.splitlines():
            if "figures" in line and not line.lstrip().startswith("#"):
                names.update(FIGURE_NAME.findall(line))
    return names


def chapter_notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def check() -> list[str]:
    """Return problems: files in figures/ no chapter writes, missing figures, files that are not PNG."""
    writers = {}
    for notebook in chapter_notebooks():
        for name in figures_written_by(notebook):
            writers.setdefault(name, notebook.name)
    problems = []
    present = sorted(path.name for path in FIGURES.iterdir() if path.is_file()) if FIGURES.exists() else []
    for name in present:
        if name not in writers:
            problems.append(
                f"figures/{name}: no chapter writes it. Save it from a chapter cell with "
                f'savefig("../figures/{name}") or delete it.'
            )
        elif (FIGURES / name).read_bytes()[:8] != PNG_SIGNATURE:
            problems.append(f"figures/{name}: not a PNG file")
    for name, notebook in sorted(writers.items()):
        if name not in present:
            problems.append(f"figures/{name}: missing; {notebook} writes it, so run `make figures`")
    return problems


def regenerate(notebooks: list[Path]) -> None:
    """Run each chapter that writes into figures/ in a fresh kernel, without storing its outputs."""
    import nbformat
    from nbclient import NotebookClient

    for path in notebooks:
        names = figures_written_by(path)
        if not names:
            print(f"{path.name}: writes no figure, skipped")
            continue
        print(f"running {path.name} for {', '.join(sorted(names))} ...", flush=True)
        notebook = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        NotebookClient(notebook, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
        missing = [name for name in names if not (FIGURES / name).exists()]
        if missing:
            raise RuntimeError(f"{path.name} ran but did not write {', '.join(missing)} into figures/.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="chapters to run (default: every chapter)")
    parser.add_argument("--check", action="store_true", help="check figures/ instead of regenerating it")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        print("\n".join(problems) if problems else
              f"figures: {len(list(FIGURES.glob('*.png')))} PNG files, each written by a chapter")
        return 1 if problems else 0
    FIGURES.mkdir(exist_ok=True)
    regenerate([path.resolve() for path in args.notebooks] or chapter_notebooks())
    print("figures: rewritten; `make check` checks the whole folder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
