"""gpt-oss checkpoints ship MXFP4 experts, which transformers refuses to train where its MXFP4
kernels are installed: the 16-bit loader asks for them dequantized, and leaves other checkpoints be."""

from __future__ import annotations

import json

import pytest

from finetune import modeling
from finetune.recipe import ModelSection


@pytest.mark.parametrize("quantized", [True, False])
def test_mxfp4_checkpoints_load_dequantized(tmp_path, monkeypatch, quantized):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    config = json.loads(modeling.bundled_config_path("openai/gpt-oss-20b").read_text())
    if not quantized:
        del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here: only the arguments are checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(modeling.UserError, match="stop here"):
        modeling.load_pretrained(ModelSection(name_or_path=str(tmp_path), attn_implementation="eager"))
    if quantized:
        assert isinstance(seen["quantization_config"], Mxfp4Config) and seen["quantization_config"].dequantize
    else:
        assert "quantization_config" not in seen and seen["attn_implementation"] == "eager"
