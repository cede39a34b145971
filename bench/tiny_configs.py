"""Tiny random configs of every Mixture-of-Experts model type transformers ships, derived from each
type's own config class: the structure kept (shared experts, dense first layers, MLA, biases,
sinks, sliding windows), the sizes shrunk to seconds on a CPU.

    python bench/support_matrix.py      # builds one tiny checkpoint per type with these
The list of types is computed by scanning transformers/models/*/modeling_*.py for fused 3-D
expert parameters (`gate_up_proj`, `up_proj`, `down_proj` built from three sizes), not written by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

import transformers
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# `self.gate_up_proj = nn.Parameter(torch.empty(a, b, c))`: three sizes make a fused 3-D expert weight.
FUSED = re.compile(r"self\.(gate_up_proj|up_proj|down_proj)\s*=\s*nn\.Parameter\(\s*torch\.\w+\(\s*"
                   r"[^,()]+(?:\([^()]*\))?\s*,\s*[^,()]+(?:\([^()]*\))?\s*,\s*[^,()]+(?:\([^()]*\))?\s*[,)]")

VOCAB = 956  # model/tiny-moe's tokenizer (its config's vocab_size)

# Sizes every config class spells in one of these names; a type keeps any field not listed.
SIZES = {
    "hidden_size": 64, "d_model": 64, "intermediate_size": 64, "moe_intermediate_size": 32,
    "expert_intermediate_size": 32, "shared_expert_intermediate_size": 32, "ffn_hidden_size": 64,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_heads": 4, "n_heads": 4, "head_dim": 16,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "top_k": 2, "moe_topk": 2,
    "vocab_size": VOCAB, "max_position_embeddings": 256,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "global_head_dim": 16, "num_global_key_value_heads": 2, "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": VOCAB, "qk_head_dim": 16, "n_group": 1, "topk_group": 1, "num_expert_group": 1,
}
# kept off when the class has them off (None), shrunk when on
WINDOWS = {"sliding_window": 32, "attention_chunk_size": 32}
LAYERS = 2  # one MoE layer after each dense-first layer kept (3 with first_k_dense_replace)


def fused_expert_types() -> dict[str, str]:
    """model_type -> the modeling file holding fused 3-D expert parameters (computed, not listed)."""
    root = Path(transformers.__file__).parent / "models"
    found = {}
    for path in sorted(root.glob("*/modeling_*.py")):
        if FUSED.search(path.read_text(encoding="utf-8")):
            model_type = path.parent.name
            if model_type in CONFIG_MAPPING_NAMES:
                found[model_type] = str(path.relative_to(root.parent))
    return found


def is_text_type(model_type: str) -> bool:
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def text_model_type(model_type: str) -> tuple[str | None, str]:
    """(the type a sweep builds, how) for a type: its text model's type where the config has a
    separate text config with a causal-LM mapping, else itself; None with the reason when neither."""
    config = AutoConfig.for_model(model_type)
    text = config.get_text_config()
    if text is not config:
        if text.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return text.model_type, f"through its text model `{text.model_type}`"
        return None, f"multimodal; its text model `{text.model_type}` has no AutoModelForCausalLM mapping"
    if is_text_type(model_type):
        return model_type, ""
    return None, "no AutoModelForCausalLM mapping and no separate text model"


def tiny_overrides(config, overrides: dict, old_types: list, old_globals: dict) -> dict[int, dict]:
    """Per-layer overrides re-keyed to the tiny depth: a layer takes the overrides of the first original
    layer of its kind (`layer_types`), else of the same index; a shrunk size keeps its ratio to the
    global value (Gemma-4's full-attention head_dim 512 over 256 becomes 32 over 16)."""
    by_index = {int(k): v for k, v in overrides.items()}
    new_types = list(getattr(config, "layer_types", None) or [])
    out = {}
    for i in range(config.num_hidden_layers):
        source = old_types.index(new_types[i]) if new_types and old_types and new_types[i] in old_types else i
        layer = {}
        for key, value in by_index.get(source, {}).items():
            old, new = old_globals.get(key), getattr(config, key, None)
            if key in SIZES and isinstance(value, int) and isinstance(old, int) and isinstance(new, int) and old:
                value = max(1, value * new // old)
            layer[key] = value
        if layer:
            out[i] = layer
    return out


def tiny_config(model_type: str):
    """The type's config class with its sizes shrunk and its structure kept."""
    config = AutoConfig.for_model(model_type).get_text_config()
    if hasattr(config, "allow_global_per_layer_attribute_access"):
        config.allow_global_per_layer_attribute_access = True  # Gemma-4: per-layer fields read globally
    # Heterogeneous configs (Gemma-4: full-attention layers have their own head_dim) key overrides by
    # layer index of the full depth; take them off now and re-key them to the tiny depth at the end.
    overrides = getattr(config, "is_heterogeneous", False) and config.to_dict().get("per_layer_config") or {}
    old_types = list(getattr(config, "layer_types", None) or [])
    old_globals = {k: getattr(config, k, None) for o in overrides.values() for k in o}
    if overrides:
        config.per_layer_config = None
    for key, value in SIZES.items():
        if hasattr(config, key) and not isinstance(getattr(config, key), (list, dict)):
            setattr(config, key, value)
    for key, value in WINDOWS.items():
        if getattr(config, key, None) is not None:
            setattr(config, key, value)
    if getattr(config, "qk_rope_head_dim", None):
        config.head_dim = config.qk_rope_head_dim  # MLA: the rotary embedding is sized by head_dim
    if getattr(config, "kv_lora_rank", None) and hasattr(config, "num_key_value_heads"):
        # MLA makes one key per head; eager attention repeats keys by heads / kv heads, so they must match
        config.num_key_value_heads = config.num_attention_heads
    dense_first = getattr(config, "first_k_dense_replace", None)
    layers = LAYERS + (1 if dense_first else 0)
    if dense_first:
        config.first_k_dense_replace = 1
    if isinstance(getattr(config, "mlp_only_layers", None), list) and config.mlp_only_layers:
        config.mlp_only_layers = [0]
        layers = 3
    config.num_hidden_layers = layers
    # per-layer lists (layer_types, moe layer masks) keep their pattern, cut to the new depth
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, list) and kinds:
        # one layer of each kind (sliding and full attention, linear and full attention), last kind last
        distinct = list(dict.fromkeys(kinds))
        layers = max(layers, len(distinct))
        config.layer_types = (distinct * layers)[:layers]
    for key in ("moe_layers", "no_rope_layers", "mlp_layer_types"):
        value = getattr(config, key, None)
        if isinstance(value, list) and value:
            setattr(config, key, (value * layers)[:layers])
    if overrides:
        config.per_layer_config = tiny_overrides(config, overrides, old_types, old_globals)
    if getattr(config, "decoder_sparse_step", None):
        config.decoder_sparse_step = 1
    if hasattr(config, "interleave_moe_layer_step"):
        config.interleave_moe_layer_step = 1
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= VOCAB:
            setattr(config, key, min(value, 2))
    config.tie_word_embeddings = False
    return config
