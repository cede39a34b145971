"""RoutingMetricsCallback inside real TRL trainers on a tiny random Mixtral (callback.py)."""

import logging
import math

import pytest
from conftest import moe_model, random_texts, word_tokenizer
from datasets import Dataset
from peft import LoraConfig

from finetune.routing.callback import RoutingMetricsCallback, add_routing_metrics


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def routing_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if any(k.startswith("routing/") for k in h)]


def check_layer_metrics(entry: dict, layers=(0, 1), experts: int = 8, drift: bool = True):
    for layer in layers:
        p = f"routing/layer{layer}"
        shares = [entry[f"{p}/expert{e}_share"] for e in range(experts)]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)
        assert entry[f"{p}/imbalance"] >= 1.0
        assert entry[f"{p}/cv"] >= 0.0
        assert 0.0 < entry[f"{p}/entropy"] <= math.log(experts) + 1e-5
        assert entry[f"{p}/dead_experts"] in range(experts + 1)
        if drift:
            assert 0.0 <= entry[f"{p}/topk_overlap"] <= 1.0
            assert entry[f"{p}/kl"] >= -1e-6
    for key in ("imbalance_max", "entropy_mean", "dead_experts"):
        assert f"routing/{key}" in entry


def test_sft_trainer_logs_routing_metrics(tokenizer):
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir="/tmp/test-routing-sft", use_cpu=True, bf16=False, report_to=[], max_steps=4,
        per_device_train_batch_size=4, logging_steps=2, save_strategy="no", max_length=48,
        disable_tqdm=True, learning_rate=1e-2,
    )
    dataset = Dataset.from_dict({"text": random_texts(16, 40)})
    model = moe_model(len(tokenizer), layers=2)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    callback = add_routing_metrics(trainer)
    trainer.train()

    logged = routing_logs(trainer)
    assert [h["step"] for h in logged] == [2, 4]  # every logging step, not the end-of-training summary
    for entry in logged:
        check_layer_metrics(entry)
    # lr 1e-2 on every weight: routing has moved away from the start by step 4.
    assert logged[-1]["routing/topk_overlap_min"] < 1.0
    assert logged[-1]["routing/kl_max"] > 0.0
    assert callback.probe["input_ids"].numel() <= callback.probe_tokens
    assert_counted_each_real_token_once(logged)


def assert_counted_each_real_token_once(logged):
    """TRL's cumulative `num_tokens` sums the attention masks of the training batches."""
    previous = 0.0
    for entry in logged:
        assert entry["routing/tokens"] == entry["num_tokens"] - previous
        previous = entry["num_tokens"]


def test_dpo_trainer_with_lora_logs_routing_metrics(tokenizer):
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir="/tmp/test-routing-dpo", use_cpu=True, bf16=False, report_to=[], max_steps=2,
        per_device_train_batch_size=2, logging_steps=1, save_strategy="no", max_length=48,
        disable_tqdm=True,
    )
    prompts, chosen, rejected = random_texts(4, 8, 1), random_texts(4, 12, 2), random_texts(4, 12, 3)
    dataset = Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})
    model = moe_model(len(tokenizer), layers=2)
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    callback = add_routing_metrics(trainer)
    trainer.train()

    logged = routing_logs(trainer)
    assert [h["step"] for h in logged] == [1, 2]
    for entry in logged:
        check_layer_metrics(entry)
    # The policy forward counts; the reference forward (adapters off, no_grad) and the drift
    # probe (eval, no_grad) do not.
    assert_counted_each_real_token_once(logged)
    assert callback.start_routing is not None


def test_dense_model_turns_the_callback_off(caplog):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    callback = RoutingMetricsCallback()
    with caplog.at_level(logging.WARNING):
        callback.on_train_begin(None, None, None, model=MistralForCausalLM(config))
    assert callback.capture is None and "routing metrics off" in caplog.text
    logs = {"loss": 1.0}
    callback.on_log(None, None, None, logs=logs)
    assert logs == {"loss": 1.0}
