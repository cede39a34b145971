"""Data rows: every kind of bad row is named by file and row; assistant masks cover exactly the answers."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from finetune.data.files import read_rows
from finetune.data.masks import tokenize_sft
from finetune.data.prep import build_datasets
from finetune.errors import UserError
from finetune.recipe import DataSection

GOOD = {"messages": [{"role": "user", "content": "reverse lamp"}, {"role": "assistant", "content": "pmal"}]}


def section(path, **kw) -> DataSection:
    return DataSection(train=[str(path)], max_length=kw.pop("max_length", 64), **kw)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"text": "hello"}, "expected `messages` or `prompt` + `completion`"),
        ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]}, "roles must alternate"),
        ({"messages": [{"role": "user", "content": "reverse lamp"}, {"role": "assistant", "content": "  "}]}, "`messages[1].content` is empty"),
        ({"messages": [{"role": "user", "content": "reverse lamp"}]}, "must end with a assistant message"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "expected one of system, user, assistant"),
    ],
)
def test_bad_sft_row_names_file_and_row(tmp_path, tokenizer, bad, message):
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(UserError) as info:
        build_datasets(section(path), tokenizer, "sft", 0)
    text = str(info.value)
    assert f"{path}:3: " in text and message in text
    assert "data.bad_rows: drop" in text  # says how to go on


def test_drop_mode_skips_and_counts(tmp_path, tokenizer):
    bad = {"messages": [{"role": "user", "content": "x"}]}
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD, bad, GOOD, bad])
    train, _, report = build_datasets(section(path, bad_rows="drop"), tokenizer, "sft", 0)
    assert len(train) == 2 and len(report.dropped) == 2
    assert str(report.dropped[0]).startswith(f"{path}:2:")


def test_template_error_is_a_row_error(tmp_path, tokenizer):
    row = {"messages": [{"role": "system", "content": "be brief"}, *GOOD["messages"]]}  # Mixtral's template has no system role
    path = write_jsonl(tmp_path / "sft.jsonl", [row])
    with pytest.raises(UserError, match=r"sft.jsonl:1: the chat template rejects this conversation"):
        build_datasets(section(path, system="keep"), tokenizer, "sft", 0)


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_system_turns_a_template_refuses_are_folded_and_counted(tmp_path, tokenizer, kind):
    """data.system: auto with Mixtral's template (it raises on system turns): folded, not lost; the
    count per choice comes back in the report, from a cold build and from the cache alike."""
    system = {"role": "system", "content": "be brief"}
    if kind == "sft":
        rows = [{"messages": [system, *GOOD["messages"]]}, GOOD, {"messages": [system, *GOOD["messages"]]}]
    else:
        pair = {"prompt": [system, GOOD["messages"][0]], "chosen": [GOOD["messages"][1]], "rejected": [{"role": "assistant", "content": "x"}]}
        rows = [pair, {**pair, "prompt": [GOOD["messages"][0]]}, pair]
    path = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
    for _ in range(2):  # cold build, then cache hit
        train, _, report = build_datasets(section(path), tokenizer, kind, 0)
        assert report.system == {"folded": 2} and len(train) == 3 and not report.dropped
    if kind == "sft":
        text = tokenizer.decode(train[0]["input_ids"])  # this tokenizer has no newline: <unk> stands for it
        assert text.startswith("<s>[INST] be brief") and text.endswith("reverse lamp [/INST] pmal</s>")
        assert "system" not in train.column_names
    else:
        assert train[0]["prompt"] == [{"role": "user", "content": "be brief\n\nreverse lamp"}]
    _, _, dropped = build_datasets(section(path, system="drop"), tokenizer, kind, 0)
    assert dropped.system == {"dropped": 2}


def test_assistant_mask_covers_answers_and_end_of_turn_only(tokenizer):
    messages = [
        {"role": "user", "content": "reverse lamp"}, {"role": "assistant", "content": "pmal"},
        {"role": "user", "content": "reverse tiger"}, {"role": "assistant", "content": "regit"},
    ]
    enc = tokenize_sft(tokenizer, messages, assistant_only=True)
    trained = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tokenizer.decode(trained) .replace(" ", "") == "pmal</s>regit</s>"
    untrained = tokenizer.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if not m])
    assert "[INST]" in untrained and "pmal" not in untrained


def test_prompt_completion_forms(tmp_path, tokenizer):
    rows = [
        {"prompt": [{"role": "user", "content": "reverse lamp"}], "completion": [{"role": "assistant", "content": "pmal"}]},
        {"prompt": "reverse lamp:", "completion": " pmal"},
    ]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    train, _, _ = build_datasets(section(path), tokenizer, "sft", 0)
    conversational, plain = train[0], train[1]
    assert tokenizer.decode(conversational["input_ids"]).startswith("<s>[INST] reverse lamp [/INST]")
    masked = [t for t, m in zip(plain["input_ids"], plain["assistant_masks"]) if m]
    assert tokenizer.decode(masked).replace(" ", "") == "pmal</s>"


def test_json_and_parquet_files(tmp_path, tokenizer):
    from datasets import Dataset

    (tmp_path / "rows.json").write_text(json.dumps([GOOD, GOOD]))
    Dataset.from_list([GOOD] * 3).to_parquet(str(tmp_path / "rows.parquet"))
    assert len(read_rows(str(tmp_path / "rows.json"))) == 2
    assert len(read_rows(str(tmp_path / "rows.parquet"))) == 3


def test_invalid_json_line_is_located(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(UserError, match=r"broken.jsonl:2: not valid JSON"):
        read_rows(str(path))


def test_missing_hub_dataset_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="could not be loaded.*download the data set and name the file"):
        read_rows("nobody/no-such-dataset:train")


def test_eval_split(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 20)
    train, eval_ds, _ = build_datasets(section(path, eval_split=0.25), tokenizer, "sft", 0)
    assert (len(train), len(eval_ds)) == (15, 5)


def test_preference_rows_with_the_prompt_repeated_inside(tmp_path, tokenizer):
    user = {"role": "user", "content": "reverse lamp"}
    rows = [
        {"prompt": "reverse lamp", "chosen": [user, {"role": "assistant", "content": "pmal"}],
         "rejected": [user, {"role": "assistant", "content": "pma"}]},  # UltraFeedback's shape
        {"chosen": [user, {"role": "assistant", "content": "pmal"}], "rejected": [user, {"role": "assistant", "content": "lamp"}]},
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    train, _, _ = build_datasets(section(path), tokenizer, "preference", 0)
    assert train[0]["prompt"] == [user] and train[1]["prompt"] == [user]
    assert train[0]["chosen"] == [{"role": "assistant", "content": "pmal"}]
