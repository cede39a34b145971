"""Tiny offline Mixtral, tokenizer and texts for the routing tests and the overhead benchmark.

No network and no files: everything is built in memory in well under a second. Used by
tests/test_routing_*.py and `python -m finetune.routing.overhead`.
"""

from __future__ import annotations

import random

import torch

WORDS = (
    "the a an of to in is was it that for on with as at by from this be are or not but have "
    "one two three four five six seven eight nine ten code python function return value list "
    "math add sum number prime even odd story cat dog ran sat mat red blue green house tree "
    "question answer user assistant system hello world yes no please thanks data model expert"
).split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s> assistant :{% endif %}"
)


def tiny_tokenizer():
    """A word-level PreTrainedTokenizerFast over WORDS with a plain chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + [":", ".", ",", "?", "!"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_mixtral(
    vocab_size: int, *, hidden: int = 32, layers: int = 3, experts: int = 8, top_k: int = 2, seed: int = 0
):
    """A randomly initialised MixtralForCausalLM small enough for CPU tests."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = MixtralForCausalLM(config)
    # The default "grouped_mm" experts path is ~100x slower than the per-expert loop on CPU at this size.
    model.set_experts_implementation("eager")
    return model


def random_texts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words))) for _ in range(n)]
