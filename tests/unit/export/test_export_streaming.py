"""Slow: `finetune export` of a 3.2 GB model in 100 MB shards stays within a fraction of its size.

    pytest -m slow tests/unit/export/test_export_streaming.py -s   (prints the measured figures)

The base is a random Mixtral-architecture checkpoint (68 decoder layers, float32) written
shard by shard in the on-disk layout transformers saves, so building it never holds more than a
shard; the chain is two adapters written directly in PEFT's format (SFT-like: attention + experts
+ router trained in full; DPO-like: a different expert rank + router LoRA). The export runs in a
subprocess whose peak RSS (VmHWM) is read at its end, next to that of a process that only
imports the same modules.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import TINY_MOE
from safetensors import safe_open
from safetensors.torch import save_file

LAYERS, HIDDEN, INTERMEDIATE, EXPERTS, VOCAB = 68, 512, 896, 8, 956
SHARD_BYTES = 100 * 10**6


def _config():
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2,
                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def _layer(i: int, g: torch.Generator) -> dict:
    p = f"model.layers.{i}."
    kv = HIDDEN // 4

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    out = {p + "input_layernorm.weight": torch.ones(HIDDEN), p + "post_attention_layernorm.weight": torch.ones(HIDDEN),
           p + "self_attn.q_proj.weight": rnd(HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": rnd(kv, HIDDEN),
           p + "self_attn.v_proj.weight": rnd(kv, HIDDEN), p + "self_attn.o_proj.weight": rnd(HIDDEN, HIDDEN),
           p + "block_sparse_moe.gate.weight": rnd(EXPERTS, HIDDEN)}
    for e in range(EXPERTS):
        q = f"{p}block_sparse_moe.experts.{e}."
        out.update({q + "w1.weight": rnd(INTERMEDIATE, HIDDEN), q + "w2.weight": rnd(HIDDEN, INTERMEDIATE),
                    q + "w3.weight": rnd(INTERMEDIATE, HIDDEN)})
    return out


def _write_base(directory) -> int:
    """Shards of about 100 MB, written one at a time, with the index; returns the total bytes."""
    directory.mkdir()
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, total, names = {}, {}, 0, 0, []

    def flush():
        nonlocal shard, size
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        names.append(name)
        shard, size = {}, 0

    extra = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.02,
             "model.norm.weight": torch.ones(HIDDEN), "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.02}
    shard.update(extra)
    for i in range(LAYERS):
        tensors = _layer(i, g)
        nbytes = sum(t.numel() * 4 for t in tensors.values())
        if size + nbytes > SHARD_BYTES:
            flush()
        shard.update(tensors)
        size += nbytes
        total += nbytes
    flush()
    total += sum(t.numel() * 4 for t in extra.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    _config().save_pretrained(directory)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_MOE / f, directory / f)
    return total


def _write_adapter(directory, base, lora_config, seed: int) -> None:
    """PEFT's file layout from a PeftModel built on the meta device, filled with small random factors."""
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(_config()), lora_config)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(tuple(v.shape), generator=g) * 0.02 for k, v in get_peft_model_state_dict(model).items()}
    directory.mkdir()
    save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora_config.base_model_name_or_path = str(base)
    lora_config.save_pretrained(str(directory))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_MOE / f, directory / f)


def _finish_run(directory, base, chain, from_run=None) -> None:
    recipe = {"output_dir": str(directory), "model": {"name_or_path": str(base), "dtype": "float32"},
              "data": {"train": [str(directory / "train.jsonl")]}}
    if from_run:
        recipe["from_run"] = str(from_run)
    (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (directory / "metrics.json").write_text(json.dumps({"stage": chain[-1]["kind"]}))
    (directory / "chain.json").write_text(json.dumps(chain))


PEAK = """
import sys
{imports}
rc = {call}
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("VmHWM_kB", int(status["VmHWM"].split()[0]))
sys.exit(rc)
"""


@pytest.mark.slow
def test_streaming_export_peak_memory_is_a_fraction_of_the_model(tmp_path):
    from peft import LoraConfig

    base = tmp_path / "base"
    model_bytes = _write_base(base)
    assert model_bytes >= 3.1e9
    sft, dpo = tmp_path / "sft-run", tmp_path / "dpo-run"
    _write_adapter(sft, base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                         target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                                         modules_to_save=["mlp.gate"]), seed=1)
    _write_adapter(dpo, base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         target_parameters=["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"],
                                         rank_pattern={"gate_up_proj": 2, "down_proj": 2}), seed=2)
    chain = [{"kind": "base", "model": str(base)}, {"kind": "sft", "run": str(sft)}]
    _finish_run(sft, base, chain)
    _finish_run(dpo, base, chain + [{"kind": "dpo", "run": str(dpo)}], from_run=sft)

    out = tmp_path / "instruct"
    argv = ["-q", "export", str(dpo), "--output", str(out), "--max-shard-size", "100MB", "--forward-check", "truncated"]
    imports = "from finetune.cli import main\nimport finetune.export, finetune.export.merge, finetune.export.verify, peft, transformers"
    export = subprocess.run([sys.executable, "-c", PEAK.format(imports=imports, call=f"main({argv!r})")],
                            capture_output=True, text=True)
    assert export.returncode == 0, export.stderr[-3000:]
    baseline = subprocess.run([sys.executable, "-c", PEAK.format(imports=imports, call="0")], capture_output=True, text=True)
    peak = int(export.stdout.split("VmHWM_kB")[-1]) * 1024
    imported = int(baseline.stdout.split("VmHWM_kB")[-1]) * 1024

    manifest = json.loads((out / "export.json").read_text())
    written = sorted(out.glob("model-*.safetensors"))
    largest_in = max(f.stat().st_size for f in base.glob("*.safetensors"))
    print(f"\nmodel {model_bytes / 1e9:.2f} GB float32 in {len(list(base.glob('*.safetensors')))} shards (largest "
          f"{largest_in / 1e6:.0f} MB); export peak RSS {peak / 1e6:.0f} MB = {peak / model_bytes:.1%} of the model; "
          f"a process importing the same modules: {imported / 1e6:.0f} MB; {len(written)} bfloat16 shards written; "
          f"export {manifest['seconds']:.0f} s; checks {manifest['checks']['forward']['mode']}")
    assert peak < model_bytes / 3
    assert manifest["checks"]["tensors"]["checked"] == LAYERS * (4 + 3 * EXPERTS + 1)
    assert len(written) >= 10 and max(f.stat().st_size for f in written) <= 100 * 10**6

    # spot check, computed here: the last layer's q_proj is base + both adapters' B @ A * alpha / r, in bfloat16
    key = f"model.layers.{LAYERS - 1}.self_attn.q_proj.weight"
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(base / index[key]), "pt") as f:
        want = f.get_tensor(key)
    for run in (sft, dpo):
        with safe_open(str(run / "adapter_model.safetensors"), "pt") as f:
            prefix = f"base_model.model.{key.removesuffix('.weight')}"
            want = want + f.get_tensor(prefix + ".lora_B.weight") @ f.get_tensor(prefix + ".lora_A.weight") * 2.0
    out_index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out / out_index[key]), "pt") as f:
        assert torch.equal(f.get_tensor(key), want.to(torch.bfloat16))
