"""Data preparation with `datasets`: a job's sources -> Arrow rows -> checked, tokenized rows, cached.

    finetune sft recipes/tiny-moe/sft.yaml      # prepares the data (or finds it in the cache) before the model loads
    accelerate launch -m finetune sft R.yaml    # the main process prepares, the other ranks load its cache entry

Steps; each writes Arrow files in the entry's temporary folder and none holds the data set in
Python objects, so memory stays bounded by a batch per process:
 1. read: every source's rows as JSON text with their row numbers, streamed (files.iter_source);
 2. convert: `datasets.map(num_proc=dataset_num_proc)` parses, checks and tokenizes each row with
    finetune/data/convert.py's converters: the same functions as before, so the same ids, masks and errors;
 3. errors, in the order the in-memory path raised them: an unreadable source or invalid JSON first
    (files used to be read whole before any row was checked), then bad rows in row order: the first
    is an error, or every one is dropped and reported (data.bad_rows; too-long rows: data.too_long);
    then per source the rows dropped and changed, by reason (rows.Report.tally);
 4. eval_split (the same seeded permutation as before), save_to_disk; finetune/data/cache.py publishes.
The datasets returned are memory-mapped from the cache entry, after a cold build as on a hit.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value, load_from_disk

from finetune import distributed
from finetune.data import cache, files, formats, mixture, sources
from finetune.data.convert import CONVERTERS, convert_row
from finetune.data.key import key_parts
from finetune.data.rows import MALFORMED, NOTES, TOO_LONG, Report, RowError
from finetune.errors import Problem, UserError
from finetune.recipe import DataSection

log = logging.getLogger("finetune")

ROW, HARD, READ = 0, 1, 2
"""Error kinds: a bad row (data.bad_rows decides), a UserError while converting (always raised),
an unreadable source or a line that is not JSON (always raised, before any row check)."""

RAW = Features({"source": Value("int32"), "number": Value("int64"), "text": Value("string"), "error": Value("string")})
_KEEP = {"source": Value("int32"), "number": Value("int64"), "error": Value("string"), "error_kind": Value("int8"),
         "reason": Value("string"), "notes": List(Value("string")),  # why dropped, why changed (rows.py reasons)
         "system": Value("string")}  # what data.system did to the row's system turn
MESSAGES = List({"role": Value("string"), "content": Value("string")})
PAIR = ("prompt", "chosen", "rejected")


def wants_eval(section: DataSection) -> bool:
    return bool(section.eval) or section.eval_split > 0


def build_datasets(section: DataSection, tokenizer, kind: str, seed: int, num_proc: int | None = None):
    """(train, eval or None, Report) for kind `sft` or `preference`, from the cache or prepared into it.

    Under a launcher the main process prepares and the others wait, then load (cache.main_first)."""
    parts = key_parts(section, tokenizer, kind, seed)
    key = cache.key(parts)
    state = launch_state()
    converted = 0
    with cache.main_first(state):
        found = cache.lookup(key)
        if found is None:
            if state is not None and not state.is_local_main_process:
                raise UserError(f"rank {state.process_index}: the data were not prepared by the main process "
                                "(its error is above); fix that and launch again")
            found, converted = prepare(key, parts, section, tokenizer, kind, seed, num_proc)
    entry, manifest = found
    rank = f"rank {state.process_index}/{state.num_processes}: " if state is not None else ""
    log.info("%sdata: %d rows tokenized here, %s (%s, %.1f MB)", rank, converted,
             "cache entry prepared" if converted else "cache hit", entry, cache.size(entry) / 1e6,
             extra=distributed.PER_RANK)  # every rank says whether it prepared or loaded
    train = load_from_disk(str(entry / "train"))
    eval_ds = load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    report = Report(rows=manifest["report"]["rows"], dropped=[Problem(*p) for p in manifest["report"]["dropped"]],
                    sources=manifest["report"].get("sources", []),
                    system=manifest["report"].get("system", {}))  # what data.system did to the rows' system turns
    report.log(log)  # what each source gave, dropped and changed, by reason: on a hit as after a build
    return train, eval_ds, report


def launch_state():
    """accelerate's PartialState when a launcher started several processes and the trainer settings
    (built first by the stages) set them up; None in a single process."""
    import torch.distributed as dist  # torch: imported here so that importing this module stays light

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from accelerate import PartialState  # with torch.distributed above: only under a launcher

    return PartialState()


# ---------------------------------------------------------------- preparation


def prepare(key: str, parts: dict, section: DataSection, tokenizer, kind: str, seed: int, num_proc: int | None):
    """Prepare into a temporary folder and publish it; ((entry, manifest), rows converted here)."""
    report = Report()
    with cache.building(key) as tmp:
        work = tmp / "work"
        work.mkdir()
        job = dict(work=work, key=key, section=section, tokenizer=tokenizer, kind=kind, num_proc=num_proc, report=report,
                   seed=seed)
        train, converted = _prepare_split("train", section.train, **job)
        eval_ds = parts_ = None
        if section.eval:
            eval_ds, more = _prepare_split("eval", section.eval, **job)
            converted += more
        if len(train) == 0:
            raise UserError(f"data.train: no usable rows in {', '.join(map(str, section.train))}")
        if eval_ds is None and section.eval_split > 0:
            parts_ = train.train_test_split(
                test_size=section.eval_split, seed=seed,
                train_indices_cache_file_name=str(work / "split-train.arrow"),
                test_indices_cache_file_name=str(work / "split-eval.arrow"),
                train_new_fingerprint=f"{key}-train-split", test_new_fingerprint=f"{key}-eval-split")
            train, eval_ds = parts_["train"], parts_["test"]
        # a fingerprint from the key, so that a cold build and a hit are the same bytes and TRL's
        # own map caches (named after it) are found again on the next run
        train.select_columns(train.column_names, new_fingerprint=f"{key}-train").save_to_disk(str(tmp / "train"))
        if eval_ds is not None:
            eval_ds.select_columns(eval_ds.column_names, new_fingerprint=f"{key}-eval").save_to_disk(str(tmp / "eval"))
        del train, eval_ds, parts_  # the memory maps of the work files, before removing them
        shutil.rmtree(work)
        dropped = [[p.where, p.what] for p in report.dropped]
        entry = cache.publish(tmp, key, parts, {"rows": report.rows, "dropped": dropped, "sources": report.sources,
                                                "system": report.system})
    return (entry, json.loads((entry / cache.MANIFEST).read_text())), converted


def _prepare_split(name: str, entries: list, work: Path, key: str, section: DataSection, tokenizer, kind: str,
                   num_proc: int | None, report: Report, seed: int) -> tuple[Dataset, int]:
    raw, heads = _read(entries, work / f"{name}-raw.arrow", name)
    specs = [sources.spec(e) for e in entries]
    shapes = sources.detect_formats(specs, heads, kind, f"data.{name}")  # each source's format, logged
    if kind == "sft":
        out = {"input_ids": List(Value("int32")), **({"assistant_masks": List(Value("int64"))}
                                                      if section.assistant_only_loss else {})}
    else:
        out = {f"{c}_{form}": Value("string") if form == "text" else MESSAGES for c in PAIR for form in ("text", "messages")}
    converted = raw.map(
        _convert_batch, batched=True, remove_columns=["text"], features=Features({**_KEEP, **out}),
        fn_kwargs={"convert": CONVERTERS[kind](tokenizer, section), "kind": kind, "columns": list(out),
                   "sources": [str(s) for s in specs], "shapes": [(f, dict(s.columns)) for f, s in zip(shapes, specs)]},
        num_proc=num_proc if num_proc and num_proc > 1 and len(raw) >= num_proc else None,
        cache_file_name=str(work / f"{name}-converted.arrow"), new_fingerprint=f"{key}-{name}-converted",
        desc=f"Checking and tokenizing {name} rows",
    )
    table = converted.data.table
    ok = pc.is_null(table["error"])
    if (pc.sum(ok).as_py() or 0) != len(table):
        _resolve_errors(table.select(list(_KEEP)).filter(pc.invert(ok)).to_pylist(), [str(s) for s in specs], section, report)
    # the usable rows, drawn per source as the mixture says (finetune/data/mixture.py)
    good, used = mixture.take(table["source"].to_numpy(), ok.to_numpy(), specs, seed, f"data.{name}", shapes)
    report.sources += [{"split": name, **u} for u in used]
    # Columns are selected before rows are filtered: filtering the whole table would copy every
    # row's token ids into memory while the table itself is memory-mapped.
    bad = table.select(["source", "reason"]).filter(pc.and_(pc.invert(ok), pc.equal(table["error_kind"], ROW)))
    noted = table.select(["source", "notes"]).filter(pc.and_(ok, pc.is_valid(table["notes"])))
    report.tally(f"data.{name}", *bad.to_pydict().values(), *noted.to_pydict().values())
    if good is not None:
        converted = converted.select(good, indices_cache_file_name=str(work / f"{name}-good.arrow"),
                                     new_fingerprint=f"{key}-{name}-good")
    report.rows += len(converted)
    report.count_system(pc.value_counts(table["system"].filter(ok).drop_null()).to_pylist())
    if kind == "preference":
        plain = pc.sum(pc.and_(ok, pc.is_valid(table["prompt_text"]))).as_py() or 0
        if 0 < plain < len(converted):
            raise UserError("data.train mixes plain-text and conversational preference rows; use one form per run")
        form = "text" if plain else "messages"
        converted = converted.select_columns([f"{c}_{form}" for c in PAIR]).rename_columns(
            {f"{c}_{form}": c for c in PAIR})
    else:
        converted = converted.remove_columns(list(_KEEP))
    return converted, len(raw)


def _resolve_errors(errors: list[dict], sources: list[str], section: DataSection, report: Report) -> None:
    """Raise what the in-memory path raised first, or record the dropped rows (errors are in row order)."""
    reads = [e for e in errors if e["error_kind"] == READ]
    if reads:  # a source-level error has row number 0: it comes before the file's JSON errors
        raise _user_error(min(reads, key=lambda e: (e["source"], e["number"]))["error"])
    for e in errors:
        if e["error_kind"] == HARD:
            raise _user_error(e["error"])
        source = sources[e["source"]]
        problem = Problem(f"{source}:{e['number']}", e["error"])
        if e["reason"] == TOO_LONG and section.too_long == "error":
            raise UserError([problem], title=f"row longer than data.max_length in {source} (set data.too_long: drop or "
                            "truncate, or raise data.max_length)")
        if e["reason"] == MALFORMED and section.bad_rows == "error":
            raise UserError([problem], title=f"bad row in {source} (fix it, or set data.bad_rows: drop to skip bad rows)")
        report.dropped.append(problem)  # the other reasons are what data.too_long: drop or truncate asked for


def _as_payload(exc: UserError) -> str:
    return json.dumps({"problems": [[p.where, p.what] for p in exc.problems], "title": exc.title})


def _user_error(payload: str) -> UserError:
    raw = json.loads(payload)
    return UserError([Problem(*p) for p in raw["problems"]], title=raw["title"])


def _read(entries: list, path: Path, name: str) -> tuple[Dataset, dict[int, list[str]]]:
    """Step 1: the rows of every source as JSON text in one Arrow file; a source that cannot be read
    becomes one error row (number 0), raised later in source order. Also each source's first rows
    (their columns tell its format). sources.write_rows does it."""
    heads = sources.write_rows(entries, path, RAW, f"Reading {name} data", _as_payload)
    return Dataset.from_file(str(path)), heads


def _convert_batch(batch: dict, convert, kind: str, columns: list[str], sources: list[str], shapes: list) -> dict:
    """Step 2, on a batch of rows in a map worker: parse, check, tokenize; errors become columns."""
    n = len(batch["text"])
    out = {"error": [None] * n, "error_kind": [None] * n, "reason": [None] * n, "notes": [None] * n, "system": [None] * n}
    for c in columns:
        out[c] = [None] * n
    for j, (source, number, text, read_error) in enumerate(zip(batch["source"], batch["number"], batch["text"], batch["error"])):
        if read_error is not None:
            out["error"][j], out["error_kind"][j] = read_error, READ
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            out["error"][j], out["error_kind"][j] = _as_payload(UserError(files.json_error(sources[source], number, exc))), READ
            continue
        try:
            row = convert_row(convert, formats.to_shape(value, *shapes[source], kind))  # the source's format first
        except RowError as exc:
            out["error"][j], out["error_kind"][j], out["reason"][j] = str(exc), ROW, exc.reason
            continue
        except UserError as exc:
            out["error"][j], out["error_kind"][j] = _as_payload(exc), HARD
            continue
        out["system"][j] = row.get("system")
        out["notes"][j] = row.get(NOTES)
        if kind == "sft":
            for c in columns:
                out[c][j] = row[c]
        else:
            for c in PAIR:
                out[f"{c}_{'text' if isinstance(row[c], str) else 'messages'}"][j] = row[c]
    return out
