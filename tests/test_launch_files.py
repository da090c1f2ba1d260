"""Binder's files, the badges written from course.toml, and the checks that keep figures portable."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from nanovllm_lib.colab import read_pins

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"


def load_tool(name: str):
    """Import tools/NAME.py (tools/ is not a package) once per test session."""
    module_name = f"tools_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[module_name]


badges = load_tool("badges")
check_notebooks = load_tool("check_notebooks")


# Binder (repo2docker reads only binder/ when that folder exists).

def test_binder_folder_has_repo2docker_files():
    assert (BINDER / "requirements.txt").is_file()
    assert (BINDER / "postBuild").is_file()
    assert (BINDER / "runtime.txt").is_file()
    assert not (ROOT / ".binder").exists(), "repo2docker rejects a repository with both binder/ and .binder/"


def test_binder_pins_match_root_requirements():
    root = read_pins(ROOT / "requirements.txt")
    binder = read_pins(BINDER / "requirements.txt")
    assert binder["torch"] == root["torch"] + "+cpu"
    for name, version in root.items():
        if name in badges.NOT_ON_BINDER:
            assert name not in binder
        elif name != "torch":
            assert binder.get(name) == version, f"{name}: binder pins {binder.get(name)}, requirements.txt {version}"
    assert set(binder) == set(root) - set(badges.NOT_ON_BINDER)


def test_binder_takes_torch_from_cpu_index():
    lines = (BINDER / "requirements.txt").read_text().splitlines()
    assert f"--extra-index-url {badges.PYTORCH_CPU_INDEX}" in lines
    root_lines = (ROOT / "requirements.txt").read_text()
    assert "--extra-index-url" not in root_lines, "the CPU index belongs only in binder/requirements.txt"


def test_post_build_installs_course_and_model():
    script = (BINDER / "postBuild").read_text()
    assert script.startswith("#!/bin/bash\n")
    assert "set -euo pipefail" in script
    assert os.access(BINDER / "postBuild", os.X_OK)
    assert "pip install --no-deps --editable ." in script
    assert "ensure_embedded_model()" in script


def test_runtime_python_meets_requires_python():
    runtime = (BINDER / "runtime.txt").read_text().strip()
    match = re.fullmatch(r"python-(\d+)\.(\d+)", runtime)
    assert match, f"runtime.txt should read python-X.Y, got {runtime!r}"
    requires = re.search(r'requires-python\s*=\s*">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert tuple(map(int, match.groups())) >= tuple(map(int, requires.groups()))


# Badges, the README launch block and the chapter cells, written from course.toml.

def test_repository_files_match_course_toml():
    assert badges.main(["--check"]) == 0


def test_readme_links_binder_to_chapter_00():
    course = badges.read_course(ROOT / "course.toml")
    readme = (ROOT / "README.md").read_text()
    assert f"https://mybinder.org/v2/gh/{course.repository}/{course.branch}?urlpath=lab/tree/notebooks/00_the_map.ipynb" in readme


@pytest.fixture
def course_copy(tmp_path):
    """README, course.toml, requirements.txt and two chapter pairs, copied into a temporary repository."""
    for name in ["README.md", "course.toml", "requirements.txt"]:
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "notebooks").mkdir()
    for stem in ["00_the_map", "04_block_tables"]:
        for suffix in [".ipynb", ".py"]:
            shutil.copy(ROOT / "notebooks" / f"{stem}{suffix}", tmp_path / "notebooks" / f"{stem}{suffix}")
    return tmp_path


def test_fork_changes_every_link(course_copy, capsys):
    (course_copy / "course.toml").write_text('repository = "a-fork/course-copy"\nbranch = "dev"\n')
    assert badges.main([], root=course_copy) == 0
    assert badges.main(["--check"], root=course_copy) == 0
    texts = [(course_copy / "README.md").read_text()]
    texts += [path.read_text() for path in (course_copy / "notebooks").iterdir()]
    combined = "\n".join(texts)
    assert "your-github-user" not in combined
    assert "https://colab.research.google.com/github/a-fork/course-copy/blob/dev/notebooks/04_block_tables.ipynb" in combined
    assert "https://mybinder.org/v2/gh/a-fork/course-copy/dev?urlpath=lab/tree/notebooks/00_the_map.ipynb" in combined
    assert '"https://github.com/a-fork/course-copy.git", "/content/course-copy"' in combined


def test_badges_are_idempotent(course_copy, capsys):
    badges.main([], root=course_copy)
    before = {path: path.read_bytes() for path in course_copy.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert badges.main([], root=course_copy) == 0
    assert capsys.readouterr().out == ""
    after = {path: path.read_bytes() for path in course_copy.rglob("*") if path.is_file()}
    assert after == before


def strip_launch_cells(ipynb: Path) -> None:
    """Turn a chapter pair back into one without the badge and Colab cells, as a new chapter starts."""
    notebook = nbformat.read(ipynb, as_version=4)
    notebook.cells = [cell for cell in notebook.cells if not (badges.is_badge_cell(cell) or badges.is_colab_cell(cell))]
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    if code_cells and code_cells[0].execution_count == 2:  # renumber as a fresh run without the Colab cell
        for cell in code_cells:
            cell.execution_count -= 1
            for output in cell.outputs:
                if output.get("execution_count") is not None:
                    output["execution_count"] -= 1
    nbformat.write(notebook, ipynb)
    ipynb.with_suffix(".py").write_text(jupytext.writes(notebook, fmt="py:percent"))


def test_new_chapter_gets_cells_and_stays_paired(course_copy, capsys):
    ipynb = course_copy / "notebooks" / "04_block_tables.ipynb"
    strip_launch_cells(ipynb)
    assert badges.main(["--check"], root=course_copy) == 1

    assert badges.main([], root=course_copy) == 0
    notebook = nbformat.read(ipynb, as_version=4)
    assert badges.is_badge_cell(notebook.cells[1])
    assert badges.is_colab_cell(notebook.cells[2])
    assert jupytext.writes(notebook, fmt="py:percent") == ipynb.with_suffix(".py").read_text()
    assert check_notebooks.execution_problems(ipynb) == []
    assert notebook.cells[2].execution_count == 1
    assert badges.main(["--check"], root=course_copy) == 0


def test_readme_without_launch_block_is_an_error(course_copy):
    readme = course_copy / "README.md"
    text = readme.read_text()
    start, end = text.index(badges.README_LAUNCH_START), text.index(badges.README_LAUNCH_END)
    readme.write_text(text[:start] + text[end + len(badges.README_LAUNCH_END):])
    with pytest.raises(ValueError, match="launch block"):
        badges.main(["--check"], root=course_copy)


@pytest.mark.parametrize("repository", ["no-slash", "a/b/c", "-bad/name", "", "owner/has space"])
def test_course_toml_rejects_bad_repository(tmp_path, repository):
    path = tmp_path / "course.toml"
    path.write_text(f'repository = "{repository}"\nbranch = "main"\n')
    with pytest.raises(ValueError, match="owner/name"):
        badges.read_course(path)


# Figures must render on Colab too: no markdown image links to local files.

def notebook_with_markdown(tmp_path: Path, markdown: str) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell(markdown)]
    path = tmp_path / "00_test.ipynb"
    nbformat.write(notebook, path)
    return path


@pytest.mark.parametrize("markdown", [
    "![roadmap](../figures/roadmap.png)",
    '![a figure](figures/x.png "title")',
    '<img src="../figures/x.png" width="400">',
    "text\n\n![](/abs/path.png)",
])
def test_local_image_link_is_reported(tmp_path, markdown):
    problems = check_notebooks.local_image_problems(notebook_with_markdown(tmp_path, markdown))
    assert len(problems) == 1
    assert "does not load on Colab" in problems[0]


@pytest.mark.parametrize("markdown", [
    "[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://example.org)",
    "![inline](data:image/png;base64,iVBORw0KGgo=)",
    "A link to [a figure](../figures/x.png), not an image.",
])
def test_portable_image_link_is_accepted(tmp_path, markdown):
    assert check_notebooks.local_image_problems(notebook_with_markdown(tmp_path, markdown)) == []


def test_chapters_show_no_local_images():
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert check_notebooks.local_image_problems(path) == []


def test_chapters_show_figures_as_png_outputs():
    """Every image a stored chapter output holds is a PNG (SVG embeds dates and ids and breaks nbval)."""
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            for output in cell.get("outputs", []):
                images = [kind for kind in output.get("data", {}) if kind.startswith("image/")]
                assert set(images) <= {"image/png"}, f"{path.name}: image output of type {images}"


# figures/: every file is written by a chapter.

figures_tool = load_tool("figures")


def test_figures_folder_passes_its_check():
    problems = figures_tool.check()
    assert [p for p in problems if "no chapter writes it" in p or "not a PNG" in p] == []


@pytest.fixture
def figures_copy(tmp_path, monkeypatch):
    """A repository with chapter 00 and its one figure, for the figures/ check."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "figures").mkdir()
    shutil.copy(ROOT / "notebooks" / "00_the_map.ipynb", tmp_path / "notebooks")
    shutil.copy(ROOT / "figures" / "roadmap.png", tmp_path / "figures")
    monkeypatch.setattr(figures_tool, "ROOT", tmp_path)
    monkeypatch.setattr(figures_tool, "FIGURES", tmp_path / "figures")
    return tmp_path


def test_figures_check_accepts_written_figure(figures_copy):
    assert figures_tool.figures_written_by(figures_copy / "notebooks" / "00_the_map.ipynb") == {"roadmap.png"}
    assert figures_tool.check() == []


def test_figures_check_rejects_hand_made_file(figures_copy):
    (figures_copy / "figures" / "sketch.png").write_bytes(figures_tool.PNG_SIGNATURE + b"drawn by hand")
    problems = figures_tool.check()
    assert len(problems) == 1
    assert "sketch.png: no chapter writes it" in problems[0]


def test_figures_check_rejects_missing_and_non_png(figures_copy):
    (figures_copy / "figures" / "roadmap.png").write_bytes(b"<svg/>")
    assert figures_tool.check() == ["figures/roadmap.png: not a PNG file"]
    (figures_copy / "figures" / "roadmap.png").unlink()
    assert len(figures_tool.check()) == 1
    assert "roadmap.png: missing" in figures_tool.check()[0]
