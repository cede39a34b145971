"""finetune: recipe-driven SFT, DPO and export for Mixture-of-Experts instruct models.

Run `finetune --help` (or `python -m finetune --help`) for the commands.
"""

__version__ = "0.1.0"
