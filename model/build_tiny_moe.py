"""Build the bundled tiny Mixtral-style base model: train its tokenizer, pretrain it on
data/tiny-tasks/corpus.txt, then teach it passkey retrieval; writes a Hugging Face model directory.

    python model/build_tiny_moe.py                # writes model/tiny-moe/ and its BUILD.md
    python model/build_tiny_moe.py --check        # rebuilds in a temp dir, compares sha256

The result is a ~3.6M-parameter MixtralForCausalLM (8 experts, top-2, GQA) with a Mixtral-style
SentencePiece-BPE tokenizer and Mixtral-8x7B-Instruct-v0.1's chat template. It knows the tasks
of data/tiny-tasks as prose ("the reverse of lamp is pmal.") and can retrieve a pass key from
the passkey check's prompt written as prose ("... What is the pass key? The pass key is 48213."),
but has never seen [INST], which is what the SFT stage is for. The build is bit-for-bit
reproducible on CPU: one seed, a fixed thread count, deterministic kernels and a data order
drawn only from the seeded generators.
"""

import argparse
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "tiny-tasks"
DEFAULT_OUT = ROOT / "model" / "tiny-moe"
sys.path.insert(0, str(ROOT))  # the passkey documents use the check's own prompt (finetune/eval/passkey.py)

SEED = 0
THREADS = 1  # a constant: reductions depend on the thread split; and one thread is 4x faster than two when the 2 cores are shared
BPE_VOCAB = 1200  # learned pieces; the final vocab adds 3 specials, 256 bytes and [INST]/[/INST]

MODEL = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    router_aux_loss_coef=0.02,
    # Mixtral's 1e6 suits 32k contexts; with 16-dim heads it leaves almost no positional
    # signal at this length, and the model never learnt to look back at a word (probe: 0%).
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
# Many small steps: recall of word facts appears only after ~600-800 optimizer steps, whatever
# the batch, so 8 blocks of 128 tokens per step buys the most steps per CPU second.
TRAIN = dict(block=128, batch=8, steps=1800, warmup=100, lr=3e-3, min_lr_ratio=0.1, weight_decay=0.1)
# Then the retrieval phase: passkey documents (the check's prompt in prose, then "The pass key
# is KEY.") on even steps, the same fact blocks on odd steps so the facts stay learnt. Copying a
# key found by content formed neither in the fact schedule (peak 3e-3) nor from a fresh model
# followed by it (the facts' high rate wiped it); from the fact-trained model at 1e-3 it forms on
# keys 0-5 filler words away, then extends to 0-40 words (bench/induction_probe.py,
# model/BUILD_HISTORY.md). When each stage succeeds varies from run to run (below 0.1 on near keys after ~650
# steps from an earlier build's weights, after 1951 from this build's; far keys then learnt at
# once from the former, from near chance in 1468 steps from the latter), so each stage goes on
# until its key-digit loss is below formed_below (a fixed rule on a seeded run: still
# reproducible), at most max_steps in all, else the build fails. Filler up to 40 words keeps
# documents within ~200 tokens, so the check's longer prompts show where retrieval stops.
RETRIEVAL = dict(warmup=50, lr=1e-3, batch=16, stages_words=(5, 40), formed_below=0.1, max_steps=6000)
# Greedy prose retrieval counted after the build: ~104, 121, 195, 341 tokens; the last is past
# the trained 40 words. The build fails under 10 of 12 at the first.
RETRIEVAL_CHECK_WORDS = (3, 10, 40, 100)

# Mixtral-8x7B-Instruct-v0.1's template, verbatim in its semantics.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)


def tokenizer_texts():
    """The corpus plus the SFT user phrasings, so instruction words get pieces of their own.

    preference.jsonl uses the same phrasings; leaving it out means it can change without
    changing the tokenizer, and so the weights.
    """
    texts = (DATA / "corpus.txt").read_text(encoding="utf-8").splitlines()
    for line in open(DATA / "sft.jsonl", encoding="utf-8"):
        texts += [m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"]
    return texts


def train_tokenizer(texts):
    """SentencePiece-style BPE with byte fallback, wrapped as a transformers fast tokenizer."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Training splits on whitespace, digits and punctuation so no learned piece crosses them:
    # digits stay single tokens (as in Mixtral) and "pmal." ends in the same piece as "pmal".
    # The runtime pre-tokenizer (Metaspace only, split=False) then yields the same pieces.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(),
    ])
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=[], show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    pieces = sorted(learned["vocab"], key=learned["vocab"].get)

    # Mixtral's layout: <unk>, <s>, </s>, then the 256 byte tokens, then the learned pieces.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    # The runtime pipeline of Mixtral's tokenizer.json. prepend_scheme="always" (Mixtral's legacy
    # behaviour) puts "▁" on text after a special token too, so an answer after [/INST]
    # tokenizes as it does in prose ("is pmal." and "[/INST]pmal" both give "▁pmal").
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<unk>", "<s>", "</s>", "[INST]", "[/INST]")])

    # TokenizersBackend (alias PreTrainedTokenizerFast) loads tokenizer.json as is. transformers 5's
    # LlamaTokenizer instead rebuilds the pre-tokenizer from `legacy`, which it does not save, so
    # one save/load cycle would switch prepend_scheme to "first" and change every answer's tokens.
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
                                  chat_template=CHAT_TEMPLATE)
    return tok


def check_tokenizer(tok):
    """Raise if the template or byte fallback do not behave like Mixtral's."""
    chat = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    if text != "<s>[INST] q1 [/INST]a1</s>[INST] q2 [/INST]a2</s>":
        raise RuntimeError(f"chat template renders {text!r}")
    ids = tok.apply_chat_template(chat[:1], tokenize=True, return_dict=True)["input_ids"]
    inst = tok.convert_tokens_to_ids(["[INST]", "[/INST]"])
    if ids[0] != tok.bos_token_id or ids[1] != inst[0] or ids[-1] != inst[1]:
        raise RuntimeError(f"[INST]/[/INST] are not atomic: {tok.convert_ids_to_tokens(ids)}")
    for bad in ([{"role": "assistant", "content": "x"}], [{"role": "system", "content": "x"}]):
        try:
            tok.apply_chat_template(bad, tokenize=False)
        except Exception:
            continue
        raise RuntimeError(f"chat template accepted {bad}")
    sample = "héllo wörld ✓ 你好 🙂 \u00a0tab\tend"
    ids = tok(sample)["input_ids"]
    if ids[0] != tok.bos_token_id or tok.unk_token_id in ids or tok.decode(ids[1:]) != sample:
        raise RuntimeError(f"byte fallback does not round-trip: {tok.decode(ids[1:])!r}")


def corpus_blocks(tok, block):
    """Each document is <s> text </s>; documents are packed back to back into fixed blocks."""
    stream = []
    for line in (DATA / "corpus.txt").read_text(encoding="utf-8").splitlines():
        stream += tok(line)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // block
    return torch.tensor(stream[: n * block]).view(n, block), len(stream)


def passkey_batch(tok, size, rng, max_words):
    """Prose passkey documents, right-padded: input ids, labels (padding ignored), the key digits' positions.

    Each is <s> the check's user turn (0..max_words filler words, the key at a random depth)
    " The pass key is KEY." </s>; keys and depths come from `rng` only.
    """
    from finetune.eval.passkey import user_turn

    rows, answers = [], []
    for _ in range(size):
        key = str(rng.randint(10_000, 99_999))
        ids = tok(user_turn(key, rng.randint(0, max_words), rng.random()) + f" The pass key is {key}.")["input_ids"]
        ids.append(tok.eos_token_id)
        answers.append(list(range(len(ids) - 7, len(ids) - 2)))  # ... KEY "." </s>
        if tok.decode(ids[answers[-1][0]:answers[-1][-1] + 1]).strip() != key:
            raise RuntimeError("the key's digits are not where expected: the tokenizer splits digits differently")
        rows.append(ids)
    width = max(map(len, rows))
    x = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])
    y = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    return x, y, torch.tensor(answers)


def lr_at(step):
    """Linear warmup, then cosine down to min_lr_ratio of the peak."""
    if step < TRAIN["warmup"]:
        return TRAIN["lr"] * (step + 1) / TRAIN["warmup"]
    progress = (step - TRAIN["warmup"]) / max(1, TRAIN["steps"] - TRAIN["warmup"])
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return TRAIN["lr"] * (TRAIN["min_lr_ratio"] + (1 - TRAIN["min_lr_ratio"]) * cosine)


def per_layer_aux_loss(router_logits, config):
    """Switch-style load balancing, averaged over layers.

    transformers' Mixtral loss pools every layer's routing into one histogram, so one layer can
    starve experts while the pooled counts look even (seen here: two dead experts in layers 1
    and 2 with it). Balancing each layer on its own keeps all 8 experts alive in every layer.
    """
    losses = [load_balancing_loss_func((g,), config.num_local_experts, config.num_experts_per_tok)
              for g in router_logits]
    return torch.stack(losses).mean()


def make_optimizer(model):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=TRAIN["lr"], betas=(0.9, 0.95), eps=1e-8)


class FactBlocks:
    """Corpus blocks in epochs, each shuffled by the seeded generator only."""

    def __init__(self, blocks, generator):
        self.blocks, self.generator = blocks, generator
        self.order, self.cursor = torch.empty(0, dtype=torch.long), 0

    def next(self, size):
        if self.cursor + size > len(self.order):
            self.order, self.cursor = torch.randperm(len(self.blocks), generator=self.generator), 0
        batch = self.blocks[self.order[self.cursor : self.cursor + size]]
        self.cursor += size
        return batch


def step(model, opt, lr, input_ids, labels, with_aux):
    """One AdamW step at `lr`; returns the LM loss and the logits."""
    for group in opt.param_groups:
        group["lr"] = lr
    out = model(input_ids=input_ids, output_router_logits=with_aux)
    lm_loss = model.loss_function(out.logits, labels, model.config.vocab_size)
    loss = lm_loss + model.config.router_aux_loss_coef * per_layer_aux_loss(out.router_logits, model.config) if with_aux else lm_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return lm_loss.item(), out.logits.detach()


def pretrain(model, opt, facts):
    """The fact phase; returns the mean LM loss (aux excluded) of the last 50 steps."""
    recent, start = [], time.time()
    model.train()
    for i in range(TRAIN["steps"]):
        batch = facts.next(TRAIN["batch"])
        lm_loss, _ = step(model, opt, lr_at(i), batch, batch, with_aux=True)
        recent = (recent + [lm_loss])[-50:]
        if i % 50 == 0 or i == TRAIN["steps"] - 1:
            print(f"facts step {i:4d}  lm loss {lm_loss:.4f}  lr {lr_at(i):.2e}  {time.time() - start:6.1f}s", flush=True)
    return sum(recent) / len(recent)


def train_retrieval(model, blocks, tok):
    """The retrieval phase (see RETRIEVAL): the last 50 fact steps' mean LM loss, the last stage's
    final key-digit loss (mean of its last 25 passkey steps), the step each stage ended at.

    A fresh AdamW (decay on every tensor) and a fresh seeded order of the fact blocks, as in the
    probe that found the phase. Not a speed-up: an earlier fixed-length schedule (near keys to
    step 880, far keys after) reached key-digit loss 0.98 at step 1300 with the fact phase's
    optimizer and data order carried on, 1.43 with fresh ones.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=RETRIEVAL["lr"], betas=(0.9, 0.95), weight_decay=TRAIN["weight_decay"])
    facts, rng = FactBlocks(blocks, torch.Generator().manual_seed(SEED)), random.Random(SEED)
    fact_recent, digit_recent, start = [], [], time.time()
    stage, stage_ends = 0, []  # index into stages_words; the step each stage ended at
    i = 0
    model.train()
    while stage < len(RETRIEVAL["stages_words"]):
        lr = RETRIEVAL["lr"] * min(1.0, (i + 1) / RETRIEVAL["warmup"])
        if i % 2 == 0:
            words = RETRIEVAL["stages_words"][stage]
            x, y, answers = passkey_batch(tok, RETRIEVAL["batch"], rng, words)
            _, logits = step(model, opt, lr, x, y, with_aux=False)
            rows = torch.arange(len(x))[:, None]
            digits = torch.nn.functional.cross_entropy(logits[rows, answers - 1].reshape(-1, logits.shape[-1]),
                                                       x[rows, answers].reshape(-1))
            digit_recent = (digit_recent + [digits.item()])[-25:]
            digit_loss = sum(digit_recent) / len(digit_recent)
            if len(digit_recent) == 25 and digit_loss < RETRIEVAL["formed_below"]:
                print(f"retrieval step {i:4d}  keys 0-{words} filler words away: key-digit loss "
                      f"{digit_loss:.3f} < {RETRIEVAL['formed_below']}, stage done", flush=True)
                stage, digit_recent = stage + 1, []
                stage_ends.append(i + 1)
            elif i + 1 >= RETRIEVAL["max_steps"]:
                raise RuntimeError(f"copying keys 0-{words} filler words away did not reach a key-digit loss below "
                                   f"{RETRIEVAL['formed_below']} in {i + 1} retrieval steps ({digit_loss:.3f})")
        else:
            batch = facts.next(TRAIN["batch"])
            lm_loss, _ = step(model, opt, lr, batch, batch, with_aux=True)
            fact_recent = (fact_recent + [lm_loss])[-50:]
        if i % 100 == 99:
            print(f"retrieval step {i:4d}  key-digit loss {sum(digit_recent) / max(1, len(digit_recent)):.3f} "
                  f"(chance {math.log(10):.3f})  fact lm loss {sum(fact_recent) / max(1, len(fact_recent)):.4f}  "
                  f"{time.time() - start:6.1f}s", flush=True)
        i += 1
    return dict(final_loss=sum(fact_recent) / len(fact_recent), digit_loss=digit_loss, stage_ends=stage_ends)


@torch.no_grad()
def prose_retrieval(model, tok, words, n=12, seed="build-check"):
    """Greedy retrieval of fresh keys (their own generator) from prose prompts with `words` filler words, depths 0..1."""
    from finetune.eval.passkey import user_turn

    rng, hits = random.Random(f"{seed}-{words}"), 0
    model.eval()
    for i in range(n):
        key = str(rng.randint(10_000, 99_999))
        ids = tok(user_turn(key, words, i / (n - 1)) + " The pass key is", return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
        hits += tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().rstrip(".") == key
    return hits


@torch.no_grad()
def expert_counts(model, blocks):
    """Tokens routed to each expert (top-k of the router) per layer, over the first 64 blocks."""
    model.eval()
    out = model(input_ids=blocks[:64], output_router_logits=True)
    k = model.config.num_experts_per_tok
    counts = []
    for logits in out.router_logits:
        chosen = logits.topk(k, dim=-1).indices.flatten()
        counts.append(torch.bincount(chosen, minlength=model.config.num_local_experts).tolist())
    return counts


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build(out):
    """Train tokenizer and model into `out`; returns facts for BUILD.md."""
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    start = time.time()

    tok = train_tokenizer(tokenizer_texts())
    check_tokenizer(tok)
    blocks, n_tokens = corpus_blocks(tok, TRAIN["block"])
    print(f"tokenizer: {len(tok)} tokens; corpus: {n_tokens} tokens, {len(blocks)} blocks of {TRAIN['block']}")

    config = MixtralConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           **MODEL)
    model = MixtralForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")
    fact_loss = pretrain(model, make_optimizer(model), FactBlocks(blocks, torch.Generator().manual_seed(SEED)))
    phase = train_retrieval(model, blocks, tok)
    retrieval = {words: prose_retrieval(model, tok, words) for words in RETRIEVAL_CHECK_WORDS}
    print(f"prose retrieval (of 12) by filler words: {retrieval}")
    if retrieval[RETRIEVAL_CHECK_WORDS[0]] < 10:
        raise RuntimeError(f"the model retrieves {retrieval[RETRIEVAL_CHECK_WORDS[0]]} of 12 keys in short prose prompts after the retrieval phase")

    counts = expert_counts(model, blocks)
    for layer, c in enumerate(counts):
        print(f"layer {layer} tokens per expert: {c}")
    if any(0 in c for c in counts):
        raise RuntimeError("an expert receives no tokens after pretraining")

    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False  # as in the real Mixtral config; stages turn it on
    model.save_pretrained(out)
    tok.save_pretrained(out)
    reloaded = AutoTokenizer.from_pretrained(out)
    check_tokenizer(reloaded)
    sample = (DATA / "corpus.txt").read_text(encoding="utf-8")[:2000]
    if reloaded(sample)["input_ids"] != tok(sample)["input_ids"]:
        raise RuntimeError(f"the tokenizer saved in {out} tokenizes differently after loading")
    return dict(n_params=n_params, n_tokens=n_tokens, fact_loss=fact_loss, **phase, retrieval=retrieval,
                counts=counts, seconds=time.time() - start, sha=sha256(out / "model.safetensors"))


LOSS_TOLERANCE = 0.02
"""Relative gap allowed between a rebuild's final LM loss and the committed model's, across machines."""


def recorded_final_loss(out: Path) -> float | None:
    """The final LM loss BUILD.md records for the committed weights."""
    import re

    match = re.search(r"final LM loss ([0-9.]+)", (out / "BUILD.md").read_text()) if (out / "BUILD.md").is_file() else None
    return float(match.group(1)) if match else None


def differing_tensors(committed: Path, rebuilt: Path) -> list[str]:
    """Tensors whose name, dtype, shape or bytes differ between two safetensors files."""
    from safetensors.torch import load_file

    a, b = load_file(committed), load_file(rebuilt)
    out = [f"{k}: only in one file" for k in sorted(set(a) ^ set(b))]
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            out.append(f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
        elif not torch.equal(x.view(torch.uint8) if x.dtype.is_floating_point else x,
                             y.view(torch.uint8) if y.dtype.is_floating_point else y):
            out.append(f"{k}: max |diff| {(x.float() - y.float()).abs().max().item():.3g}")
    return out


def write_build_md(out, facts):
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    counts = "\n".join(f"| {i} | {' '.join(str(c) for c in row)} |" for i, row in enumerate(facts["counts"]))
    text = f"""# tiny-moe: how this model was built

`model.safetensors` sha256: `{facts['sha']}`

Command (from the repository root, CPU, {THREADS} threads): `python model/build_tiny_moe.py`.
`python model/build_tiny_moe.py --check` rebuilds into a temp dir and compares every tensor with these weights: bit for bit on the machine that built them; on another machine (other float kernels) the final LM loss must be within 2%.
Versions: torch {torch.__version__}, transformers {__import__('transformers').__version__},
tokenizers {__import__('tokenizers').__version__}.

Steps:
1. Tokenizer: SentencePiece-style BPE (Metaspace, byte_fallback) trained with `tokenizers` on
   data/tiny-tasks/corpus.txt plus the user phrasings of sft.jsonl;
   ids 0-2 are <unk> <s> </s>, 3-258 the byte tokens, then {BPE_VOCAB} learned pieces, then the
   special added tokens [INST] and [/INST]. Wrapped as transformers' PreTrainedTokenizerFast
   (tokenizer.json as is, Metaspace prepend_scheme "always" as Mixtral's legacy tokenizer;
   add_bos_token=True, no pad token) with Mixtral-8x7B-Instruct-v0.1's chat template.
2. Model: MixtralForCausalLM, {json.dumps(MODEL)}, vocab {facts.get('vocab', '')}:
   {facts['n_params']:,} parameters, fp32; directory size {size / 2**20:.1f} MiB.
3. Pretraining on the corpus ({facts['n_tokens']:,} tokens; each document `<s> text </s>`,
   packed into blocks): {json.dumps(TRAIN)}; AdamW (0.9, 0.95), grad clip 1.0, seed {SEED},
   output_router_logits on and the load-balancing loss (coef {MODEL['router_aux_loss_coef']}) applied per layer
   (transformers pools all layers into one balance term, which let experts die in single layers).
   LM loss at the end of this phase {facts['fact_loss']:.4f} (mean of the last 50 steps, aux loss excluded).
4. Retrieval phase, a fresh AdamW (0.9, 0.95; weight decay {TRAIN['weight_decay']} on every tensor), linear warmup then
   constant: {json.dumps(RETRIEVAL)}; even steps are
   batches of passkey documents (the check's user turn of finetune/eval/passkey.py in prose with
   0..N filler words, N = {' then '.join(map(str, RETRIEVAL['stages_words']))}, each stage until its key-digit loss was below
   formed_below: here they ended at steps {', '.join(map(str, facts['stage_ends']))}; then " The pass key is KEY." and
   </s>; keys and depths from random.Random({SEED})), odd steps fact blocks as in 3 (a fresh order from seed {SEED}).
   Key-digit loss at the end (mean of the last 25 passkey steps): {facts['digit_loss']:.3f} (chance {math.log(10):.3f}).
   Saved with output_router_logits false, as in the real Mixtral config.

Result: final LM loss {facts['final_loss']:.4f} (fact blocks of the retrieval phase, mean of the last 50, aux
loss excluded); greedy retrieval of 12 fresh keys from prose prompts (" ... What is the pass key? The
pass key is"), by filler words: {', '.join(f"{w} words {h}/12" for w, h in facts['retrieval'].items())};
build time {facts['seconds']:.0f} s wall.

Tokens routed to each expert (top-2) per layer over 64 corpus blocks:

| layer | experts 0..7 |
|---|---|
{counts}
"""
    (out / "BUILD.md").write_text(text, encoding="utf-8")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare sha256 with --out")
    args = parser.parse_args()

    if args.check:
        expected = sha256(args.out / "model.safetensors")
        with tempfile.TemporaryDirectory() as tmp:
            facts = build(Path(tmp))
            different = differing_tensors(args.out / "model.safetensors", Path(tmp) / "model.safetensors")
        print(f"expected {expected}\nrebuilt  {facts['sha']}\nfinal LM loss {facts['final_loss']:.4f}")
        if different:
            # Bit-for-bit holds on one machine (two rebuilds here, transformers 5.23 and 5.24, gave
            # one sha256), not across machines (most likely other CPU float kernels; 1800
            # steps amplify the last bits). Then the rebuild must match the committed model's quality.
            recorded = recorded_final_loss(args.out)
            print(f"not bit-identical on this machine: {len(different)} tensor(s) differ, e.g. " + "; ".join(different[:3]))
            if recorded is None or abs(facts["final_loss"] - recorded) > LOSS_TOLERANCE * recorded:
                print(f"MISMATCH: final LM loss {facts['final_loss']:.4f} vs the committed model's {recorded} "
                      f"(allowed: within {LOSS_TOLERANCE:.0%})")
                sys.exit(1)
            print(f"OK: equivalent rebuild: final LM loss {facts['final_loss']:.4f} vs the committed {recorded:.4f} "
                  f"(within {LOSS_TOLERANCE:.0%}), every expert of every layer receives tokens")
            return
        if facts["sha"] != expected:
            # the weights are bit-identical; only the file's bytes around them differ (safetensors
            # header metadata written by another transformers/safetensors version)
            print("OK: every tensor bit-for-bit identical (the file's header differs)")
            return
        print("OK: bit-for-bit identical")
        return

    facts = build(args.out)
    facts["vocab"] = MixtralConfig.from_pretrained(args.out).vocab_size
    write_build_md(args.out, facts)
    print(f"wrote {args.out} (sha256 {facts['sha']})")


if __name__ == "__main__":
    main()
