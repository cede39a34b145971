"""The model card (README.md) of an exported checkpoint: base model, data, recipes, checks, usage.

Written by finetune/export/__init__.py (`finetune export RUN --output DIR`); a person reading the exported
directory learns where it came from, and its snippet runs as written with transformers 4.x and 5.x.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.recipe import recipe_to_dict
from finetune.runs import Run, read_run
from finetune.runs.adapter_card import hub_id
from finetune.runs.from_model import describe


def _stage_section(stage_run: Run) -> list[str]:
    r = stage_run.recipe
    m = stage_run.metrics
    final = m.get("final", {})
    return [
        f"### {m.get('stage', '?').upper()}: `{stage_run.path}`",
        "",
        f"- data: {', '.join(f'`{d}`' for d in r.data.train)}",
        f"- router: {r.router.policy}, aux-loss coefficient {r.router.aux_loss_coef}",
        f"- trainable parameters: {m.get('trainable_parameters', {})}",
        f"- final metrics: {', '.join(f'{k} = {v:.4g}' if isinstance(v, float) else f'{k} = {v}' for k, v in final.items())}",
        "",
        "<details><summary>resolved recipe</summary>",
        "",
        "```yaml",
        yaml.safe_dump(recipe_to_dict(r), sort_keys=False).rstrip(),
        "```",
        "</details>",
        "",
    ]


def usage_snippet(name: str) -> list[str]:
    """Chat with the checkpoint: apply_chat_template returns a BatchEncoding with return_dict=True
    (transformers 5 returns one even without it), so the inputs go to generate as keywords."""
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tok = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        'messages = [{"role": "user", "content": "reverse lamp"}]',
        'inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)',
        "output = model.generate(**inputs, max_new_tokens=64)",
        'print(tok.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
    ]


def write_model_card(directory: Path, name: str, run: Run, manifest: dict) -> None:
    """directory: where to write now (the temporary one); name: the export's final directory name."""
    base = run.chain[0]["model"]
    stages = [read_run(link["run"]) for link in run.chain if link["kind"] != "base"]
    checks = manifest["checks"]
    forward = checks["forward"]
    meta = ["---"]
    if hub_id(base):
        meta.append(f"base_model: {base}")
    meta += ["library_name: transformers", "tags: [mixture-of-experts, lora, sft, dpo, finetune]", "---", ""]
    base_text = f"`{base}`" if hub_id(base) else f"the local checkpoint `{base}`"
    lines = meta + [
        f"# Instruct model fine-tuned from {base_text}",
        "",
        "Chain: " + " -> ".join([f"base {base_text}"] + [f"{s.metrics.get('stage', '?')} `{s.path.name}`" for s in stages]),
        "",
        *([describe(run.chain[0]), ""] if describe(run.chain[0]) else []),
        f"Adapters merged into the base weights in float32 and saved in {manifest['dtype']}. Checks "
        f"({forward['mode']}): merged tensors equal base + PEFT's deltas within "
        f"{checks['tensors']['max_relative_error']:.1e}; the float32 merge's logits match the unmerged chain within "
        f"{forward['merge_relative_error']:.1e}; the written files are byte-identical to the merged tensors; "
        f"{manifest['dtype']} rounding moves the logits by {forward['rounding_relative_error']:.1e} (relative). "
        f"Generation stops at `{manifest['end_of_turn_token']}`, the chat template's end of turn.",
        *(["", f"MXFP4: {manifest['base_mxfp4']}."] if manifest.get("base_mxfp4") else []),
        "",
        f"Chat with it in plain transformers (from the directory that holds `{name}`, or with its full path):",
        "",
        *usage_snippet(name),
        "",
        "## Stages",
        "",
    ]
    for stage in stages:
        lines += _stage_section(stage)
    (directory / "README.md").write_text("\n".join(lines))
