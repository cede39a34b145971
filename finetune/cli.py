"""The `finetune` command: validate, plan, sft, dpo, export, eval, routing.

    finetune validate recipes/tiny-moe/sft.yaml
    finetune plan recipes/mixtral-8x7b/sft.yaml --gpu h100-80gb --gpus 8
    finetune sft recipes/tiny-moe/sft.yaml
    finetune dpo recipes/tiny-moe/dpo.yaml
    finetune export runs/tiny-moe/dpo --output exports/tiny-moe-instruct [--push-to-hub ORG/NAME [--private]]
    finetune eval exports/tiny-moe-instruct --data data/tiny-tasks/test.jsonl
    finetune eval runs/tiny-moe/sft --passkey --lengths 128,256,496 --long-ppl data/tiny-tasks/corpus.txt
    finetune pipeline recipes/tiny-moe --eval-data data/tiny-tasks/test.jsonl
    finetune routing runs/tiny-moe/dpo --data data/tiny-tasks/test.jsonl --compare model/tiny-moe

User errors print what, where and how to fix, and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

from finetune.errors import CheckFailed, UserError
from finetune.runs import signals

EXIT_USER_ERROR = 2


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a batch of 0 rows or 0 new tokens would fail late or say nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def shard_size(text: str) -> int | str:
    """argparse type for --max-shard-size, parsed the way transformers' save_pretrained will parse it,
    so a bad size fails before the merge instead of after it. Bare digits are bytes."""
    from transformers.utils.hub import convert_file_size_to_int  # transformers on use only: `finetune --help` stays fast

    value: int | str = int(text) if text.isdigit() else text
    try:
        size = convert_file_size_to_int(value)
    except ValueError:
        size = None
    if size is None or size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write a whole number and a unit, e.g. 5GB, 500MB, 2GiB")
    return value


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a recipe value (YAML syntax), e.g. --set sft.learning_rate=1e-4; repeatable",
    )


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (every GPU if any, else CPU), cpu, cuda (every GPU), cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the model's 16-bit dtype on GPUs, float32 on the CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="SFT, DPO and export for Mixture-of-Experts instruct models.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe without training (instant, no weights loaded)")
    _add_recipe_args(p)
    for stage in ("sft", "dpo"):
        p = sub.add_parser(stage, help=f"run a {stage.upper()} recipe")
        _add_recipe_args(p)
        p.add_argument("--overwrite", action="store_true",
                       help="replace a finished run at output_dir (only a run of this project; it stays intact until the new one has finished)")
        p.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its newest complete checkpoint (<parent>/.<name>.incomplete/)")

    p = sub.add_parser("plan", help="will a recipe fit: memory per GPU and strategy, micro-batch, launch config, time (no weights)")
    _add_recipe_args(p)
    p.add_argument("--gpu", help="GPU model (h100-80gb, h200, a100-40gb, a100-80gb, l40s, rtx4090, ...; default h100-80gb)")
    p.add_argument("--gpu-memory", help="memory of one GPU for any other card, e.g. 48GiB")
    p.add_argument("--gpus", type=int, help="GPUs per node (default 1, or the --launch config's)")
    p.add_argument("--nodes", type=int, help="nodes (default 1, or the --launch config's)")
    p.add_argument("--launch", help="an accelerate config (recipes/accelerate/*.yaml): plan its strategy and process count")
    p.add_argument("--nf4", action="store_true", help="plan a 4-bit base even if the recipe has none")
    p.add_argument("--rows", type=positive_int, help="training rows, for the job time of a hub data set")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("export", help="merge a run's adapter chain into a standalone checkpoint")
    p.add_argument("run", help="run directory (SFT or DPO)")
    p.add_argument("--output", required=True, help="directory to write the checkpoint to")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights")
    p.add_argument("--max-shard-size", default="5GB", type=shard_size, help="largest safetensors shard (default 5GB)")
    p.add_argument("--forward-check", default="auto", choices=["auto", "full", "truncated"],
                   help="logit check on the whole model, or on its first/middle/last decoder layers "
                        "(auto: whole model when it fits in half the available memory twice over)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="after the export is verified, upload it to this hub model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")

    p = sub.add_parser("eval", help="loss, exact match, preference accuracy, passkey retrieval, perplexity by context")
    p.add_argument("model", help="base model (directory or hub id), run directory, or exported checkpoint")
    p.add_argument("--data", action="append", help="data file (SFT rows, test prompts with `answer`, or preference pairs); repeatable")
    p.add_argument("--output", help="write every figure (data scores, passkey, long-context perplexity) as one JSON file here")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--passkey", action="store_true", help="passkey retrieval by prompt length x key depth (JSON, Markdown, heat-map)")
    p.add_argument("--lengths", help="passkey prompt lengths in tokens, e.g. 1k,2k,4k (default: 1/8, 1/4, 1/2 of the context, the longest that fits, and 2x beyond)")
    p.add_argument("--depths", help="key depths from 0 (start) to 1 (end), default 0,0.25,0.5,0.75,1")
    p.add_argument("--trials", type=positive_int, default=4, help="passkey prompts per (length, depth) cell (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkeys (default 0)")
    p.add_argument("--long-ppl", metavar="FILE", help="perplexity of this text's later tokens by context length (table and plot)")
    p.add_argument("--contexts", help="context lengths for --long-ppl, e.g. 512,1k,2k (default: powers of two from 64 that fit)")
    p.add_argument("--report-dir", help="where --passkey/--long-ppl write their files (default eval-reports/<model name>)")
    _add_placement_args(p)

    p = sub.add_parser("pipeline", help="the whole job: SFT -> DPO -> export -> eval of base, SFT, DPO and export")
    p.add_argument("recipes", help="directory holding sft.yaml and dpo.yaml, e.g. recipes/tiny-moe")
    p.add_argument("--eval-data", action="append", required=True, help="data file to score every stage on; repeatable")
    p.add_argument("--export", dest="export_dir", help="where to export (default exports/<recipes dir name>)")
    p.add_argument("--export-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a value of the SFT recipe; repeatable")
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs of this pipeline")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted pipeline: keep finished stages of the same recipe, resume an interrupted one")
    p.add_argument("--no-passkey", action="store_true", help="skip the passkey retrieval check of every stage")

    p = sub.add_parser("routing", help="routing report: expert load and repeated-expert rates per layer, with plots")
    p.add_argument("model", help="base model, run directory, or exported checkpoint")
    p.add_argument("--data", action="append", required=True, help="data file; each file (or its `source` column) is a data source; repeatable")
    p.add_argument("--compare", help="a second model/run to compare against (e.g. the base model)")
    p.add_argument("--output", required=True, help="report directory")
    p.add_argument("--max-rows", type=positive_int, default=256, help="texts per data source (default 256)")
    p.add_argument("--source-column", default="source", help="row column naming its data source (default: source)")
    p.add_argument("--max-length", type=positive_int, default=1024, help="tokens per text (default 1024)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _add_placement_args(p)
    return parser


class _RankFormatter(logging.Formatter):
    """Under several processes: warnings and errors (which can differ per rank) say which rank."""

    def __init__(self, rank: int):
        super().__init__("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        self.rank = rank

    def format(self, record):
        line = super().format(record)
        return f"[rank {self.rank}] {line}" if record.levelno >= logging.WARNING else line


def _rank_zero_or_per_rank(record) -> bool:
    """On ranks other than 0: warnings, and INFO messages marked per-rank (distributed.PER_RANK)."""
    return record.levelno >= logging.WARNING or getattr(record, "per_rank", False)


def _configure_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # accelerate/torchrun set RANK and WORLD_SIZE: with several processes every INFO line would be
    # printed once per rank (the same line 8 times on 8 GPUs); rank 0 prints them
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_RankFormatter(rank))
            if rank != 0:
                handler.addFilter(_rank_zero_or_per_rank)
    if quiet or rank != 0:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads TQDM_* defaults: no progress bars (eval, data, export)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PEFT checks rank/alpha pattern keys against module names only, so the keys for expert and
    # router parameters (target_parameters) are reported as unmatched although PEFT applies them;
    # tests/unit/test_sft.py checks the ranks that expert adapters actually get.
    warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
    import transformers  # imported after argument parsing: `finetune --help` answers without torch

    transformers.logging.set_verbosity_warning()


def check_output_path(path: str, flag: str, directory: bool) -> None:
    """Refuse, before any work, an output the command could not write: a path below a regular
    file, a report directory that is a file, a results file that is a directory, or an existing
    file this project did not write (eval replaces only its own results JSON)."""
    out = Path(path)
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} {path}: {parent} is a file, not a directory; choose another path")
    if directory and out.exists() and not out.is_dir():
        raise UserError(f"{flag} {path} is an existing file; the report is a directory: choose another path")
    if not directory and out.is_dir():
        raise UserError(f"{flag} {path} is a directory; give the path of the JSON file to write")
    if not directory and out.exists():
        try:
            ours = set(json.loads(out.read_text(encoding="utf-8"))) >= {"model", "results"}
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise UserError(f"{flag} {path} exists and is not a `finetune eval` results file; "
                            "choose another path or remove it")


def dispatch(args) -> int:
    from finetune.recipe import read_recipe  # each command imports its own layers: `finetune --help` loads no torch

    if args.command == "validate":
        from finetune.plan.warn import fit_warning  # torch/transformers load only for the command that needs them
        from finetune.validate import check  # (as above)

        checked = check(read_recipe(args.recipe, args.overrides))
        if warning := fit_warning(checked):
            print(warning, file=sys.stderr)
        groups = ", ".join(f"{k} ({', '.join(g.targets)}; r={g.r})" for k, g in checked.targets.groups.items())
        print(f"{args.recipe}: OK ({checked.stage}; LoRA on {groups}; router {checked.targets.router_policy})")
        if checked.trainable:
            per_group = ", ".join(f"{k} {v:,}" for k, v in checked.trainable.items())
            print(f"trainable parameters: {sum(checked.trainable.values()):,} ({per_group})")
        return 0
    if args.command == "plan":
        from finetune.plan.render import (  # torch loads only for the command that needs it
            check_args,
            plan_cli,
        )
        from finetune.validate import check  # (as above)

        gpu = check_args(args)
        return plan_cli(args, check(read_recipe(args.recipe, args.overrides)), gpu)
    if args.command == "sft":
        from finetune.stages.sft import run_sft  # torch/trl load only for the command that needs them

        run_sft(read_recipe(args.recipe, args.overrides), overwrite=args.overwrite, resume=args.resume)
        return 0
    if args.command == "dpo":
        from finetune.stages.dpo import run_dpo  # torch/trl load only for the command that needs them

        run_dpo(read_recipe(args.recipe, args.overrides), overwrite=args.overwrite, resume=args.resume)
        return 0
    if args.command == "export":
        from finetune.export import export  # torch/peft load only for the command that needs them
        from finetune.export.push import check_push, push_export  # (as above)

        if args.private and not args.push_to_hub:
            raise UserError("--private applies to --push-to-hub ORG/NAME; add it or drop --private")
        token = check_push(args.push_to_hub) if args.push_to_hub else None  # before any work
        out = export(args.run, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     overwrite=args.overwrite, forward_check=args.forward_check, progress=not args.quiet)
        if args.push_to_hub:
            url = push_export(out, args.push_to_hub, private=args.private, token=token)
            print(f"pushed {out} -> {url}" + (" (private)" if args.private else ""))
        return 0
    if args.command == "eval":
        from finetune.eval.scores import evaluate_cli  # torch loads only for the command that needs it

        if args.output:
            check_output_path(args.output, "--output", directory=False)
        return evaluate_cli(args)
    if args.command == "pipeline":
        from finetune.pipeline import run_pipeline  # torch/trl load only for the command that needs them

        run_pipeline(args.recipes, args.eval_data, args.export_dir, args.export_dtype, args.overrides, args.overwrite,
                     with_passkey=not args.no_passkey, resume=args.resume)
        return 0
    if args.command == "routing":
        from finetune.routing.cli import routing_cli  # torch/matplotlib load only for the command that needs them

        check_output_path(args.output, "--output", directory=True)
        return routing_cli(args)
    raise AssertionError(args.command)


def resume_command(argv: list[str]) -> str:
    """The command that continues this one: the same arguments, --resume instead of --overwrite."""
    kept = [a for a in argv if a not in ("--resume", "--overwrite")]
    command = "finetune " + shlex.join([*kept, "--resume"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun / accelerate launch
        command = f"<the same launcher, e.g. accelerate launch ...> -m {command}"
    return command


def interrupted_message(exc: signals.Interrupted, argv: list[str]) -> str:
    name = exc.args[0]
    if exc.finished:
        return f"{name}: the run had already finished; it is complete at {exc.finished}"
    if exc.checkpoint:
        return (f"{name}: stopped at a step boundary and saved checkpoint {exc.checkpoint}\n"
                f"continue with:\n  {resume_command(argv)}")
    return (f"{name}: interrupted; the outputs are as they were before (an interrupted run keeps only its "
            f"complete checkpoints, for --resume)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    _configure_logging(args.quiet)
    try:
        with signals.handled():
            return dispatch(args)
    except signals.Interrupted as exc:
        if os.environ.get("RANK", "0") == "0":  # one message per job, not one per rank
            print(interrupted_message(exc, argv), file=sys.stderr, flush=True)
        return exc.exit_code
    except UserError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_USER_ERROR
    except CheckFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
