"""The parts of `benchmarks/quality.py`, one job each.

    specs.py              what a run is: Method, Budget, RunSpec; the PruningConfig a run uses; its cache key
    data.py               held-out texts, the training stream of each data order, calibration batches
    evaluation.py         perplexity, zero-shot accuracy, the in-loop curve and timing callbacks
    hfprune_runs.py       hfprune: one shot (`prune_model`) and progressive (`PruningTrainer`)
    torch_pruning_runs.py the peer: Torch-Pruning one shot, then the same LoRA recovery
    cache.py              finished runs on disk, reused only when measured exactly as asked now
    report.py             tables, targets, the README section
    plot.py               perplexity against recovery steps (PNG)

`benchmarks/quality.py` holds the tables a reader edits (methods, budgets, the plan, the targets)
and the loop over runs; `benchmarks/recipes.py` reuses `evaluation.py`.
"""
