"""The export of a 4-bit (QLoRA) run, compared with the 4-bit adapter stack it was trained as.

    finetune export runs/mixtral-8x7b/sft-qlora --output exports/mixtral-qlora

The export merges a 4-bit run's adapters into the original 16-bit base; this check loads the
4-bit stack beside it and bounds the difference by the base's own quantization gap.
Layer: export; imports qlora (the stack), modeling, runs.
"""

from __future__ import annotations

import torch

from finetune import modeling, runs
from finetune.errors import CheckFailed
from finetune.qlora.stacked import load_stacked
from finetune.recipe import ModelSection


@torch.no_grad()
def probe_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


# A 16-bit export of a 4-bit run differs from the trained 4-bit model by the base's quantization
# error, which the adapters neither add nor remove (their deltas do not depend on W). So the
# tolerance is measured, not fixed: the base model's own 4-bit vs 16-bit gap on the same probe.
# The exported model may differ from the 4-bit chain by at most GAP_FACTOR times that gap (the
# adapters change activations, so the propagated error changes a little) plus GAP_SLACK.
GAP_FACTOR, GAP_SLACK = 2.0, 1e-3


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()


def check_against_4bit(run, probe, exported_logits) -> dict:
    """Compare the 16-bit export with the 4-bit adapter chain it was trained as; CheckFailed if too far."""
    section = ModelSection(**{**run.recipe.model.__dict__})
    quant = load_stacked(section, runs.adapter_dirs(run))
    chain4 = probe_logits(quant, probe)
    with quant.disable_adapter():
        base4 = probe_logits(quant, probe)
    del quant
    plain = modeling.load_pretrained(ModelSection(**{**section.__dict__, "quantization": "none", "dtype": "float32"}))
    base16 = probe_logits(plain.eval(), probe)
    del plain
    gap, error = relative(base4, base16), relative(chain4, exported_logits)
    tolerance = GAP_FACTOR * gap + GAP_SLACK
    if not error <= tolerance:
        raise CheckFailed(
            f"export check failed: the merged 16-bit checkpoint's logits differ from the 4-bit adapter chain it was "
            f"trained as by {error:.3e} (relative), above {tolerance:.3e} = {GAP_FACTOR:g} x the base model's own "
            f"4-bit vs 16-bit gap ({gap:.3e}) + {GAP_SLACK:g}"
        )
    return {"nf4_chain_relative_error": error, "nf4_base_gap": gap, "nf4_tolerance": tolerance}
