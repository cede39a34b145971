"""Loading a model to train or use: the one place that decides 16-bit or 4-bit, adapter chains, placement.

    finetune sft RECIPE          # load_model(recipe.model): 16-bit, or 4-bit with model.quantization: nf4
    finetune eval RUN ...        # load/chain.load_for_inference: a run's chain, merged, placed by load/placement

The 4-bit loader (finetune/qlora) plugs in here, from above: nothing below `load` imports it.
Layer: load (below stages/validate/export/eval/routing, above qlora).
"""

from __future__ import annotations

from finetune import modeling
from finetune.qlora.loading import load_quantized
from finetune.recipe import ModelSection


def load_model(section: ModelSection, device_map=None):
    """The base model with real weights: in 4-bit NF4 (experts included) when the recipe's model
    section says `quantization: nf4`, else in its 16/32-bit dtype."""
    if section.quantized:
        return load_quantized(section, device_map=device_map)
    return modeling.load_pretrained(section, device_map=device_map)
