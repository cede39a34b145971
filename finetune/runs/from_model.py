"""DPO from any model (recipe key `from_model:`): the chain entry that records it, and what an export says it came from.

    finetune dpo RECIPE     # from_model: a hub id, a local checkpoint folder, or an export (`finetune export`)

A DPO run that starts from a model instead of an SFT run (`from_run:`) has the chain
[{"kind": "base", "model": <from_model>, "from_model": true[, "export_of": {...}]}, {"kind": "dpo", ...}]:
its adapter was trained on that model as it is, and that model (adapters disabled) is TRL's
reference, so export merges the adapter into it and eval rebuilds it like any other chain.
When from_model is an export of this tool, the export's record (export.json: the run it was
made from, that run's base and chain, the dtype) is copied under `export_of`, so the whole
lineage reads from the DPO run alone, even after the export was deleted or moved.
Layer: runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from finetune.errors import UserError
from finetune.runs.outputs import is_export

EXPORT_RECORD = "export.json"
"""The record `finetune export` writes (finetune/export, a layer above, names it MANIFEST; outputs.is_export reads it)."""


def export_record(path: str | Path) -> dict | None:
    """What an export of this tool at `path` was made from ({run, base, chain, dtype}); None when
    `path` is not an export; a UserError when its export.json is damaged."""
    path = Path(path)
    if not is_export(path):
        return None
    file = path / EXPORT_RECORD
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not valid JSON ({exc}); the export is damaged: export its run again") from None
    chain = raw.get("chain") if isinstance(raw, dict) else None
    if not (isinstance(chain, list) and chain and isinstance(chain[0], dict) and isinstance(chain[0].get("model"), str)):
        raise UserError(f"{file}: not an export record of this tool (no `chain` starting with a base model); "
                        "export its run again, or remove export.json to use the folder as a plain checkpoint")
    return {"run": raw.get("run"), "base": chain[0]["model"], "chain": chain, "dtype": raw.get("dtype")}


def hub_revision(name: str) -> str | None:
    """The commit of the hub-cache snapshot a hub id loads from (its refs, read offline), None when not cached."""
    try:
        found = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError is a ValueError)
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def base_link(model: str) -> dict:
    """The chain's first entry for a DPO run that starts from `model` (a hub id or an absolute path).
    Called once the model is loaded: a hub id's snapshot is in the cache then, and its commit is
    recorded as `revision` (a hub id names whatever its main branch holds today)."""
    link = {"kind": "base", "model": model, "from_model": True}
    if Path(model).is_dir():
        record = export_record(model)
        if record is not None:
            link["export_of"] = record
    elif hub_revision(model):
        link["revision"] = hub_revision(model)
    return link


def lineage(record: dict) -> str:
    """`base X -> sft RUN -> dpo RUN` of an export record."""
    steps = [f"base `{record['base']}`"] + [f"{link.get('kind')} `{link.get('run')}`" for link in record["chain"][1:]]
    return " -> ".join(steps)


def describe(link: dict) -> str:
    """What a from_model run started from, in one sentence for cards and logs ('' for an ordinary chain)."""
    if not link.get("from_model"):
        return ""
    revision = f" at revision {link['revision']}" if link.get("revision") else ""
    text = f"DPO started from the model `{link['model']}`{revision} (`from_model`), which is also its reference model"
    record = link.get("export_of")
    if record:
        text += f"; that model is an export of this tool, made from the run `{record['run']}` ({lineage(record)})"
    return text + "."
