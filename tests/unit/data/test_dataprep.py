"""Data preparation with datasets and its cache: the same rows, masks, order and errors as the
in-memory path it replaced; a key that moves with every input; hits byte-equal; damage rebuilt."""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_MOE, TINY_TASKS, make_pairs, make_rows, write_jsonl
from datasets import Dataset
from transformers.utils import chat_template_utils

import finetune
from finetune.data import cache as datacache
from finetune.data import hashing
from finetune.data import key as datakey
from finetune.data.convert import CONVERTERS, convert_row
from finetune.data.files import read_rows
from finetune.data.key import key_parts
from finetune.data.masks import render
from finetune.data.prep import build_datasets
from finetune.data.rows import Report, RowError, sft_messages
from finetune.errors import Problem, UserError
from finetune.modeling import load_tokenizer
from finetune.recipe import DataSection, ModelSection


def old_tokenize_sft(tokenizer, item, assistant_only: bool) -> dict:
    """finetune/data.py tokenize_sft and assistant_spans at 9873a02, verbatim but for names: every
    prefix rendered, the tokenizer called per row, the mask computed token by token in Python."""
    if isinstance(item, tuple):
        prompt, completion = item
        text = (tokenizer.bos_token or "") + prompt + completion + tokenizer.eos_token
        spans = [(len(tokenizer.bos_token or "") + len(prompt), len(text))]
    else:
        text, spans = render(tokenizer, item), []
        for i, m in enumerate(item):
            if m["role"] != "assistant":
                continue
            before = render(tokenizer, item[:i], add_generation_prompt=True)
            if not text.startswith(before):
                before = render(tokenizer, item[:i])
            through = render(tokenizer, item[: i + 1])
            assert text.startswith(before) and text.startswith(through)
            spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    out = {"input_ids": enc["input_ids"]}
    if assistant_only:
        mask = [int(any(s < end and e > start for start, end in spans)) for s, e in enc["offset_mapping"]]
        if not any(mask):
            raise RowError("no assistant token left to train on")
        out["assistant_masks"] = mask
    return out


def old_sft_converter(tokenizer, section):
    def convert(value):
        encoded = old_tokenize_sft(tokenizer, sft_messages(value), section.assistant_only_loss)
        if len(encoded["input_ids"]) > section.max_length:
            raise RowError(f"{len(encoded['input_ids'])} tokens, longer than data.max_length={section.max_length}")
        return encoded

    return convert


def old_build(section: DataSection, tokenizer, kind: str, seed: int):
    """The in-memory path that finetune/data/prep.py replaced (finetune/data.py build_datasets at
    9873a02: read every row into a list, convert one by one, Dataset.from_list), with its SFT
    tokenization (above) and the unchanged preference row check: the reference the new path must equal."""
    report = Report()
    convert = old_sft_converter(tokenizer, section) if kind == "sft" else CONVERTERS[kind](tokenizer, section)

    def make(sources):
        out = []
        for row in [r for s in sources for r in read_rows(s)]:
            try:
                out.append({k: v for k, v in convert_row(convert, row.value).items() if k != "system"})  # counted, not a column
            except RowError as exc:
                problem = Problem(f"{row.source}:{row.number}", str(exc))
                if section.bad_rows == "error":
                    raise UserError([problem], title=f"bad row in {row.source} (fix it, or set data.bad_rows: drop to skip bad rows)") from None
                report.dropped.append(problem)
        report.rows += len(out)
        if kind == "preference" and len({isinstance(r["prompt"], str) for r in out}) > 1:
            raise UserError("data.train mixes plain-text and conversational preference rows; use one form per run")
        return Dataset.from_list(out)

    train = make(section.train)
    eval_ds = make(section.eval) if section.eval else None
    if len(train) == 0:
        raise UserError(f"data.train: no usable rows in {', '.join(section.train)}")
    if eval_ds is None and section.eval_split > 0:
        parts = train.train_test_split(test_size=section.eval_split, seed=seed)
        train, eval_ds = parts["train"], parts["test"]
    return train, eval_ds, report


@pytest.fixture(scope="module")
def bundled_tokenizer():
    return load_tokenizer(ModelSection(name_or_path=str(TINY_MOE)))


def same(old, new):
    assert (old is None) == (new is None)
    if old is not None:
        assert old.features == new.features and old.to_list() == new.to_list()


@pytest.mark.parametrize("kind, section", [
    ("sft", DataSection(train=[str(TINY_TASKS / "sft.jsonl"), str(TINY_TASKS / "passkey_sft.jsonl")],
                        eval=[str(TINY_TASKS / "sft_eval.jsonl")], max_length=224)),
    ("preference", DataSection(train=[str(TINY_TASKS / "preference.jsonl")], max_length=128, eval_split=0.1)),
])
def test_bundled_data_equal_the_in_memory_path(bundled_tokenizer, kind, section):
    old = old_build(section, bundled_tokenizer, kind, 42)
    new = build_datasets(section, bundled_tokenizer, kind, 42, num_proc=2)
    same(old[0], new[0])
    same(old[1], new[1])
    assert (old[2].rows, old[2].dropped) == (new[2].rows, new[2].dropped) and new[2].rows > 600


GOOD = make_rows(1)[0]
BAD_ROWS = [{"text": "hello"}, [1, 2], {"messages": [{"role": "user", "content": "x"}]},
            {"messages": [{"role": "user", "content": "a " * 200}, {"role": "assistant", "content": "b"}]}]


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_dropped_rows_and_masks_equal_the_in_memory_path(tmp_path, tokenizer, kind):
    good = make_rows(12) if kind == "sft" else make_pairs(12)
    rows = good[:3] + BAD_ROWS[:2] + good[3:8] + BAD_ROWS[2:] + good[8:]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "reverse lamp:", "completion": " pmal"}] * 3)
    for section in (DataSection(train=[str(path)], max_length=64, bad_rows="drop", eval_split=0.25),
                    DataSection(train=[str(path), str(plain)] if kind == "sft" else [str(path)], max_length=64,
                                bad_rows="drop", assistant_only_loss=False)):
        old, new = old_build(section, tokenizer, kind, 3), build_datasets(section, tokenizer, kind, 3)
        same(old[0], new[0])
        same(old[1], new[1])
        assert old[2].dropped == new[2].dropped and len(new[2].dropped) == 4


def message(build, *args):
    with pytest.raises(UserError) as info:
        build(*args)
    return str(info.value)


def test_errors_are_the_ones_the_in_memory_path_raised_first(tmp_path, tokenizer):
    good = json.dumps(GOOD) + "\n"
    files = {
        "bad_row.jsonl": (good + json.dumps({"text": "x"}) + "\n{broken\n").encode(),  # invalid JSON wins over a bad row
        "utf8.jsonl": (good + "{broken\n" + good).encode() + b"\xff\n",                 # a bad UTF-8 byte wins over JSON
        "late_bad_row.jsonl": (good * 3 + json.dumps({"text": "x"}) + "\n").encode(),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    cases = [[paths["bad_row.jsonl"]], [paths["utf8.jsonl"]], [paths["late_bad_row.jsonl"], paths["bad_row.jsonl"]],
             [paths["late_bad_row.jsonl"], tmp_path / "missing.jsonl"], [tmp_path / "missing.jsonl", paths["utf8.jsonl"]]]
    for sources in cases:
        for bad_rows in ("error", "drop"):
            section = DataSection(train=[str(s) for s in sources], max_length=64, bad_rows=bad_rows)
            expected = message(old_build, section, tokenizer, "sft", 0)
            assert message(build_datasets, section, tokenizer, "sft", 0) == expected


# ---- the cache --------------------------------------------------------------------------------


def entry_files(entry) -> dict:
    """Every file's bytes; the manifest without the files' stats (inode and mtime differ per build)."""
    out = {str(p.relative_to(entry)): p.read_bytes() for p in sorted(entry.rglob("*")) if p.is_file()}
    manifest = json.loads(out.pop("manifest.json"))
    for record in manifest["files"].values():
        assert len(record.pop("stat")) == 3
    return {**out, "manifest.json": manifest}


def test_hit_is_byte_equal_to_a_cold_build_with_any_process_count(tmp_path, tokenizer, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    path = write_jsonl(tmp_path / "sft.jsonl", make_rows(40) + [{"text": "bad"}])
    section = DataSection(train=[str(path)], max_length=64, bad_rows="drop", eval_split=0.25)
    key = datacache.key(key_parts(section, tokenizer, "sft", 0))
    trees = []
    for cache, num_proc in (("a", None), ("b", 2), ("a", None)):
        monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / cache))
        train, eval_ds, report = build_datasets(section, tokenizer, "sft", 0, num_proc=num_proc)
        trees.append((entry_files(tmp_path / cache / key), train.to_list(), eval_ds.to_list(), report.dropped))
    assert trees[0] == trees[1] == trees[2]
    assert "manifest.json" in trees[0][0] and any(name.endswith(".arrow") for name in trees[0][0])
    logged = [r.getMessage() for r in caplog.records if "rows tokenized here" in r.getMessage()]
    assert [m.split(",")[0] for m in logged] == ["data: 41 rows tokenized here"] * 2 + ["data: 0 rows tokenized here"]
    assert "cache hit" in logged[2]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no manifest"])
def test_damaged_entry_is_rebuilt_with_a_message(tmp_path, tokenizer, caplog, damage):
    path = write_jsonl(tmp_path / "sft.jsonl", make_rows(30))
    section = DataSection(train=[str(path)], max_length=64)
    first = build_datasets(section, tokenizer, "sft", 0)[0].to_list()
    entry = datacache.root() / datacache.key(key_parts(section, tokenizer, "sft", 0))
    arrow = next((entry / "train").glob("*.arrow"))
    good = entry_files(entry)
    if damage == "truncate":
        arrow.write_bytes(arrow.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(arrow.read_bytes())
        data[len(data) // 2] ^= 1
        arrow.write_bytes(bytes(data))
    else:
        (entry / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="finetune"):
        again = build_datasets(section, tokenizer, "sft", 0)[0].to_list()
    assert f"data cache entry {entry} is damaged" in caplog.text and "preparing the data again" in caplog.text
    assert again == first and entry_files(entry) == good


def test_a_hit_hashes_only_files_whose_stat_changed(tmp_path, tokenizer, monkeypatch):
    """A hit trusts the source's remembered hash and the entry's recorded stats (hashing gigabytes
    was most of a hit); a file rewritten since is hashed again, and a changed source is a new key."""
    path = write_jsonl(tmp_path / "sft.jsonl", make_rows(30))
    old = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old, old))  # an existing data file, not one written this instant
    section = DataSection(train=[str(path)], max_length=64)
    first = build_datasets(section, tokenizer, "sft", 0)[0].to_list()
    hashed = []
    real = hashing.hash_file

    def counting(p):
        hashed.append(Path(p).name)
        return real(p)

    monkeypatch.setattr(hashing, "hash_file", counting)
    monkeypatch.setattr(datacache, "hash_file", counting)
    assert build_datasets(section, tokenizer, "sft", 0)[0].to_list() == first and hashed == []
    entry = datacache.root() / datacache.key(key_parts(section, tokenizer, "sft", 0))
    arrow = next((entry / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes())  # same bytes, new mtime: checked again, still sound
    assert build_datasets(section, tokenizer, "sft", 0)[0].to_list() == first and hashed == [arrow.name]
    write_jsonl(path, make_rows(31))
    os.utime(path, ns=(old, old + 10**9))
    assert len(build_datasets(section, tokenizer, "sft", 0)[0]) == 31 and "sft.jsonl" in hashed


def test_interrupted_preparation_leaves_no_entry_and_is_cleaned_up(tmp_path, tokenizer):
    """What a kill during preparation leaves: a temporary folder with partial files and no entry."""
    path = write_jsonl(tmp_path / "sft.jsonl", make_rows(20))
    section = DataSection(train=[str(path)], max_length=64)
    key = datacache.key(key_parts(section, tokenizer, "sft", 0))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    tmp = datacache.root() / f".tmp-{key}-{socket.gethostname()}-{dead.strip()}"
    (tmp / "work").mkdir(parents=True)
    (tmp / "work" / "train-converted.arrow").write_bytes(b"partial")
    assert datacache.lookup(key) is None
    build_datasets(section, tokenizer, "sft", 0)
    assert not tmp.exists() and datacache.lookup(key) is not None


def test_failed_preparation_leaves_the_cache_as_found(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", make_rows(5) + [{"text": "bad"}])
    root = datacache.root()
    before = sorted(root.iterdir()) if root.exists() else []
    with pytest.raises(UserError, match="bad row in"):
        build_datasets(DataSection(train=[str(path)], max_length=64), tokenizer, "sft", 0)
    assert sorted(root.iterdir()) == before


def test_every_input_changes_the_key(tmp_path, tokenizer, monkeypatch):
    rows = make_rows(10)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    base = DataSection(train=[str(train)], eval_split=0.2, max_length=64)

    def key(section=base, tok=tokenizer, kind="sft", seed=0):
        return datacache.key(key_parts(section, tok, kind, seed))

    keys = {"base": key()}
    keys["path"] = key(dataclasses.replace(base, train=[str(shutil.copy(train, tmp_path / "moved.jsonl"))]))
    edited = write_jsonl(tmp_path / "edited.jsonl", rows[:-1] + [make_rows(1, seed=9)[0]])
    keys["content"] = key(dataclasses.replace(base, train=[str(edited)]))
    keys["eval files"] = key(dataclasses.replace(base, eval=[str(train)]))
    for field, value in (("max_length", 65), ("bad_rows", "drop"), ("assistant_only_loss", False), ("eval_split", 0.3)):
        keys[field] = key(dataclasses.replace(base, **{field: value}))
    keys["kind"] = key(kind="preference")
    keys["seed"] = key(seed=1)
    assert key(dataclasses.replace(base, eval_split=0.0), seed=1) == key(dataclasses.replace(base, eval_split=0.0))

    # a data.* setting added later (a format, a column mapping: issue 22) is keyed without more code
    WithFormat = dataclasses.make_dataclass("WithFormat", [("format", str, "messages")], bases=(DataSection,))
    keys["format"] = key(WithFormat(**dataclasses.asdict(base), format="sharegpt"))
    assert key(WithFormat(**dataclasses.asdict(base))) != keys["format"]

    from conftest import build_tokenizer

    other = build_tokenizer()
    assert key(tok=other) == keys["base"]  # an equal tokenizer built again: the same key
    other.add_tokens(["zebra"])
    keys["tokenizer files"] = key(tok=other)
    templated = build_tokenizer()
    templated.chat_template = templated.chat_template.replace("[INST] ", "[INST]")
    keys["chat template"] = key(tok=templated)
    monkeypatch.setattr(finetune, "__version__", "0.0.0-test")
    keys["package version"] = key()
    monkeypatch.undo()
    real = datakey.metadata.version
    monkeypatch.setattr(datakey.metadata, "version", lambda p: "0.0.0" if p == "datasets" else real(p))
    keys["datasets version"] = key()
    monkeypatch.undo()
    shutil.copytree(datakey.CODE, tmp_path / "code")
    with open(tmp_path / "code" / "masks.py", "a") as f:
        f.write("\n# changed\n")
    monkeypatch.setattr(datakey, "CODE", tmp_path / "code")
    keys["code"] = key()
    monkeypatch.undo()
    dated = build_tokenizer()  # a template that writes today's date (gpt-oss's does)
    dated.chat_template = "{{ strftime_now('%Y-%m-%d') }}" + dated.chat_template
    keys["template dated today"] = key(tok=dated)

    class Tomorrow(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime.now(tz) + datetime.timedelta(days=1)

    monkeypatch.setattr(chat_template_utils, "datetime", Tomorrow)
    keys["template dated tomorrow"] = key(tok=dated)
    monkeypatch.undo()
    assert key() == keys["base"]
    assert len(set(keys.values())) == len(keys), {k: v for k, v in keys.items() if list(keys.values()).count(v) > 1}


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "here"))
    assert datacache.root() == tmp_path / "here"
    monkeypatch.delenv("FINETUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datacache.root() == tmp_path / "xdg" / "finetune" / "data"


def test_full_cache_disk_is_a_user_error_and_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "sft.jsonl", make_rows(6))
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datacache, "publish", full)
    with pytest.raises(UserError, match=r"cannot write the prepared data to .*cache \(No space left on device\).*FINETUNE_CACHE"):
        build_datasets(DataSection(train=[str(path)], max_length=64), tokenizer, "sft", 0)
    assert list((tmp_path / "cache").iterdir()) == []
