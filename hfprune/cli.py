"""The `hfprune` command: prune, plan, eval, push, export, estimate.

    hfprune prune RECIPE.yaml|RECIPE_NAME [section.key=value ...] [--dry-run]
    hfprune plan RECIPE.yaml|RECIPE_NAME|MODEL_CONFIG [section.key=value ...] [--steps N] [--per-layer]
    hfprune eval MODEL --ppl-source FILE ... [--seq-len N] [--max-windows N] [--baseline MODEL] [--speed] [--tasks ...]
                 [--zero-shot-dev DIR]
    hfprune push DIR REPO_ID [--private] [--token TOKEN]
    hfprune export CHECKPOINT_DIR --to gguf [--outtype f32|f16|q8_0] [-o FILE] [--overwrite] [--tokenizer-from BASE.gguf]
    hfprune estimate MODEL_OR_CONFIG|RECIPE.yaml [--criterion lora] [--load-in-8bit|--load-in-4bit] [--seq-len N]

Errors are one line on stderr and exit status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

EXIT_ERROR = 2
EXPORT_FORMATS = ("gguf",)

_OVERRIDE_HELP = (
    "overrides of recipe keys, dotted and YAML-parsed: pruning.target_sparsity=0.5 training.max_steps=100 "
    "data.train.0.weight=2"
)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):  # a default that depends on the recipe says so itself
            return action.help
        return super()._get_help_string(action)


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=100)


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="hfprune",
        description="Structured pruning of Hugging Face causal LMs (LoRAPrune / LLM-Pruner criteria) inside a Trainer.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"hfprune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from .recipes import schema_text, shipped_recipes

    prune = commands.add_parser(
        "prune",
        help="run a YAML recipe: prune while training, export, evaluate, push",
        description=_wrap(
            "Run a recipe end to end: every cheap check first (recipe keys and types, data fields, output "
            "directories, the plan on the meta device), then load the model, prune and recover with "
            "PruningTrainer, export the smaller checkpoint, evaluate dense vs pruned (eval section) and push "
            "(hub section)."
        ),
        epilog=("recipe sections (hfprune/recipes/sections.py):\n" + schema_text()
                + "\n\nshipped recipes, by name: " + ", ".join(shipped_recipes())),
        formatter_class=_Formatter,
    )
    prune.add_argument("recipe", metavar="RECIPE.yaml",
                       help="the recipe file, or a shipped recipe by name (llama-7b-20)")
    prune.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDE_HELP)
    prune.add_argument("--dry-run", action="store_true",
                       help="stop after the checks and the plan: no model is loaded, nothing is written")
    prune.add_argument("--json", metavar="FILE", help="also write the run's summary as JSON to FILE")

    plan = commands.add_parser(
        "plan",
        help="dry-run a recipe (or a model config) on the meta device: widths, parameters, schedule, format",
        description=_wrap(
            "Build the model at full size on PyTorch's meta device (no weights, no download: a 65B model in "
            "seconds), run discovery, the schedule, the allocation with placeholder scores (zero, ties by "
            "index), the physical removal and the export config, and print the per-layer widths, parameter "
            "counts, mask-update steps, checkpoint format and memory estimate."
        ),
        formatter_class=_Formatter,
    )
    plan.add_argument("recipe", metavar="RECIPE.yaml|MODEL_CONFIG",
                      help="a recipe (file, or a shipped recipe by name: llama-65b-50), or a model config: short "
                           "name from hfprune/model_configs (llama-65b), config.json path or hub id")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDE_HELP)
    plan.add_argument("--dry-run", action="store_true", help="accepted for symmetry with `prune`: a plan is always dry")
    plan.add_argument("--steps", type=_positive_int, metavar="N",
                      help="optimizer steps of the run (default: training.max_steps, or estimated from the data)")
    plan.add_argument("--world-size", type=_positive_int, metavar="N",
                      help="data-parallel processes (default: $WORLD_SIZE or 1)")
    plan.add_argument("--with-lora", action="store_true",
                      help="also add the recipe's LoRA adapters on meta and slice them")
    plan.add_argument("--per-layer", action="store_true", help="one row per layer instead of runs of equal layers")
    plan.add_argument("--no-memory", action="store_true", help="leave out the memory estimate")
    plan.add_argument("--json", metavar="FILE", help="also write the plan as JSON to FILE")

    evaluate = commands.add_parser(
        "eval",
        help="perplexity, zero-shot accuracy and speed of a checkpoint (and its dense baseline)",
        description=_wrap(
            "Evaluate MODEL (a checkpoint directory or hub id) and, with --baseline, its dense parent with the "
            "same settings, one model in memory at a time. Perplexity follows LLM-Pruner/LoRAPrune: joined "
            "text, non-overlapping windows of --seq-len tokens, last partial window dropped. When MODEL is a "
            "checkpoint written by hfprune, the results also go into its pruning_report.json and model card."
        ),
        formatter_class=_Formatter,
    )
    evaluate.add_argument("model", metavar="MODEL", help="checkpoint directory or hub id")
    evaluate.add_argument("--ppl-source", action="append", default=[], metavar="SOURCE",
                          help="perplexity source, repeatable: wikitext2, ptb, c4 or a .txt/.jsonl/.json file")
    evaluate.add_argument("--seq-len", type=int, metavar="N", default=2048, help="perplexity window in tokens")
    evaluate.add_argument("--max-windows", type=int, metavar="N", help="evaluate at most this many windows per source")
    evaluate.add_argument("--tail", choices=("drop", "include"), default="drop", help="the last partial window")
    evaluate.add_argument("--batch-size", type=int, metavar="N", default=1, help="perplexity windows per forward pass")
    evaluate.add_argument("--baseline", metavar="MODEL", help="dense model evaluated with the same settings")
    evaluate.add_argument("--speed", action="store_true", help="measure prefill and decode speed")
    evaluate.add_argument("--speed-prompt-len", type=int, metavar="N", default=512, help="prompt tokens for --speed")
    evaluate.add_argument("--speed-new-tokens", type=int, metavar="N", default=64, help="greedy new tokens for --speed")
    evaluate.add_argument("--speed-repeats", type=int, metavar="N", default=5,
                          help="timed rounds for --speed (median reported)")
    evaluate.add_argument("--tasks", nargs="+", default=[], metavar="TASK",
                          help="lm-eval zero-shot tasks, e.g. boolq piqa")
    evaluate.add_argument("--task-dir", help="folder of extra lm-eval task YAMLs (offline tasks)")
    evaluate.add_argument("--zero-shot-batch-size", type=_batch_size, metavar="N|auto", default=16,
                          help="lm-eval requests per forward pass (a few hundred tokens each; auto: the largest "
                               "that fits the GPU)")
    evaluate.add_argument("--zero-shot-dev", metavar="DIR",
                          help="score the local PIQA / ARC-Easy / WinoGrande / HellaSwag slices in DIR (a zeroshot_dev "
                               "folder) with hfprune's own scorer, lm-eval's task definitions")
    evaluate.add_argument("--zero-shot-dev-tasks", nargs="+", metavar="TASK",
                          help="the --zero-shot-dev suites to score (default: all of them)")
    evaluate.add_argument("--zero-shot-limit", type=float, metavar="N",
                          help="rows per zero-shot task (lm-eval: count, or fraction if < 1; --zero-shot-dev: count)")
    evaluate.add_argument("--output", metavar="FILE.json", help="write the report as JSON (and a .md table beside it)")
    evaluate.add_argument("--no-record", action="store_true",
                          help="when MODEL is a local hfprune checkpoint, do not write the results into its "
                               "pruning_report.json and model card")
    evaluate.add_argument("--device", help="device (default: cuda if available, else cpu)")
    evaluate.add_argument("--dtype", default="auto", help="dtype to load the models in")
    evaluate.add_argument("--trust-remote-code", action="store_true", help="allow modeling code from the checkpoints")

    push = commands.add_parser(
        "push",
        help="upload a pruned checkpoint with its model card",
        description=_wrap("Push a checkpoint written by `hfprune prune` (or save_pruned) to the Hub, with a "
                            "model card built from its pruning_report.json."),
        formatter_class=_Formatter,
    )
    push.add_argument("directory", metavar="DIR", help="the checkpoint directory")
    push.add_argument("repo_id", metavar="REPO_ID", help="target repository, e.g. you/llama-7b-pruned-20")
    push.add_argument("--private", action="store_true", default=None, help="create the repository private")
    push.add_argument("--token", help="hub token (default: $HF_TOKEN or the stored login)")
    push.add_argument("--revision", help="branch to commit to (created from main if missing)")
    push.add_argument("--commit-message", help="commit title (default: one naming the sparsity and base model)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")

    export = commands.add_parser(
        "export",
        help="convert a checkpoint for an inference engine: GGUF for llama.cpp, Ollama, LM Studio",
        description=_wrap(
            "Write a checkpoint (from `hfprune prune` / save_pruned, or a stock one) as one GGUF file. Uniform "
            "checkpoints become their family's llama.cpp architecture; heterogeneous Llama, Mistral and Qwen2 "
            "ones become llama.cpp's `deci`, which reads every layer's head and MLP widths. Every check runs "
            "before the first tensor is read; the file is written to a temporary path and renamed into place."
        ),
        formatter_class=_Formatter,
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="the safetensors checkpoint directory")
    export.add_argument("--to", required=True, metavar="FORMAT", help=f"target format: {', '.join(EXPORT_FORMATS)}")
    export.add_argument("--outtype", default="f16", metavar="TYPE",
                        help="type of the weight matrices: f32, f16 or q8_0 (norms and vectors stay f32)")
    export.add_argument("-o", "--output", metavar="FILE",
                        help="the file to write (default: CHECKPOINT_DIR-OUTTYPE.gguf beside the directory)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    export.add_argument("--tokenizer-from", metavar="BASE.gguf",
                        help="reuse the tokenizer metadata of a GGUF of the unpruned model instead of building it "
                             "from the checkpoint's tokenizer.json")

    from .importance.names import criterion_names  # torch-free: --help stays fast

    estimate = commands.add_parser(
        "estimate",
        help="accelerator memory of pruning a model, LoRA criterion vs full-gradient Taylor",
        description=_wrap(
            "Peak memory of one pruning step (weights, LoRA, optimizer, activations, loss, scoring) without "
            "loading a weight: the model is built on the meta device from its config. Give a model config and "
            "the settings, or a recipe (its criterion, base, data.max_length, micro-batch, LoRA and "
            "checkpointing; the flags override them). Followed by LoRAPrune's setting (lora, 8-bit base) "
            "against LLM-Pruner's (taylor, bf16)."
        ),
        formatter_class=_Formatter,
    )
    estimate.add_argument("model", metavar="MODEL_OR_CONFIG|RECIPE.yaml",
                          help="short name from hfprune/model_configs (llama-65b), config.json path, hub id, "
                               "or a recipe")
    estimate.add_argument("--criterion", choices=criterion_names(), metavar="NAME",
                          help="a registered importance criterion: " + ", ".join(criterion_names())
                               + " (default: lora, or the recipe's)")
    estimate.add_argument("--load-in-8bit", action=argparse.BooleanOptionalAction, default=None,
                          help="8-bit base (default: on unless --load-in-4bit or the criterion needs full weight "
                               "gradients, as PruningTrainer loads it; or the recipe's model.load_in_8bit)")
    estimate.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                          help="4-bit base (bitsandbytes NF4/FP4, QLoRA-style; not with full-gradient criteria) "
                               "(default: off, or the recipe's model.load_in_4bit)")
    estimate.add_argument("--double-quant", action="store_true",
                          help="4-bit with double quantization (bnb_4bit_use_double_quant)")
    estimate.add_argument("--seq-len", type=int, metavar="N", help="tokens per sequence (default: 512, or the "
                                                                   "recipe's data.max_length)")
    estimate.add_argument("--batch", type=int, metavar="N",
                          help="sequences per micro-batch (default: 1, or the recipe's per_device_train_batch_size)")
    estimate.add_argument("--lora-r", type=int, metavar="N", help="LoRA rank (default: 8, or the recipe's)")
    estimate.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                          help="keep only each layer's input and recompute (default: on, or the recipe's)")
    from .config import COMPENSATIONS  # torch-free

    estimate.add_argument("--compensation", choices=COMPENSATIONS,
                          help="PruningConfig.compensation: auto and least_squares keep Gram matrices in host "
                               "memory (default: auto, or the recipe's)")
    estimate.add_argument("--gpu-gb", type=float, metavar="GB", default=80,
                          help="GPU size for the fits / does not fit verdict")
    return parser


# ---- commands ---------------------------------------------------------------------------------------------


def _cmd_prune(args) -> int:
    from .job import run_recipe
    from .recipes import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, check_device=not args.dry_run)
    summary = run_recipe(recipe, dry_run=args.dry_run)
    if args.json:
        _write_json(args.json, summary)
    return 0


def _is_recipe(target: str) -> bool:
    from .recipes import shipped_recipes

    return (target.endswith((".yaml", ".yml")) or os.path.isfile(target) and not target.endswith(".json")
            or not os.path.exists(target) and target in shipped_recipes())


def _load_plan_target(target: str, overrides: list[str]):
    """A recipe file, or a bare model config planned with the recipe defaults (and the overrides)."""
    from .recipes import load_recipe

    if _is_recipe(target):
        return load_recipe(target, overrides, check_device=False)
    return load_recipe({"name": os.path.basename(target.rstrip("/")).removesuffix(".json"),
                        "model": {"name_or_path": target, "model_config": target}}, overrides, check_device=False)


def _cmd_plan(args) -> int:
    from .plan import dry_run

    recipe = _load_plan_target(args.recipe, args.overrides)
    # A bare model config has no training settings worth estimating memory for: `hfprune estimate` does that.
    memory = not args.no_memory and _is_recipe(args.recipe)
    result = dry_run(recipe, total_steps=args.steps, with_lora=args.with_lora, memory=memory,
                     world_size=args.world_size)
    print(result.to_text(per_layer=args.per_layer))
    if args.json:
        _write_json(args.json, result.to_dict())
    return 0


def _cmd_eval(args) -> int:
    from .evaluation import run_eval
    from .evaluation.multiple_choice import ZERO_SHOT_DEV_TASKS
    from .model_source import check_model_source

    if not args.ppl_source and not args.tasks and not args.zero_shot_dev and not args.speed:
        raise ValueError("nothing to measure: give --ppl-source SOURCE, --tasks TASK ..., --zero-shot-dev DIR or --speed")
    check_model_source(args.model, "MODEL")
    if args.baseline:
        check_model_source(args.baseline, "--baseline")
    speed = False
    if args.speed:
        speed = {"prompt_len": args.speed_prompt_len, "new_tokens": args.speed_new_tokens,
                 "repeats": args.speed_repeats}
    limit = args.zero_shot_limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    _register_pruned_classes()
    report = run_eval(
        args.model, sources=args.ppl_source, seq_len=args.seq_len, tasks=args.tasks, speed=speed,
        output=args.output, baseline=args.baseline, batch_size=args.batch_size, max_windows=args.max_windows,
        tail=args.tail, task_dir=args.task_dir, zero_shot_limit=limit, zero_shot_dev=args.zero_shot_dev,
        zero_shot_dev_tasks=args.zero_shot_dev_tasks or ZERO_SHOT_DEV_TASKS, device=args.device, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, zero_shot_batch_size=args.zero_shot_batch_size,
    )
    print(report.to_markdown())
    if args.output:
        print(f"report written to {args.output}")
    report_file = _own_report_file(args.model)
    if report_file is not None and not args.no_record:
        from .model_card import record_evaluation

        record_evaluation(args.model, report)
        print(f"results recorded in {report_file} and its model card")
    return 0


def _own_report_file(path: str) -> Optional[str]:
    """pruning_report.json of a local hfprune checkpoint; None for a hub id, another checkpoint, or a
    snapshot in the Hugging Face cache (its files are links into the cache, not the user's to rewrite)."""
    from .report import REPORT_FILE

    report = os.path.join(path, REPORT_FILE)
    return report if os.path.isfile(report) and not os.path.islink(report) else None


def _cmd_push(args) -> int:
    from .atomic import recover_directory

    recover_directory(args.directory)  # an export killed half-way: finished or rolled back first
    if not os.path.isdir(args.directory):
        raise FileNotFoundError(f"{args.directory!r}: no such checkpoint directory")
    _refuse_pickles(args.directory)
    from .hub import push_pruned

    commit = push_pruned(args.directory, args.repo_id, token=args.token, private=args.private,
                         revision=args.revision, commit_message=args.commit_message, create_pr=args.create_pr)
    url = getattr(commit, "pr_url", None) if args.create_pr else None
    print(f"pushed {args.directory} to {args.repo_id}: {url or commit}")
    return 0


def _cmd_export(args) -> int:
    if args.to not in EXPORT_FORMATS:
        raise ValueError(f"--to {args.to!r}: unknown format; available: {', '.join(EXPORT_FORMATS)}")
    from .atomic import recover_directory
    from .export import export_gguf

    recover_directory(args.checkpoint)  # an export killed half-way: finished or rolled back first
    output = args.output or f"{os.path.normpath(args.checkpoint)}-{args.outtype}.gguf"
    path = export_gguf(args.checkpoint, output, outtype=args.outtype, tokenizer_from=args.tokenizer_from,
                       overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _cmd_estimate(args) -> int:
    from .estimate import (
        compare_criteria, comparison_markdown, estimate_memory, model_shapes, recipe_model_source, recipe_settings,
    )

    given = {name: value for name, value in (
        ("criterion", args.criterion), ("load_in_8bit", args.load_in_8bit), ("load_in_4bit", args.load_in_4bit),
        ("seq_len", args.seq_len), ("batch_size", args.batch), ("lora_r", args.lora_r),
        ("gradient_checkpointing", args.gradient_checkpointing), ("compensation", args.compensation),
    ) if value is not None}
    if args.double_quant:
        given["double_quant"] = True
    if _is_recipe(args.model):
        from .recipes import load_recipe

        recipe = load_recipe(args.model, check_device=False)
        source = recipe_model_source(recipe)
        settings = {**recipe_settings(recipe), **given}
        if "criterion" in given and recipe.model.load_in_8bit is None:
            settings.pop("load_in_8bit")  # PruningTrainer's default for the criterion asked for
        label = recipe.model.name_or_path
        print(f"Settings of recipe {args.model} (flags override them):\n")
    else:
        source, settings, label = args.model, given, args.model
    # One quantized base: asking for one turns the other off unless it was asked for too.
    for flag, other in (("load_in_4bit", "load_in_8bit"), ("load_in_8bit", "load_in_4bit")):
        if given.get(flag) and other not in given:
            settings[other] = False
    shapes = model_shapes(source)
    estimate = estimate_memory(shapes, **settings)
    gpu_bytes = args.gpu_gb * 1e9
    print(estimate.to_markdown())
    print(f"\nFits one {args.gpu_gb:g} GB GPU: {'yes' if estimate.fits(gpu_bytes) else 'no'} "
          "(with ~1 GiB CUDA context and 5% allocator slack)")
    s = estimate.settings
    comparison = compare_criteria(shapes, seq_len=s["seq_len"], batch_size=s["batch_size"], lora_r=s["lora_r"] or 8,
                                  gradient_checkpointing=s["gradient_checkpointing"])
    print("\nLoRAPrune (lora, 8-bit base) vs LLM-Pruner (taylor, bf16 weights and full gradients):\n")
    print(comparison_markdown({label: comparison}, gpu_bytes=gpu_bytes))
    return 0


COMMANDS = {"prune": _cmd_prune, "plan": _cmd_plan, "eval": _cmd_eval, "push": _cmd_push, "export": _cmd_export,
            "estimate": _cmd_estimate}


# ---- helpers ----------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be an integer >= 1")
    return value


def _batch_size(text: str):
    return text if text == "auto" else _positive_int(text)


def _refuse_pickles(path: Optional[str]) -> None:
    """A local checkpoint holding pickles is refused before anything is loaded from it."""
    if path and os.path.isdir(path):
        from .model_source import check_no_pickles

        check_no_pickles(path)


def _register_pruned_classes() -> None:
    try:
        from .export import register_auto_classes
    except ImportError:  # pragma: no cover
        return
    register_auto_classes()


def _write_json(path: str, data) -> None:
    from .atomic import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def _one_line(error: BaseException) -> str:
    """The error as one line: ValueErrors (recipe, config, data errors) speak for themselves,
    other exceptions keep their type name (FileExistsError: ..., ImportError: ...)."""
    message = " ".join(str(error).split())
    if not message:
        return type(error).__name__
    if isinstance(error, ValueError):
        return message
    return f"{type(error).__name__}: {message}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `hfprune` command; returns the exit status (0, or 2 on any error)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors (argparse prints them)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_ERROR
    if args.command in ("prune", "plan", "export", "eval"):
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("hfprune").setLevel(logging.INFO)
    if args.command == "prune":
        # The Trainer's start-of-training block and hfprune's run summary (hfprune/summary.py) go there.
        logging.getLogger("transformers.trainer").setLevel(logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"hfprune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line, no traceback: the message names the bad value and the fix
        if args.debug or os.environ.get("HFPRUNE_DEBUG"):
            raise
        print(f"hfprune {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
