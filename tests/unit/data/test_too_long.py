"""data.too_long on the bundled tiny model's tokenizer: SFT rows cut keep_start (ids and mask are a
prefix of the whole row's), rows left with no trained token dropped and counted; DPO rows truncated
as TRL 1.16 does it (its own _prepare_dataset and collator run here), the rows TRL would drop
dropped and counted by us; counts by reason per source in the report; too_long: error names the row."""

from __future__ import annotations

import types

import pytest
from conftest import TINY_MOE, write_jsonl
from transformers import AutoTokenizer

from finetune.data.masks import tokenize_sft
from finetune.data.prep import build_datasets
from finetune.errors import UserError
from finetune.recipe import DataSection

LIMIT = 40


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_MOE)


def turn(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


SHORT = {"messages": turn("Reverse the word lamp.", "pmal")}
# two turns: the first whole within LIMIT, the second cut in its answer
LONG = {"messages": turn("Reverse the word star.", "rats") + turn("Now say the word cloud " * 4, "cloud " * 30)}
# the prompt alone is longer than LIMIT: cut there, no assistant token is left
PROMPT_ONLY = {"messages": turn("Count the words: " + "gold wind hat " * 20, "60")}


def test_sft_truncate_keeps_the_start_of_ids_and_mask(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [SHORT, LONG, PROMPT_ONLY, SHORT])
    train, _, report = build_datasets(DataSection(train=[str(path)], max_length=LIMIT, too_long="truncate"), tok, "sft", 0)
    assert len(train) == 3
    whole = tokenize_sft(tok, LONG["messages"], True)
    assert len(whole["input_ids"]) > LIMIT and sum(whole["assistant_masks"][:LIMIT]) < sum(whole["assistant_masks"])
    cut = train[1]
    assert cut["input_ids"] == whole["input_ids"][:LIMIT]
    assert cut["assistant_masks"] == whole["assistant_masks"][:LIMIT]
    assert tokenize_sft(tok, SHORT["messages"], True)["input_ids"] == train[0]["input_ids"]  # short rows untouched
    (source,) = report.sources
    assert source["rows_read"] == 4 and source["usable"] == 3 and source["used"] == 3
    assert source["dropped"] == {"no trained token left": 1} and source["changed"] == {"truncated": 1}
    assert [p.where for p in report.dropped] == [f"{path}:3"]
    # a cache hit reports the same counts (they are in the entry's manifest, then in <run>/data_report.json)
    again = build_datasets(DataSection(train=[str(path)], max_length=LIMIT, too_long="truncate"), tok, "sft", 0)[2]
    assert again.sources == report.sources and again.dropped == report.dropped


def test_sft_drop_is_the_default_and_error_names_the_row(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [SHORT, {"text": "not a row"}, LONG, PROMPT_ONLY])
    assert DataSection().too_long == "drop"
    train, _, report = build_datasets(DataSection(train=[str(path)], max_length=LIMIT, bad_rows="drop"), tok, "sft", 0)
    assert len(train) == 1
    assert report.sources[0]["dropped"] == {"malformed": 1, "too long": 2} and "changed" not in report.sources[0]
    with pytest.raises(UserError) as info:
        build_datasets(DataSection(train=[str(path)], max_length=LIMIT, bad_rows="drop", too_long="error"), tok, "sft", 0)
    assert f"{path}:3: " in str(info.value) and "data.too_long" in str(info.value)


# ---- DPO: TRL's own truncation ------------------------------------------------------------------


def pair(prompt, chosen, rejected):
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def trl_prepare(rows, tok, tmp_path):
    """TRL 1.16's DPOTrainer._prepare_dataset on the rows (it needs no model: only the tokenizer)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_length=LIMIT, use_cpu=True, bf16=False, report_to="none")
    return DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), Dataset.from_list(rows), tok, args, "train")


@pytest.mark.parametrize("form", ["messages", "text"])
def test_dpo_truncate_is_trls_and_counts_what_trl_would_drop(tmp_path, tok, form):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [pair("Say glass twice.", "glass glass", "wolf wolf"),
            pair("Say cloud many times.", "cloud " * 40, "cloud " * 3),              # longer than LIMIT: TRL cuts it
            pair("Count the words: " + "gold wind hat " * 20, "60", "59")]          # the prompt alone fills LIMIT
    if form == "text":
        rows = [{k: v[0]["content"] for k, v in r.items()} for r in rows]
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    train, _, report = build_datasets(DataSection(train=[str(path)], max_length=LIMIT, too_long="truncate"), tok,
                                      "preference", 0)
    assert report.sources[0]["dropped"] == {"prompt fills max_length": 1}
    assert report.sources[0]["changed"] == {"truncated": 1}
    assert train.to_list() == rows[:2]
    # TRL, given every row, drops exactly the one we dropped; given ours, drops none
    assert len(trl_prepare(rows, tok, tmp_path)) == 2
    ours = trl_prepare(train.to_list(), tok, tmp_path)
    assert len(ours) == 2
    long = ours[1]
    assert len(long["prompt_ids"]) + len(long["chosen_ids"]) > LIMIT
    batch = DataCollatorForPreference(pad_token_id=tok.eos_token_id, max_length=LIMIT)([long])
    assert batch["input_ids"].shape[1] == LIMIT  # cut by TRL's collator, keep_start
    assert batch["input_ids"][0].tolist() == (long["prompt_ids"] + long["chosen_ids"])[:LIMIT]
    # drop (the default): the long row is dropped as too long, by the length TRL would train on
    train, _, report = build_datasets(DataSection(train=[str(path)], max_length=LIMIT), tok, "preference", 0)
    assert report.sources[0]["dropped"] == {"too long": 2} and len(train) == 1
    assert f"{len(long['prompt_ids']) + len(long['chosen_ids'])} tokens" in report.dropped[0].what
