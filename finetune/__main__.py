"""`python -m finetune ...` (also `accelerate launch -m finetune ...`): same as the `finetune` command."""

from finetune.cli import main

raise SystemExit(main())
