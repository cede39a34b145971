"""A causal LM whose `base_model_prefix` names no attribute (Llama-4's text model) gets its decoder
as `base_model` on load, so TRL's fused LM head (SFT and DPO) reads hidden states from it."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Llama4TextConfig
from trl.trainer.utils import add_fused_lm_head

from finetune.modeling import load_pretrained
from finetune.recipe import ModelSection


def test_llama4_text_base_model_is_its_decoder_and_the_fused_head_runs(tmp_path):
    config = Llama4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=32, intermediate_size_mlp=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=4, num_experts_per_tok=1, max_position_embeddings=64)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config)
    assert plain.base_model is plain  # the transformers quirk this fixes: prefix `language_model`, decoder at `model`
    plain.save_pretrained(tmp_path)

    model = load_pretrained(ModelSection(name_or_path=str(tmp_path), dtype="float32"))
    assert model.base_model is model.model
    assert model.state_dict().keys() == plain.state_dict().keys()  # nothing registered twice

    add_fused_lm_head(model)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    fused = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    want = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(fused, want, atol=1e-5, rtol=1e-5)
