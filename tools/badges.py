"""Write the course's Colab and Binder links, each chapter's Colab setup cell and binder/requirements.txt.

All of it follows from the two values in course.toml (the GitHub repository and its branch) and from
requirements.txt, so a fork edits course.toml and runs this script (`make badges`).

    python tools/badges.py          # update README.md, the chapters and binder/requirements.txt
    python tools/badges.py --check  # exit 1 if any of them differs from what this script would write

In each chapter the script keeps two cells right after the title cell: a markdown cell with the
Colab and Binder badges, and a code cell that sets up a Colab runtime and does nothing elsewhere.
It edits the .ipynb and its paired py:percent file alike, so the pair stays in sync and no other
line of either file changes. A newly inserted setup cell takes execution count 1 and every later
count moves up by one, which is what a fresh run gives, since the cell runs nothing outside Colab.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent

COLAB_BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
BINDER_BADGE_IMAGE = "https://mybinder.org/badge_logo.svg"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Root requirements that binder/requirements.txt leaves out, with the reason.
NOT_ON_BINDER = {"playwright": "only the browser test uses it, and Binder runs no tests"}
FIRST_CHAPTER = "notebooks/00_the_map.ipynb"
README_LAUNCH_START = "<!-- launch badges: written by `make badges` from course.toml -->"
README_LAUNCH_END = "<!-- end of launch badges -->"
REPOSITORY_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?/[A-Za-z0-9._-]+")
BRANCH_PATTERN = re.compile(r"[A-Za-z0-9._/-]+")
# The setup cell is recognised by its first line, so keep this line when rewording the cell.
COLAB_CELL_FIRST_LINE = "# On Google Colab this cell gets the course, installs what it needs (keeping Colab's own torch)"
CELL_MARKER = re.compile(r"^# %%(?: |$)", re.MULTILINE)


@dataclass(frozen=True)
class Course:
    """The published location of the course: a GitHub repository (owner/name) and a branch."""

    repository: str
    branch: str

    @property
    def name(self) -> str:
        return self.repository.split("/", 1)[1]

    @property
    def clone_url(self) -> str:
        return f"https://github.com/{self.repository}.git"

    @property
    def colab_dir(self) -> str:
        """Folder of the clone on a Colab runtime."""
        return f"/content/{self.name}"

    def colab_url(self, notebook: str) -> str:
        """Colab's address for a notebook given by its path in the repository."""
        return f"https://colab.research.google.com/github/{self.repository}/blob/{self.branch}/{notebook}"

    def binder_url(self, notebook: str) -> str:
        """mybinder.org's address that builds the repository and opens the notebook in JupyterLab."""
        return f"https://mybinder.org/v2/gh/{self.repository}/{self.branch}?urlpath=lab/tree/{notebook}"


def read_course(path: Path) -> Course:
    """Read and validate course.toml."""
    text = path.read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 has no tomllib; course.toml holds only `key = "value"` lines.
        values = dict(re.findall(r'^\s*(\w+)\s*=\s*"([^"]*)"\s*$', text, re.MULTILINE))
    else:
        values = tomllib.loads(text)
    repository, branch = values.get("repository", ""), values.get("branch", "")
    if not REPOSITORY_PATTERN.fullmatch(repository):
        raise ValueError(f"{path}: repository must be a GitHub owner/name such as you/nano-vllm-course, got {repository!r}.")
    if not BRANCH_PATTERN.fullmatch(branch):
        raise ValueError(f"{path}: branch must be a git branch name such as main, got {branch!r}.")
    return Course(repository, branch)


# The cells every chapter gets.

def badge_markdown(course: Course, notebook: str) -> str:
    """Return the Colab and Binder badges of one notebook as one markdown line."""
    return (f"[![Open in Colab]({COLAB_BADGE_IMAGE})]({course.colab_url(notebook)}) "
            f"[![Launch on Binder]({BINDER_BADGE_IMAGE})]({course.binder_url(notebook)})")


def colab_cell_source(course: Course, course_dir: str | None = None) -> str:
    """Return the chapter cell that sets up a Colab runtime by cloning the course into `course_dir` and running setup_colab.

    The module is loaded by its file path, because importing nanovllm_lib would import packages
    (safetensors among them) before setup_colab has installed their pinned versions.
    """
    folder = course_dir or course.colab_dir
    return "\n".join([
        COLAB_CELL_FIRST_LINE,
        "# and fetches the model, which takes a few minutes the first time. Anywhere else it does nothing.",
        "import sys",
        "",
        'if "google.colab" in sys.modules:',
        "    import os",
        "    import runpy",
        "    import subprocess",
        "",
        f'    if not os.path.isdir("{folder}"):',
        f'        subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", "{course.branch}",',
        f'                        "{course.clone_url}", "{folder}"], check=True)',
        "    # Loaded by file path, so that no package is imported before setup_colab installs its pinned version.",
        f'    runpy.run_path("{folder}/nanovllm_lib/colab.py")["setup_colab"]("{folder}")',
    ])


def is_badge_cell(cell: dict) -> bool:
    return cell["cell_type"] == "markdown" and COLAB_BADGE_IMAGE in cell["source"]


def is_colab_cell(cell: dict) -> bool:
    return cell["cell_type"] == "code" and cell["source"].startswith(COLAB_CELL_FIRST_LINE)


def render_percent_cell(cell_type: str, source: str) -> str:
    """Return the py:percent text of a cell without tags or metadata, as jupytext writes it, with its trailing newline."""
    if cell_type == "markdown":
        body = "\n".join(f"# {line}" if line else "#" for line in source.split("\n"))
        return f"# %% [markdown]\n{body}\n"
    return f"# %%\n{source}\n"


# Editing a chapter pair.

def cell_offsets(py_text: str) -> list[int]:
    return [match.start() for match in CELL_MARKER.finditer(py_text)]


def insert_cell(notebook: nbformat.NotebookNode, py_text: str, index: int, cell: nbformat.NotebookNode) -> str:
    """Insert `cell` at `index` in the notebook and in its py:percent text; return the new text."""
    offsets = cell_offsets(py_text)
    if len(offsets) != len(notebook.cells):
        raise ValueError(
            f"the .py file has {len(offsets)} cells but the .ipynb has {len(notebook.cells)}; "
            "sync the pair with `jupytext --sync` first."
        )
    notebook.cells.insert(index, cell)
    text = render_percent_cell(cell.cell_type, cell.source) + "\n"
    if index < len(offsets):
        return py_text[:offsets[index]] + text + py_text[offsets[index]:]
    return py_text.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"


def replace_cell_source(cell: nbformat.NotebookNode, py_text: str, source: str) -> str:
    """Give `cell` a new source in the notebook and in its py:percent text; return the new text."""
    old = render_percent_cell(cell.cell_type, cell.source)
    if py_text.count(old) != 1:
        raise ValueError("the .py file does not contain the cell exactly once; sync the pair with `jupytext --sync` first.")
    cell.source = source
    return py_text.replace(old, render_percent_cell(cell.cell_type, source))


def shift_execution_counts(notebook: nbformat.NotebookNode, inserted: nbformat.NotebookNode) -> None:
    """Number a newly inserted first code cell 1 and move every later count up by one, if the notebook was run."""
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    if code_cells[0] is not inserted:
        raise ValueError("the Colab setup cell must come before every other code cell.")
    if len(code_cells) == 1 or code_cells[1].execution_count != 1:
        return  # not executed (or not from a fresh kernel): leave the counts for `make execute`
    inserted.execution_count = 1
    for cell in code_cells[1:]:
        if cell.execution_count is not None:
            cell.execution_count += 1
        for output in cell.outputs:
            if output.get("execution_count") is not None:
                output["execution_count"] += 1


def updated_chapter(ipynb: Path, course: Course) -> tuple[nbformat.NotebookNode, str, list[str]] | None:
    """Return (notebook, py text, changes) with the badge and Colab cells up to date, or None if nothing changes."""
    notebook = nbformat.read(ipynb, as_version=4)
    py_text = ipynb.with_suffix(".py").read_text(encoding="utf-8")
    relative = f"notebooks/{ipynb.name}"
    if not notebook.cells or notebook.cells[0].cell_type != "markdown":
        raise ValueError(f"{ipynb.name}: the first cell must be the markdown title cell.")
    changes = []

    expected_sources = {"badge": badge_markdown(course, relative), "colab": colab_cell_source(course)}
    finders = {"badge": is_badge_cell, "colab": is_colab_cell}
    for kind in ("badge", "colab"):
        found = [cell for cell in notebook.cells if finders[kind](cell)]
        if len(found) > 1:
            raise ValueError(f"{ipynb.name}: {len(found)} {kind} cells; keep one.")
        if found:
            if found[0].source != expected_sources[kind]:
                py_text = replace_cell_source(found[0], py_text, expected_sources[kind])
                changes.append(f"updated the {kind} cell")
            continue
        if kind == "badge":
            cell = nbformat.v4.new_markdown_cell(expected_sources[kind], id="launch-badges")
            position = 1
        else:
            cell = nbformat.v4.new_code_cell(expected_sources[kind], id="colab-setup")
            badge_index = next(i for i, c in enumerate(notebook.cells) if is_badge_cell(c))
            position = badge_index + 1
        py_text = insert_cell(notebook, py_text, position, cell)
        if kind == "colab":
            shift_execution_counts(notebook, cell)
        changes.append(f"inserted the {kind} cell")
    if not changes:
        return None
    return notebook, py_text, changes


def write_chapter(ipynb: Path, notebook: nbformat.NotebookNode, py_text: str) -> None:
    """Write the .ipynb first and the .py second, so the .py is the newer file of the pair.

    jupytext --sync takes the cell inputs from the newer file, and the .py may hold an author's
    edits that are not synced yet; both files carry the new cells, so nothing is lost either way.
    """
    nbformat.write(notebook, ipynb)
    ipynb.with_suffix(".py").write_text(py_text, encoding="utf-8")


def pair_in_sync(notebook: nbformat.NotebookNode, py_text: str) -> bool:
    return jupytext.writes(notebook, fmt="py:percent") == py_text


# README.md and binder/requirements.txt.

def readme_launch_block(course: Course) -> str:
    return "\n".join([README_LAUNCH_START, badge_markdown(course, FIRST_CHAPTER), README_LAUNCH_END])


def updated_readme(text: str, course: Course) -> str:
    """README text with a Colab badge after each chapter link of the chapter table, and the launch block."""
    row = re.compile(r"^(\|\s*\d\d\s*\|\s*)\[([^\]]+)\]\((notebooks/[^)\s]+\.ipynb)\)[^|]*?(\s*\|)", re.MULTILINE)

    def with_badge(match: re.Match) -> str:
        notebook = match.group(3)
        badge = f"[![Open in Colab]({COLAB_BADGE_IMAGE})]({course.colab_url(notebook)})"
        return f"{match.group(1)}[{match.group(2)}]({notebook}) {badge}{match.group(4)}"

    text = row.sub(with_badge, text)
    start, end = text.find(README_LAUNCH_START), text.find(README_LAUNCH_END)
    if start < 0 or end < start:
        raise ValueError(
            f"README.md has no launch block: add the two lines\n{README_LAUNCH_START}\n{README_LAUNCH_END}\n"
            "where the Colab and Binder badges of chapter 00 should go, then run `make badges`."
        )
    return text[:start] + readme_launch_block(course) + text[end + len(README_LAUNCH_END):]


def binder_requirements(root_requirements: str) -> str:
    """binder/requirements.txt: the root pins, less NOT_ON_BINDER, with torch from PyTorch's CPU index."""
    pins = []
    for raw in root_requirements.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0]
        if name.lower() in NOT_ON_BINDER:
            continue
        if name.lower() == "torch":
            # Binder has no local wheel; the +cpu build keeps pip from taking PyPI's CUDA build of several GB.
            line = line + "+cpu" if "+" not in line else line
        pins.append(line)
    header = [
        "# Generated from ../requirements.txt by `make badges` (tools/badges.py); do not edit.",
        "# repo2docker installs this file on Binder. Binder has no local PyTorch wheel, so torch comes",
        "# from PyTorch's CPU index; the other pins are those of ../requirements.txt, except "
        + ", ".join(sorted(NOT_ON_BINDER)) + ".",
        f"--extra-index-url {PYTORCH_CPU_INDEX}",
    ]
    return "\n".join(header + pins) + "\n"


def chapter_notebooks(root: Path) -> list[Path]:
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report what differs instead of writing")
    args = parser.parse_args(argv)
    course = read_course(root / "course.toml")
    problems = []

    for ipynb in chapter_notebooks(root):
        update = updated_chapter(ipynb, course)
        if update is None:
            continue
        notebook, py_text, changes = update
        if args.check:
            problems.append(f"{ipynb.name}: {'; '.join(changes)} would change")
            continue
        was_in_sync = pair_in_sync(nbformat.read(ipynb, as_version=4), ipynb.with_suffix(".py").read_text(encoding="utf-8"))
        if was_in_sync and not pair_in_sync(notebook, py_text):
            raise RuntimeError(f"{ipynb.name}: the edited pair would be out of sync; nothing was written.")
        write_chapter(ipynb, notebook, py_text)
        print(f"{ipynb.relative_to(root)}: {'; '.join(changes)}")

    generated = {
        root / "README.md": updated_readme((root / "README.md").read_text(encoding="utf-8"), course),
        root / "binder" / "requirements.txt": binder_requirements((root / "requirements.txt").read_text(encoding="utf-8")),
    }
    for path, text in generated.items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            problems.append(f"{path.relative_to(root)} differs from what `make badges` writes")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(root)}")

    if problems:
        print("Launch links and Colab cells are out of date; run `make badges` and commit the result.")
        print("\n".join(problems))
        return 1
    if args.check:
        print(f"badges: {len(chapter_notebooks(root))} chapters, README.md and binder/requirements.txt "
              f"match course.toml ({course.repository}@{course.branch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
