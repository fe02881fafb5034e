"""Rules no single config class enforces: across sections, and TrainingArguments values that
transformers only finds wrong after the model is loaded."""

from __future__ import annotations

import math
import re

from ..adapters import DEFAULT_LORA_TARGETS
from .errors import RecipeError, one_line
from .sections import DataSection


def check_consistency(recipe) -> None:
    """Raise RecipeError for the first rule `recipe` (a `Recipe`) breaks."""
    from ..importance import check_scores_in_training, get_importance

    where, pruning, model = recipe.source, recipe.pruning, recipe.model
    try:
        criterion = get_importance(pruning.importance)
        check_scores_in_training(pruning.importance, criterion)  # recipes always train
    except ValueError as error:
        raise RecipeError(f"{where}: pruning.importance: {one_line(error)}") from None
    for flag, kind in (("load_in_8bit", "an 8-bit"), ("load_in_4bit", "a 4-bit")):
        if criterion.needs_weight_gradients and getattr(model, flag):
            raise RecipeError(
                f"{where}: model.{flag}=true with pruning.importance={pruning.importance!r}: this criterion needs "
                f"full weight gradients, which {kind} base cannot have; set model.{flag}: false or "
                "pruning.importance: lora (or activation_taylor)"
            )
    check_training(recipe.training, where)
    training = recipe.training
    if getattr(training, "fsdp", None) or getattr(training, "deepspeed", None):
        which = "training.fsdp" if getattr(training, "fsdp", None) else "training.deepspeed"
        raise RecipeError(
            f"{where}: {which}: sharded training is not supported by hfprune prune: slicing needs whole "
            "parameters, which FSDP / DeepSpeed ZeRO keep as shards; use data parallelism (accelerate launch / "
            "torchrun without FSDP or DeepSpeed), or FSDP2 with importance='activation_taylor' through the Python "
            "API (PruningTrainer / PruningCallback; exported from the original checkpoint), see docs/distributed.md"
        )
    if pruning.importance == "lora":
        missing = _lora_missing_roles(recipe.lora)
        if missing:
            raise RecipeError(
                f"{where}: lora.target_modules={_target_modules(recipe.lora)!r}: importance='lora' reads the LoRA "
                f"factors of every projection it prunes, but {missing} carry no adapter; use target_modules: "
                f"[{', '.join(DEFAULT_LORA_TARGETS)}] (or all-linear), or another pruning.importance"
            )
        if getattr(recipe.lora, "use_dora", False):
            raise RecipeError(f"{where}: lora.use_dora=true: DoRA layers cannot be pruned; use plain LoRA")
    if pruning.uniform and recipe.export.uniform is False:
        raise RecipeError(
            f"{where}: pruning.uniform=true with export.uniform=false: a uniform model exports a stock config"
        )


def check_training(args, where: str) -> None:
    """Batch sizes and the learning rate: TrainingArguments takes 0 and negatives, the run fails (or diverges)."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if value < 1:
            raise RecipeError(f"{where}: training.{name}={value}: must be an integer >= 1")
    if not (math.isfinite(args.learning_rate) and args.learning_rate >= 0):
        raise RecipeError(f"{where}: training.learning_rate={args.learning_rate}: must be a finite number >= 0")


def check_phases(data: DataSection, training_raw: dict, where: str) -> None:
    """`mixing: phases` trains on each source in turn (LoRAShear's two-phase recovery: text, then instructions)."""
    weighted = [i for i, source in enumerate(data.train) if source.weight is not None]
    if weighted:
        raise RecipeError(
            f"{where}: data.train[{weighted[0]}].weight with data.mixing=phases: phases run one source after the "
            "other, so weights mean nothing; size each phase with max_samples, or use mixing: first_exhausted"
        )
    strategy = training_raw.get("train_sampling_strategy", "random")
    if strategy not in ("random", "sequential"):
        raise RecipeError(
            f"{where}: training.train_sampling_strategy={strategy!r} with data.mixing=phases: phases need the "
            "sequential sampler (set automatically); remove the key or set it to sequential"
        )


def _target_modules(lora):
    modules = getattr(lora, "target_modules", None)
    return sorted(modules) if isinstance(modules, (set, frozenset)) else modules


def _lora_missing_roles(lora) -> list[str]:
    if lora is None:
        return list(DEFAULT_LORA_TARGETS)
    modules = lora.target_modules
    if modules is None:
        return list(DEFAULT_LORA_TARGETS)
    if isinstance(modules, str):
        if modules == "all-linear":
            return []
        # A regular expression over module names: check it the way peft will.
        return [role for role in DEFAULT_LORA_TARGETS if not re.fullmatch(modules, f"model.layers.0.self_attn.{role}")
                and not re.fullmatch(modules, f"model.layers.0.mlp.{role}")]
    names = set(modules)
    return [role for role in DEFAULT_LORA_TARGETS if not any(name == role or name.endswith("." + role) for name in names)]
