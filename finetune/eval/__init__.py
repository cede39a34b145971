"""Long-context evaluation like the Mixtral paper's section 3.2, and where models are loaded for it.

    finetune eval MODEL_OR_RUN --passkey [--lengths 1k,2k] [--depths 0,0.5,1] [--trials 4]
    finetune eval MODEL_OR_RUN --long-ppl FILE [--contexts 512,1k,2k]

- placement: which device(s) and dtype a model is evaluated in (16-bit on GPUs, float32 on CPU);
- passkey: retrieval of a key hidden at a depth of a filler text, by length x depth;
- long_ppl: perplexity of the same later tokens as the context before them grows;
- report: the JSON, Markdown and PNG files of both.
Exact match, loss and preference accuracy stay in finetune/eval/scores.py; `finetune eval` runs all.
"""
