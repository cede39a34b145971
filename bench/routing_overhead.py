"""Measure what RoutingMetricsCallback costs a training step, on CPU, as a ratio in one run.

    python bench/routing_overhead.py                     # hidden 256, 4 layers: ~2.5 min on 2 cores
    python bench/routing_overhead.py --hidden 64 --layers 2 --repeats 5

Trains a tiny random Mixtral with trl.SFTTrainer at logging_steps=10 and reports two ratios of
step time with / without the callback, over whole logging windows (the logging step is where
the host sync and the drift probe happen):
  attributed  in each run with the callback, the thread CPU time spent inside its hooks and
              events, against the rest of the step. Immune to other jobs on a shared machine.
  A/B         best per-step time of runs with vs without (same weights, data, seed), alternated;
              on a busy 2-core machine the noise between runs is larger than the effect.
The model is a random Mixtral of the chosen width with the bundled model/tiny-moe tokenizer;
the texts are random words. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

TOKENIZER = Path(__file__).resolve().parent.parent / "model" / "tiny-moe"
WORDS = (
    "the a an of to in is was it that for on with as at by from this be are or not but have one two three "
    "code python function return value list math add sum number prime story cat dog house tree question answer"
).split()


def build_model(vocab_size: int, hidden: int, layers: int):
    """A random Mixtral, 8 experts top-2, on the per-expert loop (grouped_mm is far slower on CPU at these sizes)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=512, pad_token_id=0,
    )
    model = MixtralForCausalLM(config)
    model.set_experts_implementation("eager")
    return model


def random_texts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words))) for _ in range(n)]


class _Attribution:
    """Thread CPU seconds spent inside the routing callback and its hooks (outermost call only:
    the drift probe runs the model, whose own hooks must not be counted twice)."""

    def __init__(self):
        self.cpu, self._depth = 0.0, 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self._depth += 1
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.cpu += time.thread_time() - start

        return timed

    def install(self, callback):
        """Time `callback`'s events and every RoutingCapture hook; returns an undo function."""
        from finetune.routing.capture import RoutingCapture

        for event in ("on_train_begin", "on_pre_optimizer_step", "on_log", "on_train_end"):
            setattr(callback, event, self.wrap(getattr(callback, event)))
        saved = {name: getattr(RoutingCapture, name) for name in ("on_forward_start", "on_forward_end", "router_hook")}
        RoutingCapture.on_forward_start = self.wrap(saved["on_forward_start"])
        RoutingCapture.on_forward_end = self.wrap(saved["on_forward_end"])
        RoutingCapture.router_hook = lambda cap, pos, name: self.wrap(saved["router_hook"](cap, pos, name))

        def undo():
            for name, fn in saved.items():
                setattr(RoutingCapture, name, fn)

        return undo


class _StepClock(TrainerCallback):
    """Marks each step begin (and the end), so a window of steps includes the logging-step work.

    Thread CPU time besides wall time: other people's jobs stretch wall time at random.
    """

    def __init__(self, attribution: _Attribution | None):
        self.attribution = attribution
        self.wall, self.cpu, self.inside = [], [], []

    def _mark(self):
        self.wall.append(time.perf_counter())
        self.cpu.append(time.thread_time())
        self.inside.append(self.attribution.cpu if self.attribution else 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._mark()

    def on_train_end(self, args, state, control, **kwargs):
        self._mark()


def _train(model, tokenizer, texts, steps: int, logging_steps: int, with_callback: bool) -> _StepClock:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from finetune.routing.callback import add_routing_metrics

    config = SFTConfig(
        output_dir="/tmp/routing-overhead",
        use_cpu=True,
        bf16=False,
        report_to=[],
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=logging_steps,
        save_strategy="no",
        max_length=128,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer
    )
    trainer.remove_callback(PrinterCallback)  # console printing is not what is measured
    attribution, undo = _Attribution() if with_callback else None, None
    clock = _StepClock(attribution)
    trainer.add_callback(clock)
    if with_callback:
        undo = attribution.install(add_routing_metrics(trainer))
    try:
        trainer.train()
    finally:
        if undo:
            undo()
    return clock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps dropped from the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating without/with pairs")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = build_model(len(tokenizer), args.hidden, args.layers)
    texts = random_texts(4 * args.steps, 120)
    _train(copy.deepcopy(base), tokenizer, texts, 3, args.logging_steps, True)  # warm caches and allocator
    per_step = {(kind, cb): [] for kind in ("cpu", "wall") for cb in (False, True)}
    attributed = []
    for _ in range(args.repeats):
        for with_cb in (False, True):
            clock = _train(copy.deepcopy(base), tokenizer, texts, args.steps, args.logging_steps, with_cb)
            w = args.warmup
            for kind in ("cpu", "wall"):
                marks = getattr(clock, kind)
                per_step[kind, with_cb].append((marks[-1] - marks[w]) / (len(marks) - 1 - w))
            if with_cb:
                inside = clock.inside[-1] - clock.inside[w]
                attributed.append(1 + inside / (clock.cpu[-1] - clock.cpu[w] - inside))
    print(
        f"tiny Mixtral hidden={args.hidden} layers={args.layers} experts=8 top-2, batch 4 x <=128 tokens, "
        f"logging_steps={args.logging_steps}, steps {args.warmup}..{args.steps} timed, torch threads={args.threads}"
    )
    print(f"attributed overhead ratio per run: {[round(r, 4) for r in attributed]}")
    for kind in ("cpu", "wall"):
        off, on = min(per_step[kind, False]), min(per_step[kind, True])
        print(f"{kind:>4} ms/step without: {[round(t * 1e3, 1) for t in per_step[kind, False]]}")
        print(f"{kind:>4} ms/step with:    {[round(t * 1e3, 1) for t in per_step[kind, True]]}")
        print(f"{kind:>4} A/B ratio (best with / best without): {on / off:.3f}")


if __name__ == "__main__":
    main()
