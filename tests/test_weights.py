"""Loading checkpoints: where they come from and how bad ones fail."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from nanovllm_lib import ModelConfig, load_model
from nanovllm_lib.weights import read_safetensors, resolve_checkpoint
from random_models import random_hf_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def tiny_checkpoint(tmp_path, embedded_dir):
    """A random Qwen2 checkpoint folder with the embedded model's tokenizer (vocabulary ids are never decoded)."""
    hf = random_hf_model("qwen2", tie=False)
    hf.save_pretrained(tmp_path)
    for name in TOKENIZER_FILES:
        shutil.copy(embedded_dir / name, tmp_path / name)
    return tmp_path, hf


def test_load_folder_matches_transformers(tiny_checkpoint):
    folder, hf = tiny_checkpoint
    lm = load_model(folder)
    ids = torch.arange(10)[None]
    from nanovllm_lib import CausalAttention

    with torch.no_grad():
        ours = lm.model.compute_logits(lm.model(ids, torch.arange(10)[None], CausalAttention()))
        assert (ours - hf(ids).logits).abs().max() < 1e-4
    assert lm.config.attention_bias


def test_unknown_folder_is_rejected():
    with pytest.raises(FileNotFoundError, match="neither a folder nor"):
        resolve_checkpoint("/no/such/checkpoint")


def test_unreachable_repo_id_explains_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="Could not fetch"):
        resolve_checkpoint("nobody-here/no-such-model-xyz")


def test_unsupported_architecture_rejected(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mistral_moe"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unsupported model_type 'mistral_moe'"):
        load_model(folder)


def test_missing_weight_file_rejected(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="No \\*.safetensors"):
        load_model(folder)


def test_corrupted_weight_file_rejected(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupted or incomplete"):
        read_safetensors(folder)


def test_missing_tensor_named(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    tensors = read_safetensors(folder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="missing \\['model.layers.1.mlp.up_proj.weight'\\]"):
        load_model(folder)


def test_unexpected_tensor_named(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    tensors = read_safetensors(folder)
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected \\['model.layers.0.extra.weight'\\]"):
        load_model(folder)


def test_misshapen_tensor_named(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    tensors = read_safetensors(folder)
    tensors["model.norm.weight"] = torch.zeros(3)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight has shape \\(3,\\)"):
        load_model(folder)


def test_no_parameter_left_on_meta(lm):
    assert all(not p.is_meta for p in lm.model.parameters())
    assert not lm.model.inv_freq.is_meta


def test_embedded_config_numbers(lm):
    assert lm.config == ModelConfig.from_pretrained(lm.path)
    assert (lm.config.num_layers, lm.config.num_heads, lm.config.num_kv_heads, lm.config.head_dim) == (30, 9, 3, 64)
    assert lm.config.rope_theta == 100000.0
    assert 2 in lm.eos_token_ids
