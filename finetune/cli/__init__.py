"""The `finetune` command: validate, data, plan, sft, dpo, export, eval, routing.

    finetune validate recipes/tiny-moe/sft.yaml
    finetune data recipes/tiny-moe/sft.yaml --show 3
    finetune plan recipes/mixtral-8x7b/sft.yaml --gpu h100-80gb --gpus 8
    finetune sft recipes/tiny-moe/sft.yaml
    finetune dpo recipes/tiny-moe/dpo.yaml
    finetune export runs/tiny-moe/dpo --output exports/tiny-moe-instruct [--push-to-hub ORG/NAME [--private]]
    finetune eval exports/tiny-moe-instruct --data data/tiny-tasks/test.jsonl
    finetune eval runs/tiny-moe/sft --passkey --lengths 128,256,496 --long-ppl data/tiny-tasks/corpus.txt
    finetune pipeline recipes/tiny-moe --eval-data data/tiny-tasks/test.jsonl
    finetune routing runs/tiny-moe/dpo --data data/tiny-tasks/test.jsonl --compare model/tiny-moe

User errors print what, where and how to fix, and exit with status 2 (no traceback). The commands
and options are in parser.py; this module runs them (logging, signals, exit statuses).
Layer: cli (top).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

from finetune.cli.parser import build_parser  # noqa: F401  (tests and docs build the parser from here)
from finetune.errors import CheckFailed, UserError
from finetune.runs import signals

EXIT_USER_ERROR = 2


def _every_rank(record) -> bool:
    """Printed by every rank: errors, and messages marked per-rank (distributed.PER_RANK) because
    they can differ between ranks. Everything else is the same on every rank: rank 0 prints it."""
    return record.levelno >= logging.ERROR or getattr(record, "per_rank", False)


class _RankFormatter(logging.Formatter):
    """Under several processes: a warning or error that every rank prints says which rank it is from
    (per-rank INFO lines say it in their text: `rank 1/2: ...`)."""

    def __init__(self, rank: int):
        super().__init__("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        self.rank = rank

    def format(self, record):
        line = super().format(record)
        return f"[rank {self.rank}] {line}" if record.levelno >= logging.WARNING and _every_rank(record) else line


def _configure_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # accelerate/torchrun set RANK and WORLD_SIZE: with several processes every INFO line would be
    # printed once per rank (the same line 8 times on 8 GPUs); rank 0 prints them
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # the libraries' Python warnings (deprecations, ...) are the same on every rank too: through
        # logging, so that the filter below keeps them to rank 0
        logging.captureWarnings(True)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_RankFormatter(rank))
            if rank != 0:
                handler.addFilter(_every_rank)
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
        from finetune.balancing import default_coef  # torch/transformers load only for the command that needs them
        from finetune.plan.warn import fit_warning  # (as above)
        from finetune.validate import check  # (as above)

        checked = check(read_recipe(args.recipe, args.overrides))
        if warning := fit_warning(checked):
            print(warning, file=sys.stderr)
        groups = ", ".join(f"{k} ({', '.join(g.targets)}; r={g.r})" for k, g in checked.targets.groups.items())
        print(f"{args.recipe}: OK ({checked.stage}; LoRA on {groups}; router {checked.targets.router_policy})")
        if checked.balancing:  # what the router policy does with its parameters and buffers; aux loss or not
            policy = checked.targets.router_policy
            coef = checked.recipe.router.aux_loss_coef
            coef = coef if coef is not None else default_coef(checked.balancing)
            print(f"router: {policy}, {checked.balancing.policy_note(policy)}; {checked.balancing.summary(coef)}")
        if checked.trainable:
            per_group = ", ".join(f"{k} {v:,}" for k, v in checked.trainable.items())
            print(f"trainable parameters: {sum(checked.trainable.values()):,} ({per_group})")
        return 0
    if args.command == "data":
        from finetune.data.preview import colour_wanted, preview  # datasets/matplotlib load only for this command
        from finetune.validate.resolve import resolved_recipe  # (as above)

        output = args.output or str(Path("data-reports") / f"{Path(args.recipe).resolve().parent.name}-{Path(args.recipe).stem}")
        check_output_path(output, "--output", directory=True)
        checked, recipe = resolved_recipe(read_recipe(args.recipe, args.overrides), args.stage)
        print("\n".join(preview(recipe, checked.stage, max(args.show, 0), Path(output), colour_wanted(sys.stdout))))
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
            code = dispatch(args)
            if "torch" in sys.modules:  # a command that loaded torch may have joined a process group
                from finetune import distributed  # imported here: `finetune --help` loads no torch

                distributed.finish()
            return code
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
