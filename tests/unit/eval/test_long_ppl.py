"""Perplexity by context length, checked against a direct full-logits computation."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from finetune.errors import UserError
from finetune.eval import long_ppl, report
from finetune.load.chain import load_for_inference


def direct_ppl(model, ids, bos, starts, context, n):
    """Full logits over every position, log-softmax over the vocabulary, scored tokens picked after."""
    nll, count = 0.0, 0
    for start in starts:
        seq = torch.tensor([[bos] + ids[start - context:start + n]])
        logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
        for j in range(1 + context, seq.shape[1]):
            nll -= logp[j - 1, seq[0, j]].item()
            count += 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def model_and_text(tiny_mixtral):
    model, tokenizer = load_for_inference(str(tiny_mixtral))
    rng = random.Random(0)
    words = "apple river stone cloud green lamp tiger ocean paper music bread light".split()
    text = " ".join(rng.choice(words) for _ in range(400))
    return model, tokenizer, text


def test_perplexity_by_context_equals_a_direct_computation(model_and_text):
    model, tokenizer, text = model_and_text
    result = long_ppl.long_ppl(model, tokenizer, text, [8, 32, 96, 300], score_tokens=24, max_blocks=3)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert result["blocks"] == 3 and result["block_starts"] == [96, 120, 144]  # after the longest context that fits
    curve = {p["context"]: p for p in result["curve"]}
    for context in (8, 32, 96):
        expected = direct_ppl(model, ids, tokenizer.bos_token_id, result["block_starts"], context, 24)
        assert curve[context]["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert curve[context]["tokens"] == 72
    assert curve[300]["status"] == "beyond context" and curve[300]["perplexity"] is None  # 1 + 300 + 24 > 256


def test_too_short_a_text_is_a_user_error(model_and_text):
    model, tokenizer, _ = model_and_text
    with pytest.raises(UserError, match="longer text or shorter --contexts"):
        long_ppl.long_ppl(model, tokenizer, "apple river", [64], score_tokens=24)


def test_long_ppl_files(model_and_text, tmp_path):
    model, tokenizer, text = model_and_text
    result = long_ppl.long_ppl(model, tokenizer, text, [16, 64, 1024], score_tokens=16, max_blocks=1)
    files = report.write_long_ppl(result, tmp_path, "tiny", "text.txt")
    assert json.loads(files[0].read_text())["curve"][2]["status"] == "beyond context"
    assert "| 1024 | beyond context | 0 |" in files[1].read_text()
    assert files[2].read_bytes()[:4] == b"\x89PNG"
