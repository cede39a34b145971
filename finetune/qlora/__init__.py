"""QLoRA for MoE: 4-bit NF4 base weights, the fused experts included, dequantized just in time.

    finetune sft recipes/mixtral-8x7b/sft-qlora.yaml      # a recipe with `model.quantization: nf4`

transformers' bitsandbytes integration (`BitsAndBytesConfig(load_in_4bit=True)`) replaces
`nn.Linear` only; Mixtral's experts are fused 3-D parameters (about 45B of its 47B weights) and
stay 16-bit. This package loads the model through that integration (attention, other linear
layers: bitsandbytes `Linear4bit`, NF4, double quantization), extended so that each expert's
matrix of `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) is quantized as the checkpoint
streams in (finetune/qlora/loading.py), the same way `Linear4bit` quantizes a weight:
`bitsandbytes.functional.quantize_4bit`, NF4, block size 64, absmax double-quantized
(`compress_statistics=True`), one quantization state per expert. The packed bytes and states
become non-persistent buffers of the experts module; the 16-bit parameter is replaced by a
one-element NaN placeholder broadcast to the original shape (so PEFT still reads shape, dtype
and device to build its 3-D LoRA factors, while anything that computes with the placeholder
turns NaN instead of silently using wrong weights). The router (`mlp.gate`) is not an
`nn.Linear` and stays 16-bit: it is tiny and router policies train it.

The experts then run only through the fast expert path (finetune/lora/fast_experts.py), which calls
its own `grouped_linear` (finetune/qlora/experts.py): per expert group it dequantizes that expert's matrix, multiplies,
and drops it; backward dequantizes again for the input gradient. The 16-bit working set is one
expert matrix at a time; gradients flow to the inputs and LoRA factors only. PEFT's stock path
(`lora.expert_path: peft`) folds W + BA into the parameter, which here is a placeholder, so it
is refused by validation and raises if reached.
Modules: nf4.py (storage), experts.py (the 4-bit experts class and its grouped linear), loading.py
(the streamed 4-bit load), stacked.py (adapter stacks and the DPO reference), checks.py (recipe
rules), memory.py (bytes held, for the bench). This layer plugs in from above: finetune/load
decides 16-bit or 4-bit; nothing below imports it.
Tests: `pytest tests/unit/qlora`; memory: `python bench/qlora_memory.py`.
Layer: qlora (below load, above lora).

"""

