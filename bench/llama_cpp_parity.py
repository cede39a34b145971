"""Does an exported checkpoint tokenize and answer the same in llama.cpp as in transformers?

    python bench/llama_cpp_parity.py EXPORT_DIR --llama-cpp LLAMA_CPP_DIR \
        [--converter-python PY] [--prompts data/tiny-tasks/test.jsonl] [--max-new-tokens 32] \
        [--perturb-scale 0.5] [--quantize Q8_0 ... --llama-quantize BIN] [--work DIR] [--json OUT]

Not part of CI: it needs llama.cpp built from source, and its Python bindings. Both ship in the
package registry's `llama-cpp-python` source distribution (`pip download --no-deps --no-binary
:all: llama-cpp-python`): `pip install` of it builds everything (long), or build the library in
its vendor/llama.cpp with cmake (docs/serving.md has the commands run here: `--target llama
llama-quantize`, ~25 minutes on the shared two cores), install the bindings without building
(`CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install --target DIR <sdist dir> diskcache`) and run this with
`PYTHONPATH=DIR LLAMA_CPP_LIB_PATH=<build>/bin`. The converter, `convert_hf_to_gguf.py`, pins
transformers 4.x in its own requirements: `--converter-python` names an interpreter that has them
(a venv with transformers 4.57.6, torch, sentencepiece, protobuf and the sources' gguf-py).

For every chat row of the prompts file ({"prompt": [messages], ...}):
1. EXPORT_DIR is converted to GGUF at its own precision once (a float32 export gives float32
   tensors, so both sides compute in float32 from the same numbers and a differing answer means
   a differing program, not rounding);
2. the prompt is rendered with the export's chat template and tokenized by transformers and by
   llama.cpp (its own reader of the GGUF's tokenizer, special tokens parsed, BOS as the GGUF says);
3. both decode greedily from their own ids (transformers `generate`, do_sample=False; llama.cpp
   with temperature 0, which is its greedy sampler, top-k 1, no repetition penalty), on one
   thread: --max-new-tokens tokens without stopping at EOS (transformers: argmax of its forward
   token by token), and the answer, those tokens up to the export's end-of-turn token
   (transformers: `generate` stopping there, a separate run). llama.cpp decodes each prompt once:
   its answer is the prefix of its run without stopping, the same computation token for token;
4. the negative control: a copy of the export whose last decoder layer got Gaussian noise
   (--perturb-scale x each tensor's std; bench/parity.py's `perturb`) is converted and decoded
   the same way and compared with transformers on the unperturbed export. It must disagree.
With --quantize, the f32/bf16 GGUF is also quantized by llama.cpp's `llama-quantize` to each type
named and compared the same way; those counts are reported, not required to be complete (a
quantized model computes another function).

It reports how many prompts tokenize to identical ids and generate identical token ids, for the
export and for the control, and for every prompt whose tokens differ, transformers' logit gap at
the first differing token between its token and llama.cpp's (bench/parity.py's
`first_differences`): a gap near 0 is a near-tie that float32 summation order breaks either way.
Exit status 1 when prompt ids or answers differ on any prompt, fewer than --min-identical (95%,
the issue's bar) of the prompts are identical over all tokens without stopping, or the control
agrees on every prompt. (llama.cpp's own `llama-completion` tool was tried first: it prints the
generated text through an asynchronous logger that can lose the last pieces at exit under load,
llama.cpp issue 22142, so the bindings are used.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from parity import agreement, chat_rows, first_differences, perturb, transformers_greedy  # bench/ is on sys.path as a script
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

GGUF_TYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def convert(export: Path, llama_cpp: Path, python: str, out: Path, dtype: torch.dtype) -> None:
    cmd = [python, str(llama_cpp / "convert_hf_to_gguf.py"), str(export), "--outfile", str(out),
           "--outtype", GGUF_TYPES[dtype]]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"convert_hf_to_gguf.py failed ({done.returncode}):\n{done.stderr[-3000:]}")


def quantize(llama_quantize: Path, gguf: Path, out: Path, kind: str) -> None:
    done = subprocess.run([str(llama_quantize), str(gguf), str(out), kind], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"llama-quantize failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def llama_greedy(llm, ids: list[int], eos: set[int], max_new_tokens: int) -> dict:
    """`max_new_tokens` greedy ids from a fresh context (no prefix reuse between prompts), and the answer:
    those ids up to the first EOS."""
    llm.reset()
    no_stop = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        no_stop.append(token)
        if len(no_stop) == max_new_tokens:
            break
    stops = [i for i, t in enumerate(no_stop) if t in eos]
    return {"prompt_ids": ids, "ids": no_stop[: stops[0]] if stops else no_stop, "no_stop_ids": no_stop}


def llama_cpp_answers(gguf: Path, hf: list[dict], bos: str | None, eos: set[int], max_new_tokens: int,
                      n_ctx: int, desc: str) -> list[dict]:
    """llama.cpp's prompt ids and greedy ids for the prompts transformers rendered (hf[i]["text"])."""
    from llama_cpp import Llama  # llama.cpp's Python bindings (see above): optional, not a project dependency

    llm = Llama(str(gguf), n_threads=1, n_ctx=n_ctx, verbose=False)
    out = []
    for row in tqdm(hf, desc=desc):
        text = row["text"]
        # llama.cpp adds BOS itself (the GGUF says add_bos_token): give it the text after the template's BOS.
        bare = text[len(bos):] if bos and text.startswith(bos) else text
        ids = llm.tokenize(bare.encode(), add_bos=True, special=True)
        result = llama_greedy(llm, ids, eos, max_new_tokens)
        out.append({**result, "answer": llm.detokenize(result["ids"]).decode(errors="replace")})
    llm.close()
    return out


def check(export: Path, llama_cpp: Path, converter_python: str, rows: list[dict], max_new_tokens: int,
          perturb_scale: float, work: Path, hf: tuple[list[dict], set[int]] | None = None,
          quantized: tuple[Path, list[str]] = (Path("llama-quantize"), [])) -> dict:
    """Transformers vs llama.cpp on `export` and on its perturbed copy (written under `work`): the counts
    of bench/parity.py's `agreement` for both, and every row's ids. `hf`: transformers' side
    (`transformers_greedy`'s result) when the caller has it already. `quantized`: llama-quantize's path and
    the types (Q8_0, Q4_K_M, ...) whose quantized GGUFs are compared too (reported, not a pass/fail)."""
    config = AutoConfig.from_pretrained(export)
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype))
    bos = AutoTokenizer.from_pretrained(export).bos_token
    hf, eos = hf or transformers_greedy(export, rows, max_new_tokens)
    n_ctx = config.max_position_embeddings
    convert(export, llama_cpp, converter_python, work / "export.gguf", dtype)
    served = llama_cpp_answers(work / "export.gguf", hf, bos, eos, max_new_tokens, n_ctx, "llama.cpp, export")
    quantized_results = {}
    for kind in quantized[1]:
        quantize(quantized[0], work / "export.gguf", work / f"export-{kind}.gguf", kind)
        answers = llama_cpp_answers(work / f"export-{kind}.gguf", hf, bos, eos, max_new_tokens, n_ctx, f"llama.cpp, {kind}")
        quantized_results[kind] = {**agreement(hf, answers), "gguf_bytes": (work / f"export-{kind}.gguf").stat().st_size}
    changed = perturb(export, work / "export-perturbed", perturb_scale)
    convert(work / "export-perturbed", llama_cpp, converter_python, work / "export-perturbed.gguf", dtype)
    control = llama_cpp_answers(work / "export-perturbed.gguf", hf, bos, eos, max_new_tokens, n_ctx, "llama.cpp, perturbed")
    rows_out = [{"prompt": a["text"], "transformers_prompt_ids": a["prompt_ids"], "llama_prompt_ids": b["prompt_ids"],
                 "transformers": a["ids"], "llama": b["ids"], "llama_answer": b["answer"], "llama_perturbed": c["ids"],
                 "transformers_no_stop": a["no_stop_ids"], "llama_no_stop": b["no_stop_ids"]}
                for a, b, c in zip(hf, served, control)]
    return {"export": str(export), "dtype": str(dtype).removeprefix("torch."), "gguf_type": GGUF_TYPES[dtype],
            "max_new_tokens": max_new_tokens,
            "export_vs_transformers": agreement(hf, served),
            "perturbed_vs_transformers": {**agreement(hf, control), "perturbed_tensors": len(changed), "scale": perturb_scale},
            "quantized_vs_transformers": quantized_results, "gguf_bytes": (work / "export.gguf").stat().st_size,
            "first_differences": first_differences(export, rows_out, "transformers_no_stop", "llama_no_stop"),
            "rows": rows_out}


def report(result: dict, label: str, min_identical: float = 0.95) -> bool:
    """Prints the counts; True when prompt ids and answers agree on every prompt, the 32 tokens without
    stopping on at least `min_identical` of them, and the control does not agree on all."""
    ok, bad = result["export_vs_transformers"], result["perturbed_vs_transformers"]
    n, k = ok["prompts"], result["max_new_tokens"]
    print(f"{label}: llama.cpp ({result['gguf_type']} GGUF) vs transformers on {n} prompts: prompt ids identical "
          f"{ok['prompt_ids_identical']}/{n}, greedy answers identical {ok['generated_ids_identical']}/{n} "
          f"({ok['distinct_transformers_answers']} distinct answers, {ok['generated_tokens_compared']} tokens), "
          f"{k} tokens without stopping at EOS identical {ok['no_stop_identical']}/{n} "
          f"({ok['no_stop_tokens_identical']}/{ok['no_stop_tokens_compared']} tokens)")
    for d in result["first_differences"]:
        print(f"  differs at token {d['position']}{' (after an EOS)' if d.get('after_eos') else ''}: transformers' logit "
              f"gap between its token and llama.cpp's {d['logit_gap']}, prompt {d['prompt']!r}")
    print(f"{label}: negative control (perturbed copy, {bad['perturbed_tensors']} tensors, noise {bad['scale']} x std): "
          f"prompt ids identical {bad['prompt_ids_identical']}/{n}, greedy answers identical "
          f"{bad['generated_ids_identical']}/{n}, without stopping {bad['no_stop_identical']}/{n} "
          f"({bad['no_stop_tokens_identical']}/{bad['no_stop_tokens_compared']} tokens)")
    for kind, q in result.get("quantized_vs_transformers", {}).items():
        print(f"{label}: {kind} GGUF ({q['gguf_bytes']:,} bytes, the unquantized {result['gguf_bytes']:,}) vs transformers: "
              f"greedy answers identical {q['generated_ids_identical']}/{n}, without stopping {q['no_stop_identical']}/{n} "
              f"({q['no_stop_tokens_identical']}/{q['no_stop_tokens_compared']} tokens)")
    exact = ok["prompt_ids_identical"] == ok["generated_ids_identical"] == n
    return exact and ok["no_stop_identical"] >= min_identical * n and bad["no_stop_identical"] < n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source dir (its convert_hf_to_gguf.py)")
    p.add_argument("--converter-python", default=sys.executable, help="python with convert_hf_to_gguf.py's requirements")
    p.add_argument("--prompts", type=Path, default=Path("data/tiny-tasks/test.jsonl"))
    p.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--perturb-scale", type=float, default=0.5, help="noise on the control's last layer, x each tensor's std")
    p.add_argument("--quantize", nargs="*", default=[], metavar="TYPE", help="also compare these llama-quantize types (e.g. Q8_0 Q4_K_M)")
    p.add_argument("--llama-quantize", type=Path, default=Path("llama-quantize"), help="llama.cpp's llama-quantize binary")
    p.add_argument("--min-identical", type=float, default=0.95,
                   help="share of prompts whose tokens without stopping must be identical (the issue's bar: 95%%)")
    p.add_argument("--work", type=Path, help="keep the GGUFs and the perturbed copy here (default: a temporary dir)")
    p.add_argument("--json", type=Path, help="write the counts and per-prompt ids here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = chat_rows(args.prompts, args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = check(args.export.resolve(), args.llama_cpp, args.converter_python, rows, args.max_new_tokens,
                       args.perturb_scale, work, quantized=(args.llama_quantize, args.quantize))
    result["prompts_file"] = str(args.prompts)
    ok = report(result, str(args.export), args.min_identical)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
