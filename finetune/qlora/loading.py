"""Load a base model in 4-bit with its fused experts quantized as the checkpoint streams in.

    finetune sft recipes/mixtral-8x7b/sft-qlora.yaml      # model.quantization: nf4 loads through here
    python bench/qlora_memory.py                          # peak memory of this load, measured

transformers 5 loads a checkpoint tensor by tensor: for each parameter it asks the quantizer
`param_needs_quantization`, and if so hands the tensor (after the weight conversions, for
Mixtral the per-expert w1/w3 merged into one `gate_up_proj`) to the quantizer's op before it
sets the parameter. Its bitsandbytes 4-bit quantizer says yes for `Linear4bit` weights only,
so the fused 3-D experts would arrive and stay in 16-bit until the whole model is loaded: about
90 GB for Mixtral-8x7B on the load device, which is what keeps it off one GPU.

`ExpertsNF4Quantizer` is that quantizer saying yes for the fused expert weights too; its op
quantizes each arriving fused tensor expert by expert (finetune.quantize_expert_weight)
and gives the loader the placeholder to set, so the 16-bit working set is one layer's fused
expert tensor and the per-expert tensors it was merged from, whatever the model's size.
transformers picks the quantizer class from the config's method; registering a new method name
(its `register_quantizer`) would make the model report that name, and transformers' Trainer,
FSDP and `.to()` guards test for `quantization_method == "bitsandbytes"`. So the config stays a
plain `BitsAndBytesConfig` and the class is swapped in for the `from_pretrained` call only.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from finetune.errors import UserError
from finetune.modeling import load_config, meta_model, resolve_dtype, ships_mxfp4
from finetune.moe import experts_modules, is_fused_expert_weight
from finetune.qlora.experts import is_nf4, quantize_expert_weight, quantize_experts, refuse_unserved_experts, register_staged
from finetune.qlora.nf4 import QUANT_TYPE, require_bitsandbytes

log = logging.getLogger("finetune")

BNB_4BIT = "bitsandbytes_4bit"  # transformers' AUTO_QUANTIZER_MAPPING key for BitsAndBytesConfig(load_in_4bit=True)


def bnb_config(compute_dtype: torch.dtype):
    """transformers' 4-bit config, as QLoRA does it: NF4, double quantization, compute in the model dtype."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QUANT_TYPE, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _quantizer_class():
    """transformers' bitsandbytes 4-bit quantizer, extended to the fused experts (defined lazily:
    importing transformers' quantizers needs bitsandbytes, an optional extra)."""
    from transformers.core_model_loading import ConversionOps  # optional extra: these modules need bitsandbytes
    from transformers.integrations.bitsandbytes import Bnb4bitQuantize  # needs bitsandbytes (optional extra)
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer  # needs bitsandbytes (optional extra)
    from transformers.quantizers.quantizers_utils import get_module_from_name  # needs bitsandbytes (optional extra)

    class ExpertsNF4Quantize(ConversionOps):
        """Per loaded tensor: a fused expert weight goes to NF4 per expert; a linear weight to bitsandbytes."""

        def __init__(self, hf_quantizer):
            self.linear = Bnb4bitQuantize(hf_quantizer)
            self.compute_dtype = hf_quantizer.quantization_config.bnb_4bit_compute_dtype

        def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
            out, linear = {}, {}
            for name, value in input_dict.items():
                module, attr = get_module_from_name(model, name)
                if is_fused_expert_weight(module, attr):
                    value = value[0] if isinstance(value, list) else value
                    quantize_expert_weight(module, attr, value, self.compute_dtype, staged=True)
                    out[name] = getattr(module, attr)  # the placeholder, which the loader sets again
                else:
                    linear[name] = value
            if linear:
                out.update(self.linear.convert(linear, full_layer_name=full_layer_name, model=model, **kwargs))
            return out

    class ExpertsNF4Quantizer(Bnb4BitHfQuantizer):
        mxfp4 = False  # set for an MXFP4 checkpoint (gpt-oss): its experts arrive as blocks + scales

        def get_weight_conversions(self):
            # MXFP4 experts are decoded by transformers' own op (what Mxfp4Config(dequantize=True)
            # runs), per fused weight as it is read; the decoded 16-bit tensor then goes to the NF4 op
            if not self.mxfp4:
                return super().get_weight_conversions()
            from transformers.core_model_loading import WeightConverter  # needs bitsandbytes (optional extra)
            from transformers.integrations.mxfp4 import Mxfp4Dequantize  # only for MXFP4 checkpoints
            from transformers.quantizers.quantizer_mxfp4 import Mxfp4HfQuantizer  # only for MXFP4 checkpoints

            return super().get_weight_conversions() + [
                WeightConverter(names, param, [Mxfp4Dequantize(self)]) for param, names in Mxfp4HfQuantizer.serialized_names.items()]

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            module, attr = get_module_from_name(model, param_name)
            return is_fused_expert_weight(module, attr) or super().param_needs_quantization(model, param_name, **kwargs)

        def get_quantize_ops(self):
            return ExpertsNF4Quantize(self)

    return ExpertsNF4Quantizer


@contextlib.contextmanager
def experts_quantized_on_load(mxfp4: bool = False):
    """Within: from_pretrained with a 4-bit BitsAndBytesConfig also quantizes the fused experts
    (mxfp4: decoded from the checkpoint's MXFP4 blocks first)."""
    from transformers.quantizers import auto  # transformers' quantizer registry; used only on the 4-bit path (bitsandbytes extra)

    stock = auto.AUTO_QUANTIZER_MAPPING[BNB_4BIT]
    auto.AUTO_QUANTIZER_MAPPING[BNB_4BIT] = type("ExpertsNF4Quantizer", (_quantizer_class(),), {"mxfp4": mxfp4})
    try:
        yield
    finally:
        auto.AUTO_QUANTIZER_MAPPING[BNB_4BIT] = stock


def load_quantized(section, device_map=None):
    """The base model with linear layers in bitsandbytes 4-bit and every expert in NF4, each weight
    quantized as it is read (so the load needs the 4-bit model plus one layer's experts in 16-bit)."""
    require_bitsandbytes()
    dtype = resolve_dtype(section.dtype)
    if device_map is None and torch.cuda.is_available():
        device_map = {"": PartialState().device}  # bitsandbytes quantizes on the device it loads to
    config = load_config(section)
    refuse_unserved_experts(meta_model(config, section.trust_remote_code))  # before minutes of loading
    mxfp4 = ships_mxfp4(config)
    if mxfp4:  # one quantization per load: the MXFP4 config gives way to the 4-bit one, whose loader decodes MXFP4
        del config.quantization_config
        log.info("%s ships its experts in MXFP4: decoded and quantized to NF4 as they load", section.name_or_path)
    try:
        with experts_quantized_on_load(mxfp4):
            model = AutoModelForCausalLM.from_pretrained(
                section.name_or_path, config=config, dtype=dtype, attn_implementation=section.attn_implementation,
                trust_remote_code=section.trust_remote_code, device_map=device_map, quantization_config=bnb_config(dtype),
            )
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot load weights from `{section.name_or_path}` in 4-bit: {exc}") from None
    register_staged(model)
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            # bitsandbytes' CPU inference kernel repacks a Linear4bit weight in place on the first
            # no-grad eval forward (training alternates with such forwards: eval, routing probes),
            # and fails for layers narrower than the block size; keep the one packed format.
            m.support_avx512bf16_for_cpu = False
    # Experts the loader did not hand to the quantizer (a model family whose weights load another
    # way) are quantized here, after the load, which then needs their 16-bit size once.
    late = quantize_experts(model, dtype)
    if late:
        log.warning("4-bit NF4: %d MoE layers' experts were quantized after loading, not while loading", late)
    n = sum(is_nf4(m) for m in experts_modules(model))
    log.info("4-bit NF4: linear layers through bitsandbytes, experts of %d MoE layers quantized per expert", n)
    return model
