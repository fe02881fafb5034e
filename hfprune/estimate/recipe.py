"""What a recipe will run, as `estimate_memory` settings: its criterion, base, sequence length,
micro-batch, LoRA and checkpointing. `hfprune estimate RECIPE.yaml` and `hfprune plan` use it."""

from __future__ import annotations

from typing import Any, Optional

from ..structure.arch import PROJECTION_ROLES
from .memory import estimate_memory
from .report import MemoryEstimate
from .settings import DTYPE_BYTES, CriterionCost


def recipe_settings(recipe) -> dict[str, Any]:
    """`estimate_memory` keyword arguments for what `recipe` runs (its own defaults resolved as the
    run resolves them: PruningTrainer's 8-bit rule, the default LoRA when the recipe has none)."""
    model, training, lora = recipe.model, recipe.training, recipe.lora
    criterion = recipe.pruning.importance
    cost = CriterionCost.of(criterion)
    load_in_4bit = bool(model.load_in_4bit)
    load_in_8bit = model.load_in_8bit
    if load_in_8bit is None:  # PruningTrainer's default
        load_in_8bit = not load_in_4bit and not cost.full_gradients
    if lora is None and (cost.needs == "lora_gradients" or load_in_8bit or load_in_4bit):
        # PruningTrainer adds the default adapters: the criterion reads them, a quantized base trains only them
        from ..adapters import default_lora_config

        lora = default_lora_config()
    settings = {
        "criterion": criterion,
        "load_in_8bit": bool(load_in_8bit),
        "load_in_4bit": load_in_4bit,
        "seq_len": recipe.data.max_length,
        "batch_size": training.per_device_train_batch_size,
        "gradient_checkpointing": bool(training.gradient_checkpointing),
        "compute_dtype": model.dtype if model.dtype in DTYPE_BYTES else "bfloat16",
        "optimizer": _optimizer(training.optim),
        "lora_r": 0,
        "compensation": recipe.pruning.compensation,
        "protected_layers": recipe.pruning.protected_layers,
    }
    if load_in_4bit:
        settings["double_quant"] = bool(model.bnb_4bit_use_double_quant)
    if model.attn_implementation:
        # fused kernels (flash attention, ...) keep what SDPA keeps
        settings["attn_implementation"] = "eager" if model.attn_implementation == "eager" else "sdpa"
    if lora is not None:
        settings.update(lora_r=lora.r, lora_target_modules=_lora_roles(lora.target_modules),
                        lora_dropout=float(lora.lora_dropout or 0.0))
    return settings


def estimate_recipe(recipe, shapes: Optional[Any] = None, **overrides) -> MemoryEstimate:
    """`estimate_memory` for what `recipe` runs; `shapes`: its model (a `ModelShapes`, a model or a
    config; default: the recipe's `model.model_config`, else `model.name_or_path`); `overrides`
    replace settings."""
    source = shapes if shapes is not None else recipe_model_source(recipe)
    return estimate_memory(source, **{**recipe_settings(recipe), **overrides})


def recipe_model_source(recipe) -> str:
    """Where the recipe's model is measured from: `model.model_config`, else `model.name_or_path`."""
    return recipe.model.model_config or recipe.model.name_or_path


def _optimizer(optim: Any) -> str:
    name = str(getattr(optim, "value", optim)).lower()
    if "8bit" in name:
        return "adamw_8bit"
    if "adam" in name:
        return "adamw"
    if name.startswith("sgd"):
        return "sgd"
    raise ValueError(f"training.optim={name!r}: the estimator models AdamW (adamw_*), 8-bit AdamW (*8bit) and SGD")


def _lora_roles(target_modules: Any) -> tuple[str, ...]:
    """The projection roles a LoRA config adapts (module names, or peft's "all-linear")."""
    if target_modules == "all-linear":
        return PROJECTION_ROLES
    if isinstance(target_modules, str):
        raise ValueError(f"lora.target_modules={target_modules!r}: the estimator needs a list of module names")
    others = sorted(set(target_modules) - set(PROJECTION_ROLES))
    if others:
        raise ValueError(f"lora.target_modules: {others} are not among the projections the estimator models "
                         f"({', '.join(PROJECTION_ROLES)})")
    return tuple(role for role in PROJECTION_ROLES if role in set(target_modules))
