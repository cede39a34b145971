"""routing_report and load_sources on a tiny random Mixtral with an offline tokenizer (report.py)."""

import json

import pandas as pd
import pytest
from conftest import moe_model, random_texts, word_tokenizer
from PIL import Image

from finetune.errors import UserError
from finetune.routing.report import load_sources, routing_report


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return moe_model(len(tokenizer), layers=3).eval()


@pytest.fixture(scope="module")
def sources():
    return {"code": random_texts(6, 16, seed=1), "chat": random_texts(5, 24, seed=2)}


@pytest.fixture(scope="module")
def compared(tmp_path_factory, model, tokenizer, sources):
    other = moe_model(len(tokenizer), layers=3, seed=1).eval()
    out = tmp_path_factory.mktemp("compare")
    return out, routing_report(
        model, tokenizer, sources, out, compare=(other, tokenizer), max_length=24, batch_size=4, progress=False
    )


def test_report_files_and_figures(tmp_path, model, tokenizer, sources):
    result = routing_report(model, tokenizer, sources, tmp_path, max_length=24, batch_size=4, progress=False)
    saved = json.loads((tmp_path / "routing.json").read_text())
    assert saved["sources"].keys() == {"code", "chat"}
    assert saved["model"]["layers"] == [0, 1, 2] and saved["model"]["num_experts"] == 8
    assert saved["baselines"]["first_choice"] == pytest.approx(0.125)
    assert saved["baselines"]["first_or_second"] == pytest.approx(1 - 6 / 8 * 5 / 7)
    for name, texts in sources.items():
        stats = saved["sources"][name]
        # Every real token counted once; padding (batches mix lengths) never.
        expected = sum(min(len(tokenizer(t)["input_ids"]), 24) for t in texts)
        assert stats["tokens"] == expected and stats["texts"] == len(texts)
        for layer in stats["layers"]:
            assert sum(layer["share"]) == pytest.approx(1.0)
            assert layer["pairs"] == expected - len(texts)  # consecutive pairs within each text
            assert 0 <= layer["repeat"]["first_choice"] <= layer["repeat"]["first_or_second"] <= 1
    md = (tmp_path / "routing.md").read_text()
    assert "Repeated expert assignments" in md and "| random | 12.5% | 46.4%" in md
    assert "Compared" not in md
    assert result["plots"] == ["expert_share.png", "repeated_experts.png"]
    for png in result["plots"]:
        with Image.open(tmp_path / png) as image:
            image.verify()
            assert image.format == "PNG"


def test_compare_mode(compared):
    out, result = compared
    saved = json.loads((out / "routing.json").read_text())
    diff = saved["compare"]["diff"]["code"]
    assert [row["layer"] for row in diff] == [0, 1, 2]
    for row in diff:  # two independently initialised models route differently
        assert 0 <= row["topk_overlap"] < 1 and row["kl"] > 0 and row["share_tv"] > 0
    moved = saved["compare"]["moved_most"]
    assert sorted(r["layer"] for r in moved) == [0, 1, 2]
    overlaps = [r["topk_overlap"] for r in moved]
    assert overlaps == sorted(overlaps)  # least overlap (moved most) first
    assert "Layers that moved most" in (out / "routing.md").read_text()
    for png in ("compare.png", "expert_share_compare.png"):
        with Image.open(out / png) as image:
            image.verify()


def test_compare_with_itself_has_no_drift(tmp_path, model, tokenizer, sources):
    result = routing_report(
        model, tokenizer, sources, tmp_path, compare=(model, tokenizer), max_length=24, batch_size=4,
        progress=False, plots=False,
    )
    assert not list(tmp_path.glob("*.png"))
    for rows in result["compare"]["diff"].values():
        for row in rows:
            assert row["topk_overlap"] == pytest.approx(1.0)
            assert row["kl"] == pytest.approx(0.0, abs=1e-6)
            assert row["share_tv"] == pytest.approx(0.0)


def test_batching_does_not_change_the_figures(tmp_path, model, tokenizer, sources):
    kwargs = dict(max_length=24, progress=False, plots=False)
    one = routing_report(model, tokenizer, sources, tmp_path / "a", batch_size=1, **kwargs)
    many = routing_report(model, tokenizer, sources, tmp_path / "b", batch_size=5, **kwargs)
    for name in sources:
        a, b = one["sources"][name]["layers"], many["sources"][name]["layers"]
        for x, y in zip(a, b):
            assert x["share"] == pytest.approx(y["share"], abs=1e-6)
            assert x["repeat"] == pytest.approx(y["repeat"])


def test_load_sources_formats(tmp_path, tokenizer):
    chat = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]}] * 2
    chat.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "sft.json").write_text(json.dumps([{"prompt": "two plus two", "completion": " four"}]))
    pd.DataFrame(
        {"prompt": ["a question"], "chosen": [" yes please"], "rejected": [" no thanks"]}
    ).to_parquet(tmp_path / "prefs.parquet")
    mixed = [{"text": "def add", "source": "code"}, {"text": "the cat", "source": "story"}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    paths = [str(tmp_path / n) for n in ("chat.jsonl", "sft.json", "prefs.parquet", "mixed.jsonl")]
    got = load_sources(paths, tokenizer=tokenizer)
    assert got["chat"] == [tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)] * 2
    assert "<s> user : hello </s>" in got["chat"][0]
    assert got["sft"] == ["two plus two four"]
    assert got["prefs"] == ["a question yes please", "a question no thanks"]
    assert got["code"] == ["def add"] and got["story"] == ["the cat"]
    assert "mixed" not in got  # rows with a `source` column name their own source


def test_load_sources_reports_every_bad_row_with_file_and_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"question": "no known key"}\n{"text": 3}\n')
    with pytest.raises(UserError) as err:
        load_sources([str(bad), str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl: file not found" in str(err.value)
    with pytest.raises(UserError) as err:
        load_sources([str(bad)])
    message = str(err.value)
    assert "bad.jsonl:2" in message and "question" in message and "bad.jsonl:3" in message
    conv = tmp_path / "conv.jsonl"
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match="chat template"):
        load_sources([str(conv)])


def test_chat_rendered_text_gets_no_second_bos(tmp_path, model, tokenizer):
    # A chat-rendered text starts with BOS already: no second BOS is added.
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    result = routing_report(model, tokenizer, {"s": [text]}, tmp_path, max_length=64, progress=False, plots=False)
    assert result["sources"]["s"]["tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_dense_model_is_a_user_error(tmp_path, tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(UserError, match="no MoE routers"):
        routing_report(MistralForCausalLM(config), tokenizer, {"s": ["hello"]}, tmp_path, progress=False)
