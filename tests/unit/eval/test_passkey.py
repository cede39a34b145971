"""Passkey retrieval: prompt construction, scoring, the grid's files, beyond-context cells, the CLI."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_MOE
from transformers import AutoTokenizer

from finetune.cli import main
from finetune.eval import passkey, report
from finetune.load.chain import load_for_inference


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MOE)


@pytest.mark.parametrize("length", [128, 200, 333, 496])
def test_prompt_length_is_within_a_few_tokens_of_the_target(tiny_tokenizer, length):
    for depth in (0.0, 0.5, 1.0):
        prompt = passkey.build_prompt(tiny_tokenizer, length, depth, "48213")
        measured = len(tiny_tokenizer(prompt["text"], add_special_tokens=False)["input_ids"])
        assert measured == prompt["tokens"]
        assert length - 6 <= measured <= length, (length, depth, measured)


def test_prompt_is_the_models_chat_template_with_the_key_at_its_depth(tiny_tokenizer):
    filler_sentence = 4  # words per filler sentence at most: the key sits on a sentence boundary
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        prompt = passkey.build_prompt(tiny_tokenizer, 400, depth, "48213")
        text = prompt["text"]
        assert text.startswith("<s>[INST] " + passkey.INTRO) and text.endswith(passkey.QUESTION + " [/INST]")
        key_sentence = passkey.KEY_SENTENCE.format(key="48213")
        assert text.count(key_sentence) == 1
        body = text[len("<s>[INST] " + passkey.INTRO):-len(passkey.QUESTION + " [/INST]")]
        before = len(body[:body.index(key_sentence)].split())
        assert abs(before - depth * prompt["filler_words"]) <= filler_sentence / 2 + 0.5, (depth, before, prompt["filler_words"])
    with pytest.raises(Exception, match="before any filler"):
        passkey.build_prompt(tiny_tokenizer, 20, 0.5, "48213")


def test_keys_are_deterministic_for_a_seed_and_vary_by_cell():
    assert passkey.make_key(0, 128, 0.5, 1) == passkey.make_key(0, 128, 0.5, 1)
    keys = {passkey.make_key(0, n, d, t) for n in (128, 256) for d in (0, 1) for t in range(3)}
    assert len(keys) == 12 and all(len(k) == 5 and k.isdigit() for k in keys)
    assert passkey.make_key(1, 128, 0.5, 1) != passkey.make_key(0, 128, 0.5, 1)


def test_scoring_is_exact_retrieval():
    assert passkey.score("48213", "48213") and passkey.score(" 48213. ", "48213")
    assert not passkey.score("4821", "48213") and not passkey.score("48213 48213", "48213")
    assert not passkey.score("The pass key is 48213", "48213")


def test_grid_scores_cells_and_reports_lengths_beyond_the_context(tiny_mixtral, tmp_path, monkeypatch):
    model, tokenizer = load_for_inference(str(tiny_mixtral))  # 256 positions; this tokenizer needs 147 before filler
    answered = {}

    def fake_answers(model, tokenizer, texts, max_new_tokens):
        # Answer the key at depth 0 only: accuracy must be 1 there and 0 elsewhere.
        out = []
        for text in texts:
            key = text.split("The pass key is ")[1].split(".")[0]
            at_start = text.index("The pass key is") < text.index(passkey.INTRO) + len(passkey.INTRO) + 3
            out.append(key if at_start else "12")
            answered[text] = out[-1]
        return out

    monkeypatch.setattr(passkey, "greedy_answers", fake_answers)
    grid = passkey.passkey_grid(model, tokenizer, [160, 200, 250, 600], [0.0, 1.0], trials=3, seed=7)
    assert grid["context"] == 256
    cell = {(c["length"], c["depth"]): c for c in grid["cells"]}
    for length in (160, 200):
        assert cell[length, 0.0]["accuracy"] == 1.0 and cell[length, 1.0]["accuracy"] == 0.0
        assert cell[length, 0.0]["n"] == 3
    for length in (250, 600):  # 250 + 16 new tokens do not fit 256 positions
        assert cell[length, 0.0]["status"] == passkey.BEYOND and cell[length, 0.0]["accuracy"] is None and cell[length, 0.0]["n"] == 0
    assert grid["accuracy"] == pytest.approx(0.5)
    assert len(answered) == 12  # only the cells within context were run

    files = report.write_passkey(grid, tmp_path / "report", "tiny")
    assert [f.name for f in files] == ["passkey.json", "passkey.md", "passkey.png"]
    assert json.loads(files[0].read_text())["cells"][0]["accuracy"] == 1.0
    table = files[1].read_text()
    assert "| 0 | 1.00 | 1.00 | beyond context | beyond context |" in table
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "report").glob("*.tmp*"))


def test_eval_cli_passkey_on_a_real_model_writes_the_grid(tiny_mixtral, tmp_path, capsys):
    out = tmp_path / "reports"
    figures = tmp_path / "figures" / "eval.json"  # --output: every figure in one JSON (it was ignored with --passkey)
    code = main(["-q", "eval", str(tiny_mixtral), "--passkey", "--lengths", "180,1k", "--depths", "0,1",
                 "--trials", "1", "--report-dir", str(out), "--device", "cpu", "--output", str(figures)])
    assert code == 0
    grid = json.loads((out / "passkey.json").read_text())
    assert grid["lengths"] == [180, 1024] and [c["n"] for c in grid["cells"]] == [1, 1, 0, 0]
    written = json.loads(figures.read_text())
    assert written["model"] == str(tiny_mixtral) and written["results"] == {}
    assert written["passkey"] == {k: v for k, v in grid.items() if k != "model"}
    assert (out / "passkey.png").is_file() and "beyond context" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to evaluate"),
    (["--lengths", "1k"], "add --passkey"),
    (["--passkey", "--lengths", "1k,x"], "not a token count"),
    (["--passkey", "--depths", "0,2"], "between 0"),
    (["--long-ppl", "missing.txt"], "file not found"),
    (["--contexts", "512"], "add --long-ppl"),
    (["--passkey", "--device", "cuda:0"], "no CUDA GPU"),
])
def test_eval_cli_refuses_bad_flags_before_loading(tiny_mixtral, tmp_path, capsys, argv, message):
    assert main(["eval", str(tiny_mixtral), "--report-dir", str(tmp_path / "r"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_lengths_parse_k_suffixes():
    assert report.parse_lengths("512,1k,2K, 32768", "--lengths") == [512, 1024, 2048, 32768]


def test_pipeline_table_has_a_passkey_column():
    from finetune.pipeline import format_summary, pipeline_lengths

    assert pipeline_lengths(512) == [128, 256, 384, 496, 1024]
    def grid(acc):
        cells = [{"length": n, "depth": 0.0, "status": "ok" if n < 512 else passkey.BEYOND, "accuracy": acc if n < 512 else None}
                 for n in (128, 1024)]
        return {"lengths": [128, 1024], "depths": [0.0], "trials": 4, "cells": cells, "accuracy": acc}

    results = {stage: {"test.jsonl": {"exact_match": em, "n": 10}} for stage, em in (("base", 0.0), ("sft", 0.7))}
    text = format_summary({"runs": {"sft": "s", "dpo": "runs/d", "export": "e"}, "results": results,
                           "passkey": {"base": grid(0.0), "sft": grid(0.75)}, "seconds": {"total": 1.0}})
    assert "passkey (in context)" in text.splitlines()[2]
    assert text.splitlines()[4].split()[-2:] == ["0.7000", "0.7500"]
    assert "sft: 0.75 beyond" in text
