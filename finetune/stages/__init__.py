"""The two training stages, one readable function each: sft.py and dpo.py.

    finetune sft recipes/tiny-moe/sft.yaml
    finetune dpo recipes/tiny-moe/dpo.yaml
Layer: stages (below cli/pipeline; imports validate, train, load and below).
"""
