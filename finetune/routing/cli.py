"""`finetune routing`: load the model(s), turn data files into sources, write the routing report.

    finetune routing runs/tiny-moe/dpo --data data/tiny-tasks/test.jsonl --compare model/tiny-moe --output reports/routing
"""

from __future__ import annotations

from pathlib import Path

from finetune.load.chain import load_for_inference
from finetune.routing.report import load_sources, routing_report
from finetune.routing.tokens import write_token_view


def routing_cli(args) -> int:
    model, tokenizer = load_for_inference(args.model, args.dtype, args.device)
    sources = load_sources(args.data, args.source_column, tokenizer=tokenizer)
    sources = {name: texts[: args.max_rows] for name, texts in sources.items()}
    compare = None
    if args.compare:
        other, other_tokenizer = load_for_inference(args.compare, args.dtype, args.device)
        compare = (other, other_tokenizer)
    routing_report(model, tokenizer, sources, args.output, compare=compare, max_length=args.max_length,
                   batch_size=args.batch_size, plots=not args.no_plots, progress=not args.quiet)
    out = Path(args.output)
    write_token_view(model, tokenizer, sources, out, max_length=args.max_length, png=not args.no_plots,
                     title=f"Top-1 expert per token: {args.model}")
    print(f"routing report for {args.model}" + (f" vs {args.compare}" if args.compare else "") + f": {out}/routing.md")
    for extra in sorted([*out.glob("*.png"), out / "tokens.html"]):
        print(f"  {extra}")
    return 0
