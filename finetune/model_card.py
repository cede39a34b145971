"""The model card (README.md) of an exported checkpoint: base model, data, recipes, metrics.

Written by finetune/export.py; a person reading the exported directory learns where it came from.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.recipe import recipe_to_dict
from finetune.runs import Run, read_run


def _stage_section(stage_run: Run) -> list[str]:
    r = stage_run.recipe
    m = stage_run.metrics
    final = m.get("final", {})
    lines = [
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
    return lines


def write_model_card(directory: Path, run: Run, manifest: dict) -> None:
    base = run.chain[0]["model"]
    stages = [read_run(link["run"]) for link in run.chain if link["kind"] != "base"]
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "tags: [mixture-of-experts, lora, sft, dpo, finetune]",
        "---",
        "",
        f"# Instruct model fine-tuned from `{base}`",
        "",
        "Chain: " + " -> ".join([f"base `{base}`"] + [f"{s.metrics.get('stage', '?')} `{s.path.name}`" for s in stages]),
        "",
        f"Adapters merged into the base weights and saved in {manifest['dtype']}. Merge check: the saved weights' logits "
        f"match the unmerged adapter chain within {manifest['probe_relative_error']:.2e} (relative; allowed "
        f"{manifest['tolerance']:.0e}). Generation stops at `{manifest['end_of_turn_token']}`, the chat template's end of turn.",
        "",
        "Load it with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{directory.name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{directory.name}")',
        'ids = tok.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True, return_tensors="pt")',
        "print(tok.decode(model.generate(ids, max_new_tokens=64)[0]))",
        "```",
        "",
        "## Stages",
        "",
    ]
    for stage in stages:
        lines += _stage_section(stage)
    (directory / "README.md").write_text("\n".join(lines))
