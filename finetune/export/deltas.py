"""The weight changes a chain of LoRA adapters makes, read from the adapter files alone.

    finetune export RUN --output DIR   (finetune/export/merge.py applies these to the base shards)

No base weights are loaded: PEFT injects the adapter's structure into the model built on the meta
device (so module names, the parameter each wrapper adapts, and the scaling with rank_pattern and
alpha_pattern resolved are PEFT's own), and the LoRA factors are read from
adapter_model.safetensors. Each adapted parameter gets a list of terms in chain order: `add`
(LoRA: B @ A * scaling, per expert for 3-D parameters) or `replace` (a `modules_to_save` copy,
e.g. a router trained in full). Values are in the model's layout (fused experts) and float32.
Also used to merge into base weights kept outside a loaded model (QLoRA export).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear, LoraLayer, ParamWrapper
from peft.utils.other import ModulesToSaveWrapper
from safetensors import SafetensorError, safe_open

from finetune.errors import UserError

PREFIX = "base_model.model."  # PeftModel's prefix in front of the base model's parameter names


@dataclass
class Term:
    kind: str
    """`add` (a LoRA delta) or `replace` (a full copy saved by modules_to_save)."""
    param: str
    """The adapted parameter in the model's layout, e.g. `model.layers.0.mlp.experts.gate_up_proj`."""
    module: str
    """The PEFT module that holds it (its name in the PeftModel), for the independent check."""
    tensors: dict[str, torch.Tensor]
    scaling: float = 1.0
    shape: tuple = ()
    """Shape of the adapted parameter."""
    in_out: bool | None = None
    """A fused 3-D parameter stored (E, in, out) (gpt-oss, Llama-4), as PEFT decides it from the experts
    module's `is_transposed`; None: decided from the shapes, which cannot tell when in == out."""

    def value(self) -> torch.Tensor:
        """The delta (add) or the new weight (replace), float32, in the parameter's layout."""
        if self.kind == "replace":
            return self.tensors["value"].float()
        a, b = self.tensors["A"].float(), self.tensors["B"].float()
        if len(self.shape) == 2:
            return (b @ a) * self.scaling
        # PEFT stacks the experts' factors: A is (E*r, in) expert-major, B is (out, r*E) expert-minor
        # (peft/tuners/lora/layer.py, ParamWrapper.get_delta_weight). One batched GEMM per expert.
        experts = self.shape[0]
        a = a.reshape(experts, -1, a.shape[-1])  # E, r, in
        b = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # E, out, r
        delta = torch.bmm(b, a) * self.scaling  # E, out, in
        if self.in_out or (self.in_out is None and tuple(delta.shape) != tuple(self.shape)):
            delta = delta.transpose(1, 2)  # parameters stored (E, in, out)
        if tuple(delta.shape) != tuple(self.shape):
            raise UserError(f"{self.module}: LoRA factors of shape {tuple(a.shape)}/{tuple(b.shape)} do not fit "
                            f"the parameter {self.param} of shape {tuple(self.shape)}")
        return delta.contiguous()

    def expert_value(self, box: "ExpertBox") -> torch.Tensor:
        """The delta of one expert's box of a fused 3-D parameter (an `add` term), in float32,
        in the layout of the on-disk tensor the box becomes: one expert's rows and columns of
        B @ A * scaling, so a Mixtral-8x7B export never holds a whole fused delta for the merge."""
        a, b = self.tensors["A"].float(), self.tensors["B"].float()
        experts = self.shape[0]
        a = a.reshape(experts, -1, a.shape[-1])[box.expert]  # r, in
        b = b.reshape(b.shape[0], -1, experts)[:, :, box.expert]  # out, r
        (r0, r1), (c0, c1) = box.rows, box.cols  # in the parameter's own (E, d1, d2) layout
        out_in = b.shape[0] == self.shape[1] and a.shape[1] == self.shape[2]
        if (not self.in_out) if self.in_out is not None else out_in:  # stored (E, out, in)
            piece = (b[r0:r1] @ a[:, c0:c1]) * self.scaling
        else:  # stored (E, in, out)
            piece = ((b[c0:c1] @ a[:, r0:r1]) * self.scaling).t()
        return (piece.t() if box.transposed else piece).contiguous()


@dataclass(frozen=True)
class ExpertBox:
    """Where an on-disk tensor sits in a fused (E, d1, d2) parameter: expert, row and column
    ranges of that expert's (d1, d2) matrix, and whether the file stores it transposed."""
    expert: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    transposed: bool = False


@dataclass
class Adapter:
    path: Path
    peft_model: object
    """The PeftModel on the meta device: structure only, no weights."""
    terms: dict[str, list[Term]] = field(default_factory=dict)


def owner_of(module_name: str) -> str:
    """`...mlp.experts.base_layer` -> `...mlp.experts`: PEFT nests one wrapper per adapted parameter."""
    name = module_name.removeprefix(PREFIX)
    while name.endswith(".base_layer"):
        name = name[: -len(".base_layer")]
    return name


def read_adapter(meta_model_fn, path: Path) -> Adapter:
    """The terms of one adapter directory: PEFT's structure on a fresh meta model, factors from the file."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(f"{path}: adapter_config.json or adapter_model.safetensors is missing; the run is incomplete")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("lora_bias") or config.get("fan_in_fan_out"):
        raise UserError(f"{config_file}: export merges plain LoRA adapters (no DoRA, LoRA bias or fan_in_fan_out)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pattern keys on parameters; meta-device loading
            peft_model = PeftModel.from_pretrained(meta_model_fn(), str(path), low_cpu_mem_usage=True)
        return _read_terms(Adapter(path=path, peft_model=peft_model), weights_file)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"{weights_file}: cannot load the adapter ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                        "the run chain is damaged: rerun that stage") from None


def _read_terms(adapter: Adapter, weights_file: Path) -> Adapter:
    path, peft_model = adapter.path, adapter.peft_model
    with safe_open(str(weights_file), "pt") as f:
        stored = set(f.keys())
        used: set[str] = set()

        def take(key: str) -> torch.Tensor:
            if key not in stored:
                raise UserError(f"{weights_file}: tensor `{key}` is missing (the adapter does not match its config)")
            used.add(key)
            return f.get_tensor(key)

        for name, module in peft_model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                owner = owner_of(name)
                # buffers too: a router trained in full saves its bias buffer beside its weight
                # (DeepSeek/GLM's e_score_correction_bias); the copy holds the value to write
                original = module.original_module
                for pname, p in [*original.named_parameters(), *original.named_buffers()]:
                    key = f"{name}.{pname}"
                    if key in stored:
                        term = Term("replace", f"{owner}.{pname}", name, {"value": take(key)}, shape=tuple(p.shape))
                        adapter.terms.setdefault(term.param, []).append(term)
            elif isinstance(module, (ParamWrapper, Linear)) and "default" in module.lora_A:
                in_out = None
                if isinstance(module, ParamWrapper):
                    param, shape = f"{owner_of(name)}.{module.parameter_name}", tuple(module.get_param().shape)
                    if len(shape) == 3:  # PEFT swaps in/out unless the experts store (E, in, out)
                        in_out = not getattr(module, "_did_swap_in_out_features", True)
                else:
                    param, shape = f"{owner_of(name)}.weight", tuple(module.base_layer.weight.shape)
                tensors = {"A": take(f"{name}.lora_A.weight"), "B": take(f"{name}.lora_B.weight")}
                term = Term("add", param, name, tensors, float(module.scaling["default"]), shape, in_out)
                adapter.terms.setdefault(param, []).append(term)
            elif isinstance(module, LoraLayer) and not isinstance(module, (ParamWrapper, Linear)):
                raise UserError(f"{path}: {name} is a {type(module).__name__} LoRA layer, which export cannot merge")
        unused = sorted(stored - used)
    if unused:
        raise UserError(f"{weights_file}: {len(unused)} tensors export does not know how to merge, e.g. `{unused[0]}`")
    return adapter


def chain_terms(adapters: list[Adapter]) -> dict[str, list[Term]]:
    """Every adapted parameter with its terms, oldest adapter first (each adapter was trained on the
    merge of the previous ones, so terms apply in this order: a later `replace` wins)."""
    out: dict[str, list[Term]] = {}
    for adapter in adapters:
        for param, terms in adapter.terms.items():
            out.setdefault(param, []).extend(terms)
    return out


def apply_terms(base: torch.Tensor, values: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """base (float32) with the chain's terms applied in order."""
    out = base
    for kind, value in values:
        out = value.clone() if kind == "replace" else out + value
    return out
