"""The routing report's token view (paper Fig. 8): the colour of every token in tokens.html is the top-1
expert that plain transformers' own router logits (output_router_logits=True) give in a separate forward."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import torch
from conftest import TINY_MOE, TINY_TASKS
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.cli import main
from finetune.routing.tokens import expert_colour

MODEL, DATA = TINY_MOE, TINY_TASKS / "test.jsonl"


class _Spans(HTMLParser):
    """Every text block (data-sample) with its token spans' attributes, and the text inside each span."""

    def __init__(self):
        super().__init__()
        self.blocks, self._in_span = [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "data-sample" in a:
            self.blocks.append({**a, "spans": []})
        elif tag == "span" and "data-expert" in a:
            self.blocks[-1]["spans"].append({**a, "text": ""})
            self._in_span = True

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_span = False

    def handle_data(self, data):
        if self._in_span and self.blocks and self.blocks[-1]["spans"]:
            self.blocks[-1]["spans"][-1]["text"] += data


def test_token_colours_are_the_routers_top1_expert(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["-q", "routing", str(MODEL), "--data", str(DATA), "--output", str(out), "--max-rows", "3",
                 "--dtype", "float32", "--device", "cpu"]) == 0
    assert f"{out}/tokens.html" in capsys.readouterr().out
    parser = _Spans()
    parser.feed((out / "tokens.html").read_text(encoding="utf-8"))

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    n_layers, n_experts = model.config.num_hidden_layers, model.config.num_local_experts
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:3]]
    # the texts as the report sees them: prompt and answer rendered with the chat template (BOS included)
    texts = [tokenizer.apply_chat_template(r["prompt"] + [{"role": "assistant", "content": r["answer"]}], tokenize=False)
             for r in rows]
    expected = {}
    for k, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids, output_router_logits=True).router_logits  # per layer (S, E)
        expected[k] = (ids[0].tolist(), {layer: logits[layer].argmax(-1).tolist() for layer in range(n_layers)})

    layers_shown = sorted({int(b["spans"][0]["data-layer"]) for b in parser.blocks})
    assert layers_shown == [0, n_layers // 2, n_layers - 1]  # first, middle, last MoE layer
    assert len(parser.blocks) == 3 * len(texts)
    checked = 0
    for block in parser.blocks:
        k = int(block["data-sample"])
        ids, top1 = expected[k]
        spans = block["spans"]
        layer = int(spans[0]["data-layer"])
        assert [int(s["data-id"]) for s in spans] == ids  # every token of the text, in order
        assert [int(s["data-pos"]) for s in spans] == list(range(len(ids)))
        assert [int(s["data-expert"]) for s in spans] == top1[layer]
        # the colour drawn is the expert's colour, and pieces read back as the text
        assert all(f"background:{expert_colour(int(s['data-expert']), n_experts)}" in s["style"] for s in spans)
        assert "".join(s["text"] for s in spans).replace("\u21b5", "\n").strip().endswith(rows[k]["answer"] + "</s>")
        checked += len(spans)
    assert checked == 3 * sum(len(ids) for ids, _ in expected.values()) > 60
    # experts differ across tokens (a constant colour would pass the comparison only if routing were constant)
    assert len({s["data-expert"] for b in parser.blocks for s in b["spans"]}) > 2

    png = out / "tokens.png"
    from matplotlib.image import imread

    image = imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 400 and image[..., :3].std() > 0.05
