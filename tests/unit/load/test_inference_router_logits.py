"""Loading for inference switches router logits off: a checkpoint saved with
`output_router_logits: true` once made `finetune eval` fail inside batched `generate`, where
transformers computed the aux loss of one new token against the whole attention mask."""

from __future__ import annotations

import json

import pytest
from conftest import build_model
from transformers import AutoModelForCausalLM

from finetune.eval.scores import exact_match
from finetune.load.chain import load_for_inference

# prompts of different lengths, so the batch is left-padded
ROWS = [{"prompt": "reverse abc", "answer": "cba"}, {"prompt": "reverse the quick brown fox jumps", "answer": "x"}]


@pytest.fixture(scope="module")
def logits_on_checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("router-logits-on")
    build_model("mixtral", vocab_size=len(tokenizer), output_router_logits=True, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_eval_generates_on_a_checkpoint_saved_with_router_logits_on(logits_on_checkpoint):
    assert json.loads((logits_on_checkpoint / "config.json").read_text())["output_router_logits"] is True
    model, tokenizer = load_for_inference(str(logits_on_checkpoint), "float32", "cpu")
    assert model.config.output_router_logits is False
    result = exact_match(model, tokenizer, ROWS, max_new_tokens=3, batch_size=2)
    assert result["n"] == 2 and len(result["samples"]) == 2
    # the checkpoint on disk is left as it was
    assert json.loads((logits_on_checkpoint / "config.json").read_text())["output_router_logits"] is True


def test_the_same_checkpoint_loaded_plainly_fails_in_generate(logits_on_checkpoint):
    """The failure the switch prevents (so the test above can fail)."""
    _, tokenizer = load_for_inference(str(logits_on_checkpoint), "float32", "cpu")
    plain = AutoModelForCausalLM.from_pretrained(logits_on_checkpoint).eval()
    with pytest.raises(RuntimeError, match="size of tensor"):
        exact_match(plain, tokenizer, ROWS, max_new_tokens=3, batch_size=2)
