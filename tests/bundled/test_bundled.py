"""The embedded default: the bundled tiny model and tokenizer behave like Mixtral's, and the data is sane."""

from __future__ import annotations

import json

import torch
from conftest import TINY_MOE, TINY_TASKS
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_is_mixtral_shaped_and_small():
    config = json.loads((TINY_MOE / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert config["num_local_experts"] == 8 and config["num_experts_per_tok"] == 2
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert sum(p.stat().st_size for p in TINY_MOE.iterdir()) < 20 * 2**20


def test_tokenizer_is_mixtral_style():
    tok = AutoTokenizer.from_pretrained(TINY_MOE)
    chat = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<s>[INST] q1 [/INST]a1</s>[INST] q2 [/INST]a2</s>"
    text = "naïve 東京 🙂"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte fallback, no <unk>
    assert tok.unk_token_id not in tok(text)["input_ids"]


def test_tiny_model_knows_the_task_language():
    tok = AutoTokenizer.from_pretrained(TINY_MOE)
    model = AutoModelForCausalLM.from_pretrained(TINY_MOE).eval()
    corpus = (TINY_TASKS / "corpus.txt").read_text().splitlines()[:32]
    ids = tok("\n".join(corpus), return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 2.0, loss  # far below uniform (ln vocab): it was pretrained on the corpus


def load_build_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tiny_moe", TINY_MOE.parent / "build_tiny_moe.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def test_tiny_model_retrieves_a_pass_key_written_as_prose():
    """The build's retrieval phase (0-40 filler words): keys come back from prose prompts; this is
    what SFT on passkey_sft.jsonl carries into the chat form that `finetune eval --passkey` asks."""
    build = load_build_module()
    tok = AutoTokenizer.from_pretrained(TINY_MOE)
    model = AutoModelForCausalLM.from_pretrained(TINY_MOE).eval()
    assert build.prose_retrieval(model, tok, 10) >= 10  # measured 11 of 12 (model/tiny-moe/BUILD.md)


def test_passkey_documents_mark_the_key_digits():
    import random

    build = load_build_module()
    tok = AutoTokenizer.from_pretrained(TINY_MOE)
    x, y, answers = build.passkey_batch(tok, 4, random.Random(0), 40)
    for row, labels, at in zip(x, y, answers):
        text = tok.decode(row[labels != -100])
        key = tok.decode(row[at]).replace(" ", "")
        assert len(key) == 5 and key.isdigit()
        assert f"The pass key is {key}. Remember it. {key} is the pass key." in text
        assert text.rstrip().endswith(f"What is the pass key? The pass key is {key}.</s>")


def test_data_files_have_the_documented_forms():
    def rows(name):
        return [json.loads(line) for line in (TINY_TASKS / name).read_text().splitlines() if line.strip()]

    assert all("messages" in r for r in rows("sft.jsonl"))
    pairs = rows("preference.jsonl")
    assert all(r["chosen"] != r["rejected"] for r in pairs)
    tests = rows("test.jsonl")
    assert all({"prompt", "answer", "task"} <= set(r) for r in tests)
    seen = {r["prompt"][0]["content"] for r in tests}
    trained = {r["messages"][0]["content"] for r in rows("sft.jsonl")} | {r["prompt"][0]["content"] for r in pairs}
    assert not seen & trained, "held-out prompts leak into training data"


def test_build_prefix_reproduces_the_committed_tokenizer():
    """The deterministic prefix of model/build_tiny_moe.py: the tokenizer it trains equals the committed
    one (vocabulary and merges) and passes the build's own Mixtral-likeness checks. The whole rebuild
    (about 24 minutes on one core) is a bench command: `python model/build_tiny_moe.py --check`."""
    build = load_build_module()
    tok = build.train_tokenizer(build.tokenizer_texts())
    build.check_tokenizer(tok)
    mine = json.loads(tok.backend_tokenizer.to_str())["model"]
    committed = json.loads((TINY_MOE / "tokenizer.json").read_text())["model"]
    assert mine["vocab"] == committed["vocab"]
    assert mine["merges"] == committed["merges"]


def test_check_compares_tensors_bit_for_bit(tmp_path):
    from safetensors.torch import save_file

    build = load_build_module()
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    save_file(a, tmp_path / "a.safetensors")
    save_file(a, tmp_path / "same.safetensors", metadata={"format": "pt"})  # other header, same tensors
    off = a["w"].clone()
    off[1, 2] = torch.nextafter(off[1, 2], torch.tensor(10.0))  # one ulp in one element
    save_file({**a, "w": off}, tmp_path / "off.safetensors")
    assert build.differing_tensors(tmp_path / "a.safetensors", tmp_path / "same.safetensors") == []
    assert [d.split(":")[0] for d in build.differing_tensors(tmp_path / "a.safetensors", tmp_path / "off.safetensors")] == ["w"]
