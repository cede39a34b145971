"""gpt-oss checkpoints with MXFP4 experts: LoRA loads them decoded (16-bit, or NF4 with
model.quantization: nf4), and the export writes a 16-bit checkpoint and says so.

    pytest tests/e2e/test_mxfp4.py      # CPU, offline, about half a minute

The tiny MXFP4 checkpoint is written from the format with random codes
(bench/mxfp4_checkpoint.py: transformers 5.25 cannot write MXFP4 on a CPU offline, it needs
Triton kernels fetched from the hub), so the expected decoded weights are known exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from finetune.modeling import load_pretrained
from finetune.recipe import ModelSection

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import mxfp4_checkpoint  # writes MXFP4 experts from the format
import support_matrix  # the recipes of the family sweep
import tiny_models  # its tiny checkpoints (bundled tokenizer)


def write_mxfp4(directory: Path) -> dict[str, torch.Tensor]:
    """A tiny random gpt-oss checkpoint with its experts in MXFP4; returns the exact decoded weights."""
    tiny_models.tiny_checkpoint("gpt_oss", directory)
    return mxfp4_checkpoint.to_mxfp4(directory)


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    return directory, write_mxfp4(directory)


def section(path, **extra) -> ModelSection:
    return ModelSection(name_or_path=str(path), dtype="float32", attn_implementation="eager", **extra)


def test_16bit_load_decodes_exactly(mxfp4_dir):
    path, expected = mxfp4_dir
    model = load_pretrained(section(path))
    assert not getattr(model.config, "quantization_config", None)  # a plain model: LoRA and the Trainer accept it
    for key, want in expected.items():
        got = model.get_parameter(key)
        assert got.dtype == torch.float32 and torch.equal(got, want), key


def test_nf4_load_decodes_then_quantizes_while_loading(mxfp4_dir, monkeypatch, caplog):
    from finetune.qlora import experts as nf4_experts
    from finetune.qlora import loading, nf4

    path, expected = mxfp4_dir
    arrived = []
    real = nf4_experts.quantize_expert_weight

    def spy(experts, name, w, compute_dtype, staged=False):
        arrived.append(w.dtype)
        return real(experts, name, w, compute_dtype, staged)

    monkeypatch.setattr(loading, "quantize_expert_weight", spy)
    with caplog.at_level("WARNING", logger="finetune"):
        model = loading.load_quantized(section(path))
    monkeypatch.setattr(loading, "quantize_expert_weight", real)
    assert arrived == [torch.float32] * len(expected) and "after loading" not in caplog.text
    plain = load_pretrained(section(path))  # the exact decode, quantized the ordinary way
    nf4_experts.quantize_experts(plain, torch.float32)
    for got, want in zip(model.model.layers, plain.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(got.mlp.experts, f"{name}_nf4_packed"), getattr(want.mlp.experts, f"{name}_nf4_packed"))
            assert torch.equal(nf4.dequantized_weight(got.mlp.experts, name), nf4.dequantized_weight(want.mlp.experts, name))


def test_sft_and_export_write_16bit(mxfp4_dir, tmp_path):
    from finetune.export import MANIFEST, export
    from finetune.recipe import read_recipe
    from finetune.stages.sft import run_sft

    path, expected = mxfp4_dir
    run = run_sft(read_recipe(support_matrix.recipe(tmp_path, path, "sft", steps=2)))
    out = export(str(run), str(tmp_path / "export"), dtype="float32", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    note = json.loads((out / MANIFEST).read_text())["base_mxfp4"]
    assert "4 expert weights in MXFP4" in note and "merged in float32" in note, note
    assert note in (out / "README.md").read_text()  # the model card says it too
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert not any(k.endswith(("_blocks", "_scales")) for k in keys)
        for key, base in expected.items():
            merged = f.get_tensor(key)
            assert merged.dtype == torch.float32 and merged.shape == base.shape
            assert not torch.equal(merged, base)  # LoRA merged into the decoded experts (the export checks the values)
