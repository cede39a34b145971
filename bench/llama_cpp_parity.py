"""Does an exported checkpoint tokenize and answer the same in llama.cpp as in transformers?

    python bench/llama_cpp_parity.py EXPORT_DIR --llama-cpp LLAMA_CPP_DIR \
        [--converter-python PY] [--prompts data/tiny-tasks/test.jsonl] [--max-new-tokens 32] [--json OUT]

Not part of CI: it needs llama.cpp built from source, and its Python bindings. Both ship in the
package registry's `llama-cpp-python` source distribution (`pip download --no-deps --no-binary
:all: llama-cpp-python`): `pip install` of it builds everything (long), or build only the
library in its vendor/llama.cpp (`cmake -B build -DLLAMA_CURL=OFF && cmake --build build
--target llama`, part of the ~12-minute build on two cores) and run this with
`PYTHONPATH=<sdist dir> LLAMA_CPP_LIB_PATH=<vendor/llama.cpp/build/bin>` (the bindings also
import `diskcache`). The converter, `convert_hf_to_gguf.py`, pins transformers 4.x in its own
requirements: `--converter-python` names an interpreter that has them (a throwaway venv with
transformers 4.57, sentencepiece and torch worked).

For every chat row of the prompts file ({"prompt": [messages], ...}):
1. EXPORT_DIR is converted to GGUF at its own precision once (a float32 export gives float32
   tensors, so both sides compute in float32 from the same numbers and a differing answer means
   a differing program, not rounding);
2. the prompt is rendered with the export's chat template and tokenized by transformers and by
   llama.cpp (its own reader of the GGUF's tokenizer, special tokens parsed, BOS as the GGUF says);
3. both decode greedily from their own ids (transformers `generate`, do_sample=False; llama.cpp
   with temperature 0, which is its greedy sampler, top-k 1, no repetition penalty), on one
   thread, until the export's end-of-turn token or --max-new-tokens.
It reports how many prompts tokenize to identical ids and how many generate identical token ids.
Exit status 1 when anything differs. (llama.cpp's own `llama-completion` tool was tried first:
it prints the generated text through an asynchronous logger that can lose the last pieces at
exit under load, llama.cpp issue 22142, so the bindings are used.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

END_OF_TEXT = "[end of text]"
GGUF_TYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def convert(export: Path, llama_cpp: Path, python: str, out: Path, dtype: torch.dtype) -> None:
    cmd = [python, str(llama_cpp / "convert_hf_to_gguf.py"), str(export), "--outfile", str(out),
           "--outtype", GGUF_TYPES[dtype]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"convert_hf_to_gguf.py failed ({done.returncode}):\n{done.stderr[-3000:]}")


def llama_greedy(llm, ids: list[int], eos: set[int], max_new_tokens: int) -> list[int]:
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in eos or len(out) == max_new_tokens:
            break
        out.append(token)
    return out


@torch.no_grad()
def hf_greedy(model, tokenizer, ids: list[int], eos: set[int], max_new_tokens: int) -> list[int]:
    input_ids = torch.tensor([ids])
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id)
    return [t for t in out[0, len(ids):].tolist() if t not in eos]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source dir (its convert_hf_to_gguf.py)")
    p.add_argument("--converter-python", default=sys.executable, help="python with convert_hf_to_gguf.py's requirements")
    p.add_argument("--prompts", type=Path, default=Path("data/tiny-tasks/test.jsonl"))
    p.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, help="write per-prompt results here")
    args = p.parse_args(argv)
    from llama_cpp import Llama  # llama.cpp's Python bindings (see above)

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.export)
    model = AutoModelForCausalLM.from_pretrained(args.export, dtype="auto").eval()
    dtype = next(model.parameters()).dtype
    model.float()  # float32 compute in transformers; llama.cpp computes in float32 on the CPU as well
    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    rows = rows[: args.limit] if args.limit else rows

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "model.gguf"
        convert(args.export, args.llama_cpp, args.converter_python, gguf, dtype)
        llm = Llama(str(gguf), n_threads=1, n_ctx=model.config.max_position_embeddings, verbose=False)
        for row in tqdm(rows, desc="prompts"):
            text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            hf = tokenizer(text, add_special_tokens=False)["input_ids"]
            # llama.cpp adds BOS itself (the GGUF says add_bos_token): give it the text after the template's BOS.
            bare = text[len(tokenizer.bos_token):] if tokenizer.bos_token and text.startswith(tokenizer.bos_token) else text
            ll = llm.tokenize(bare.encode(), add_bos=True, special=True)
            hf_out = hf_greedy(model, tokenizer, hf, eos, args.max_new_tokens)
            ll_out = llama_greedy(llm, ll, eos, args.max_new_tokens)
            results.append({"prompt": text, "hf_ids": hf, "llama_ids": ll, "ids_equal": hf == ll,
                            "hf_answer": tokenizer.decode(hf_out), "llama_answer": llm.detokenize(ll_out).decode(errors="replace"),
                            "answers_equal": hf_out == ll_out})

    n = len(results)
    same_ids = sum(r["ids_equal"] for r in results)
    same_answers = sum(r["answers_equal"] for r in results)
    print(f"export {args.export} ({dtype}), {n} prompts of {args.prompts}")
    print(f"tokenization identical: {same_ids}/{n}; greedy answers identical (token ids): {same_answers}/{n}")
    for r in results:
        if not (r["ids_equal"] and r["answers_equal"]):
            print(json.dumps({k: r[k] for k in ("prompt", "hf_ids", "llama_ids", "hf_answer", "llama_answer")}))
    if args.json:
        args.json.write_text(json.dumps({"export": str(args.export), "dtype": str(dtype), "n": n, "ids_identical": same_ids,
                                         "answers_identical": same_answers, "rows": results}, indent=1))
    return 0 if same_ids == n and same_answers == n else 1

if __name__ == "__main__":
    sys.exit(main())
