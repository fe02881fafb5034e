"""`run_recipe`: a recipe, end to end, in five steps, each one function called in this order:

    check(recipe)              everything that needs no model weights: output directories, hub token,
                               evaluation sources, the tokenizer, every data source and its fields
                               (tokenised here), the plan on the meta device (feasibility, schedule,
                               export format)
    train(recipe, inputs)      load the model, PruningTrainer(...).train(): progressive pruning + recovery
    export(recipe, trained)    trainer.save_model(...): the checkpoint, exactly as the Python API writes it
    evaluate(recipe, ...)      dense vs pruned, one model in memory at a time, recorded in the checkpoint's
                               pruning_report.json and model card                            (recipe.eval)
    push(recipe, export_dir)   push_pruned(...)                                               (recipe.hub)

Nothing expensive happens before every cheap check has passed, so a typo costs seconds,
not a model load.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .recipes import Recipe
from .report import PruningReport

logger = logging.getLogger(__name__)

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass
class JobInputs:
    """What `check` checked and built: everything the run needs but the model."""

    model_path: str
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    total_steps: int
    plan: Any  # hfprune.plan.PlanResult
    resume_from_checkpoint: Any = None
    data_formats: list[str] = field(default_factory=list)


# ---- checks before the model is loaded ----------------------------------------------------------------------


def check_outputs(recipe: Recipe) -> Any:
    """Refuse to clobber an earlier result; return what `train(resume_from_checkpoint=...)` gets."""
    from .atomic import check_export_dir
    from .checkpoints import checkpoint_problem, checkpoints, incomplete_checkpoints, last_complete_checkpoint

    overwrite = recipe.export.overwrite
    export_dir = Path(recipe.export.output_dir)
    training_dir = recipe.training.output_dir
    # First: with overwrite the export would delete the checkpoints, without it fail after training.
    check_export_dir(export_dir, training_dir, "export.output_dir", "training.output_dir")
    if export_dir.exists() and not export_dir.is_dir():
        raise FileExistsError(f"export.output_dir={str(export_dir)!r} exists and is not a directory")
    if export_dir.is_dir() and any(export_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"export.output_dir={str(export_dir)!r} exists and is not empty; pass export.overwrite=true to replace "
            "it, or choose another directory"
        )
    found = checkpoints(training_dir) if training_dir else []
    resume = recipe.training.resume_from_checkpoint
    if resume == "last":
        if last_complete_checkpoint(training_dir) is None:
            skipped = "; ".join(f"{p.name}: {why}" for p, why in incomplete_checkpoints(training_dir).items())
            raise FileNotFoundError(
                f"training.resume_from_checkpoint=last, but training.output_dir={training_dir!r} holds no complete "
                "checkpoint" + (f" ({skipped})" if skipped else "")
            )
        return True
    if resume is not None:
        if not os.path.isdir(resume):
            raise FileNotFoundError(f"training.resume_from_checkpoint={resume!r}: no such checkpoint directory")
        problem = checkpoint_problem(resume)
        if problem is not None:
            last = last_complete_checkpoint(os.path.dirname(os.path.abspath(resume)))
            raise ValueError(
                f"training.resume_from_checkpoint={resume!r} is not a complete checkpoint: {problem} (killed while "
                "writing it?); " + (f"resume from {str(last)!r}" if last else "no complete checkpoint is beside it")
            )
        return resume
    if found and not overwrite:
        raise FileExistsError(
            f"training.output_dir={training_dir!r} holds checkpoints of an earlier run ({found[0].name}); "
            "resume it with training.resume_from_checkpoint=last, or pass export.overwrite=true to start over"
        )
    return None


def check_hub(recipe: Recipe) -> None:
    if not recipe.hub:
        return
    env = recipe.hub.token_env
    if env and not os.environ.get(env):
        raise ValueError(
            f"hub.token_env={env!r}: environment variable {env} is not set (the push would fail at the end)"
        )
    try:
        from .hub import push_pruned  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"hub.repo_id={recipe.hub.repo_id!r} is set but hfprune.hub cannot be imported: {error}"
        ) from None


def check_eval(recipe: Recipe) -> None:
    evaluation = recipe.eval
    if not evaluation:
        return
    from .evaluation.perplexity import HUB_SOURCES

    for source in evaluation.perplexity:
        if source not in HUB_SOURCES and not os.path.isfile(source):
            raise FileNotFoundError(
                f"eval.perplexity: {source!r}: no such file; valid sources are {', '.join(HUB_SOURCES)} or a "
                ".txt/.jsonl/.json file"
            )
    if evaluation.tasks:
        try:
            from .evaluation.zero_shot import _check_tasks, _task_manager
        except ImportError as error:
            raise ImportError(f"eval.tasks needs lm-eval (pip install 'hfprune[eval]'): {error}") from None
        try:
            manager = _task_manager(evaluation.tasks, evaluation.task_dir)
        except ImportError as error:
            raise ImportError(f"eval.tasks needs lm-eval (pip install 'hfprune[eval]'): {error}") from None
        _check_tasks(evaluation.tasks, manager)


def _load_source(source, key: str):
    import datasets

    from .data import load_records

    path = source.path
    if source.local:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}.path={path!r}: no such file")
        suffix = Path(path).suffix.lower()
        if suffix in (".csv", ".parquet", ".arrow"):
            return datasets.load_dataset(suffix[1:], data_files=path, split="train")
        return load_records(path)
    return datasets.load_dataset(path, source.name, split=source.split)


def load_data(recipe: Recipe, split: str, tokenizer, log: Log = _print):
    """The tokenised data set of `data.<split>`: every source checked, tokenised, then mixed."""
    import datasets

    from .data import detect_format, prepare_dataset

    data = recipe.data
    parts, formats = [], []
    for i, source in enumerate(getattr(data, split)):
        key = f"data.{split}[{i}]"
        raw = _load_source(source, key)
        if source.skip_samples:
            raw = raw.select(range(min(source.skip_samples, len(raw)), len(raw)))
        if source.max_samples is not None:
            raw = raw.select(range(min(source.max_samples, len(raw))))
        field_name = source.text_field
        if field_name != "text":
            if field_name not in raw.column_names:
                raise ValueError(
                    f"{key} ({source.path}): text_field={field_name!r} is not a column; columns: {raw.column_names}"
                )
            raw = raw.rename_column(field_name, "text") if "text" not in raw.column_names else raw
        try:
            fmt = detect_format(raw.column_names)
        except ValueError as error:
            raise ValueError(f"{key} ({source.path}): {error}") from None
        if len(raw) == 0:
            raise ValueError(f"{key} ({source.path}): no records")
        log(f"  {key}: {source.path} -- {len(raw)} {fmt} records")
        tokenized = prepare_dataset(raw, tokenizer, data.max_length, data.train_on_prompt, data.num_proc,
                                    what=f"{key} ({source.path})")  # raises when no record is left
        parts.append(tokenized)
        formats.append(fmt)
    if not parts:
        return None, formats
    columns = ("input_ids", "attention_mask", "labels")
    parts = [p.select_columns([c for c in columns if c in p.column_names]) for p in parts]
    if len(parts) == 1:
        return parts[0], formats
    if data.mixing == "phases":
        # One source after the other (the sequential sampler keeps the order), each shuffled within itself.
        seed = recipe.training.seed
        log(f"  data.{split}: {len(parts)} phases of {', '.join(str(len(p)) for p in parts)} examples, in this order")
        return datasets.concatenate_datasets([p.shuffle(seed=seed + i) for i, p in enumerate(parts)]), formats
    weights = [s.weight for s in getattr(data, split)]
    if weights[0] is None:
        return datasets.concatenate_datasets(parts), formats
    total = sum(weights)
    mixed = datasets.interleave_datasets(
        parts, probabilities=[w / total for w in weights], seed=recipe.training.seed, stopping_strategy=data.mixing
    )
    return mixed, formats


def check(recipe: Recipe, log: Log = _print) -> JobInputs:
    """Step 1: every check that needs no model weights; raises before anything expensive happens."""
    from transformers import AutoConfig, AutoTokenizer

    from .model_source import check_model_source
    from .plan import dry_run, steps_for

    if not recipe.data.train:
        raise ValueError(f"{recipe.source}: data.train is empty: give a data file or hub data set to train on")
    resume = check_outputs(recipe)
    check_hub(recipe)
    check_eval(recipe)

    model = recipe.model
    hub_kwargs = {"revision": model.revision} if model.revision else {}
    model_path = check_model_source(model.name_or_path, "model.name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=model.trust_remote_code, **hub_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    log("checking the data")
    with recipe.training.main_process_first(desc="tokenising the data"):
        train, formats = load_data(recipe, "train", tokenizer, log)
        evaluation, _ = load_data(recipe, "eval", tokenizer, log)
    val_size = recipe.data.val_set_size
    if val_size:
        if val_size >= len(train):
            raise ValueError(f"data.val_set_size={val_size}: must be smaller than the {len(train)} training examples")
        split = train.train_test_split(test_size=val_size, seed=recipe.training.seed)
        train = split["train"]
        if evaluation is None:
            evaluation = split["test"]
    args = recipe.training
    if args.max_steps > 0:
        total_steps, steps_source = args.max_steps, "training.max_steps"
    else:
        total_steps = steps_for(len(train), args, args.world_size)
        steps_source = (f"{len(train)} examples x {args.num_train_epochs:g} epochs, batch "
                        f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} x {args.world_size}")

    log("planning on the meta device")
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=model.trust_remote_code, **hub_kwargs)
    plan = dry_run(recipe, model_config=config, total_steps=total_steps, steps_source=steps_source, memory=False)
    log(f"  {plan.num_layers} layers, {plan.params_before / 1e6:.1f}M -> {plan.params_after / 1e6:.1f}M parameters, "
        f"{plan.checkpoint['kind']} checkpoint; {total_steps} optimizer steps, "
        f"{len(plan.schedule['update_steps'])} mask updates")
    return JobInputs(model_path, tokenizer, train, evaluation, total_steps, plan, resume, formats)


# ---- the run --------------------------------------------------------------------------------------------------


def _release_memory() -> None:
    """Collect what the caller just dropped (call it after `del`), so the next model fits."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_recipe(recipe: Recipe, *, dry_run: bool = False, log: Log = _print) -> dict:
    """Run `recipe` end to end and return a summary (see the module docstring).

    dry_run=True stops after the checks and the plan (nothing is loaded or written).
    """
    timings: dict[str, float] = {}
    log(f"[1/5] checking recipe {recipe.name}")
    with _timed(timings, "checks"):
        inputs = check(recipe, log)
    if dry_run:
        log(inputs.plan.to_text())
        return {"recipe": recipe.name, "dry_run": True, "plan": inputs.plan.to_dict(),
                "total_steps": inputs.total_steps}
    log(f"[2/5] loading {recipe.model.name_or_path} and training ({inputs.total_steps} optimizer steps)")
    with _timed(timings, "train"):
        trained = train(recipe, inputs)
    if trained.trainer is None:  # another DDP rank: rank 0 exports, evaluates and pushes
        return {"recipe": recipe.name, "rank": recipe.training.process_index}
    export_dir = Path(recipe.export.output_dir)
    log(f"[3/5] exporting to {export_dir}")
    with _timed(timings, "export"):
        export(recipe, trained, export_dir)
    trained.release()  # one model in memory at a time: the evaluation loads fresh ones

    evaluation = None
    if recipe.eval:
        log("[4/5] evaluating " + ("dense vs pruned" if recipe.eval.dense else "the pruned model"))
        with _timed(timings, "evaluate"):
            evaluation = evaluate(recipe, export_dir, trained.dense_path, log)
    else:
        log("[4/5] no eval section: evaluation skipped")

    hub_url = None
    if recipe.hub:
        log(f"[5/5] pushing to {recipe.hub.repo_id}")
        with _timed(timings, "push"):
            hub_url = push(recipe, export_dir)
    else:
        log("[5/5] no hub section: not pushed")

    saved = PruningReport.from_dir(export_dir)
    summary = {
        "recipe": recipe.name,
        "output_dir": str(export_dir),
        "format": saved.format,
        "parameters": saved.parameters,
        "reached": saved.reached,
        "target_sparsity": recipe.pruning.target_sparsity,
        "train": trained.summary,
        "evaluation": evaluation.to_dict() if evaluation is not None else None,
        "hub_url": hub_url,
        "timings": timings,
    }
    log(summary_text(summary, evaluation))
    return summary


@contextlib.contextmanager
def _timed(timings: dict[str, float], step: str):
    start = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - start


@dataclass
class TrainedRun:
    """What `train` leaves for the later steps. `trainer` is None on ranks other than the main one."""

    trainer: Any
    dense_path: str  # the unpruned model, for the dense side of the evaluation
    summary: dict

    def release(self) -> None:
        self.trainer = None
        _release_memory()


def train(recipe: Recipe, inputs: JobInputs) -> TrainedRun:
    """Step 2: load the model and run PruningTrainer: progressive pruning, physical removal, recovery."""
    from transformers.trainer_utils import set_seed

    from .trainer import PruningTrainer

    set_seed(recipe.training.seed)
    model = recipe.model
    init_kwargs = {"dtype": model.dtype, "trust_remote_code": model.trust_remote_code}
    if model.revision:
        init_kwargs["revision"] = model.revision
    if model.attn_implementation:
        init_kwargs["attn_implementation"] = model.attn_implementation
    if model.device_map is not None:
        init_kwargs["device_map"] = model.device_map
    trainer = PruningTrainer(
        model=inputs.model_path,
        args=recipe.training,
        pruning_config=recipe.pruning,
        peft_config=recipe.lora,
        train_dataset=inputs.train_dataset,
        eval_dataset=inputs.eval_dataset,
        processing_class=inputs.tokenizer,
        load_in_8bit=model.load_in_8bit,
        quantization_config=model.quantization_config(),
        model_init_kwargs=init_kwargs,
        max_length=recipe.data.max_length,
        train_on_prompt=recipe.data.train_on_prompt,
        distillation=recipe.distillation,
    )
    result = trainer.train(resume_from_checkpoint=inputs.resume_from_checkpoint)
    summary = {
        "global_step": trainer.state.global_step,
        "training_loss": getattr(result, "training_loss", None),
        "runtime_s": (result.metrics or {}).get("train_runtime") if result is not None else None,
    }
    dense_path = trainer.original_checkpoint or inputs.model_path
    return TrainedRun(trainer if trainer.is_world_process_zero() else None, dense_path, summary)


def export(recipe: Recipe, trained: TrainedRun, export_dir: Path) -> Path:
    """Step 3: `PruningTrainer.save_model`, the Python API's export, with what only the recipe knows
    (its data sources, the recipe itself) added to the report."""
    trainer = trained.trainer
    trainer.report_metadata = {
        "datasets": [
            {"path": source.path, "name": source.name, "split": source.split, "weight": source.weight}
            for source in recipe.data.train
        ],
        "recipe": recipe_record(recipe),
    }
    return trainer.save_model(
        str(export_dir),
        dtype=recipe.export.dtype,
        max_shard_size=recipe.export.max_shard_size,
        uniform=recipe.export.uniform,
        overwrite=recipe.export.overwrite,
    )


def evaluate(recipe: Recipe, export_dir: Path, dense_path, log: Log = _print):
    """Step 4: measure the checkpoint (and the dense model), then record the results in its report and card."""
    from .model_card import record_evaluation

    evaluation = evaluate_checkpoint(recipe, export_dir, dense_path, log)
    record_evaluation(export_dir, evaluation)
    return evaluation


def push(recipe: Recipe, export_dir: Path) -> Optional[str]:
    """Step 5: upload the checkpoint with its card in one commit; returns the commit URL."""
    from .hub import push_pruned

    env = recipe.hub.token_env
    commit = push_pruned(export_dir, recipe.hub.repo_id, token=os.environ.get(env) if env else None,
                         private=recipe.hub.private)
    return str(commit) if commit is not None else None


# ---- evaluation ---------------------------------------------------------------------------------------------


def _load_for_eval(path, device: str, dtype, trust_remote_code: bool = False, revision: Optional[str] = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": revision} if revision else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, device_map=device, trust_remote_code=trust_remote_code, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
    return model.eval(), tokenizer


def evaluate_checkpoint(recipe: Recipe, export_dir, dense_path, log: Log = _print):
    """Pruned checkpoint (and the dense original) measured with the same settings, one model loaded at a time."""
    from .evaluation import build_report, evaluate_model

    try:
        from .export import register_auto_classes

        register_auto_classes()  # heterogeneous checkpoints load without remote code
    except ImportError:  # pragma: no cover
        pass
    settings = recipe.eval
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    common = dict(
        sources=settings.perplexity, seq_len=settings.seq_len, tasks=settings.tasks, speed=settings.speed,
        batch_size=settings.batch_size, max_windows=settings.max_windows, tail=settings.tail,
        task_dir=settings.task_dir, zero_shot_limit=settings.zero_shot_limit, progress=True,
        zero_shot_batch_size=settings.zero_shot_batch_size,
    )
    log(f"  pruned: {export_dir}")
    model, tokenizer = _load_for_eval(export_dir, device, "auto")
    dtype = model.dtype
    pruned = evaluate_model(model, tokenizer, name="pruned", **common)
    del model, tokenizer
    _release_memory()
    dense = None
    if settings.dense:
        log(f"  dense: {dense_path} ({str(dtype).removeprefix('torch.')}, as the pruned checkpoint)")
        model, tokenizer = _load_for_eval(dense_path, device, dtype, recipe.model.trust_remote_code)
        dense = evaluate_model(model, tokenizer, name="dense", **common)
        del model, tokenizer
        _release_memory()
    report_settings = {k: v for k, v in common.items() if k != "progress"}
    report_settings.update(device=device, dtype=str(dtype).removeprefix("torch."), dense=str(dense_path),
                           pruned=str(export_dir))
    return build_report(pruned, dense, report_settings)


def recipe_record(recipe: Recipe) -> dict:
    """The recipe as written (overrides and ${VAR} applied), for the checkpoint's report; no secrets."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not ("token" in str(k) and k != "token_env")}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return {"name": recipe.name, "file": str(recipe.path) if recipe.path else None, "settings": clean(recipe.raw)}


def summary_text(summary: dict, evaluation=None) -> str:
    parameters = summary.get("parameters") or {}
    reached = summary.get("reached") or {}
    train = summary.get("train") or {}
    rows = [
        ("checkpoint", f"{summary['output_dir']} ({summary.get('format')})"),
        ("parameters", f"{_count(parameters.get('before'))} -> {_count(parameters.get('after'))}"
                       + (f" ({100 * parameters['removed_fraction']:.1f}% removed)"
                          if parameters.get("removed_fraction") is not None else "")),
        ("prunable sparsity", f"{reached.get('sparsity', float('nan')):.4f} (target {summary['target_sparsity']})"),
        ("training", f"{train.get('global_step')} steps, loss {_fmt(train.get('training_loss'))}, "
                     f"{_fmt(train.get('runtime_s'), '.0f')} s"),
    ]
    if summary.get("hub_url"):
        rows.append(("hub", summary["hub_url"]))
    width = max(len(k) for k, _ in rows)
    lines = ["", "hfprune summary", *(f"  {k.ljust(width)}  {v}" for k, v in rows)]
    if evaluation is not None:
        lines += ["", evaluation.to_markdown()]
    return "\n".join(lines)


def _count(value) -> str:
    if value is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _fmt(value, spec: str = ".4f") -> str:
    return "?" if value is None else format(value, spec)
