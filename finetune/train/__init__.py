"""Training helpers the stages call in order: trainer arguments (args.py), the checked LoRA wrap
(wrap.py), training, saving and the summary (save.py).

    finetune sft recipes/tiny-moe/sft.yaml
Layer: train (beside validate, export, eval, routing; below stages).
"""
