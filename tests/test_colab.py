"""The Colab setup: what it installs on a simulated Colab runtime, and that it does nothing elsewhere.

No test runs pip or git: every command goes to a recorder instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

import nanovllm_lib.embedded_model
from nanovllm_lib import colab
from nanovllm_lib.colab import KEPT_ON_COLAB, is_colab, missing_requirements, read_pins, setup_colab

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements.txt"


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


class Recorder:
    """Stands in for a command runner or for ensure_embedded_model, and records each call."""

    def __init__(self, result=None):
        self.calls = []
        self.result = result

    def __call__(self, *args):
        self.calls.append(args[0] if len(args) == 1 else args)
        return self.result


@pytest.fixture
def outside_colab(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    for name in [name for name in os.environ if name.startswith("COLAB_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def on_colab(monkeypatch):
    """Simulate a Colab runtime; restore the working directory and sys.path afterwards."""
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(Path.cwd())


@pytest.fixture
def course_dir(tmp_path):
    """A stand-in for the clone on Colab: the real requirements.txt and a notebooks/ folder."""
    (tmp_path / "notebooks").mkdir()
    shutil.copy(REQUIREMENTS, tmp_path / "requirements.txt")
    (tmp_path / "nanovllm_lib").mkdir()
    shutil.copy(ROOT / "nanovllm_lib" / "colab.py", tmp_path / "nanovllm_lib" / "colab.py")
    return tmp_path


def nothing_installed(name: str) -> None:
    return None


def installed_args(commands: list[list[str]]) -> list[str]:
    """Every argument of every pip command that is not an option."""
    return [arg for command in commands for arg in command[4:] if not arg.startswith("-")]


def test_is_colab_detects_module_and_env(outside_colab, monkeypatch):
    assert not is_colab()
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-test")
    assert is_colab()
    monkeypatch.delenv("COLAB_RELEASE_TAG")
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert is_colab()


def test_setup_does_nothing_outside_colab(outside_colab, course_dir):
    run, ensure_model = Recorder(), Recorder()
    cwd, path = Path.cwd(), list(sys.path)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        commands = setup_colab(course_dir, run=run, installed=nothing_installed, ensure_model=ensure_model)
    assert commands == []
    assert run.calls == []
    assert ensure_model.calls == []
    assert Path.cwd() == cwd
    assert sys.path == path
    assert output.getvalue() == ""


def test_setup_installs_requirements_except_torch(on_colab, course_dir):
    run, ensure_model = Recorder(), Recorder(result=course_dir / "model")
    with contextlib.redirect_stdout(io.StringIO()):
        commands = setup_colab(course_dir, run=run, installed=nothing_installed, ensure_model=ensure_model)

    assert run.calls == commands
    assert len(commands) == 2
    requirements_install, package_install = commands
    assert requirements_install[:4] == [sys.executable, "-m", "pip", "install"]
    pins = read_pins(REQUIREMENTS)
    expected = {f"{name}=={version}" for name, version in pins.items() if name not in KEPT_ON_COLAB}
    assert set(installed_args([requirements_install])) == expected
    assert package_install[-3:] == ["--no-deps", "--editable", str(course_dir.resolve())]
    assert not any(arg.startswith("torch") for arg in installed_args(commands))
    assert ensure_model.calls == [()]
    assert Path.cwd() == (course_dir / "notebooks").resolve()
    assert sys.path[0] == str(course_dir.resolve())


def test_setup_installs_only_missing_or_other_versions(on_colab, course_dir, monkeypatch):
    monkeypatch.delitem(sys.modules, "transformers", raising=False)  # as if this session had not imported it
    pins = read_pins(REQUIREMENTS)
    colab_versions = dict(pins, transformers="4.0.0", torch="2.0.0+cu121")
    del colab_versions["gguf"]
    run = Recorder()
    with contextlib.redirect_stdout(io.StringIO()):
        commands = setup_colab(course_dir, run=run, installed=colab_versions.get, ensure_model=Recorder())
    assert set(installed_args(commands[:1])) == {f"gguf=={pins['gguf']}", f"transformers=={pins['transformers']}"}
    assert commands[1][-3:] == ["--no-deps", "--editable", str(course_dir.resolve())]


def test_setup_with_everything_installed_installs_only_course(on_colab, course_dir):
    run = Recorder()
    with contextlib.redirect_stdout(io.StringIO()):
        commands = setup_colab(course_dir, run=run, installed=read_pins(REQUIREMENTS).get, ensure_model=Recorder())
    assert len(commands) == 1
    assert commands[0][-3:] == ["--no-deps", "--editable", str(course_dir.resolve())]


def test_setup_asks_restart_for_imported_package(on_colab, course_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", types.ModuleType("gguf"))
    versions = dict(read_pins(REQUIREMENTS), gguf="0.1.0")
    ensure_model = Recorder()
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(RuntimeError, match="Restart the session"):
        setup_colab(course_dir, run=Recorder(), installed=versions.get, ensure_model=ensure_model)
    assert ensure_model.calls == []


def test_missing_requirements_never_lists_kept_packages():
    pins = read_pins(REQUIREMENTS)
    missing = missing_requirements(pins, installed=nothing_installed)
    names = {pin.split("==")[0] for pin in missing}
    assert "torch" in pins
    assert names == set(pins) - set(KEPT_ON_COLAB)


@pytest.mark.parametrize("line", ["torch>=2.0", "torch", "-e .", "numpy==1.0 ; python_version<'3.9'"])
def test_read_pins_rejects_non_pins(tmp_path, line):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"# a comment\n--extra-index-url https://example.invalid/simple\n{line}\n")
    if line.startswith("-"):
        assert read_pins(requirements) == {}
        return
    with pytest.raises(ValueError, match="exact pin"):
        read_pins(requirements)


def test_read_pins_normalizes_names(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("Jupyter_Client==8.0.0  # comment\n\ntorch==2.13.0+cpu\n")
    assert read_pins(requirements) == {"jupyter-client": "8.0.0", "torch": "2.13.0+cpu"}


# The cell at the top of every chapter.

def chapter_colab_cells() -> list[tuple[str, str]]:
    cells = []
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        found = [cell.source for cell in notebook.cells if badges.is_colab_cell(cell)]
        cells.append((path.name, found[0] if found else None))
    return cells


@pytest.mark.parametrize("name, source", chapter_colab_cells())
def test_chapter_cell_is_silent_outside_colab(outside_colab, monkeypatch, name, source):
    assert source is not None, f"{name} has no Colab setup cell; run `make badges`"
    assert source == badges.colab_cell_source(badges.read_course(ROOT / "course.toml"))

    def reject_command(*args, **kwargs):
        raise AssertionError(f"the Colab cell of {name} ran a command outside Colab: {args}")

    monkeypatch.setattr(subprocess, "run", reject_command)
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        exec(compile(source, name, "exec"), {})
    assert output.getvalue() == ""


def test_chapter_cell_on_simulated_colab(on_colab, course_dir, monkeypatch):
    """Run the generated cell end to end with Colab simulated: it clones, installs and fetches the model."""
    course = badges.Course("someone/nano-vllm-course", "main")
    clone_target = course_dir.parent / "clone-target"  # missing, so the cell must clone
    source = badges.colab_cell_source(course, course_dir=str(clone_target))
    commands = []

    def record(command, **kwargs):
        commands.append(command)
        if command[:2] == ["git", "clone"]:
            shutil.copytree(course_dir, clone_target)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", record)
    ensure_model = Recorder(result=Path("/model"))
    monkeypatch.setattr(nanovllm_lib.embedded_model, "ensure_embedded_model", ensure_model)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(source, "colab cell", "exec"), {})

    assert commands[0] == ["git", "clone", "--quiet", "--depth", "1", "--branch", "main",
                           "https://github.com/someone/nano-vllm-course.git", str(clone_target)]
    pip_commands = commands[1:]
    assert all(command[1:4] == ["-m", "pip", "install"] for command in pip_commands)
    assert pip_commands[-1][-3:] == ["--no-deps", "--editable", str(clone_target.resolve())]
    assert not any(arg.startswith("torch") for arg in installed_args(pip_commands))
    assert ensure_model.calls == [()]
    assert Path.cwd() == (clone_target / "notebooks").resolve()
    assert "model ready: /model" in output.getvalue()


def test_setup_module_imports_only_standard_library():
    """The cell loads colab.py before any requirement is installed, so it must not import one."""
    source = Path(colab.__file__).read_text(encoding="utf-8")
    top_level_imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    third_party = [line for line in top_level_imports
                   if line.split()[1].split(".")[0] not in sys.stdlib_module_names | {"__future__"}]
    assert third_party == []
