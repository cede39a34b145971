"""Data preparation: finetune's datasets-based, cached preparation against TRL's SFTTrainer preparation.

    python bench/data_prep.py generate                      # 200k UltraChat-shaped conversations + 50k pairs
    python bench/data_prep.py run --procs 1,2               # the table in bench/RESULTS.md (issue 23)
    python bench/data_prep.py bounded --limit-gb 2          # finetune's cold preparation inside a memory cgroup, then a hit
    BENCH_DATA_DIR=outputs/bench-data-prep-20k python bench/data_prep.py generate --rows 20000 --pairs 5000

`generate` writes JSONL under outputs/bench-data-prep/ (git-ignored: never commit the data):
sft.jsonl, UltraChat's shape ({prompt, prompt_id, messages}, 1-3 user/assistant turns of generated
English-like text, seeded) and preference.jsonl (UltraFeedback's shape: prompt, chosen and rejected
as message lists that repeat the prompt). `run` measures, each in a fresh process with its own
empty caches, with the bundled tokenizer (model/tiny-moe): finetune's cold preparation
(finetune.data.prep.build_datasets) with 1 and 2 processes, a cache hit, then TRL 1.16's own preparation of
the same rows (load_dataset("json") + SFTTrainer._prepare_dataset, dataset_num_proc 1 and 2) and
TRL's remaining steps on finetune's tokenized rows (labels, truncation, filter: what SFTTrainer
still runs on a pre-tokenized data set). Peak RSS: the measuring process and its largest child
(a datasets map worker), from getrusage; it counts the pages of memory-mapped Arrow files the
process read, so the peak anonymous memory (heap) is sampled too, of the process alone and with
its map workers. `bounded` runs finetune's cold preparation in a memory
cgroup (v1 or v2, written directly; needs root) whose limit is below the data set's size as
Python lists, which the in-memory path held (measured by tracemalloc on a sample, extrapolated).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("BENCH_DATA_DIR", REPO / "outputs" / "bench-data-prep"))
TOKENIZER = REPO / "model" / "tiny-moe"
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her all she there would their we him been has when who will more no if out so said what up its about "
         "into than them can only other new some could time these two may then do first any my now such like our over "
         "man me even most made after also did many before must through back years where much your way well down should "
         "because each just those people how too little state good very make world still own see men work long get here "
         "between both life being under never day same another know while last might us great old year off come since "
         "against go came right used take three water energy system river model data light music history city plan").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def paragraph(rng: random.Random, lo: int, hi: int) -> str:
    out, n = [], rng.randint(lo, hi)
    while n > 0:
        k = min(n, rng.randint(6, 18))
        out.append(sentence(rng, k))
        n -= k
    return " ".join(out)


def conversation(rng: random.Random) -> list[dict]:
    messages = []
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": paragraph(rng, 12, 60)})
        messages.append({"role": "assistant", "content": paragraph(rng, 40, 160)})
    return messages


def generate(rows: int, pairs: int, seed: int) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(OUT / "sft.jsonl", "w") as f:
        for _ in range(rows):
            messages = conversation(rng)
            f.write(json.dumps({"prompt": messages[0]["content"], "prompt_id": f"{rng.getrandbits(64):016x}",
                                "messages": messages}) + "\n")
    with open(OUT / "preference.jsonl", "w") as f:
        for _ in range(pairs):
            prompt = [{"role": "user", "content": paragraph(rng, 12, 60)}]
            chosen, rejected = ({"role": "assistant", "content": paragraph(rng, 40, 160)} for _ in range(2))
            f.write(json.dumps({"prompt": prompt[0]["content"], "chosen": prompt + [chosen],
                                "rejected": prompt + [rejected], "score_chosen": 8.0, "score_rejected": 5.0}) + "\n")
    for name in ("sft.jsonl", "preference.jsonl"):
        print(f"{OUT / name}: {(OUT / name).stat().st_size / 1e6:.1f} MB")


# ---------------------------------------------------------------- one measurement per process


def _tokenizer():
    from finetune.modeling import load_tokenizer
    from finetune.recipe import ModelSection

    return load_tokenizer(ModelSection(name_or_path=str(TOKENIZER)))


def _section(path: str, max_length: int, kind: str):
    from finetune.recipe import DataSection

    return DataSection(train=[path], max_length=max_length)


def _trl_trainer(tokenizer, num_proc: int | None, max_length: int):
    """An SFTTrainer on the bundled tiny model, to call its _prepare_dataset (what its constructor runs)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to="none", max_length=max_length,
                     dataset_num_proc=num_proc, assistant_only_loss=False)
    model = AutoModelForCausalLM.from_pretrained(str(TOKENIZER))
    tiny = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    return SFTTrainer(model=model, args=args, train_dataset=tiny, processing_class=tokenizer), args


def _anon_kb(pid: str) -> int:
    """Anonymous resident memory of a process (its heap; not the memory-mapped Arrow files' pages)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")), 0)


class AnonPeak:
    """Samples (every 0.1 s) the anonymous memory of this process and of this process plus its children
    (datasets' map workers): getrusage's peak RSS also counts the pages of memory-mapped files read."""

    def __init__(self):
        import threading

        self.self_kb = self.total_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.1):
            children = set()
            for task in Path("/proc/self/task").iterdir():
                try:
                    children.update((task / "children").read_text().split())
                except OSError:
                    pass
            own = _anon_kb("self")
            self.self_kb = max(self.self_kb, own)
            self.total_kb = max(self.total_kb, own + sum(_anon_kb(c) for c in children))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_anon_mb": self.self_kb / 1024, "peak_anon_with_workers_mb": self.total_kb / 1024}


def measure(what: str, path: str, num_proc: int | None, max_length: int, kind: str) -> dict:
    tokenizer = _tokenizer()
    out = {}
    sampler = AnonPeak()
    if what == "finetune":
        from finetune.data.prep import build_datasets

        start = time.perf_counter()
        train, _, report = build_datasets(_section(path, max_length, kind), tokenizer, kind, 0, num_proc)
        out["seconds"] = time.perf_counter() - start
        out["rows"] = len(train)
        out["dropped"] = len(report.dropped)
        if kind == "sft" and os.environ.get("BENCH_TRL_AFTER"):
            trainer, args = _trl_trainer(tokenizer, num_proc, max_length)
            start = time.perf_counter()
            ready = trainer._prepare_dataset(train, tokenizer, args, False, None, "train")
            out["trl_after_seconds"] = time.perf_counter() - start
            out["trl_after_rows"] = len(ready)
    else:  # TRL from the JSONL file, as its scripts load data
        from datasets import load_dataset

        trainer, args = _trl_trainer(tokenizer, num_proc, max_length)
        start = time.perf_counter()
        # UltraChat rows carry a `prompt` string beside `messages`, which TRL would take for prompt-completion
        raw = load_dataset("json", data_files=path, split="train").select_columns(["messages"])
        ready = trainer._prepare_dataset(raw, tokenizer, args, False, None, "train")
        out["seconds"] = time.perf_counter() - start
        out["rows"] = len(ready)
    out.update(sampler.stop())
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_child_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def in_process(what: str, path: str, num_proc: int | None, max_length: int, kind: str, cache: str,
               extra_env: dict | None = None, cgroup: Path | None = None) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import data_prep as b; "
            f"print('RESULT', json.dumps(b.measure({what!r}, {path!r}, {num_proc!r}, {max_length!r}, {kind!r})))")
    env = {**os.environ, "FINETUNE_CACHE": cache, "HF_DATASETS_CACHE": cache + "/hf", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(extra_env or {})}
    join = None if cgroup is None else (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, preexec_fn=join)
    if cgroup is not None and proc.returncode == -9:
        return {"killed": True}
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def run(procs: list[int], max_length: int, kind: str, trl: bool, trl_after: bool) -> None:
    path = str(OUT / ("sft.jsonl" if kind == "sft" else "preference.jsonl"))
    rows = []
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        for p in procs:
            cache = f"{tmp}/finetune-{p}"
            cold = in_process("finetune", path, p, max_length, kind, cache, {"BENCH_TRL_AFTER": "1"} if trl and trl_after else None)
            rows.append({"what": f"finetune cold, num_proc={p}", **cold})
            print(json.dumps(rows[-1]), flush=True)
            if p == procs[0]:
                hit = in_process("finetune", path, p, max_length, kind, cache)
                rows.append({"what": "finetune cache hit", **hit})
                print(json.dumps(rows[-1]), flush=True)
            if trl and kind == "sft":
                t = in_process("trl", path, p, max_length, kind, f"{tmp}/trl-{p}")
                rows.append({"what": f"TRL SFTTrainer, dataset_num_proc={p}", **t})
                print(json.dumps(rows[-1]), flush=True)
    (OUT / f"results-{kind}.json").write_text(json.dumps(rows, indent=1))


def python_list_bytes(path: str, max_length: int, sample: int = 2000) -> float:
    """Bytes per row of the tokenized rows as Python lists (what the in-memory path held), by tracemalloc."""
    import tracemalloc

    from finetune.data.convert import convert_row, sft_converter

    tokenizer = _tokenizer()
    convert = sft_converter(tokenizer, _section(path, max_length, "sft"))
    with open(path) as f:
        lines = [next(f) for _ in range(sample)]
    tracemalloc.start()
    rows = [convert_row(convert, json.loads(line)) for line in lines]
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del rows
    return size / sample


def bounded(limit_gb: float, num_proc: int, max_length: int) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from qlora_memory import memory_cgroup  # the cgroup helper the 4-bit loading bench uses

    path = str(OUT / "sft.jsonl")
    count = sum(1 for _ in open(path))
    per_row = python_list_bytes(path, max_length)
    print(f"{count} rows; tokenized rows as Python lists: {per_row:.0f} B/row -> {per_row * count / 1e9:.2f} GB "
          f"(tracemalloc on 2000 rows, extrapolated)", flush=True)
    limit = int(limit_gb * 1e9)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        with memory_cgroup(limit) as (group, peak):
            result = in_process("finetune", path, num_proc, max_length, "sft", f"{tmp}/cache", cgroup=group)
            result["cgroup_peak_gb"] = peak() / 1e9
        print(json.dumps({"what": f"finetune cold in a {limit_gb} GB memory cgroup", "num_proc": num_proc, **result}), flush=True)
        if not result.get("killed"):
            hit = in_process("finetune", path, num_proc, max_length, "sft", f"{tmp}/cache")
            print(json.dumps({"what": "finetune cache hit (no limit)", **hit}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--rows", type=int, default=200_000)
    g.add_argument("--pairs", type=int, default=50_000)
    g.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--procs", default="1,2")
    r.add_argument("--kind", choices=["sft", "preference"], default="sft")
    r.add_argument("--no-trl", action="store_true")
    r.add_argument("--no-trl-after", action="store_true",
                   help="skip TRL's remaining steps on finetune's rows (one full pass less per process count)")
    b = sub.add_parser("bounded")
    b.add_argument("--limit-gb", type=float, default=2.0)
    b.add_argument("--num-proc", type=int, default=2)
    for p in (r, b):
        p.add_argument("--max-length", type=int, default=8192, help="above every generated row: nothing is dropped")
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.rows, args.pairs, args.seed)
    elif args.command == "run":
        run([int(p) for p in args.procs.split(",")], args.max_length, args.kind, not args.no_trl, not args.no_trl_after)
    else:
        bounded(args.limit_gb, args.num_proc, args.max_length)


if __name__ == "__main__":
    main()
