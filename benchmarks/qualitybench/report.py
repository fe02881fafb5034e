"""The quality report: one table per budget, the issue's targets checked, zero-shot, the README section.

Every function reads `RunResult`s (or their dicts from the JSON) and returns markdown or rows; nothing
here runs a model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional

import common
from qualitybench.specs import DENSE, PEER

SETS = ("wiki", "c4")
SET_NAMES = {"wiki": "wiki", "c4": "C4"}
ZERO_SHOT_TASKS = ("piqa", "arc_easy", "winogrande", "hellaswag")
README_BEGIN = "<!-- quality: begin (benchmarks/quality.py --update-readme writes what follows) -->"
README_END = "<!-- quality: end -->"


def percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def pct(sparsity: float) -> str:
    return f"{round(sparsity * 100)}%"


def dense_of(results: dict):
    return next((r for r in results.values() if r.method == DENSE), None)


def x_dense(run, dense, dataset: str) -> Optional[float]:
    if dense is None or not run.after_recovery or dataset not in run.after_recovery:
        return None
    return run.after_recovery[dataset] / dense.after_recovery[dataset]


def zero_shot_average(run) -> tuple[Optional[float], Optional[float]]:
    average = (run.zero_shot or {}).get("average")
    return (average["acc"], average["acc_norm"]) if average else (None, None)


def _label(run) -> str:
    return f"**{run.method}**" if run.method == "default" else run.method


def _in_budget(results: dict, budget: str) -> list:
    """The runs of a budget by sparsity (one shot: then calibration and structures), in plan order otherwise."""
    runs = [r for r in results.values() if r.budget == budget]
    one_shot = any(r.calibration for r in runs)
    return sorted(runs, key=lambda r: (r.sparsity, r.calibration, r.structures if one_shot else "", r.seed))


# ---------------------------------------------------------------- tables


def budget_table(results: dict, budget_name: str, budget) -> str:
    dense = dense_of(results)
    one_shot = budget.one_shot
    headers = ["method", "sparsity", "structures", "seed", "base", "calibration" if one_shot else "data", "params"]
    if one_shot:
        headers += ["wiki", "C4"]
    else:
        headers += ["wiki after pruning", "C4 after pruning", "wiki after recovery", "C4 after recovery"]
    headers += ["wiki x dense", "C4 x dense", "pruning stage s"] + ([] if one_shot else ["s/step"])
    headers += ["0-shot acc", "0-shot acc_norm"]
    rows = []
    for run in _in_budget(results, budget_name):
        acc, acc_norm = zero_shot_average(run)
        row = [_label(run), f"{run.reached:.3f}", run.structures + ("" if run.own_structures else " (set)"),
               run.seed, run.base, run.calibration if one_shot else run.data, f"{run.params / 1e6:.1f}M"]
        if not one_shot:
            row += [common.fmt(run.after_pruning.get(d)) for d in SETS]
        row += [common.fmt(run.after_recovery.get(d)) for d in SETS]
        row += [f"{x:.2f}x" if (x := x_dense(run, dense, d)) is not None else "n/a" for d in SETS]
        row.append(common.fmt(run.pruning_seconds, 1))
        if not one_shot:
            row.append(common.fmt(common.median(run.step_seconds), 1) if run.step_seconds else "n/a")
        row += [percent(acc), percent(acc_norm)]
        rows.append(row)
    return common.table(headers, rows, "lrlrll" + "r" * (len(headers) - 6))


def zero_shot_table(results: dict) -> Optional[str]:
    """Every run with zero-shot accuracy: acc and acc_norm per task (WinoGrande has acc only), the averages."""
    runs = [r for r in results.values() if r.zero_shot]
    if not runs:
        return None
    dense = dense_of(results)
    dense_acc = zero_shot_average(dense)[0] if dense is not None else None
    headers = ["budget", "method", "sparsity", "structures", "seed"]
    for task in ZERO_SHOT_TASKS:
        headers += [f"{task} acc"] + ([] if task == "winogrande" else [f"{task} acc_norm"])
    headers += ["average acc", "average acc_norm", "acc vs dense", "rows"]
    rows = []
    for run in runs:
        row = [run.budget, _label(run), pct(run.sparsity), run.structures, run.seed]
        for task in ZERO_SHOT_TASKS:
            metrics = run.zero_shot.get(task, {})
            row += [percent(metrics.get("acc"))] + ([] if task == "winogrande" else [percent(metrics.get("acc_norm"))])
        acc, acc_norm = zero_shot_average(run)
        row += [percent(acc), percent(acc_norm),
                f"{acc / dense_acc:.1%}" if acc is not None and dense_acc else "n/a",
                run.zero_shot.get("average", {}).get("n", "n/a")]
        rows.append(row)
    return common.table(headers, rows, "llrlr" + "r" * (len(headers) - 5))


def methods_table(methods: dict, used: Iterable[str]) -> str:
    rows = []
    for name in used:
        if name == PEER:
            rows.append([name, "Torch-Pruning 1.6.1: MetaPruner + GroupTaylorImportance, MLP channels, local", "fp32"])
        elif name in methods:
            overrides = {k: v for k, v in methods[name].items() if k not in ("base", "distillation", "data")}
            options = {k: v for k, v in methods[name].items() if k in ("base", "distillation", "data")}
            rows.append([name, ", ".join(f"`{k}={v!r}`" for k, v in overrides.items()) or "`PruningConfig()`",
                         ", ".join(f"{k}: {v}" for k, v in options.items()) or "-"])
    return common.table(["method", "PruningConfig overrides (over the package's defaults)", "run options"], rows, "lll")


# ---------------------------------------------------------------- targets


def _matches(run, **fields) -> bool:
    return all(math.isclose(getattr(run, k), v) if isinstance(v, float) else getattr(run, k) == v
               for k, v in fields.items())


def _find(results: dict, **fields) -> list:
    return [r for r in results.values() if _matches(r, **fields)]


def _peer_of(results: dict, run):
    """Torch-Pruning's run at the same point (budget, sparsity, calibration, seed)."""
    found = _find(results, method=PEER, budget=run.budget, sparsity=run.sparsity, calibration=run.calibration,
                  seed=run.seed)
    return found[0] if found else None


def _compare(ours, theirs, margin: float) -> tuple[str, bool]:
    """`ours` at least `margin` below `theirs` in perplexity after recovery, on both held-out sets."""
    parts, met = [], True
    for d in SETS:
        a, b = ours.after_recovery[d], theirs.after_recovery[d]
        parts.append(f"{SET_NAMES[d]} {a:.2f} vs {b:.2f} ({a / b - 1:+.1%})")
        met &= a <= (1 - margin) * b
    return ", ".join(parts), met


def _where(run) -> str:
    where = f"{run.budget} {pct(run.sparsity)} {run.structures}"
    return where + (f" {run.calibration}" if run.calibration else "") + (f" seed {run.seed}" if run.seed else "")


def _row(target: str, measured: list[str], verdicts: list[bool]) -> tuple[str, str, str]:
    if not verdicts:
        return target, "not measured", "n/a"
    return target, "; ".join(measured), "met" if all(verdicts) else "**missed**"


def target_rows(results: dict, targets: dict, budgets: Iterable[str]) -> list[tuple[str, str, str]]:
    """(target, measured, met / **missed** / n/a) for each of the issue's targets."""
    dense = dense_of(results)
    rows = []

    t = targets["one_shot"]
    runs = _find(results, budget=t["budget"], method=t["method"], sparsity=t["sparsity"], structures=t["structures"])
    where = f"one shot {pct(t['sparsity'])} {t['structures']}"
    measured, verdicts = [], []
    for run in runs if dense is not None else []:
        ratios = {d: x_dense(run, dense, d) for d in SETS}
        measured.append(f"{run.calibration}: " + ", ".join(f"{SET_NAMES[d]} {r:.2f}x" for d, r in ratios.items()))
        verdicts.append(all(r <= t["max_x_dense"] for r in ratios.values()))
    rows.append(_row(f"{where}: {t['method']} <= {t['max_x_dense']}x dense", measured, verdicts))
    measured, verdicts = [], []
    for run in runs:
        peer = _peer_of(results, run)
        if peer is not None:
            text, met = _compare(run, peer, t["ahead_of_peer"])
            measured.append(f"{run.calibration}: {text}")
            verdicts.append(met)
    rows.append(_row(f"{where}: {t['method']} >= {t['ahead_of_peer']:.0%} ahead of Torch-Pruning's one shot",
                     measured, verdicts))

    t = targets["beats_peer"]
    for budget in budgets:
        measured, verdicts = [], []
        for peer in _find(results, method=PEER, budget=budget):
            ours = _find(results, method=t["method"], budget=budget, sparsity=peer.sparsity,
                         calibration=peer.calibration, seed=peer.seed)
            ours = sorted(ours, key=lambda r: not r.own_structures)  # what a user of the method gets, first
            if ours:
                text, met = _compare(ours[0], peer, t["margin"])
                measured.append(f"{pct(peer.sparsity)} {ours[0].structures}"
                                + (f" {peer.calibration}" if peer.calibration else "")
                                + (f" seed {peer.seed}" if peer.seed else "") + f": {text}")
                verdicts.append(met)
        rows.append(_row(f"{budget}: {t['method']} beats Torch-Pruning by >= {t['margin']:.0%} at every sparsity",
                         measured, verdicts))

    t = targets["allocation"]
    measured, verdicts = [], []
    for local in _find(results, method=t["local"], sparsity=t["sparsity"]):
        other = _find(results, method=t["nonuniform"], budget=local.budget, sparsity=local.sparsity,
                      structures=local.structures, calibration=local.calibration, seed=local.seed)
        if other:
            text, met = _compare(other[0], local, t["margin"])
            measured.append(f"{_where(local)}: {text}")
            verdicts.append(met)
    rows.append(_row(f"{t['nonuniform']} beats {t['local']} by >= {t['margin']:.0%} at {pct(t['sparsity'])}",
                     measured, verdicts))

    t = targets["compensation"]
    measured, verdicts = [], []
    for plain in _find(results, method=t["without"]):
        other = _find(results, method=t["with"], budget=plain.budget, sparsity=plain.sparsity,
                      structures=plain.structures, calibration=plain.calibration, seed=plain.seed)
        if other and plain.pruning_seconds > 0:
            overhead = other[0].pruning_seconds / plain.pruning_seconds - 1
            measured.append(f"{_where(plain)}: {plain.pruning_seconds:.1f} s -> {other[0].pruning_seconds:.1f} s "
                            f"({overhead:+.1%})")
            verdicts.append(overhead <= t["max_overhead"])
    rows.append(_row(f"compensation ({t['with']} vs {t['without']}) adds <= {t['max_overhead']:.0%} to the pruning "
                     "stage's wall time", measured, verdicts))
    return rows


# ---------------------------------------------------------------- README


def readme_section(results: dict, budgets: dict, targets: list, command: str, minutes: float,
                   plot: Optional[str], recipes: Optional[dict]) -> str:
    """The README's quality section, from the results: one compact table per budget, the plot, the targets."""
    dense = dense_of(results)
    lines = [f"Quality (`{command}`, {minutes:.0f} min of runs, `benchmarks/results/quality.md`): every method of a "
             "budget gets the same calibration text and the same optimizer steps; perplexity on held-out text "
             "(`wiki_demo.txt` and C4 documents never trained on, 128-token windows)."]
    if dense is not None:
        acc, _ = zero_shot_average(dense)
        lines[-1] += (f" Dense: wiki {dense.after_recovery['wiki']:.2f}, C4 {dense.after_recovery['c4']:.2f}"
                      + (f", zero-shot average acc {percent(acc)}%" if acc is not None else "") + ".")
    lines.append("")
    for name, budget in budgets.items():
        runs = _in_budget(results, name)
        if not runs:
            continue
        sparsities = sorted({r.sparsity for r in runs})
        what = ("one shot, no recovery" if budget.one_shot else
                f"{budget.steps} steps of {budget.batch_size} x {budget.seq_len} tokens, {budget.data}")
        headers = ["method", "structures"] + [f"{pct(s)}: wiki / C4" for s in sparsities]
        with_zero_shot = any(r.zero_shot for r in runs)
        if with_zero_shot:
            headers += [f"{pct(s)}: 0-shot acc" for s in sparsities]
        rows, seen = [], []
        for run in runs:
            row_key = (run.method, run.structures, run.calibration)
            if row_key in seen or run.seed != min(r.seed for r in runs):
                continue
            seen.append(row_key)
            cells = {r.sparsity: r for r in runs if (r.method, r.structures, r.calibration) == row_key
                     and r.seed == run.seed}
            row = [_label(run) + (f" ({run.calibration})" if run.calibration else ""), run.structures]
            row += [f"{cells[s].after_recovery['wiki']:.2f} / {cells[s].after_recovery['c4']:.2f}" if s in cells
                    else "" for s in sparsities]
            if with_zero_shot:
                row += [percent(zero_shot_average(cells[s])[0]) if s in cells else "" for s in sparsities]
            rows.append(row)
        lines += [f"`{name}` ({what}):", "", common.table(headers, rows, "ll" + "r" * (len(headers) - 2)), ""]
    if plot:
        lines += [f"![perplexity against recovery steps]({plot})", ""]
    lines += [common.table(["target (issue #11)", "measured", "result"], targets, "lll"), ""]
    if recipes:
        lines += [recipes_intro(recipes), "", recipes_table(recipes), ""]
    return "\n".join(lines).rstrip() + "\n"


def replace_between_markers(text: str, section: str, begin: str = README_BEGIN, end: str = README_END) -> str:
    """`text` with what lies between the `begin` and `end` marker lines replaced by `section`."""
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"README has no {begin!r} ... {end!r} pair: put both marker lines where the quality "
                         "section goes")
    return text[: start + len(begin)] + "\n\n" + section.strip() + "\n\n" + text[stop:]


def update_readme(path: Path, section: str) -> None:
    from hfprune.atomic import write_text_atomic

    write_text_atomic(path, replace_between_markers(path.read_text(), section))


# ---------------------------------------------------------------- the quality recipes (benchmarks/recipes.py)


def recipes_intro(recipes: dict) -> str:
    load = recipes["machine"].get("load_average") or [float("nan")]
    end = recipes["machine"].get("load_average_end") or [float("nan")]
    return (f"Quality recipes (`{recipes['command']}`: each `hfprune prune RECIPE` in a fresh process, load average "
            f"{load[0]:.1f} at start, {end[0]:.1f} at end; evaluated by the job on the exported checkpoint: "
            f"{recipes['windows']} windows of {recipes['seq_len']} tokens, dense vs pruned):")


def recipes_table(recipes: dict) -> str:
    rows = []
    dense = recipes.get("dense") or {}
    if dense:
        rows.append(["dense", "", f"{dense['params'] / 1e6:.1f}M", common.fmt(dense.get("wiki")),
                     common.fmt(dense.get("c4")), "", percent(dense.get("zero_shot_acc"))])
    for row in recipes["rows"]:
        if row["rc"] != 0:
            rows.append([f"`{row['recipe']}`", _minutes(row["wall_seconds"]), f"**failed (rc {row['rc']})**",
                         "", "", "", ""])
            continue
        ratio = lambda name: (f" ({row[name] / dense[name]:.2f}x)"  # noqa: E731
                              if dense.get(name) and row.get(name) is not None else "")
        limit = f" (limit {row['flops_limit']:.2f}x)" if row.get("flops_limit") else ""
        speedup = f"{row['prefill_speedup']:.2f}x{limit}" if row.get("prefill_speedup") else "n/a"
        acc = row.get("zero_shot_acc")
        keeps = f" ({acc / dense['zero_shot_acc']:.1%} of dense)" if acc is not None and dense.get("zero_shot_acc") \
            else ""
        rows.append([f"`{row['recipe']}`", _minutes(row["wall_seconds"]), f"{row['params'] / 1e6:.1f}M",
                     common.fmt(row.get("wiki")) + ratio("wiki"), common.fmt(row.get("c4")) + ratio("c4"),
                     speedup, percent(acc) + keeps])
    return common.table(["recipe", "wall time", "params", "wiki", "C4", "prefill speed-up", "0-shot acc"], rows,
                        "lrrrrrr")


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"
