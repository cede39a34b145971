"""Routing observability for Mixture-of-Experts fine-tuning: which experts tokens go to, and how
that changes in training. Metrics follow the Mixtral paper's routing analysis (section 5).

    metrics.py   pure functions on router outputs (definitions and random baselines)
    capture.py   hooks that record router logits / top-k ids (PEFT-wrapped or not)
    callback.py  RoutingMetricsCallback: per-layer metrics in SFT/DPO training logs
    report.py    routing_report(): JSON, Markdown and plots per data source (`finetune routing`)
    sources.py   load_sources(): data files -> {source: texts}
    markdown.py, plots.py   routing.md and the PNGs of the report

The callback's cost per step is measured by `python bench/routing_overhead.py`.
Imports stay in the submodules so `import finetune.routing` pulls in neither TRL nor matplotlib.
"""
