"""Loading the base model, its config and its tokenizer from a recipe's `model:` section.

Also builds the model on the meta device (no weights, no memory) so recipe checks can match
LoRA targets against Mixtral-8x7B instantly. Used by every stage; nothing here trains.

    finetune validate recipes/mixtral-8x7b/sft.yaml     # config and meta model, offline
Layer: modeling (bottom, beside moe/data/runs); imports recipe and errors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Mxfp4Config, PreTrainedModel

from finetune import hub
from finetune.errors import UserError
from finetune.recipe import ModelSection

log = logging.getLogger(__name__)

# Configs of the hub models our shipped recipes name, so `finetune validate` can check LoRA
# targets with no network (CI, air-gapped clusters). Only config.json: no weights.
BUNDLED_CONFIGS = Path(__file__).resolve().parent.parent / "model" / "configs"

# The one table of dtype names (recipes, --dtype flags, placement, export).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def is_local(name_or_path: str) -> bool:
    return Path(name_or_path).exists()


def bundled_config_path(name_or_path: str) -> Path:
    return BUNDLED_CONFIGS / name_or_path.replace("/", "--") / "config.json"


def load_config(section: ModelSection):
    """The model's config: from disk, the local hub cache, the bundled copy (known hub ids), or the hub.

    The bundled copy comes before the network so that `finetune validate` is instant and works
    offline; configs of released models do not change.
    """
    config = _load_config(section)
    check_config(config, section.name_or_path)
    return config


# Sizes the model is built from: each must be a whole number >= 1 (transformers checks the type of
# some, not the range, and a 0 or a string surfaces as a traceback from deep inside the model code).
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "num_experts")


def check_config(config, name: str) -> None:
    cfg = text_config(config)
    where = f"{name}/config.json" if is_local(name) else f"the config of `{name}`"
    problems = []
    for key in SIZES:
        value = getattr(cfg, key, None)
        values = value if isinstance(value, (list, tuple)) and value else [value]  # some models size each layer
        if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            problems.append(f"`{key}` is {value!r}; expected a whole number >= 1")
    experts, top_k = getattr(cfg, "num_local_experts", None), getattr(cfg, "num_experts_per_tok", None)
    if not problems and isinstance(experts, int) and isinstance(top_k, int) and top_k > experts:
        problems.append(f"`num_experts_per_tok` ({top_k}) is larger than `num_local_experts` ({experts})")
    if problems:
        raise UserError(f"model.name_or_path: {where}: " + "; ".join(problems) + "; fix the model's config.json")


def _load_config(section: ModelSection):
    name = section.name_or_path
    kwargs = {"trust_remote_code": section.trust_remote_code}
    if not is_local(name):
        try:
            return AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
        except (OSError, ValueError):
            bundled = bundled_config_path(name)
            if bundled.is_file():
                raw = json.loads(bundled.read_text())
                return AutoConfig.for_model(raw.pop("model_type"), **raw)
        hub.check_reachable(name, "model", "model.name_or_path")  # seconds, not ~30 s of retries
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except StrictDataclassError as exc:  # a field of the wrong type, e.g. num_experts_per_tok: "two"
        where = f"{name}/config.json" if is_local(name) else f"the config of `{name}`"
        raise UserError(f"model.name_or_path: {where}: {exc}; fix the model's config.json") from None
    except (OSError, ValueError) as exc:
        hint = (
            "the directory has no usable config.json"
            if is_local(name)
            else f"no such local directory (relative paths are read from {Path.cwd()}) and no hub model of that name "
            "could be reached (check the name, your network, HF_TOKEN)"
        )
        raise UserError(f"model.name_or_path: cannot load a config from `{name}`: {hint}. ({exc.__class__.__name__}: {exc})") from None


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_moe(config) -> bool:
    cfg = text_config(config)
    return any(getattr(cfg, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"))


def meta_model(config, trust_remote_code: bool = False):
    """The model's module tree on the meta device: names and shapes, no storage."""
    # Under ZeRO-3 transformers builds every model inside deepspeed.zero.Init, which partitions it
    # with collectives: a meta model (names and shapes; the saved-adapter check builds one on rank
    # 0 alone) must not be, or that rank waits for the others forever. set_zero3_state marks
    # zero.Init as already entered, so transformers skips it.
    from transformers.modeling_utils import set_zero3_state

    try:
        with torch.device("meta"), set_zero3_state():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:  # e.g. an architecture transformers has no causal-LM class for
        raise UserError(f"model.name_or_path: cannot build a causal LM from this config: {exc}") from None


def _not_found(name: str) -> str:
    """A plain reason for a name that is neither a local directory nor a hub id ('' otherwise):
    transformers would say "Repo id must be in the form 'repo_name'" for a mistyped local path."""
    if is_local(name):
        return ""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return f"no such local directory (relative paths are read from {Path.cwd()})"
    return ""


def load_pretrained(section: ModelSection, device_map=None):
    """The base model with real weights in 16/32-bit, in the recipe's dtype and attention kernel.
    (finetune/load.load_model is the one place that chooses between this and the 4-bit loader.)"""
    hub.check_reachable(section.name_or_path, "model", "model.name_or_path")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            section.name_or_path,
            dtype=resolve_dtype(section.dtype),
            attn_implementation=section.attn_implementation,
            trust_remote_code=section.trust_remote_code,
            device_map=device_map,
            **dequantized(load_config(section), section.name_or_path),
        )
    except SafetensorError as exc:
        broken = broken_safetensors(section.name_or_path)
        what = f"{broken} is truncated or corrupt" if broken else "a weights file is corrupt"
        raise UserError(f"model.name_or_path: cannot load weights from `{section.name_or_path}`: {what} ({exc}); "
                        "download or save the model again") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot load weights from `{section.name_or_path}`: "
                        f"{_not_found(section.name_or_path) or exc}") from None
    alias_expert_count(model.config)
    expose_backbone(model)
    return model


def ships_mxfp4(config) -> bool:
    """The checkpoint stores its experts in MXFP4 (gpt-oss: `*_blocks` + `*_scales` per expert weight)."""
    q = getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(getattr(method, "value", method)) == "mxfp4"


def dequantized(config, name: str) -> dict:
    """from_pretrained arguments that load an MXFP4 checkpoint's experts dequantized to the load
    dtype: LoRA needs real weights (transformers' MXFP4 experts are Triton kernels, not trainable;
    without Triton it dequantizes anyway, with a warning). Empty for any other checkpoint."""
    if not ships_mxfp4(config):
        return {}
    log.info("%s ships its experts in MXFP4: loading them dequantized (transformers' Mxfp4Config(dequantize=True))", name)
    return {"quantization_config": Mxfp4Config(dequantize=True)}


def expose_backbone(model) -> None:
    """Make `model.base_model` the decoder where the class's `base_model_prefix` names no attribute
    (Llama-4's text model: prefix `language_model`, for loading from the multimodal checkpoint, while
    its decoder sits at `model`). TRL 1.16's fused LM head takes hidden states from `base_model`;
    on such a class that is the causal LM itself, and SFT and DPO fail (`last_hidden_state`).
    A plain instance attribute, not a registered submodule: state dict and saving are unchanged."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or getattr(model, "base_model", None) is not model:
        return
    # the decoder: the one child that is itself a transformers model (Llama4TextModel)
    bodies = [child for child in model.children() if isinstance(child, PreTrainedModel)]
    if len(bodies) == 1:
        model.__dict__[prefix] = bodies[0]


def alias_expert_count(config) -> None:
    """Let `config.num_experts` read `num_local_experts` where a family names it so (Phi-3.5-MoE,
    Granite-MoE), as Mixtral's own config does: TRL 1.16's fused forward reads
    `text_config.num_experts` for the aux loss and raises AttributeError on these families.
    An alias on the class, like Mixtral's `attribute_map`: nothing is added to a saved config.json."""
    cfg = text_config(config)
    cls = type(cfg)
    if "num_experts" not in cls.attribute_map and isinstance(getattr(cfg, "num_local_experts", None), int) \
            and "num_experts" not in cfg.__dict__:
        cls.attribute_map = {**cls.attribute_map, "num_experts": "num_local_experts"}


def broken_safetensors(directory: str) -> Path | None:
    """The first .safetensors file under a local model directory whose size disagrees with its header."""
    root = Path(directory)
    if not root.is_dir():
        return None
    for path in sorted(root.glob("*.safetensors")):
        try:
            with path.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size != 8 + n + end:
                return path
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return path
    return None


def load_tokenizer(section: ModelSection):
    """The tokenizer, with the recipe's chat template if it names one, and a pad token."""
    hub.check_reachable(section.name_or_path, "model", "model.name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(section.name_or_path, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from `{section.name_or_path}`: "
                        f"{_not_found(section.name_or_path) or exc}") from None
    template = section.chat_template
    if template:
        path = Path(template)
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8") if path.suffix == ".jinja" and path.is_file() else template
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"model.chat_template: cannot read {path} as UTF-8 text ({exc})") from None
    if tokenizer.chat_template is None:
        raise UserError(
            f"model.chat_template: the tokenizer of `{section.name_or_path}` has no chat template; "
            "set model.chat_template to a .jinja file or the template text"
        )
    if tokenizer.pad_token is None:
        # Mixtral ships no pad token. Padding positions are masked out of the loss and attention,
        # so reusing </s> is safe and keeps the vocabulary (and the exported checkpoint) unchanged.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
