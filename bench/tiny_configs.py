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
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

# `self.gate_up_proj = nn.Parameter(torch.empty(a, b, c))`: three sizes make a fused 3-D expert weight.
FUSED = re.compile(r"self\.(gate_up_proj|up_proj|down_proj)\s*=\s*nn\.Parameter\(\s*torch\.\w+\(\s*"
                   r"[^,()]+(?:\([^()]*\))?\s*,\s*[^,()]+(?:\([^()]*\))?\s*,\s*[^,()]+(?:\([^()]*\))?\s*[,)]")

CLASS = re.compile(r"^class (\w+)\(", re.MULTILINE)

VOCAB = 956  # model/tiny-moe's tokenizer (its config's vocab_size)

# Sizes every config class spells in one of these names; a type keeps any field not listed.
SIZES = {
    "hidden_size": 64, "d_model": 64, "intermediate_size": 64, "moe_intermediate_size": 32,
    "expert_intermediate_size": 32, "shared_expert_intermediate_size": 32, "ffn_hidden_size": 64,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_heads": 4, "n_heads": 4, "head_dim": 16,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "top_k": 2, "moe_topk": 2,
    "vocab_size": VOCAB, "unpadded_vocab_size": VOCAB, "max_position_embeddings": 256,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "global_head_dim": 16, "num_global_key_value_heads": 2, "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": VOCAB, "qk_head_dim": 16, "n_group": 1, "topk_group": 1, "num_expert_group": 1,
    "zero_expert_num": 2,  # LongCat-Flash's zero-computation experts
    "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 16, "mamba_num_heads": 4, "mamba_head_dim": 32,
    "ssm_state_size": 16, "n_groups": 1,  # Mamba-2 groups must divide its heads (Nemotron-H)
    # DeepSeek-V3.2/V4 sparse-attention indexer and grouped output projection
    "index_n_heads": 2, "index_head_dim": 16, "index_topk": 16, "o_lora_rank": 16, "o_groups": 2,
}
# Sizes some classes default to None although their model needs them; set only when None.
FILL_NONE = {
    "n_shared_experts": 1,  # dots1 (its released config has 2)
    # Qwen4-Exp's indexed attention (QSA): budget a multiple of the compress ratio, one key head
    "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 16, "indexer_compress_ratio": 4,
}
SUBLAYERS = {"longcat_flash": 2}
# Layer kinds a class leaves None by default (its released configs list them), first to last.
# Granite-4.0-MoE-hybrid's class default is Mamba only, which its attention-mask code cannot run.
LAYER_KINDS = {"lfm2_moe": ["conv", "full_attention"], "granitemoehybrid": ["linear_attention", "full_attention"]}
TOP_K = ("num_experts_per_tok", "moe_k", "top_k", "moe_topk")
# kept off when the class has them off (None), shrunk when on
WINDOWS = {"sliding_window": 32, "attention_chunk_size": 32}
LAYERS = 2  # one MoE layer after each dense-first layer kept (3 with first_k_dense_replace)


def fused_expert_types() -> dict[str, str]:
    """model_type -> the modeling file holding fused 3-D expert parameters (computed, not listed).

    A type counts when its directory's modeling file has them, or when its model or causal-LM class
    (the auto mappings) is defined in such a file: types built from another family's classes
    (sarvam_moe is Glm4MoeForCausalLM) and types named unlike their directory (inkling's
    `inkling_mm_model`). A listed type's sub-models (gemma4 -> gemma4_text, gemma4_vision) are not
    listed again."""
    root = Path(transformers.__file__).parent / "models"
    files = {path: path.read_text(encoding="utf-8") for path in sorted(root.glob("*/modeling_*.py"))}
    defined = {}  # class name -> fused modeling file
    fused_dirs = {}
    for path, text in files.items():
        if FUSED.search(text):
            fused_dirs[path.parent.name] = path
            defined.update({name: path for name in CLASS.findall(text)})
    found = {}
    for model_type in CONFIG_MAPPING_NAMES:
        classes = [MODEL_MAPPING_NAMES.get(model_type), MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)]
        path = fused_dirs.get(model_type) or next((defined[c] for c in classes if isinstance(c, str) and c in defined), None)
        if path is not None:
            found[model_type] = str(path.relative_to(root.parent))
    # a listed type's sub-configs (text, vision, audio, thinker models) are parts of it, not types of their own
    parts = {getattr(sub, "model_type", None) for t in found for sub in getattr(CONFIG_MAPPING[t], "sub_configs", {}).values()}
    return {t: f for t, f in sorted(found.items()) if t not in parts}


def is_text_type(model_type: str) -> bool:
    """The type has a causal LM, its own or its text model's (what the sweep can build)."""
    return text_model_type(model_type)[0] is not None


def text_model_type(model_type: str) -> tuple[str | None, str]:
    """(the type a sweep builds, how) for a type: its text model's type where the config has a
    separate text config with a causal-LM mapping, else itself; None with the reason when neither."""
    config = AutoConfig.for_model(model_type)
    text = config.get_text_config()
    if text is not config:
        if text.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return text.model_type, f"through its text model `{text.model_type}`"
        return None, f"multimodal; its text model `{text.model_type}` has no AutoModelForCausalLM mapping"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return model_type, ""
    return None, "no AutoModelForCausalLM mapping and no separate text model"


def representative_layers(config, overrides: dict, depth: int) -> tuple[list[int], dict[str, list]]:
    """(original layer indices to keep, the per-layer lists) so that every distinct combination of
    per-layer settings keeps one layer: any list attribute with one entry per layer (layer_types,
    MoE/dense masks, per-layer limits such as swiglu_limits) and Gemma-4's per-layer overrides.
    The first layer of each combination, then layers of the commonest one up to `depth`, in order."""
    n = config.num_hidden_layers
    lists = {k: v for k, v in vars(config).items() if isinstance(v, list) and len(v) == n and n > 1
             and v != list(range(n))}  # [0, 1, ..., n-1] lists layer indices (every layer), not one value each
    # kinds (strings, flags) tell layers apart; lists of many distinct values (per-layer limits) do not
    kinds = [v for v in lists.values() if len({repr(x) for x in v}) <= 4]
    signature = [tuple(repr(v[i]) for v in kinds) + (repr(overrides.get(i)),) for i in range(n)]
    keep = sorted({signature.index(sig) for sig in signature})
    # more layers, where the depth asks for them, of the commonest combination (DeepSeek's MoE layers)
    spare = sorted((i for i in range(n) if i not in keep), key=lambda i: (-signature.count(signature[i]), i))
    keep = sorted(keep + spare[: max(0, depth - len(keep))])
    return keep, lists


def tiny_overrides(overrides: dict, keep: list[int], old_globals: dict, config) -> dict[int, dict]:
    """Per-layer overrides of the kept layers, re-keyed to the tiny depth; a shrunk size keeps its
    ratio to the global value (Gemma-4's full-attention head_dim 512 over 256 becomes 32 over 16)."""
    out = {}
    for new_index, old_index in enumerate(keep):
        layer = {}
        for key, value in overrides.get(old_index, {}).items():
            old, new = old_globals.get(key), getattr(config, key, None)
            if key in SIZES and isinstance(value, int) and isinstance(old, int) and isinstance(new, int) and old:
                value = max(1, value * new // old)
            layer[key] = value
        if layer:
            out[new_index] = layer
    return out


def tiny_config(model_type: str):
    """The type's config class with its sizes shrunk and its structure kept."""
    config = AutoConfig.for_model(model_type).get_text_config()
    if hasattr(config, "allow_global_per_layer_attribute_access"):
        config.allow_global_per_layer_attribute_access = True  # Gemma-4: per-layer fields read globally
    # Heterogeneous configs (Gemma-4: full-attention layers have their own head_dim) key overrides by
    # layer index of the full depth; take them off now and re-key them to the tiny depth at the end.
    overrides = getattr(config, "is_heterogeneous", False) and config.to_dict().get("per_layer_config") or {}
    overrides = {int(k): v for k, v in overrides.items()}
    old_globals = {k: getattr(config, k, None) for o in overrides.values() for k in o}
    if overrides:
        config.per_layer_config = None
    for key, value in SIZES.items():
        old = getattr(config, key, None)
        if hasattr(config, key) and not isinstance(old, (list, dict)):
            # a family routing to fewer experts per token keeps its top-k (Zaya supports top-1 only)
            setattr(config, key, min(value, old) if key in TOP_K and isinstance(old, int) and old > 0 else value)
    for key, value in FILL_NONE.items():
        if hasattr(config, key) and getattr(config, key) is None:
            setattr(config, key, value)
    for key in [k for k in vars(config) if k.endswith("_layer_period")]:
        # Jamba: attention every 8th layer, MoE every 2nd; a period of 2 keeps both kinds in 2 layers
        offset = key.replace("_period", "_offset")
        if isinstance(getattr(config, key), int) and isinstance(getattr(config, offset, None), int):
            setattr(config, offset, getattr(config, offset) % 2)
            setattr(config, key, 2)
    for key, value in WINDOWS.items():
        if getattr(config, key, None) is not None:
            setattr(config, key, value)
    if getattr(config, "qk_rope_head_dim", None):
        config.head_dim = config.qk_rope_head_dim  # MLA: the rotary embedding is sized by head_dim
    if getattr(config, "kv_lora_rank", None) and hasattr(config, "num_key_value_heads"):
        # MLA makes one key per head; eager attention repeats keys by heads / kv heads, so they must match
        config.num_key_value_heads = config.num_attention_heads
    dense_keys = [k for k in ("first_k_dense_replace", "num_dense_layers") if getattr(config, k, None)]
    layers = LAYERS + (1 if dense_keys else 0)
    for key in dense_keys:  # dense first layers (DeepSeek, LFM2-MoE): keep one
        setattr(config, key, 1)
    if isinstance(getattr(config, "mlp_only_layers", None), list) and config.mlp_only_layers:
        config.mlp_only_layers = [0]
        layers = 3
    if config.model_type in LAYER_KINDS and len(set(getattr(config, "layer_types", None) or [])) < 2:
        kinds = LAYER_KINDS[config.model_type]
        config.layer_types = [kinds[0]] * (config.num_hidden_layers - 1) + [kinds[-1]]
    n_layers = config.num_hidden_layers
    keep, lists = representative_layers(config, overrides, layers)
    # LongCat-Flash counts two sublayers per decoder layer in num_hidden_layers (= 2 * num_layers)
    config.num_hidden_layers = len(keep) * SUBLAYERS.get(config.model_type, 1)
    for key, value in lists.items():
        setattr(config, key, [value[i] for i in keep])
    for key, value in vars(config).items():
        if value == list(range(n_layers)) and n_layers > 1:  # every layer, by index
            setattr(config, key, list(range(len(keep))))
    for key in ("moe_layers", "no_rope_layers", "mlp_layer_types"):  # pattern lists not one entry per layer
        value = getattr(config, key, None)
        if isinstance(value, list) and value and key not in lists and value != list(range(len(keep))):
            setattr(config, key, (value * len(keep))[: len(keep)])
    if overrides:
        config.per_layer_config = tiny_overrides(overrides, keep, old_globals, config)
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
