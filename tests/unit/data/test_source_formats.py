"""Source formats and readers: ShareGPT and Alpaca rows train to the same token ids and masks as the
equivalent messages rows (the bundled tiny model's tokenizer and tasks); column mappings; CSV,
save_to_disk folders and hub data sets (load_dataset monkeypatched: no download)."""

from __future__ import annotations

import csv
import json
import logging

import datasets
import pytest
from conftest import TINY_MOE, TINY_TASKS, write_jsonl

from finetune import hub
from finetune.data import formats
from finetune.data.prep import build_datasets, key_parts
from finetune.data.rows import RowError
from finetune.errors import UserError
from finetune.modeling import load_tokenizer
from finetune.recipe import FORMATS, DataSection, DataSource, ModelSection, recipe_from_dict

SPEAKER = {"user": "human", "assistant": "gpt", "system": "system"}


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_tokenizer(ModelSection(name_or_path=str(TINY_MOE)))


def tiny_rows(name: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (TINY_TASKS / name).read_text().splitlines()[:n]]


def sft_rows() -> list[dict]:
    """12 single-turn rows of the bundled tasks, and 4 two-turn rows made of pairs of them."""
    single = tiny_rows("sft.jsonl", 20)
    return single[:12] + [{"messages": a["messages"] + b["messages"]} for a, b in zip(single[12:16], single[16:20])]


def sharegpt(row: dict) -> dict:
    return {"conversations": [{"from": SPEAKER[m["role"]], "value": m["content"]} for m in row["messages"]], "id": 7}


def alpaca(row: dict, i: int) -> tuple[dict, dict]:
    """An Alpaca row of a messages row (the last turn as instruction; the earlier ones as history),
    with an input on every other row, and the messages row it stands for."""
    turns = row["messages"]
    history = [[turns[k]["content"], turns[k + 1]["content"]] for k in range(0, len(turns) - 2, 2)]
    given = f"(case {i})" if i % 2 else ""
    out = {"instruction": turns[-2]["content"], "input": given, "output": turns[-1]["content"]} | (
        {"history": history} if history else {})
    user = turns[-2]["content"] + (formats.ALPACA_JOIN + given if given else "")
    return out, {"messages": [*turns[:-2], {"role": "user", "content": user}, turns[-1]]}


def prepared(tokenizer, *sources, kind="sft", **settings):
    train, _, report = build_datasets(DataSection(train=list(sources), max_length=224, **settings), tokenizer, kind, 0)
    return train, report


def assert_same_sft(a, b):
    assert len(a) == len(b) > 0
    assert a["input_ids"] == b["input_ids"] and a["assistant_masks"] == b["assistant_masks"]
    assert all(any(m) and not all(m) for m in a["assistant_masks"])  # prompts masked, answers trained


def test_sharegpt_rows_train_like_messages_rows(tmp_path, tiny_tokenizer, caplog):
    rows = sft_rows()
    messages = write_jsonl(tmp_path / "messages.jsonl", rows)
    shared = write_jsonl(tmp_path / "sharegpt.jsonl", [sharegpt(r) for r in rows])
    with caplog.at_level(logging.INFO, logger="finetune"):
        got, report = prepared(tiny_tokenizer, str(shared))  # no format, no columns: detected
    assert_same_sft(got, prepared(tiny_tokenizer, str(messages))[0])
    assert "data.train[0] " in caplog.text and "format sharegpt (detected from its columns: conversations, id)" in caplog.text
    assert report.sources == [{"split": "train", "where": "data.train[0]", "source": str(shared), "format": "sharegpt",
                               "rows_read": 16, "usable": 16, "used": 16}]


def test_alpaca_rows_train_like_messages_rows(tmp_path, tiny_tokenizer):
    pairs = [alpaca(r, i) for i, r in enumerate(sft_rows())]
    assert any("history" in a for a, _ in pairs) and any(a["input"] for a, _ in pairs)
    messages = write_jsonl(tmp_path / "messages.jsonl", [m for _, m in pairs])
    alpacas = write_jsonl(tmp_path / "alpaca.jsonl", [a for a, _ in pairs])
    assert_same_sft(prepared(tiny_tokenizer, str(alpacas))[0], prepared(tiny_tokenizer, str(messages))[0])


def test_preference_sharegpt_and_alpaca_rows_equal_messages_rows(tmp_path, tiny_tokenizer):
    rows = tiny_rows("preference.jsonl", 10)
    turn = {"user": "human", "assistant": "gpt"}
    shared = [{"conversations": [{"from": turn[m["role"]], "value": m["content"]} for m in r["prompt"]],
               "chosen": {"from": "gpt", "value": r["chosen"][0]["content"]},
               "rejected": [{"from": "gpt", "value": r["rejected"][0]["content"]}]} for r in rows]
    alpacas = [{"instruction": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"],
                "rejected": r["rejected"][0]["content"]} for r in rows]
    want = prepared(tiny_tokenizer, str(write_jsonl(tmp_path / "pref.jsonl", rows)), kind="preference")[0]
    for name, made in (("sharegpt", shared), ("alpaca", alpacas)):
        got, report = prepared(tiny_tokenizer, str(write_jsonl(tmp_path / f"{name}.jsonl", made)), kind="preference")
        assert report.sources[0]["format"] == name
        assert got.to_list() == want.to_list() and len(want) == 10


def test_shape_of_system_turns_and_role_names():
    row = {"system": "Be brief.", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert formats.to_shape(row, "auto", {}, "sft") == {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    alpaca_row = {"instruction": "Add", "input": "1 2", "output": "3", "system": "Be exact."}
    assert formats.to_shape(alpaca_row, "alpaca", {}, "sft")["messages"][:2] == [
        {"role": "system", "content": "Be exact."}, {"role": "user", "content": "Add\n\n1 2"}]
    with pytest.raises(RowError, match=r"`conversations\[1\].from` is `bot`; expected one of human, user, gpt"):
        formats.to_shape({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}, "auto", {}, "sft")
    turns = [{"from": "Human", "value": "hi"}, {"from": "GPT", "value": "yo"}]  # mapped onto messages, capitalised
    assert formats.to_shape({"chat": turns}, "auto", {"messages": "chat"}, "sft") == {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(RowError, match=r"no column `chat` \(columns.messages\) in this row; its columns: talk"):
        formats.to_shape({"talk": turns}, "auto", {"messages": "chat"}, "sft")
    with pytest.raises(RowError, match=r"format alpaca needs output"):
        formats.to_shape({"instruction": "a"}, "alpaca", {}, "sft")


def test_formats_are_the_recipes_choices():
    assert set(formats.FORMATS) | {"auto"} == set(FORMATS)
    assert all(set(formats.DETECT[k]) == {n for n, f in formats.FORMATS.items() if k in f.needs} for k in formats.KINDS)


def test_column_mapping_and_csv(tmp_path, tiny_tokenizer):
    rows = tiny_rows("sft.jsonl", 8)
    plain = [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]} for r in rows]
    with open(tmp_path / "qa.csv", "w", newline="") as f:  # a comma and a newline inside quoted fields
        writer = csv.writer(f)
        writer.writerow(["question", "answer", "note"])
        writer.writerows([[p["prompt"], p["completion"], "x, y\nz"] for p in plain])
    want = prepared(tiny_tokenizer, str(write_jsonl(tmp_path / "plain.jsonl", plain)))[0]
    mapped = DataSource(path=str(tmp_path / "qa.csv"), columns={"prompt": "question", "completion": "answer"})
    got, report = prepared(tiny_tokenizer, mapped)
    assert_same_sft(got, want)
    assert report.sources[0]["format"] == "prompt_completion"
    convo = write_jsonl(tmp_path / "convo.jsonl", [{"conversation": r["messages"]} for r in rows])
    got = prepared(tiny_tokenizer, DataSource(path=str(convo), columns={"messages": "conversation"}))[0]
    assert_same_sft(got, prepared(tiny_tokenizer, str(write_jsonl(tmp_path / "m.jsonl", rows)))[0])


def test_save_to_disk_folders_and_hub_sets(tmp_path, tiny_tokenizer, monkeypatch):
    rows = tiny_rows("sft.jsonl", 6)
    want = prepared(tiny_tokenizer, str(write_jsonl(tmp_path / "m.jsonl", rows)))[0]
    shared = datasets.Dataset.from_list([sharegpt(r) for r in rows])
    shared.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": shared.select([0]), "test": shared}).save_to_disk(str(tmp_path / "dict"))
    assert_same_sft(prepared(tiny_tokenizer, str(tmp_path / "one"))[0], want)
    assert_same_sft(prepared(tiny_tokenizer, DataSource(path=str(tmp_path / "dict"), split="test"))[0], want)
    with pytest.raises(UserError, match=r"no split `dev` in the saved data set \(splits: train, test\)"):
        prepared(tiny_tokenizer, DataSource(path=str(tmp_path / "dict"), split="dev"))

    calls = []

    def load_dataset(path, name=None, data_files=None, split=None):
        calls.append((path, name, data_files, split))
        return shared

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "check_reachable", lambda *a: None)
    source = DataSource(name="someone/chats", config="en", split="train_sft", data_files=["en/*.parquet"])
    assert_same_sft(prepared(tiny_tokenizer, source)[0], want)
    assert calls and all(c == ("someone/chats", "en", ["en/*.parquet"], "train_sft") for c in calls)


def test_cache_key_covers_format_mapping_and_mixture(tmp_path, tiny_tokenizer):
    path = str(write_jsonl(tmp_path / "m.jsonl", tiny_rows("sft.jsonl", 4)))

    def key(**kw):
        return json.dumps(key_parts(DataSection(train=[DataSource(path=path, **kw)]), tiny_tokenizer, "sft", 0),
                          sort_keys=True, default=str)

    base = key()
    variants = [key(format="messages"), key(columns={"messages": "turns"}), key(weight=1.0), key(samples=2),
                key(samples=2, replace=True)]
    assert len({base, *variants}) == 1 + len(variants)
    # a mixture draws with the seed: another seed is another entry; without one the seed is not in the key
    mixed = DataSection(train=[DataSource(path=path, samples=2)])
    assert key_parts(mixed, tiny_tokenizer, "sft", 0) != key_parts(mixed, tiny_tokenizer, "sft", 1)
    plain = DataSection(train=[path])
    assert key_parts(plain, tiny_tokenizer, "sft", 0) == key_parts(plain, tiny_tokenizer, "sft", 1)


def test_recipe_parses_strings_and_mappings_with_dotted_errors():
    problems = []
    recipe = recipe_from_dict({"data": {"train": ["a.jsonl", {"path": "b.csv", "columns": {"prompt": 3}}, 5],
                                        "eval": {"name": "x/y", "split": "test"}}}, problems)
    assert recipe.data.train[0] == "a.jsonl" and recipe.data.train[1].path == "b.csv"
    assert recipe.data.eval == [DataSource(name="x/y", split="test")] and str(recipe.data.eval[0]) == "x/y:test"
    assert [str(p) for p in problems] == ["data.train[1].columns.prompt: expected str, got 3",
                                          "data.train[2]: expected str or a mapping of DataSource keys, got 5"]


def test_sample_prompts_read_eval_sources_in_their_format(tmp_path):
    from finetune.train.samples import read_prompts  # torch: only this test needs the trainer callbacks

    rows = tiny_rows("sft_eval.jsonl", 3)
    path = write_jsonl(tmp_path / "eval.jsonl", [sharegpt(r) for r in rows])
    assert read_prompts(2, [DataSource(path=str(path))]) == [[r["messages"][0]] for r in rows[:2]]
