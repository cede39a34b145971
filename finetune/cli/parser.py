"""The `finetune` command line: every command, option and argument type (no imports of the layers below).

    finetune --help
Layer: cli.
"""

from __future__ import annotations

import argparse


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

    p = sub.add_parser("data", help="look at the data as training will: rows kept/dropped per source, lengths, marked samples")
    _add_recipe_args(p)
    p.add_argument("--stage", choices=["sft", "dpo"], help="prepare the data as this stage does (default: the recipe's)")
    p.add_argument("--show", type=int, default=3, metavar="N", help="render N rows with their trained tokens marked (default 3)")
    p.add_argument("--output", help="folder for the length histogram PNG (default data-reports/<recipe folder>-<recipe name>)")

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
