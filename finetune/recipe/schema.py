"""The recipe schema: typed sections with a docstring under every field (what `finetune validate` checks).

    finetune validate recipes/tiny-moe/sft.yaml
Layer: recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["gate_up_proj", "down_proj"]
DENSE_MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]
# Mixtral's original checkpoints name the expert matrices w1 (gate), w3 (up) and w2 (down);
# transformers 5 fuses w1 and w3 into one gate_up_proj, so both aliases reach the same parameter.
EXPERT_ALIASES = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}


@dataclass
class ModelSection:
    name_or_path: str = ""
    """Local directory or hub id of the base model."""
    dtype: str = "auto"
    """auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa, eager, flash_attention_2, ..."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust the repository."""
    chat_template: str | None = None
    """Path to a .jinja file, or the template itself; default: the tokenizer's own."""
    quantization: str = "none"
    """none, or nf4: QLoRA, base weights in 4-bit NF4 (bitsandbytes) including the fused experts (finetune/qlora/)."""

    @property
    def quantized(self) -> bool:
        """The one spelling of "this base loads in 4-bit" (finetune/load decides with it)."""
        return self.quantization == "nf4"


@dataclass
class DataSource:
    """One entry of data.train / data.eval written as a mapping (docs/data.md). A plain string entry
    is the same as `{path: STRING}`; finetune/data/sources.py reads both."""

    path: str = ""
    """A local file (.jsonl, .json, .parquet, .csv), a datasets.save_to_disk folder, or (as in a plain string) `hub/name[:split]`."""
    name: str = ""
    """A hub data set id (instead of `path`)."""
    config: str | None = None
    """The hub data set's configuration (datasets.load_dataset's `name`), e.g. `default`."""
    split: str | None = None
    """The split to read: hub data sets and save_to_disk folders holding several splits; default train."""
    data_files: list[str] = field(default_factory=list)
    """Which files of the hub data set (or local folder) to read (datasets.load_dataset's `data_files`)."""
    format: str = "auto"
    """auto (detected from the columns and logged), messages, prompt_completion, sharegpt, alpaca, preference."""
    columns: dict[str, str] = field(default_factory=dict)
    """The format's column names -> this source's, e.g. {messages: conversation} or {prompt: question}."""
    weight: float | None = None
    """This source's share of the mixture (weights of one list are normalised); instead of `samples`."""
    samples: int | None = None
    """Exactly this many rows of the source, drawn with the recipe seed; instead of `weight`."""
    replace: bool = False
    """With `samples`: draw with replacement (needed when samples exceeds the source's rows)."""

    def __str__(self) -> str:
        """How messages name the source: its path, or `name[:split]`."""
        where = self.path or self.name
        return f"{where}:{self.split}" if self.name and self.split else where


@dataclass
class DataSection:
    train: list[str | DataSource] = field(default_factory=list)
    """Training sources: a file (.jsonl, .json, .parquet, .csv), a save_to_disk folder or a hub data set (name or name:split), or a mapping (DataSource)."""
    eval: list[str | DataSource] = field(default_factory=list)
    """Evaluation sources, as train; empty: take `eval_split` of train, or no eval."""
    eval_split: float = 0.0
    """Fraction of the training rows held out for evaluation when `eval` is empty."""
    max_length: int = 1024
    """Longest row in tokens (SFT: the whole conversation; DPO: prompt + chosen, prompt + rejected); see too_long."""
    too_long: str = "drop"
    """A row longer than max_length: drop (the default: skipped and counted per source; every trained answer
    keeps its end token), truncate (keep its first max_length tokens: SFT cuts the answer at the limit, so the
    model sees no end of it; DPO truncates as TRL does and drops rows whose prompt alone fills max_length;
    rows left with nothing to train on are dropped and counted) or error (stop, naming file and row)."""
    bad_rows: str = "error"
    """error: stop at the first bad row, naming file and row; drop: skip bad rows and report the count."""
    assistant_only_loss: bool = True
    """SFT: loss on assistant tokens only (the usual choice); false trains on the whole conversation."""
    system: str = "auto"
    """A row's system turn: keep, fold (into the first user turn), drop; auto: keep when the chat template renders system turns, else fold."""


@dataclass
class LoraGroup:
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / r."""
    targets: list[str] = field(default_factory=list)
    """Module or parameter names in this group; empty: the group's defaults."""


@dataclass
class LoraSection:
    attention: LoraGroup | None = None
    """Every Linear of each layer's attention, whatever its names (q/k/v/o_proj; MLA's q_a_proj, kv_b_proj...). Absent: on, rank 16; false: off."""
    experts: LoraGroup | None = None
    """MoE expert weights gate_up_proj/down_proj (aliases w1/w3/w2). Absent: on for MoE models; false: off."""
    shared_experts: LoraGroup | None = None
    """Shared experts of an MoE block and their gates (Qwen2-MoE shared_expert(_gate), DeepSeek shared_experts). Absent: on where the model has them; false: off."""
    mlp: LoraGroup | None = None
    """Dense MLP gate/up/down_proj: of a dense model, or of the dense layers of an MoE model (DeepSeek's first_k_dense_replace). Absent: on where the model has them; false: off."""
    dropout: float = 0.0
    """LoRA dropout on every group."""
    expert_path: str = "fast"
    """fast: expert LoRA applied to activations (finetune/lora/fast_experts.py); peft: PEFT's stock path."""


@dataclass
class RouterSection:
    policy: str = "freeze"
    """freeze: router weights untouched; train: trained in full and saved with the adapter; lora: a LoRA on the router."""
    aux_loss_coef: float | None = None
    """Load-balancing loss coefficient, applied the same in every stage; absent: the model config's value."""
    lora: LoraGroup | None = None
    """Rank and alpha for policy `lora` (default r=8, alpha=16)."""


@dataclass
class SamplesSection:
    every: int = 100
    """Log greedy answers every this many optimizer steps (and at the last step)."""
    prompts: int | str = 4
    """A .jsonl file of prompts (`prompt` text or `messages`), or how many rows of the eval data to take."""
    max_new_tokens: int = 64
    """Longest answer in tokens."""


@dataclass
class EarlyStoppingSection:
    metric: str = "eval_loss"
    """An evaluation metric the trainer logs (eval_loss; DPO also eval_rewards/accuracies, ...)."""
    patience: int = 3
    """Stop after this many evaluations without improvement."""
    threshold: float = 0.0
    """An evaluation counts as an improvement only if it beats the best by more than this."""
    mode: str = "auto"
    """min or max: whether a lower or higher value is better; auto: min for losses, else max."""


@dataclass
class Recipe:
    output_dir: str = ""
    """Where the run writes adapter, tokenizer, resolved recipe and metrics."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    router: RouterSection = field(default_factory=RouterSection)
    from_run: str | None = None
    """DPO: the SFT run directory this stage starts from (base model and tokenizer come from it); or from_model."""
    from_model: str | None = None
    """DPO without an SFT run: the model to start from and compare with (the reference): a hub id, a local
    checkpoint folder, or an export of this tool. Exactly one of from_run and from_model."""
    seed: int = 42
    """Seed for data shuffling and LoRA initialisation."""
    sft: dict = field(default_factory=dict)
    """Passed to trl.SFTConfig (learning_rate, num_train_epochs, per_device_train_batch_size, ...)."""
    dpo: dict = field(default_factory=dict)
    """Passed to trl.DPOConfig (beta, loss_type, precompute_ref_log_probs, report_to, ...)."""
    samples: SamplesSection | None = None
    """Log greedy answers to a few prompts while training (<run>/samples.jsonl and the loggers)."""
    early_stopping: EarlyStoppingSection | None = None
    """Stop when an eval metric stops improving; the best checkpoint's adapter becomes the run's."""

    # Not part of the YAML: where the recipe came from, and its structural problems, which
    # finetune/validate/ reports together with everything else it finds.
    source: str = field(default="", metadata={"internal": True})
    problems: list = field(default_factory=list, metadata={"internal": True})
