"""The README.md and adapter_config.json of a run's adapter, for people who use it with plain PEFT.

    finetune dpo RECIPE   (finetune/train/save.py calls write_adapter_card after saving the adapter)

A DPO adapter is trained on the SFT chain merged into the base weights, so applying it to the raw
base gives a different model (logits 99% off on the bundled default). PEFT would write the raw
base as `base_model_name_or_path`, inviting exactly that. This points the config at the parent
run instead (loading that as a base fails loudly instead of silently giving the wrong model:
PEFT 0.21's AutoPeftModelForCausalLM raises) and replaces PEFT's template card with the recipe
that works: merge each earlier adapter into the base, in order, then apply this one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from finetune.runs.from_model import describe

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_id(name: str) -> str | None:
    """The name if it is a hub id, None for a local path (which must not go into `base_model:`:
    tools such as llama.cpp's converter turn that field into a hub URL)."""
    return name if HUB_ID.match(name) and not Path(name).exists() else None


def plain_peft_recipe(chain: list[dict]) -> list[str]:
    """Python that rebuilds the run's model with transformers and PEFT alone (no finetune import)."""
    base = chain[0]["model"]
    adapters = [link["run"] for link in chain if link["kind"] != "base"]
    lines = [
        "```python",
        "import torch",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{base}", dtype=torch.float32)',
    ]
    for path in adapters[:-1]:
        lines.append(f'model = PeftModel.from_pretrained(model, "{path}").merge_and_unload()  # earlier stage, merged first')
    lines += [
        f'model = PeftModel.from_pretrained(model, "{adapters[-1]}")  # this adapter; .merge_and_unload() to fold it in',
        "```",
    ]
    return lines


def write_adapter_card(out: Path, stage: str, chain: list[dict]) -> None:
    """Rewrite out/README.md (PEFT's template card) and, past the first stage, out/adapter_config.json."""
    base = chain[0]["model"]
    parents = [link["run"] for link in chain[1:-1] if link["kind"] != "base"]
    meta = ["---", "library_name: peft"]
    if hub_id(base):
        meta.append(f"base_model: {base}")
    meta += [f"tags: [lora, {stage}, mixture-of-experts, finetune]", "---", ""]
    if parents:
        config_file = out / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = parents[-1]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        where = [
            f"**Do not apply this adapter to the base model `{base}` directly.** It was trained on top of "
            f"{' then '.join(f'`{p}`' for p in parents)} merged into the base weights; applied to the raw base it gives a "
            "different model (on the bundled default, logits about 99% off). `base_model_name_or_path` in "
            "adapter_config.json therefore names the parent run instead of the raw base: PEFT's "
            "`AutoPeftModelForCausalLM.from_pretrained` on this directory then stops with an error rather than "
            "building the wrong model. Rebuild the chain as below.",
        ]
    else:
        where = [f"This adapter applies to the base model `{base}` directly."]
        if describe(chain[0]):  # DPO from_model: the model it started from is the base, and the reference
            where += ["", describe(chain[0])]
    lines = meta + [
        f"# {stage.upper()} LoRA adapter (finetune)",
        "",
        *where,
        "",
        "The whole chain with plain transformers and PEFT:",
        "",
        *plain_peft_recipe(chain),
        "",
        "`finetune export` merges the chain into a standalone checkpoint; `finetune eval` scores the run directly.",
        "PEFT warns on loading that `rank_pattern`/`alpha_pattern` keys for the expert and router parameters "
        "\"were ignored\": they are applied (PEFT checks the patterns against module names only).",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
