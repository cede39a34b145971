"""The cost of checking DPO rows against data.max_length the way TRL tokenizes them.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/too_long_rows.py     # the table in bench/RESULTS-toolong.md

On the bundled preference pairs (data/tiny-tasks/preference.jsonl, 640 conversational rows) and the
bundled tokenizer (model/tiny-moe), best of 5 passes each:
- finetune.data.convert.preference_row with data.too_long drop (prompt+chosen, prompt+rejected:
  two renders and encodes) and truncate (also the prompt alone with the generation prompt);
- the three tokenizations TRL 1.16's DPOTrainer._prepare_dataset makes per row, as it makes them
  (apply_chat_template(tokenize=True) through trl.data_utils._tokenize), against masks.render +
  masks.encode, which give the same ids (checked here on every row).
"""

from __future__ import annotations

import json
from pathlib import Path

from timing import best  # bench/timing.py, beside this script
from transformers import AutoTokenizer
from trl.data_utils import _tokenize

from finetune.data.convert import preference_row
from finetune.data.masks import encode, render

REPO = Path(__file__).resolve().parent.parent


def trl_three(tok, row):
    return [_tokenize(tok, row["prompt"], add_generation_prompt=True)["input_ids"],
            *(_tokenize(tok, row["prompt"] + row[c])["input_ids"] for c in ("chosen", "rejected"))]


def ours_three(tok, row):
    return [encode(tok, render(tok, row["prompt"], add_generation_prompt=True))[0],
            *(encode(tok, render(tok, row["prompt"] + row[c]))[0] for c in ("chosen", "rejected"))]


def main() -> None:
    tok = AutoTokenizer.from_pretrained(REPO / "model" / "tiny-moe")
    rows = [json.loads(line) for line in (REPO / "data" / "tiny-tasks" / "preference.jsonl").open()]
    assert all(trl_three(tok, r) == ours_three(tok, r) for r in rows)  # the same ids, every row
    figures = {
        "preference_row, too_long drop": best(lambda r: preference_row(r, tok, 1024, "drop"), rows),
        "preference_row, too_long truncate": best(lambda r: preference_row(r, tok, 1024, "truncate"), rows),
        "TRL's 3 tokenizations (apply_chat_template tokenize=True)": best(lambda r: trl_three(tok, r), rows),
        "the same 3 with masks.render + masks.encode": best(lambda r: ours_three(tok, r), rows),
    }
    print(f"| what ({len(rows)} rows, best of 5) | seconds | per row (ms) |\n|---|---|---|")
    for name, seconds in figures.items():
        print(f"| {name} | {seconds:.3f} | {1000 * seconds / len(rows):.2f} |")


if __name__ == "__main__":
    main()
