"""Padding-free SFT batches (the default, finetune/train/args.py) compute what the rows compute alone.

TRL's collator with `padding_free=True` concatenates a batch's rows into one sequence with
position ids restarting per row and no attention mask; transformers 5 then builds a block-diagonal
causal mask from the position ids (sdpa and eager) when no cache is passed (TRL's SFTTrainer sets
use_cache=False in compute_loss; with a cache transformers skips that detection and the rows would
see each other), so no token attends across two rows. finetune's own SDPA variant
(finetune/train/packed_attention.py, what padding-free SFT runs on an SDPA model) reads the row
boundaries TRL's collator passes instead and attends row by row. These tests prove it on tiny random
models, dense and MoE: every row's per-token losses and the summed gradients equal those of the rows
run one by one; the router aux loss over the packed batch equals the padded batch's with its
attention mask (real tokens only); routing capture counts the same tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, recipe_file, sft_recipe
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from finetune.recipe import read_recipe
from finetune.routing.capture import RoutingCapture
from finetune.stages.sft import run_sft
from finetune.train import packed_attention

ROWS = [[5, 9, 13, 2, 7, 7, 30, 11], [4, 8, 15, 16, 23], [12, 3, 3, 40, 41, 42, 9, 1, 6, 22, 17]]
# rows of near lengths (7, 8, 8, 9 and 3 tokens): the row-by-row SDPA runs the 7 and the two 8 as one
# padded group, so this checks that the padding of a group never reaches a real token
SIMILAR = [[5, 9, 13, 2, 7, 7, 30, 11], [4, 8, 15, 16, 23, 42, 4], [3, 3, 40, 41, 42, 9, 1, 6, 22],
           [60, 2, 33, 18, 5, 5, 12, 50], [7, 14, 21]]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of next-token prediction (labels shifted as the model does)."""
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="none", ignore_index=-100)


@pytest.mark.parametrize("kind", ["mixtral", "mistral"])
@pytest.mark.parametrize("attn, rows", [("sdpa", ROWS), ("eager", ROWS), (packed_attention.NAME, ROWS),
                                        (packed_attention.NAME, SIMILAR), ("sliding window", SIMILAR)])
def test_padding_free_batch_equals_rows_one_by_one(kind, attn, rows, monkeypatch):
    # "sliding window": the row-by-row SDPA with a window shorter than four of the rows
    window = {"sliding_window": 4} if attn == "sliding window" else {}
    model = build_model(kind, vocab_size=64, attn_implementation="sdpa", **window).float()
    calls = []
    monkeypatch.setattr(packed_attention, "FLOOR", 0)  # groups cut by WASTE alone: 7 + 8 + 8 tokens pad one row
    if attn == "eager":
        model.set_attn_implementation("eager")
    elif attn != "sdpa":
        assert packed_attention.use_for_padding_free(model, True)
        spy = packed_attention.packed_rows_sdpa
        monkeypatch.setattr(packed_attention, "packed_rows_sdpa",
                            lambda *a, **k: calls.append("cu_seq_lens_q" in k) or spy(*a, **k))
        packed_attention.register()  # the spy in its place
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([{"input_ids": r} for r in rows])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(map(len, rows)))

    model.zero_grad()
    # every key the collator makes, as SFTTrainer passes them (the row boundaries cu_seq_lens_q among them)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    packed = model(**inputs, use_cache=False).logits[0]
    packed_losses = token_losses(packed, batch["labels"][0])
    packed_losses[batch["labels"][0][1:] != -100].sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    alone_losses = []
    for row in rows:
        ids = torch.tensor([row])
        logits = model(input_ids=ids).logits[0]
        losses = token_losses(logits, ids[0])
        losses.sum().backward()
        alone_losses.append(losses.detach())
    alone_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    start = 0
    for row, alone in zip(rows, alone_losses):
        # within the packed sequence, row k's predictions are positions start .. start+len-2
        got = packed_losses[start:start + len(row) - 1].detach()
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
        start += len(row)
    # the last token of a row never predicts the first of the next: the collator masks that label
    boundaries = [sum(map(len, rows[:i])) for i in range(1, len(rows))]
    assert all(batch["labels"][0][b] == -100 for b in boundaries)
    assert packed_grads.keys() == alone_grads.keys()
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], alone_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the row-by-row attention got the row boundaries in every layer of the packed forward
    assert sum(calls) == (0 if attn in ("sdpa", "eager") else model.config.num_hidden_layers)
    if attn == packed_attention.NAME and rows is SIMILAR:
        assert sorted(len(g) for g, _ in packed_attention._memo["plan"].groups) == [1, 1, 3]  # 3 | 7, 8, 8 | 9
    if attn == "sliding window":  # every row but the 3-token one is longer than the window: alone, with its mask
        assert len(packed_attention._memo["plan"].masked) == 4


def test_aux_loss_and_routing_count_only_real_tokens():
    """The packed batch has no padding; its aux loss and routing counts equal the padded batch's over real tokens."""
    model = build_model("mixtral", vocab_size=64, output_router_logits=True).float().eval()
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": r} for r in ROWS])
    padded = DataCollatorForLanguageModeling(pad_token_id=0)([{"input_ids": r} for r in ROWS])
    assert int((padded["attention_mask"] == 0).sum()) > 0  # the padded batch does pad
    with torch.no_grad(), RoutingCapture(model, mode="counts") as cap:
        aux_packed = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).aux_loss
        counts_packed = cap.counts.clone()
        cap.reset_counts()
        aux_padded = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).aux_loss
        counts_padded = cap.counts.clone()
    torch.testing.assert_close(aux_packed, aux_padded, rtol=1e-5, atol=1e-7)
    assert counts_packed.sum() == sum(map(len, ROWS)) * 2 * model.config.num_hidden_layers  # top-2, real tokens
    torch.testing.assert_close(counts_packed, counts_padded)


@pytest.mark.parametrize("sft, packs", [({}, True), ({"padding_free": False}, False),
                                        # TRL turns padding_free on for BFD packing, its default strategy
                                        ({"padding_free": False, "packing": True}, True),
                                        ({"padding_free": False, "packing": True, "packing_strategy": "wrapped"}, False)])
def test_the_run_reports_the_padding_it_fed(tmp_path, tiny_mixtral, sft_file, sft, packs, monkeypatch):
    """SFT is padding-free by default; metrics.json and the summary say how many padding tokens were fed.
    The run attends within rows exactly when TRL's collator packs them."""
    switched = []
    spy = packed_attention.use_for_padding_free
    monkeypatch.setattr(packed_attention, "use_for_padding_free", lambda m, on: switched.append(on) or spy(m, on))
    extra = {"sft": sft} if sft else {}
    recipe = read_recipe(recipe_file(tmp_path, **sft_recipe(tmp_path, tiny_mixtral, sft_file, **extra)))
    out = run_sft(recipe)
    metrics = json.loads((out / "metrics.json").read_text())
    assert switched == [packs]
    assert metrics["tokens_fed"] > 0
    if packs:
        assert metrics["padding_tokens"] == 0
    elif "packing" not in sft:
        assert 0 < metrics["padding_tokens"] < metrics["tokens_fed"]


def test_linear_attention_models_keep_padded_batches():
    """Qwen3-Next's gated delta-net layers cannot keep packed rows apart without causal-conv1d
    (transformers refuses), so SFT on such a model keeps padded batches unless the recipe asks."""
    from transformers import AutoConfig

    from finetune.train.args import packs_rows_apart

    assert packs_rows_apart(build_model("mixtral", vocab_size=64).config)
    assert not packs_rows_apart(AutoConfig.for_model("qwen3_next", num_hidden_layers=4))
    assert packs_rows_apart(AutoConfig.for_model("qwen3_next", num_hidden_layers=4,
                                                 layer_types=["full_attention"] * 4))


def test_rows_whose_mask_block_is_plain_causal_run_without_a_mask():
    """Row-by-row SDPA passes no mask (is_causal: the flash kernel on GPUs) only where the row's block
    of the model's mask is the causal triangle; a sliding window shorter than the row keeps its block."""
    triangle = torch.ones(3, 3, dtype=torch.bool).tril()
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    mask[..., :3, :3] = mask[..., 3:, 3:] = triangle
    assert packed_attention._plain_causal_rows(mask, [0, 3, 6]) == [True, True]
    windowed = mask.clone()
    windowed[..., 5, 3] = False  # row 2's last token sees only 2 tokens back
    assert packed_attention._plain_causal_rows(windowed, [0, 3, 6]) == [True, False]
    assert packed_attention._plain_causal_rows(None, [0, 3, 6]) == [True, True]


def test_short_rows_share_one_sdpa_call_and_long_rows_keep_their_own():
    """Padding a group may cost WASTE of its rows' attention work or one FLOOR-token row's, whichever is more."""
    sizes = [20] * 14 + [150, 200]
    groups = packed_attention._groups(sorted(range(16), key=lambda i: sizes[i]), sizes)
    assert [sorted(sizes[i] for i in g) for g in groups] == [[20] * 14, [150], [200]]


@pytest.mark.parametrize("reentrant", [False, True])
def test_within_rows_attention_under_gradient_checkpointing(reentrant, monkeypatch):
    """The real recipes train with gradient checkpointing (TRL's default use_reentrant=False; True where
    TRL forces it, PEFT under ZeRO-3): the recomputed forward must find the same rows as the first one
    (the plan is memoized per forward) and give the gradients of a run without checkpointing."""
    model = build_model("mixtral", vocab_size=64, attn_implementation="sdpa").float().train()
    assert packed_attention.use_for_padding_free(model, True)
    monkeypatch.setattr(packed_attention, "FLOOR", 0)  # a padded group of 3 rows, as in SIMILAR's test
    spy, calls = packed_attention.packed_rows_sdpa, []
    monkeypatch.setattr(packed_attention, "packed_rows_sdpa",
                        lambda *a, **k: calls.append(len(packed_attention._plan(k["cu_seq_lens_q"], a[4],
                                                                                a[1].shape[2]).groups))
                        or spy(*a, **k))
    packed_attention.register()
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": r} for r in SIMILAR])
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def gradients():
        model.zero_grad()
        calls.clear()
        model(**inputs, labels=batch["labels"], use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    assert calls == [3] * model.config.num_hidden_layers  # one forward, groups 3 | 7, 8, 8 | 9
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # what PEFT does for reentrant checkpointing
    checkpointed = gradients()
    assert calls == [3] * (2 * model.config.num_hidden_layers)  # the forward, then each layer recomputed
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
