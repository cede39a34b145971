"""Shared fixtures: tiny random Mixtral and Mistral models with a Mixtral-style tokenizer, and data.

Everything is built offline in a temporary directory; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
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

# Commands the README and docs/ show on the bundled default that train, by the slow test that runs
# them: tests/e2e/test_pipeline.py takes its argv from here and tests/docs/test_docs.py matches the docs'
# commands against it, so the documented command and the tested one cannot drift apart.
DOCUMENTED_RUNS = {
    "pipeline": ["pipeline", "recipes/tiny-moe", "--eval-data", "data/tiny-tasks/test.jsonl", "--overwrite"],
}

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


def build_model(kind: str = "mixtral", *, seed: int = 0, experts_implementation: str | None = None, **config):
    """The one builder of tiny random models for every test: a MixtralForCausalLM (or a dense
    MistralForCausalLM) from these defaults updated by `config`, seeded so weights repeat."""
    from transformers import (
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
    )

    torch.manual_seed(seed)
    settings = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
    )
    if kind == "mixtral":
        settings.update(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02)
    settings.update(config)
    model = MixtralForCausalLM(MixtralConfig(**settings)) if kind == "mixtral" else MistralForCausalLM(MistralConfig(**settings))
    if experts_implementation:
        model.set_experts_implementation(experts_implementation)
    return model


def save_tiny_model(path: Path, kind: str, tokenizer) -> Path:
    model = build_model(kind, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- in memory: the routing tests' model, word-level tokenizer and texts ----------------------

ROUTING_WORDS = (
    "the a an of to in is was it that for on with as at by from this be are or not but have "
    "one two three four five six seven eight nine ten code python function return value list "
    "math add sum number prime even odd story cat dog ran sat mat red blue green house tree "
    "question answer user assistant system hello world yes no please thanks data model expert"
).split()
WORD_CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s> assistant :{% endif %}"
)


def random_lora(model, expert_weights=("gate_up_proj", "down_proj")):
    """LoRA on q/v and the fused experts, with a seeded A and a random B: PEFT inits B to zero, which
    would hide any error in the B·A product (the 4-bit tests compare it with PEFT's stock path)."""
    from peft import LoraConfig, get_peft_model  # peft: only the tests that build adapters need it

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        target_parameters=[f"experts.{w}" for w in expert_weights])
    torch.manual_seed(1)  # the same LoRA A for both models of a pair
    model = get_peft_model(model, config)
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            if "lora_B" in name:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(i))
    return model


def moe_model(vocab_size: int, *, hidden: int = 32, layers: int = 3, experts: int = 8, top_k: int = 2, seed: int = 0):
    """A random Mixtral with 8 experts for the routing tests, built in memory (no files)."""
    return build_model(
        "mixtral", seed=seed, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=512,
        router_aux_loss_coef=0.001, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        # the default "grouped_mm" experts path is ~100x slower than the per-expert loop on CPU at this size
        experts_implementation="eager",
    )


def word_tokenizer():
    """A word-level tokenizer over ROUTING_WORDS with a plain chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + ROUTING_WORDS + [":", ".", ",", "?", "!"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = WORD_CHAT_TEMPLATE
    return tok


def random_texts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(ROUTING_WORDS) for _ in range(rng.randint(words // 2, words))) for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Prepared data sets go to a folder of this session, not ~/.cache (finetune/data/cache.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_CACHE", str(tmp_path_factory.mktemp("finetune-cache")))
        yield


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


def assume_tensorboard(monkeypatch):
    """The Mixtral recipes log to TensorBoard. CI installs it (the `test` extra) and validates them
    for real; without it, validate's logger check is assumed to pass here and is tested on its own
    (tests/unit/train/test_watch_checks.py: the recipe fails in validate, naming the extra)."""
    real = importlib.util.find_spec
    if real("tensorboard") is None:
        monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: real("json") if mod == "tensorboard" else real(mod, *a))
