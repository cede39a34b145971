"""Shared fixtures: tiny random Mixtral and Mistral models with a Mixtral-style tokenizer, and data.

Everything is built offline in a temporary directory; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny tensors: a second intra-op thread only adds spin-waiting, most of all on a shared 2-core machine.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
TINY_MOE = REPO / "model" / "tiny-moe"
TINY_TASKS = REPO / "data" / "tiny-tasks"

MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

WORDS = "apple river stone cloud green lamp tiger ocean paper music bread light".split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        rows.append({"messages": [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": w[::-1]}]})
    return rows


def make_pairs(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"reverse {w}"}],
                "chosen": [{"role": "assistant", "content": w[::-1]}],
                "rejected": [{"role": "assistant", "content": w[::-1][:-1]}],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"])
    texts = [f"reverse {w} {w[::-1]} {w.upper()}" for w in WORDS] * 4 + ["the quick brown fox 0123456789"]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=MIXTRAL_TEMPLATE
    )


def save_tiny_model(path: Path, kind: str, tokenizer) -> Path:
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02, **common))
    else:
        model = MistralForCausalLM(MistralConfig(**common))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-mixtral"), "mixtral", tokenizer)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral", tokenizer)


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", make_rows(48))


@pytest.fixture(scope="session")
def pref_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pref.jsonl", make_pairs(32))


def recipe_file(tmp_path: Path, name: str = "recipe.yaml", **sections) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def sft_recipe(tmp_path: Path, model: Path, data: Path, **extra) -> dict:
    recipe = {
        "output_dir": str(tmp_path / "sft-run"),
        "model": {"name_or_path": str(model), "dtype": "float32"},
        "data": {"train": [str(data)], "max_length": 64},
        "lora": {"attention": {"r": 4, "alpha": 8}, "experts": {"r": 4, "alpha": 8}},
        "sft": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe
