"""Tiny random checkpoints for the support matrix: a type's tiny config (tiny_configs.py), random
weights, the bundled tokenizer, and a seed whose routers feed every expert.

    python bench/support_matrix.py      # builds one checkpoint per type with tiny_checkpoint
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import tiny_configs
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.moe import find_routers
from finetune.routing.capture import RoutingCapture

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "model" / "tiny-moe"
DATA = REPO / "data" / "tiny-tasks"
# seeds tried in order, the least share of an even split each expert must get, the SFT rows routed
SEEDS, MIN_SHARE, SFT_ROWS = range(8), 0.25, 32


def tiny_checkpoint(model_type: str, directory: Path) -> tuple[Path, int]:
    """(directory, seed) of a tiny random checkpoint with the bundled tokenizer. The seed is the first
    of SEEDS whose random routers send every expert at least MIN_SHARE of an even share of the SFT
    data's tokens (else the most even one): with a starved expert (OLMoE's seed 0 sent one expert
    0.6% of layer 1's tokens) a 3-step run cannot change it, and "every expert changed" would test
    the random init instead of the export."""
    config = tiny_configs.tiny_config(model_type)
    if getattr(config, "enable_moe_block", None) is False:
        config.enable_moe_block = True  # Gemma-4: the MoE block is a config switch, off by default
        config.num_experts, config.top_k_experts, config.moe_intermediate_size = 4, 2, 32
    # AutoTokenizer picks the family's tokenizer class from config.json's model_type, and some add
    # special tokens the bundled vocabulary lacks (Qwen3.5's `<|endoftext|>` pad, id 956): the tiny
    # model's embedding covers every id its tokenizer makes, as a released checkpoint's does.
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOKENIZER / name, directory / name)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    batch = sft_batch(tokenizer)
    best = None
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).float()
        # random init leaves some families' norms/biases at zero or one; a little noise makes every expert matter
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        share = min_expert_share(model, batch)
        if best is None or share > best[0]:
            best = (share, seed, model)
        if share >= MIN_SHARE:
            break
    best[2].save_pretrained(directory)
    return directory, best[1]


def sft_batch(tokenizer) -> dict[str, torch.Tensor]:
    """The first SFT_ROWS conversations of the SFT data, chat-formatted and padded into one batch."""
    rows = [json.loads(line) for line in (DATA / "sft.jsonl").read_text().splitlines()[:SFT_ROWS]]
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt"))


def min_expert_share(model, batch) -> float:
    """The least-routed expert's share of real tokens over all MoE layers, 1.0 = an even share
    (1.0 where no router is found or its output cannot be read: the matrix's columns then say why)."""
    if not find_routers(model):
        return 1.0
    try:
        with RoutingCapture(model, mode="counts") as capture, torch.no_grad():
            model(**batch)
    except TypeError:  # a router output routing capture cannot read: the routing column says so
        return 1.0
    counts = capture.counts.float()  # (layers, experts) top-k assignments
    return (counts / counts.sum(1, keepdim=True) * counts.shape[1]).min().item()
