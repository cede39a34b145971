"""Hostile inputs: every bad recipe value, data file, model file and command-line argument we know
of ends in a clear message (exit 2, or 1 for a failed check), names the key/file/row, prints no
traceback and leaves no output behind.

Run: `pytest tests/e2e/test_hostile.py` (CPU, offline). Most cases stop in validation, in-process
through finetune.cli.main; the data and model cases stop before anything is written.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MOE, make_rows, recipe_file, sft_recipe, write_jsonl

from finetune.cli import main
from finetune.data.files import read_rows
from finetune.data.rows import RowError, sft_messages
from finetune.errors import CheckFailed
from finetune.guards import NonFiniteGuard


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit status and everything printed; argparse's own errors arrive as SystemExit(2)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    text = out.err + out.out
    assert "Traceback" not in text, text
    return code, text


@pytest.fixture
def recipe(tmp_path, tiny_mixtral, sft_file):
    """A good SFT recipe on the tiny Mixtral (48 rows, batch 4); its output_dir must never appear."""
    return recipe_file(tmp_path, **sft_recipe(tmp_path, tiny_mixtral, sft_file))


def assert_user_error(code: int, text: str, *needles: str, status: int = 2) -> None:
    assert code == status, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"


# ---------------------------------------------------------------- recipe values (validate)

BAD_SETS = {
    # id: (--set values, words the message must hold)
    "alpha_nan_string": (["lora.experts.alpha=NaN"], "lora.experts.alpha: must be a finite number"),
    "alpha_inf": (["lora.attention.alpha=.inf"], "lora.attention.alpha: must be a finite number"),
    "dropout_nan": (["lora.dropout=.nan"], "lora.dropout: must be a finite number"),
    "aux_coef_nan": (["router.aux_loss_coef=.nan"], "router.aux_loss_coef: must be a finite number"),
    "eval_split_inf": (["data.eval_split=.inf"], "data.eval_split: must be a finite number"),
    "lr_nan": (["sft.learning_rate=.nan"], "sft.learning_rate: must be a finite number"),
    "lr_nan_string": (["sft.learning_rate=NaN"], "sft.learning_rate: must be a finite number"),
    "warmup_minus_inf": (["sft.warmup_steps=-.inf"], "sft.warmup_steps: must be a finite number"),
    "max_grad_norm_inf_string": (["sft.max_grad_norm=Infinity"], "sft.max_grad_norm: must be a finite number"),
    "router_lora_rank_0": (["router.policy=lora", "router.lora.r=0"], "router.lora.r: rank must be at least 1"),
    "attention_rank_0": (["lora.attention.r=0"], "lora.attention.r: rank must be at least 1"),
    "experts_rank_negative": (["lora.experts.r=-1"], "lora.experts.r: rank must be at least 1"),
    "batch_size_0": (["sft.per_device_train_batch_size=0"], "sft.per_device_train_batch_size: must be at least 1"),
    "eval_batch_size_0": (["sft.per_device_eval_batch_size=0"], "sft.per_device_eval_batch_size: must be at least 1"),
    "grad_accum_0": (["sft.gradient_accumulation_steps=0"], "sft.gradient_accumulation_steps: must be at least 1"),
    "lr_negative": (["sft.learning_rate=-1e-4"], "sft.learning_rate: must be > 0"),
    "lr_zero": (["sft.learning_rate=0"], "sft.learning_rate: must be > 0"),
    "eval_steps_without_eval_data": (["sft.eval_strategy=steps"], "sft.eval_strategy: `steps` needs eval data"),
    "eval_epoch_without_eval_data": (["sft.eval_strategy=epoch"], "sft.eval_strategy: `epoch` needs eval data"),
    "eval_split_leaves_no_batch": (["data.eval_split=0.95"], "data.eval_split: 0.95 of the 48 training rows leaves 2"),
    "fp16_on_cpu": (["sft.fp16=true"], "sft.fp16: mixed precision needs a GPU"),
    "bf16_on_cpu": (["sft.bf16=true"], "sft.bf16: mixed precision needs a GPU"),
    "eval_strategy_choice": (["sft.eval_strategy=banana"], "banana is not a valid IntervalStrategy"),
    "scheduler_choice": (["sft.lr_scheduler_type=sideways"], "sideways"),
    "yaml11_bool_for_bool_field": (["sft.packing=yes"], "sft.packing: expected bool, got 'yes' (write true or false"),
    "yaml11_bool_for_recipe_bool": (["model.trust_remote_code=no"], "model.trust_remote_code: expected bool, got 'no'"),
    "epochs_not_a_number": (["sft.num_train_epochs=three"], "sft.num_train_epochs: expected float, got 'three'"),
    "string_field_given_number_list": (["sft.optim=[1, 2]"], "sft.optim: expected str, got [1, 2]"),
    "unclosed_list": (["data.train=[x.jsonl, "], "--set data.train=[x.jsonl, : the value is not valid YAML"),
    "unclosed_mapping": (["lora.attention={r: 4"], "is not valid YAML"),
    "set_without_equals": (["sft.learning_rate"], "expected key.path=value"),
    "set_empty_key_part": (["sft..learning_rate=1"], "expected key.path=value"),
    "set_below_a_value": (["data.max_length.x=1"], "--set data.max_length.x: `max_length` is not a mapping"),
    "max_length_word": (["data.max_length=long"], "data.max_length: expected int, got 'long'"),
    "max_length_tiny": (["data.max_length=4"], "data.max_length: must be at least 8 tokens"),
    "eval_split_above_one": (["data.eval_split=1.5"], "data.eval_split: must be in [0, 1)"),
    "dropout_one": (["lora.dropout=1.0"], "lora.dropout: must be in [0, 1)"),
    "aux_coef_negative": (["router.aux_loss_coef=-1"], "router.aux_loss_coef: must be >= 0"),
    "seed_word": (["seed=abc"], "seed: expected int, got 'abc'"),
    "seed_negative": (["seed=-1"], "seed: must be in [0, 2**32), got -1"),
    "zero_epochs": (["sft.max_steps=-1", "sft.num_train_epochs=0"], "sft.num_train_epochs: must be > 0, got 0"),
    "warmup_negative": (["sft.warmup_steps=-1"], "warmup_steps >= 0"),
    "logging_steps_zero": (["sft.logging_steps=0"], "requires non-zero --logging_steps"),
    "rank_word": (["lora.experts.r=eight"], "lora.experts.r: expected int, got 'eight'"),
    "unknown_section": (["modle.dtype=float32"], "modle: unknown key (did you mean `model`?)"),
    "unknown_trl_key": (["sft.learning_rat=1e-4"], "sft.learning_rat: not a trl.SFTConfig field (did you mean `learning_rate`?)"),
    "owned_trl_key": (["sft.max_length=12"], "sft.max_length: set `data.max_length` in the recipe instead"),
    "owned_seed": (["sft.seed=1"], "sft.seed: set `seed` in the recipe instead"),
    "router_policy_choice": (["router.policy=trian"], "router.policy: `trian` is not one of freeze, train, lora"),
    "dtype_choice": (["model.dtype=float64"], "model.dtype: `float64` is not one of"),
    "bad_rows_choice": (["data.bad_rows=skip"], "data.bad_rows: `skip` is not one of error, drop"),
    "expert_path_choice": (["lora.expert_path=fastest"], "lora.expert_path: `fastest` is not one of fast, peft"),
    "missing_train_file": (["data.train=nowhere.jsonl"], "data.train[0]: file not found: nowhere.jsonl"),
    "missing_template_file": (["model.chat_template=nowhere.jinja"], "model.chat_template: file not found"),
    "expert_target_matches_nothing": (["lora.experts.targets=[w9]"], "`w9` matches nothing in the model"),
    "mlp_group_on_moe": (["lora.mlp.r=4"], "lora.mlp: every layer of this Mixture-of-Experts model is an MoE layer"),
    "nothing_trains": (["lora.attention=false", "lora.experts=false"], "nothing would train"),
    "router_lora_without_policy": (["router.lora.r=4"], "router.lora: only used with router.policy: lora"),
    "dpo_section_in_sft": (["dpo.beta=0.1"], "section, not `"),
    "section_not_mapping": (["lora=3"], "lora: expected a mapping of LoraSection keys"),
    "missing_model": (["model.name_or_path=/nonexistent/model"], "model.name_or_path: cannot load a config"),
}


@pytest.mark.parametrize("sets, message", BAD_SETS.values(), ids=BAD_SETS.keys())
def test_bad_recipe_value(capsys, recipe, tmp_path, sets, message):
    argv = ["validate", recipe] + [a for s in sets for a in ("--set", s)]
    code, text = run_cli(capsys, argv)
    assert_user_error(code, text, message)
    # and the training command refuses it before creating anything
    code, text = run_cli(capsys, ["sft", recipe] + argv[2:])
    assert_user_error(code, text, message)
    assert not (tmp_path / "sft-run").exists()


GOOD_SETS = {
    # YAML 1.1 would read `no` as false; our loader keeps it the string TRL wants (see recipe._Loader)
    "eval_strategy_no": ["sft.eval_strategy=no"],
    "eval_steps_with_split": ["sft.eval_strategy=steps", "sft.eval_steps=2", "data.eval_split=0.25"],
    "quoted_nan_is_not_a_number_field": ["sft.run_name=nan"],
    "text_list_of_one_file": ["data.train=[data.jsonl]"],
    "zero_epochs_with_max_steps": ["sft.num_train_epochs=0"],  # max_steps=3 decides
}


@pytest.mark.parametrize("sets", GOOD_SETS.values(), ids=GOOD_SETS.keys())
def test_values_that_are_fine(capsys, recipe, sets, sft_file, monkeypatch):
    monkeypatch.chdir(sft_file.parent)
    shutil.copy(sft_file, sft_file.parent / "data.jsonl")
    code, text = run_cli(capsys, ["validate", recipe] + [a for s in sets for a in ("--set", s)])
    assert code == 0 and ": OK (sft;" in text, text


@pytest.fixture
def dpo_recipe(tmp_path, tiny_mixtral, sft_file, pref_file):
    """A DPO recipe on a stand-in finished SFT run (recipe.yaml + chain.json: all validate reads)."""
    run = tmp_path / "sft-parent"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(sft_recipe(tmp_path, tiny_mixtral, sft_file)))
    (run / "chain.json").write_text(json.dumps([{"kind": "base", "model": str(tiny_mixtral)}, {"kind": "sft", "run": str(run)}]))
    return recipe_file(tmp_path, "dpo.yaml", output_dir=str(tmp_path / "dpo-run"), from_run=str(run),
                       data={"train": [str(pref_file)], "max_length": 64}, dpo={"beta": 0.1, "max_steps": 2})


BAD_DPO_SETS = {
    "beta_nan": (["dpo.beta=.nan"], "dpo.beta: must be a finite number"),
    "beta_nan_string": (["dpo.beta=nan"], "dpo.beta: must be a finite number"),
    "beta_zero": (["dpo.beta=0"], "dpo.beta: must be > 0, got 0"),
    "beta_negative": (["dpo.beta=-0.1"], "dpo.beta: must be > 0, got -0.1"),
    "batch_size_0": (["dpo.per_device_train_batch_size=0"], "dpo.per_device_train_batch_size: must be at least 1"),
    "lr_negative": (["dpo.learning_rate=-5e-5"], "dpo.learning_rate: must be > 0"),
    "fp16_on_cpu": (["dpo.fp16=true"], "dpo.fp16: mixed precision needs a GPU"),
    "eval_without_data": (["dpo.eval_strategy=epoch"], "dpo.eval_strategy: `epoch` needs eval data"),
    "loss_weights_inf": (["dpo.loss_weights=[1.0, .inf]"], "dpo.loss_weights[1]: must be a finite number"),
    "other_base_model": ([f"model.name_or_path={TINY_MOE}"], "differs from the SFT run's base"),
}


@pytest.mark.parametrize("sets, message", BAD_DPO_SETS.values(), ids=BAD_DPO_SETS.keys())
def test_bad_dpo_value(capsys, dpo_recipe, tmp_path, sets, message):
    extra = [a for s in sets for a in ("--set", s)]
    for command in ("validate", "dpo"):
        code, text = run_cli(capsys, [command, dpo_recipe] + extra)
        assert_user_error(code, text, message)
    assert not (tmp_path / "dpo-run").exists()


def test_good_dpo_recipe_validates(capsys, dpo_recipe):
    code, text = run_cli(capsys, ["validate", dpo_recipe])
    assert code == 0 and ": OK (dpo;" in text, text


# ---------------------------------------------------------------- recipe files

RECIPE_FILES = {
    "not_yaml": (b"model: [unclosed\n", "not valid YAML"),
    "a_list": (b"- just\n- a list\n", "a recipe is a mapping"),
    "not_utf8": (b"output_dir: caf\xe9\n", "not UTF-8 text (byte offset 15)"),
    "yaml11_bool_in_file": (b"output_dir: x\nmodel: {trust_remote_code: yes}\n", "expected bool, got 'yes'"),
    "nan_in_file": (b"output_dir: x\nlora: {experts: {alpha: .nan}}\n", "lora.experts.alpha: must be a finite number"),
}


@pytest.mark.parametrize("content, message", RECIPE_FILES.values(), ids=RECIPE_FILES.keys())
def test_bad_recipe_file(capsys, tmp_path, content, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    code, text = run_cli(capsys, ["validate", path])
    assert_user_error(code, text, message)


def test_missing_recipe_and_parent_run(capsys, tmp_path, recipe):
    code, text = run_cli(capsys, ["validate", tmp_path / "none.yaml"])
    assert_user_error(code, text, "recipe file not found")
    code, text = run_cli(capsys, ["validate", recipe, "--set", "sft={}", "--set", f"from_run={tmp_path / 'no-run'}",
                                  "--set", "dpo.beta=0.1"])
    assert_user_error(code, text, "from_run: run directory not found")


# ---------------------------------------------------------------- model configs and weights

def broken_model(tmp_path: Path, **config_changes) -> Path:
    model = tmp_path / "model"
    shutil.copytree(TINY_MOE, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **config_changes}))
    return model


BAD_CONFIGS = {
    "top_k_word": ({"num_experts_per_tok": "two"}, "num_experts_per_tok"),
    "top_k_zero": ({"num_experts_per_tok": 0}, "`num_experts_per_tok` is 0; expected a whole number >= 1"),
    "top_k_above_experts": ({"num_experts_per_tok": 99}, "`num_experts_per_tok` (99) is larger than `num_local_experts`"),
    "hidden_size_float": ({"hidden_size": 64.5}, "hidden_size"),
    "layers_negative": ({"num_hidden_layers": -2}, "`num_hidden_layers` is -2"),
}


@pytest.mark.parametrize("changes, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_model_config(capsys, tmp_path, recipe, changes, message):
    model = broken_model(tmp_path, **changes)
    code, text = run_cli(capsys, ["validate", recipe, "--set", f"model.name_or_path={model}"])
    assert_user_error(code, text, "model.name_or_path:", "config.json", message)


def test_truncated_model_weights(capsys, tmp_path):
    model = broken_model(tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    data = write_jsonl(tmp_path / "d.jsonl", make_rows(2))
    code, text = run_cli(capsys, ["eval", model, "--data", data, "--output", tmp_path / "out.json"])
    assert_user_error(code, text, f"{weights} is truncated or corrupt", "download or save the model again")
    assert not (tmp_path / "out.json").exists()


# ---------------------------------------------------------------- data files and rows (sft stops before writing)

def row_file(tmp_path: Path, bad_row) -> Path:
    rows = [json.dumps(r) for r in make_rows(3)]
    rows.insert(1, bad_row if isinstance(bad_row, str) else json.dumps(bad_row))
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def chat(content) -> dict:
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]}


BAD_ROWS = {
    "content_int": (chat(42), "`messages[0].content` must be a string or a list of text parts, got int"),
    "content_image_part": (chat([{"type": "image", "url": "x.png"}]), "part 1 has type `image`; only text parts"),
    "content_part_without_text": (chat([{"type": "text"}]), "part 1 is a text part without a string `text`"),
    "content_part_not_mapping": (chat(["hello"]), "part 1 must be a mapping with `type` and `text`"),
    "content_empty_parts": (chat([]), "`messages[0].content` is empty"),
    "content_null": (chat(None), "got NoneType"),
    "prompt_int": ({"prompt": 5, "completion": "x"}, "`prompt` must be a string or a list of messages, got int"),
    "not_an_object": ("[1, 2]", "expected a JSON object, got list"),
    "not_json": ('{"messages": [', "not valid JSON"),
    "no_known_fields": ({"text": "hi"}, "expected `messages` or `prompt` + `completion`"),
}


@pytest.mark.parametrize("bad, message", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_training_row(capsys, tmp_path, recipe, bad, message):
    data = row_file(tmp_path, bad)
    code, text = run_cli(capsys, ["sft", recipe, "--set", f"data.train=[{data}]"])
    assert_user_error(code, text, f"{data}:2", message)
    assert not (tmp_path / "sft-run").exists()


BAD_FILES = {
    "jsonl_not_utf8": ("rows.jsonl", b'{"a": 1}\n{"b": "caf\xe9"}\n', "rows.jsonl:2: not valid UTF-8 at byte offset 19"),
    "json_not_utf8": ("rows.json", b'[{"a": "\xff"}]', "rows.json:1: not valid UTF-8 at byte offset 8"),
    "parquet_not_parquet": ("rows.parquet", b"this is not parquet at all", "rows.parquet: not a readable Parquet file"),
    "bom_then_bad_byte": ("rows.jsonl", b'\xef\xbb\xbf{"a": 1}\n{"b": "caf\xe9"}\n', "rows.jsonl:2: not valid UTF-8 at byte offset 22"),
    "json_not_a_list": ("rows.json", b'{"messages": []}', "expected a JSON list of rows, got dict"),
}


@pytest.mark.parametrize("name, content, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_data_file(capsys, tmp_path, recipe, name, content, message):
    data = tmp_path / name
    data.write_bytes(content)
    code, text = run_cli(capsys, ["sft", recipe, "--set", f"data.train=[{data}]"])
    assert_user_error(code, text, message)
    assert not (tmp_path / "sft-run").exists()


def test_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(chat("hi")).encode() + b"\n")
    assert [r.value for r in read_rows(str(path))] == [chat("hi")]


def test_missing_model_directory(capsys, tmp_path):
    code, text = run_cli(capsys, ["eval", tmp_path / "no" / "model", "--data", "d.jsonl"])
    assert_user_error(code, text, "no such local directory")


def test_text_parts_are_joined():
    """The OpenAI/transformers multimodal shape, text only, trains like a string (parts joined by newlines)."""
    parts = [{"type": "text", "text": "reverse"}, {"type": "text", "text": "lamp"}]
    assert sft_messages(chat(parts))[0] == {"role": "user", "content": "reverse\nlamp"}
    with pytest.raises(RowError, match="part 2 has type `input_audio`"):
        sft_messages(chat(parts[:1] + [{"type": "input_audio"}]))


# ---------------------------------------------------------------- eval and routing arguments, eval rows

BAD_ARGS = {
    "eval_batch_size_0": (["eval", "m", "--data", "d.jsonl", "--batch-size", "0"], "--batch-size: must be at least 1"),
    "eval_max_new_tokens_0": (["eval", "m", "--data", "d.jsonl", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
    "eval_batch_size_word": (["eval", "m", "--data", "d.jsonl", "--batch-size", "many"], "expected a whole number"),
    "shard_size_banana": (["export", "run", "--output", "x", "--max-shard-size", "banana"], "'banana' is not a size"),
    "shard_size_zero": (["export", "run", "--output", "x", "--max-shard-size", "0GB"], "'0GB' is not a size"),
    "routing_max_rows_0": (["routing", "m", "--data", "d.jsonl", "--output", "r", "--max-rows", "0"], "--max-rows: must be at least 1"),
    "routing_batch_size_negative": (["routing", "m", "--data", "d.jsonl", "--output", "r", "--batch-size", "-3"], "must be at least 1"),
}


@pytest.mark.parametrize("argv, message", BAD_ARGS.values(), ids=BAD_ARGS.keys())
def test_bad_command_line_number(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, text = run_cli(capsys, argv)
    assert_user_error(code, text, message)
    assert list(tmp_path.iterdir()) == []


def output_case(tmp_path: Path, case: str) -> Path:
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "adir").mkdir()
    (tmp_path / "foreign.json").write_text('{"precious": true}')
    return tmp_path / {"below_file": "afile/out.json", "dir": "adir", "file": "afile", "foreign": "foreign.json"}[case]


OUTPUTS = {
    "eval_below_file": ("eval", "below_file", "afile is a file, not a directory"),
    "eval_directory": ("eval", "dir", "is a directory; give the path of the JSON file"),
    "eval_foreign_file": ("eval", "foreign", "exists and is not a `finetune eval` results file"),
    "routing_file": ("routing", "file", "is an existing file; the report is a directory"),
    "routing_below_file": ("routing", "below_file", "afile is a file, not a directory"),
}


@pytest.mark.parametrize("command, case, message", OUTPUTS.values(), ids=OUTPUTS.keys())
def test_unwritable_output(capsys, tmp_path, command, case, message):
    out = output_case(tmp_path, case)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, text = run_cli(capsys, [command, TINY_MOE, "--data", "d.jsonl", "--output", out])
    assert_user_error(code, text, "--output", message)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


EVAL_ROWS = {
    "exact_match_row_without_prompt": ([{"prompt": "reverse lamp", "answer": "pmal"}, {"answer": "x"}],
                                       ":2: missing `prompt`"),
    "exact_match_prompt_image": ([{"prompt": "a", "answer": "b"},
                                  {"prompt": [{"role": "user", "content": [{"type": "image"}]}], "answer": "b"}],
                                 ":2: `prompt[0].content` part 1 has type `image`"),
    "preference_row_without_rejected": ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
                                        ":2: missing `rejected`"),
    "loss_row_content_int": ([chat("hi"), chat(7)], ":2: `messages[0].content` must be a string or a list of text parts"),
    "unknown_shape": ([{"text": "hello"}], ":1: cannot tell what to score"),
}


@pytest.mark.parametrize("rows, message", EVAL_ROWS.values(), ids=EVAL_ROWS.keys())
def test_bad_eval_row(capsys, tmp_path, rows, message):
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    code, text = run_cli(capsys, ["eval", TINY_MOE, "--data", data, "--output", tmp_path / "out" / "r.json"])
    assert_user_error(code, text, f"{data}{message}")
    assert not (tmp_path / "out").exists()


def test_eval_accepts_text_parts_and_replaces_its_own_results(capsys, tmp_path):
    parts = [{"type": "text", "text": "reverse"}, {"type": "text", "text": "lamp"}]
    data = write_jsonl(tmp_path / "test.jsonl", [{"prompt": [{"role": "user", "content": parts}], "answer": "pmal"}])
    out = tmp_path / "r.json"
    for _ in range(2):  # the second run replaces the file the first wrote
        code, text = run_cli(capsys, ["eval", TINY_MOE, "--data", data, "--output", out, "--max-new-tokens", "2"])
        assert code == 0, text
    assert json.loads(out.read_text())["results"][str(data)]["n"] == 1


# ---------------------------------------------------------------- non-finite training

def test_guard_names_the_step():
    class State:
        global_step = 7

    guard = NonFiniteGuard()
    guard.on_log(None, State(), None, logs={"loss": 1.5, "grad_norm": 0.3})  # finite: nothing happens
    for key in ("loss", "grad_norm", "aux_loss"):
        with pytest.raises(CheckFailed, match=f"step 7: {key} is nan"):
            guard.on_log(None, State(), None, logs={key: math.nan})


def test_guard_checks_gradients_before_the_optimizer_step():
    class State:
        global_step = 3

    class Args:
        fp16 = False

    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    NonFiniteGuard().on_pre_optimizer_step(Args(), State(), None, model=model)  # finite: nothing happens
    model.weight.grad[0, 0] = math.inf
    with pytest.raises(CheckFailed, match="step 4: the gradients are not finite"):
        NonFiniteGuard().on_pre_optimizer_step(Args(), State(), None, model=model)
    Args.fp16 = True  # fp16: inf gradients are the GradScaler's business (it skips the step)
    NonFiniteGuard().on_pre_optimizer_step(Args(), State(), None, model=model)


def test_non_finite_training_stops_with_exit_1(capsys, tmp_path, tiny_mixtral, sft_file):
    """A learning rate that passes validate but blows the weights up: exit 1 naming the step, no run left marked finished."""
    recipe = recipe_file(tmp_path, **sft_recipe(tmp_path, tiny_mixtral, sft_file,
                                                sft={"learning_rate": 1e30, "max_steps": 4, "logging_steps": 10}))
    code, text = run_cli(capsys, ["sft", recipe])
    assert_user_error(code, text, "training stopped at step", "not finite", status=1)
    assert not (tmp_path / "sft-run" / "chain.json").exists()
    assert not (tmp_path / "sft-run" / "adapter_model.safetensors").exists()
