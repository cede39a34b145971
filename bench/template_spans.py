"""Assistant spans: the whole-conversation method (finetune/data/templates.py) against the prefix
method it replaced (finetune/data/masks.py at 79f3b06), on prefix-preserving templates where both work.

    python bench/template_spans.py --rows 2000          # the table in bench/RESULTS-templates.md

Conversations of 1-3 user/assistant turns of seeded words; the bundled tokenizer (model/tiny-moe)
with its Mixtral template, then with the Qwen2 ChatML template (tests/unit/data/templates/).
Both methods run in this process, alternating, best of --repeats; the spans must be equal where the
old method's end (the rendering of the conversation through the turn) and the new one's (the
special token after the content) agree, which the script checks on the Mixtral template.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import types
from pathlib import Path

from timing import best  # bench/timing.py, beside this script

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from transformers import AutoTokenizer

from finetune.data import templates

WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "this"]


def old_module():
    """finetune/data/masks.py as it was at 79f3b06 (the prefix method), loaded under another name."""
    source = subprocess.run(["git", "-C", str(REPO), "show", "79f3b06:finetune/data/masks.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("masks_79f3b06")
    exec(compile(source, "masks_79f3b06.py", "exec"), module.__dict__)  # noqa: S102 - the repository's own file
    return module


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": role, "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))}
                      for role in ("user", "assistant")]
        out.append(turns)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    old = old_module()
    rows = conversations(args.rows)
    turns = sum(len(r) // 2 for r in rows)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "model" / "tiny-moe")
    for row in rows[:200]:  # Mixtral's template: both methods end a turn at its </s>
        assert old.assistant_spans(tokenizer, row) == templates.assistant_spans(tokenizer, row), row
    print(f"{args.rows} conversations, {turns} assistant turns; best of {args.repeats}")
    print("| template | prefix method (s) | whole conversation (s) | ratio old/new |")
    print("|---|---|---|---|")
    for name, template in [("Mixtral (bundled tokenizer)", None),
                           ("Qwen2 ChatML", (REPO / "tests/unit/data/templates/qwen2_moe.jinja").read_text())]:
        if template:
            tokenizer.chat_template = template
        t_old = best(lambda r: old.assistant_spans(tokenizer, r), rows, args.repeats)
        t_new = best(lambda r: templates.assistant_spans(tokenizer, r), rows, args.repeats)
        print(f"| {name} | {t_old:.2f} | {t_new:.2f} | {t_old / t_new:.2f} |")


if __name__ == "__main__":
    main()
