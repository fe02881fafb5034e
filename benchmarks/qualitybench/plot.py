"""Perplexity against optimizer steps, one panel per sparsity: which tool gives the better model for the compute.

Each curve is one run's in-loop evaluations (`RunResult.curve`). hfprune's progressive runs reach their
target sparsity only at the end of the pruning stage: points before it (partly pruned) are hollow.
Torch-Pruning's curve starts at step 0, right after its one-shot pruning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qualitybench.report import SET_NAMES, dense_of, pct


def plot_curves(results: dict, budget: str, path: Path, methods: Optional[tuple] = None,
                dataset: str = "wiki", title: str = "") -> Optional[Path]:
    """Write the PNG and return its path, or None when no run of `budget` has a curve."""
    runs = [r for r in results.values() if r.budget == budget and len(r.curve) > 1
            and (methods is None or r.method in methods)]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    sparsities = sorted({r.sparsity for r in runs})
    names = list(dict.fromkeys(r.method for r in runs))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    dense = dense_of(results)
    figure, axes = plt.subplots(1, len(sparsities), figsize=(6.4 * len(sparsities), 4.6), squeeze=False)
    for ax, sparsity in zip(axes[0], sparsities):
        for run in (r for r in runs if r.sparsity == sparsity):
            points = sorted(run.curve, key=lambda p: p["step"])
            label = run.method + ("" if run.own_structures else f" ({run.structures})")
            label += f" seed {run.seed}" if run.seed else ""
            steps, values = [p["step"] for p in points], [p[dataset] for p in points]
            ax.plot(steps, values, color=colours[run.method], label=label, linewidth=2 if run.method == "default" else 1.3,
                    linestyle=":" if run.seed else "-")
            full = [p.get("sparsity") is None or p["sparsity"] >= run.sparsity - 0.01 for p in points]
            for step, value, reached in zip(steps, values, full):
                ax.plot(step, value, "o", color=colours[run.method], markersize=4,
                        markerfacecolor=colours[run.method] if reached else "none")
        if dense is not None:
            ax.axhline(dense.after_recovery[dataset], color="grey", linestyle="--", linewidth=1, label="dense")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(f"{SET_NAMES[dataset]} perplexity (held out)")
        ax.set_title(f"{pct(sparsity)} of the prunable parameters removed")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(title or f"{budget}: perplexity during pruning and recovery (hollow: not yet at the target)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
