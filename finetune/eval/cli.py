"""The long-context part of `finetune eval`: flag checks before any weights load, then the runs.

    finetune eval MODEL_OR_RUN --passkey --lengths 1k,2k --long-ppl FILE --contexts 512,1k --report-dir DIR

Called by finetune.eval.scores.evaluate_cli, which loads the model once for every requested check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.eval import long_ppl, passkey, report

log = logging.getLogger("finetune")


@dataclass
class LongContextRequest:
    lengths: list[int] | None
    depths: list[float]
    contexts: list[int] | None
    text: str | None
    out: Path


def check_args(args) -> LongContextRequest:
    """Every flag of the long-context checks, checked before the model loads (which can take minutes)."""
    if args.trials < 1:
        raise UserError(f"--trials {args.trials}: at least 1 prompt per (length, depth) cell")
    if (args.lengths or args.depths) and not args.passkey:
        raise UserError("--lengths/--depths set the passkey grid; add --passkey")
    if args.contexts and not args.long_ppl:
        raise UserError("--contexts sets the perplexity curve; add --long-ppl FILE")
    if not (args.data or args.passkey or args.long_ppl):
        raise UserError("finetune eval: nothing to evaluate; give --data FILE, --passkey and/or --long-ppl FILE")
    lengths = report.parse_lengths(args.lengths, "--lengths") if args.lengths else None
    depths = passkey.parse_depths(args.depths or "0,0.25,0.5,0.75,1")
    contexts = report.parse_lengths(args.contexts, "--contexts") if args.contexts else None
    text = long_ppl.read_text(args.long_ppl) if args.long_ppl else None
    out = Path(args.report_dir) if args.report_dir else Path("eval-reports") / Path(args.model.rstrip("/")).name
    if out.exists() and not out.is_dir():
        raise UserError(f"--report-dir {out}: exists and is not a directory")
    return LongContextRequest(lengths, depths, contexts, text, out)


def default_contexts(limit: int | None, score_tokens: int) -> list[int]:
    """Powers of two from 64 up to the longest context that fits the model with the scored block."""
    top = (limit or 4096 + score_tokens + 1) - score_tokens - 1
    out, c = [], 64
    while c <= top:
        out.append(c)
        c *= 2
    return out or [top]


def run(model, tokenizer, args, request: LongContextRequest) -> dict:
    name = args.model
    results = {}
    if args.passkey:
        lengths = request.lengths or passkey.default_lengths(passkey.context_of(model))
        grid = passkey.passkey_grid(model, tokenizer, lengths, request.depths, trials=args.trials, seed=args.seed,
                                    batch_size=args.batch_size)
        files = report.write_passkey(grid, request.out, name)
        print(passkey.markdown(grid, name))
        print("written: " + ", ".join(str(f) for f in files))
        results["passkey"] = grid
    if args.long_ppl:
        contexts = request.contexts or default_contexts(passkey.context_of(model), 128)
        curve = long_ppl.long_ppl(model, tokenizer, request.text, contexts)
        files = report.write_long_ppl(curve, request.out, name, args.long_ppl)
        print(long_ppl.markdown(curve, name, args.long_ppl))
        print("written: " + ", ".join(str(f) for f in files))
        results["long_ppl"] = curve
    return results
