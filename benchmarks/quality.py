"""Quality of pruned SmolLM2-135M-Instruct: hfprune's methods against Torch-Pruning, budget by budget.

    python benchmarks/quality.py                       # every budget of PLAN, writes results/quality.md (+ .json, PNG)
    python benchmarks/quality.py --budgets oneshot     # run one budget; the report shows every cached run of PLAN
    python benchmarks/quality.py --budgets budget16 --methods default act-taylor torch-pruning --seeds 0 1
    python benchmarks/quality.py --list                # the runs, cached or not, with estimated times; runs nothing
    python benchmarks/quality.py --update-readme       # also rewrite the README's quality section (between markers)
    python benchmarks/quality.py --smoke               # tiny random Llama, seconds, temp dir

What a run is (the tables below are the place to edit):

* METHODS: an hfprune method is a dict of `PruningConfig` overrides over the package's own defaults
  (`"default": {}` is `PruningConfig()` as the package defines it when the benchmark runs) plus run
  options: `base` (auto / 8bit / fp32; auto is fp32 exactly when the criterion needs full weight
  gradients), `distillation` (DistillationConfig fields) and `data` (the order of the text). The peer
  `torch-pruning` is Torch-Pruning 1.6.1, MetaPruner + GroupTaylorImportance on MLP channels (its GQA
  head pruning fails; the failure is recorded in the report), fp32.
* BUDGETS: a protocol; every method in it gets the same text and the same optimizer steps.
  `oneshot`: no recovery; `prune_model` and Torch-Pruning's one shot from the same calibration batches
  (N random windows of L tokens of C4 [40:300), LLM-Pruner's 10 x 64 by default). `budget16`:
  16 batches of 4 x 128 tokens (hfprune: 8 progressive pruning steps, then 8 of recovery; Torch-Pruning:
  one shot from the first 8 batches, then 8 LoRA steps on the other 8: the same text, recovery steps and
  backward passes). `budget200`: the quality recipes' 200 steps of
  2 x 256 tokens (C4 first, then Alpaca; lr 5e-4), perplexity every 25 steps for the curve.
* PLAN: which methods, sparsities, structures, seeds (and calibrations) each budget runs, and whether
  its final models get zero-shot accuracy (PIQA, ARC-Easy, WinoGrande, HellaSwag: minutes per model).
* TARGETS: issue #11's targets, checked in the report with the numbers.

Evaluation: perplexity with 128-token windows (no context carried over, as LLM-Pruner), the first
`--windows` windows of `wiki_demo.txt` and of C4 documents [0:40), which nothing trains or calibrates
on. Runs on the 8-bit base are evaluated after recovery on the exported checkpoint (LoRA merged into
the full-precision weights: what a user ships). LoRA r=8 (alpha 16, dropout 0.05) on the 7 projections.

Finished runs are cached (`--cache`, default results/.cache-quality, kept unless `--drop-cache`) under a
fingerprint of everything their numbers depend on (the resolved PruningConfig included): adding runs reruns
only what is new, changing the package's defaults reruns "default", `--rerun PATTERN` forces runs whose key
matches (hfprune's code is not in the fingerprint: after changing a criterion's code, rerun its runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from qualitybench.specs import DENSE, OWN, PEER, Budget, RunSpec, expand_plan, fingerprint  # noqa: E402
from qualitybench.specs import parse_calibration, parse_structures, split_method, wants_zero_shot  # noqa: E402

NAME = "quality"

METHODS = {
    "default": {},  # PruningConfig() as the package defines it at run time
    "lora": {"importance": "lora"},  # LoRAPrune's criterion, 8-bit base, with the package's other defaults
    # LoRAPrune as published: KV groups, no compensation
    "loraprune": {"importance": "lora", "head_granularity": "kv_group", "compensation": "none"},
    "taylor": {"importance": "taylor"},  # LLM-Pruner's element-1, fp32 (full weight gradients)
    "act-taylor": {"importance": "activation_taylor", "compensation": "none"},  # the default without compensation
    "default-global": {"ranking": "global"},  # the default with the bounded global allocation
    # The quality recipes' settings (recipes/smollm2-135m-quality-20.yaml) within a budget's protocol.
    "recipe": {"importance": "activation_taylor", "physical_removal": "at_end",
               "distillation": {"alpha": 0.5, "temperature": 2.0, "kl_tokens": "labeled"}},
}

BUDGETS = {
    "oneshot": Budget(),
    "budget16": Budget(steps=16, batch_size=4, seq_len=128, pruning_steps=8, prune_every=1, learning_rate=1e-3,
                       warmup_steps=1, data="c4-first"),
    "budget200": Budget(steps=200, batch_size=2, seq_len=256, pruning_steps=80, prune_every=5, learning_rate=5e-4,
                        warmup_steps=5, data="phases", eval_every=25),
}

MLP, BOTH = ("channels",), ("heads", "channels")
PLAN = {
    "oneshot": dict(methods=("default", "taylor", "act-taylor", "default-global", PEER), sparsities=(0.2, 0.5),
                    structures=(MLP, BOTH), calibrations=("10x64", "64x256"), seeds=(0,), zero_shot=False),
    "budget16": dict(methods=("default", "lora", "loraprune", "taylor", "act-taylor", "default-global", PEER),
                     sparsities=(0.2, 0.5), structures=(OWN,), seeds=(0,), zero_shot=False),
    # zero_shot: True (every run), False, or the methods whose runs get it (20-50 min per model on this CPU)
    "budget200": dict(methods=("default", "recipe", PEER), sparsities=(0.2, 0.5), structures=(OWN,),
                      seeds=(0,), zero_shot=False),
}

TARGETS = {
    "one_shot": dict(budget="oneshot", method="default", sparsity=0.2, structures="channels", max_x_dense=1.35,
                     ahead_of_peer=0.15),
    "beats_peer": dict(method="default", margin=0.10),  # in every budget, at every sparsity
    "allocation": dict(nonuniform="default-global", local="default", sparsity=0.5, margin=0.05),
    "compensation": {"with": "default", "without": "act-taylor", "max_overhead": 0.15},  # pruning-stage time
}
CURVES = dict(budget="budget200", methods=None)  # None: every method of that budget

SETTINGS = dict(windows=16, eval_seq_len=128, eval_batch=8, c4_eval_docs=40, c4_train_docs=(40, 300), lora_r=8)

# --smoke: the same tables on a tiny random Llama, budgets shrunk to a few steps.
SMOKE_BUDGETS = {
    "oneshot": Budget(),
    "budget16": Budget(steps=3, batch_size=2, seq_len=32, pruning_steps=2, warmup_steps=0, data="c4-first"),
    "budget200": Budget(steps=4, batch_size=2, seq_len=32, pruning_steps=2, warmup_steps=0, data="phases",
                        eval_every=2),
}
SMOKE_PLAN = {
    "oneshot": dict(methods=("default", "act-taylor", PEER), sparsities=(0.5,),
                    structures=(MLP, OWN), calibrations=("4x32",)),
    "budget16": dict(methods=("default", "act-taylor", "default-global"), sparsities=(0.5,)),
    "budget200": dict(methods=("default", PEER), sparsities=(0.2, 0.5), zero_shot=True),
}
SMOKE_SETTINGS = dict(windows=4, eval_seq_len=32, eval_batch=4, c4_eval_docs=4, c4_train_docs=(4, 40), lora_r=8,
                      wiki_limit=2, zero_shot_limit=4)


def parse_args(argv):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--budgets", nargs="+", choices=list(BUDGETS), help="budgets to run (default: all of PLAN)")
    p.add_argument("--methods", nargs="+", help="replace the methods of the budgets run (METHODS or torch-pruning)")
    p.add_argument("--sparsities", type=float, nargs="+")
    p.add_argument("--structures", nargs="+", help="channels, heads+channels, or own (the method's own)")
    p.add_argument("--seeds", type=int, nargs="+", help="e.g. 0 1 2: every run of the budgets run, per seed")
    p.add_argument("--calibrations", nargs="+", help="one-shot calibration sizes, SEQUENCESxTOKENS (10x64 64x256)")
    p.add_argument("--zero-shot", nargs="+", metavar="BUDGET", help="budgets whose final models get zero-shot "
                   "accuracy (all, none, or names; default: PLAN's zero_shot). About 20-50 min per model here")
    p.add_argument("--zero-shot-methods", nargs="+", metavar="METHOD", help="only these methods' runs get "
                   "zero-shot (the dense model always does when any run does)")
    p.add_argument("--zero-shot-limit", type=int, help="rows per task (quick checks only; default: all)")
    p.add_argument("--windows", type=int, help=f"perplexity windows per held-out set (default {SETTINGS['windows']})")
    p.add_argument("--rerun", nargs="+", default=[], metavar="PATTERN", help="rerun cached runs whose key matches "
                   "(shell pattern, e.g. 'budget16.default.*')")
    p.add_argument("--list", action="store_true", help="print the plan's runs and whether they are cached; run none")
    p.add_argument("--cache", help="directory of finished runs (default <out>/.cache-quality)")
    # The cache is kept: hours of runs, several invocations (one per budget). --keep-cache is the old spelling.
    p.add_argument("--keep-cache", action="store_true", help="accepted for old command lines: the cache is kept")
    p.add_argument("--drop-cache", action="store_true", help="delete the cache after writing the report")
    p.add_argument("--update-readme", action="store_true", help="rewrite the README's quality section (between "
                   "its markers) from the results")
    p.add_argument("--readme", default=str(common.ROOT / "README.md"))
    p.add_argument("--tp-head-probe", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_plan(args, plan: dict, budgets: dict) -> tuple[dict, dict]:
    """What this invocation runs: (the plan of the budgets run, with the command line's replacements;
    zero-shot as {budget: methods, or None for all of them})."""
    run_plan = {}
    for name in args.budgets or plan:
        entry = run_plan[name] = dict(plan.get(name, {}))
        for key in ("methods", "sparsities", "seeds", "calibrations"):
            if getattr(args, key):
                entry[key] = tuple(getattr(args, key))
        if args.structures:
            entry["structures"] = tuple(parse_structures(s) for s in args.structures)
        if not entry.get("methods") or not entry.get("sparsities"):
            raise SystemExit(f"budget {name!r}: the plan has no methods or sparsities; pass --methods / --sparsities")
    if args.zero_shot is None:  # the plan's `zero_shot`: False, True or method names
        zero_shot = {name: None if entry.get("zero_shot") is True else tuple(entry["zero_shot"])
                     for name, entry in run_plan.items() if entry.get("zero_shot")}
    elif args.zero_shot == ["none"]:
        zero_shot = {}
    else:
        names = list(run_plan) if args.zero_shot == ["all"] else args.zero_shot
        unknown = [name for name in names if name not in run_plan]
        if unknown:
            raise SystemExit(f"--zero-shot {unknown}: not among the budgets run ({', '.join(run_plan)}); "
                             "valid: all, none, or their names")
        zero_shot = {name: None for name in names}
    if args.zero_shot_methods:
        zero_shot = {name: tuple(args.zero_shot_methods) for name in zero_shot}
    return run_plan, zero_shot


def shown_plan(plan: dict, run_plan: dict) -> dict:
    """The report's plan: the table's, and what this invocation adds to it (methods, sparsities, ... merged)."""
    shown = {name: dict(entry) for name, entry in plan.items()}
    for name, entry in run_plan.items():
        merged = shown.setdefault(name, {})
        for key, values in entry.items():
            if key != "zero_shot":
                merged[key] = tuple(dict.fromkeys((*merged.get(key, ()), *values)))
    return shown


def run_one(ctx, spec: RunSpec, methods: dict, budgets: dict, workdir: Path):
    from qualitybench import runs, torch_pruning_runs

    if spec.method == DENSE:
        return runs.run_dense(ctx, spec)
    budget = budgets[spec.budget]
    if spec.method == PEER:
        return torch_pruning_runs.run(ctx, spec, budget, workdir)
    if budget.one_shot:
        return runs.run_one_shot(ctx, spec, methods[spec.method], budget)
    return runs.run_progressive(ctx, spec, methods[spec.method], budget, workdir)


# Rough costs on this 2-core CPU, for --list (results/quality.md of 2026-11: ~5 s per optimizer step of 512
# tokens, ~16 s per perplexity evaluation; zero-shot measured at ~50 min per model with the load at 6).
STEP_SECONDS_PER_TOKEN = 5 / 512
EVAL_SECONDS = 16
ZERO_SHOT_SECONDS = 30 * 60


def estimate_seconds(spec: RunSpec, methods: dict, budgets: dict, zero_shot: dict) -> float:
    seconds = ZERO_SHOT_SECONDS if wants_zero_shot(zero_shot, spec) else 0.0
    if spec.method == DENSE:
        return seconds + EVAL_SECONDS
    budget = budgets[spec.budget]
    if budget.one_shot:
        count, length = parse_calibration(spec.calibration)
        seconds += 40 if spec.method == PEER else 0  # Torch-Pruning builds its dependency graph
        return seconds + 10 + count * length * STEP_SECONDS_PER_TOKEN + EVAL_SECONDS
    tokens = budget.batch_size * budget.seq_len
    teacher = 1.5 if spec.method != PEER and methods[spec.method].get("distillation") is not None else 1.0
    evals = 2 + (budget.steps // budget.eval_every if budget.eval_every else 0)
    seconds += 20 + budget.steps * tokens * STEP_SECONDS_PER_TOKEN * teacher + evals * EVAL_SECONDS
    return seconds + (40 + budget.pruning_steps * tokens * STEP_SECONDS_PER_TOKEN if spec.method == PEER else 0)


def list_plan(specs, cache, to_run, methods, budgets, zero_shot) -> None:
    todo = 0.0
    for spec in specs:
        estimate = estimate_seconds(spec, methods, budgets, zero_shot)
        if cache.get(spec, spec.key in to_run):
            state = "cached"
        elif spec.key in to_run:
            state, todo = f"to run, ~{estimate / 60:.0f} min", todo + estimate
        else:
            state = "missing (not run by this command)"
        print(f"{spec.key:64s} {'0-shot' if wants_zero_shot(zero_shot, spec) else '':7s}{state}")
    print(f"estimated wall time of the runs to do: ~{todo / 3600:.1f} h (alone on the machine; more when it is "
          "shared)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tp_head_probe:
        from qualitybench.torch_pruning_runs import head_probe

        common.setup(args.threads)
        print(head_probe(args.tp_head_probe))
        return 0
    methods = METHODS
    budgets, plan, settings = (SMOKE_BUDGETS, SMOKE_PLAN, SMOKE_SETTINGS) if args.smoke else (BUDGETS, PLAN, SETTINGS)
    settings = {**settings, **{k: v for k, v in (("windows", args.windows), ("zero_shot_limit", args.zero_shot_limit))
                               if v}}
    # Every check before any model loads: the methods (planned or not: a typo fails in CI), the plan, zero-shot.
    for name, method in methods.items():
        split_method(name, method)
    run_plan, zero_shot = build_plan(args, plan, budgets)
    plan = shown_plan(plan, run_plan)
    to_run = {spec.key for spec in expand_plan(run_plan, methods, budgets)} | {RunSpec(DENSE, DENSE, 0.0).key}
    specs = [RunSpec(DENSE, DENSE, 0.0)] + expand_plan(plan, methods, budgets)
    from qualitybench.evaluation import check_zero_shot, zero_shot_scorer

    if args.smoke and args.zero_shot is None and zero_shot_scorer() is None:
        zero_shot = {}  # the scorer comes from the `zeroshot` branch; smoke runs with or without it
    if zero_shot and not args.list:
        check_zero_shot()
    readme = Path(args.readme)
    if args.update_readme and args.smoke and readme.resolve() == (common.ROOT / "README.md").resolve():
        raise SystemExit("--smoke --update-readme: pass --readme PATH; a smoke run never rewrites the README")
    common.setup(args.threads)
    out = common.output_dir(args)

    from qualitybench.cache import RunCache

    with tempfile.TemporaryDirectory(prefix="hfprune-quality-") as tmp:
        tmp = Path(tmp)
        path = common.tiny_llama_checkpoint(tmp / "tiny") if args.smoke else common.smollm2_path()
        # What every run's numbers depend on; the zero-shot row limit matters to zero-shot only (the cache checks it).
        depends_on = {**{k: v for k, v in settings.items() if k != "zero_shot_limit"},
                      "model": "tiny" if args.smoke else "SmolLM2-135M-Instruct"}
        cache = RunCache(Path(args.cache) if args.cache else out / ".cache-quality",
                         lambda spec: fingerprint(spec, methods.get(spec.method), budgets.get(spec.budget), depends_on),
                         zero_shot, settings.get("zero_shot_limit"), tuple(args.rerun))
        if args.list:
            list_plan(specs, cache, to_run, methods, budgets, zero_shot)
            return 0
        info = common.machine()
        ctx = make_context(path, settings, tmp, zero_shot)
        extra = {"tp_head_error": tp_head_error(args.smoke, cache.directory, path, run_plan)}
        results, missing = {}, []
        for spec in specs:
            result = cache.get(spec, measure_now=spec.key in to_run)
            if result is None and spec.key not in to_run:
                missing.append(spec.key)
                continue
            if result is None:
                print(f"{spec.key}: running", file=sys.stderr, flush=True)
                (tmp / spec.key).mkdir()
                result = run_one(ctx, spec, methods, budgets, tmp / spec.key)
                cache.put(spec, result)
                shutil.rmtree(tmp / spec.key, ignore_errors=True)
                gc.collect()
            print(f"{spec.key}: after pruning {common.fmt(result.after_pruning.get('wiki'))} / "
                  f"{common.fmt(result.after_pruning.get('c4'))}, after recovery "
                  f"{common.fmt(result.after_recovery.get('wiki'))} / {common.fmt(result.after_recovery.get('c4'))}, "
                  f"{result.total_seconds:.0f} s", file=sys.stderr, flush=True)
            results[spec.key] = result
        info["load_average_end"] = common.machine()["load_average"]
        write_report(out, results, missing, methods, budgets, plan, settings, info, extra, args, readme)
    if args.drop_cache:
        shutil.rmtree(cache.directory, ignore_errors=True)
    return 0


def make_context(path: str, settings: dict, workdir: Path, zero_shot: dict):
    from transformers import AutoTokenizer

    from qualitybench import data, evaluation, runs

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = data.Texts.load(settings["c4_eval_docs"], settings["c4_train_docs"], settings.get("wiki_limit"))
    evaluation_settings = evaluation.EvalSettings(settings["windows"], settings["eval_seq_len"],
                                                  settings["eval_batch"], settings.get("zero_shot_limit"))
    return runs.Context(path, tokenizer, texts, evaluation_settings, workdir, settings["lora_r"], zero_shot)


def tp_head_error(smoke: bool, cache: Path, path: str, plan: dict) -> str:
    """How Torch-Pruning fails on the model's GQA heads (probed once, cached: it is about the model and library)."""
    from qualitybench.torch_pruning_runs import head_pruning_error

    if smoke or not any(PEER in entry["methods"] for entry in plan.values()):
        return "was not probed (--smoke, or no Torch-Pruning run)"
    marker = cache / "tp_head_error.json"
    if not marker.exists():
        marker.write_text(json.dumps({"error": head_pruning_error(__file__, path)}))
    return json.loads(marker.read_text())["error"]


def write_report(out, results, missing, methods, budgets, plan, settings, info, extra, args, readme) -> None:
    from qualitybench import report
    from qualitybench.plot import plot_curves

    targets = report.target_rows(results, TARGETS, [b for b in budgets if b in plan])
    plot = plot_curves(results, CURVES["budget"], out / "quality_curves.png", CURVES["methods"])
    markdown = report_markdown(results, missing, methods, budgets, plan, settings, info, extra, targets, plot,
                               args.smoke)
    minutes = sum(r.total_seconds for r in results.values()) / 60
    recipes_json = out / "recipes.json"
    recipes = json.loads(recipes_json.read_text()) if recipes_json.exists() else None
    section = report.readme_section(results, budgets, targets, "python benchmarks/quality.py", minutes,
                                    "benchmarks/results/quality_curves.png" if plot else None, recipes)
    (out / "quality_readme.md").write_text(section)
    data_out = {"settings": settings, "machine": info, "extra": extra, "budgets": {k: asdict(v) for k, v in
                budgets.items()}, "methods": methods, "plan": json.loads(json.dumps(plan, default=list)),
                "runs": {k: asdict(v) for k, v in results.items()}, "missing": missing, "targets": targets}
    common.write_outputs(out, NAME, markdown, data_out)
    if args.update_readme:
        report.update_readme(readme, section)
        print(f"rewrote the quality section of {readme}", file=sys.stderr)
    print(markdown)


def report_markdown(results, missing, methods, budgets, plan, settings, info, extra, targets, plot, smoke) -> str:
    from qualitybench import report

    model = "tiny random Llama (smoke test: numbers mean nothing)" if smoke else "SmolLM2-135M-Instruct"
    lines = common.header(f"Quality after pruning and recovery: {model}", info)
    lines += [
        f"Evaluation: perplexity on the first {settings['windows']} windows of {settings['eval_seq_len']} tokens of "
        f"`wiki_demo.txt` and of the held-out C4 documents [0:{settings['c4_eval_docs']}); training and calibration "
        f"read C4 [{settings['c4_train_docs'][0]}:{settings['c4_train_docs'][1]}) and Alpaca. LoRA r="
        f"{settings['lora_r']} on the 7 projections for every trained run, seeded before the adapters exist. "
        "x dense = perplexity after recovery over the dense model's; sparsity = fraction of the prunable "
        "parameters removed (reached); structures marked (set) were set by the plan, not the method's own; "
        "pruning stage s = `prune_model` (one shot), the steps of the pruning stage (progressive: training, "
        "scoring, mask updates and compensation), or Torch-Pruning's scoring and pruning. 0-shot = average over "
        "PIQA, ARC-Easy, WinoGrande, HellaSwag (`zeroshot_dev/`, "
        + (f"first {settings['zero_shot_limit']} rows of each" if settings.get("zero_shot_limit") else "all rows")
        + "; WinoGrande counts its acc in the acc_norm average).", ""]
    dense = report.dense_of(results)
    if dense is not None:
        acc, acc_norm = report.zero_shot_average(dense)
        lines += [f"Dense: {dense.params / 1e6:.1f}M parameters, perplexity wiki {dense.after_recovery['wiki']:.2f}, "
                  f"C4 {dense.after_recovery['c4']:.2f}" + (f", zero-shot average acc {report.percent(acc)}, acc_norm "
                                                             f"{report.percent(acc_norm)}" if acc is not None else "")
                  + ".", ""]
    lines += ["## Targets (issue #11; perplexity after recovery on both held-out sets)", "",
              common.table(["target", "measured", "result"], targets, "lll"), ""]
    for name, budget in budgets.items():
        if name not in plan:
            continue
        what = ("one shot, no recovery: `prune_model` / Torch-Pruning from the same calibration batches" if
                budget.one_shot else
                f"{budget.steps} optimizer steps of {budget.batch_size} x {budget.seq_len} tokens, data "
                f"`{budget.data}` read in order; hfprune: {budget.pruning_steps} progressive pruning steps (masks "
                f"every {budget.prune_every}), then recovery; Torch-Pruning: one shot from those "
                f"{budget.pruning_steps} batches, then LoRA on the {budget.steps - budget.pruning_steps} batches "
                f"after them (hfprune's recovery steps); AdamW lr {budget.learning_rate}, "
                f"linear decay, {budget.warmup_steps} warm-up steps"
                + (f"; perplexity every {budget.eval_every} steps (the curve)" if budget.eval_every else ""))
        lines += [f"## Budget `{name}`", "", what + ".", "", report.budget_table(results, name, budget), ""]
    if plot:
        lines += [f"![perplexity against recovery steps]({plot.name})", ""]
    zero_shot = report.zero_shot_table(results)
    if zero_shot:
        lines += ["## Zero-shot accuracy (%)", "", zero_shot, ""]
    used = list(dict.fromkeys(m for entry in plan.values() for m in entry["methods"]))
    lines += ["## Methods", "", report.methods_table(methods, used), "", "## Notes", "",
              "- Torch-Pruning prunes MLP channels only (attention projections in `ignored_layers`): asked to remove "
              f"SmolLM2's grouped-query attention heads (`prune_num_heads=True`, as in its LLM example) it "
              f"{extra['tp_head_error']}.",
              "- Runs on the 8-bit base are evaluated after recovery on the exported checkpoint (LoRA merged into "
              "the fp32 weights); their after-pruning and in-loop values are the in-memory 8-bit model.",
              "- s/step = median wall time of one optimizer step (end-of-step callbacks included) on this shared "
              "machine; see the load averages above."]
    lines += [f"- {r.key}: {r.note}" for r in results.values() if r.note]
    if missing:
        lines += [f"- Not measured yet (in PLAN; run its budget): {', '.join(missing)}."]
    total = sum(r.total_seconds for r in results.values())
    lines += ["", f"Wall time of the runs shown: {total / 60:.1f} min (training "
              f"{sum(r.train_seconds for r in results.values()) / 60:.1f} min, evaluation "
              f"{sum(r.eval_seconds for r in results.values()) / 60:.1f} min)."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
