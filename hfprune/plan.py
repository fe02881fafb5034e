"""Dry runs: what a recipe will do to a model, in seconds, without downloading a weight.

`dry_run(recipe_or_model_config, pruning_config)` builds the model at full size on
PyTorch's meta device (shapes only, no memory: a 65B Llama takes about two
seconds), then runs the real pipeline on it:

    discovery (discover_for_config) -> feasibility (check_feasible) -> the schedule's
    update steps -> masks (allocate) -> physical removal (remove_pruned_groups on meta
    tensors) -> the export config (stock/uniform or heterogeneous)

Scores cannot exist on meta (there are no weights and no gradients), so masks come from
placeholder scores: zero for every group, ties broken by index (the lowest indices are
removed). With `ranking="local"` the number of heads and channels each layer loses does
not depend on the scores, so the widths, parameter counts and checkpoint format are
exactly those of the real run; only *which* heads and channels go differs. With
`ranking="global"` the split across layers depends on the scores: the plan then shows
one feasible split, and only the totals carry over.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from .config import PruningConfig
from .estimate.model_configs import build_meta_model  # noqa: F401  (public here too: plan builds on meta)

PLACEHOLDER_NOTE = (
    "scores are placeholders: zero for every group, ties broken by index (the lowest indices are removed); "
    "the real run removes the lowest-scoring groups instead"
)


@dataclass
class LayerPlan:
    """Widths and projection parameters of one decoder layer, before and after pruning."""

    index: int
    protected: bool
    before: dict[str, int]
    after: dict[str, int]
    params_before: int
    params_after: int


@dataclass
class PlanResult:
    """Everything `dry_run` found out; `to_text()` is what `hfprune plan` prints."""

    model: str
    model_type: str
    num_layers: int
    pruning: dict
    layers: list[LayerPlan]
    params_before: int
    params_after: int
    prunable_params: int
    removed_params: int
    target_sparsity: float
    reached_sparsity: float
    checkpoint: dict
    schedule: Optional[dict] = None
    memory: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def total_sparsity(self) -> float:
        return 1.0 - self.params_after / max(1, self.params_before)

    def to_dict(self, timings: bool = True) -> dict:
        out = asdict(self)
        out["total_sparsity"] = self.total_sparsity
        if not timings:
            out.pop("timings")
        return out

    # ---- text --------------------------------------------------------------------------------------------

    def to_text(self, per_layer: bool = False) -> str:
        p = self.pruning
        lines = [
            f"Plan for {self.model} ({self.model_type}, {self.num_layers} layers): dry run on the meta device, "
            "no weights loaded",
            f"pruning: target_sparsity={p['target_sparsity']} of the prunable parameters, "
            f"importance={p['importance']}, "
            f"structures={'+'.join(p['structures'])} ({p['head_granularity']}), ranking={p['ranking']}, "
            f"protected layers {_ranges(sorted(l.index for l in self.layers if l.protected)) or 'none'}",
            "",
        ]
        lines += self._layer_table(per_layer)
        lines += [
            "",
            f"parameters: {_count(self.params_before)} -> {_count(self.params_after)} "
            f"({-100 * self.total_sparsity:+.1f}% of the model)",
            f"prunable (projections of unprotected layers): {_count(self.prunable_params)}, removed "
            f"{_count(self.removed_params)} = {self.reached_sparsity:.4f} (target {self.target_sparsity:.4f})",
            f"checkpoint: {self.checkpoint['kind']} -- {self.checkpoint['loading']}",
        ]
        if self.checkpoint["kind"] != "heterogeneous":  # (heterogeneous: the table above says why)
            lines.append(f"  ({self.checkpoint['reason']})")
        if self.schedule is not None:
            lines.append("schedule: " + _schedule_text(self.schedule))
        if self.memory:
            lines += ["", "memory (estimate for the recipe's settings):", self.memory]
        lines += ["", "notes:"] + [f"- {note}" for note in self.notes]
        if self.timings:
            lines.append("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        return "\n".join(lines)

    def _layer_table(self, per_layer: bool) -> list[str]:
        rows: list[tuple[list[int], LayerPlan]] = []
        for layer in self.layers:
            key = (layer.protected, tuple(layer.before.values()), tuple(layer.after.values()))
            if rows and not per_layer:
                previous = rows[-1][1]
                if (previous.protected, tuple(previous.before.values()), tuple(previous.after.values())) == key:
                    rows[-1][0].append(layer.index)
                    continue
            rows.append(([layer.index], layer))
        header = ("layers", "query heads", "kv heads", "mlp channels", "params / layer")
        table = [header]
        for indices, layer in rows:
            b, a = layer.before, layer.after
            table.append((
                _ranges(indices) + (" (protected)" if layer.protected else ""),
                _arrow(b["num_attention_heads"], a["num_attention_heads"]),
                _arrow(b["num_key_value_heads"], a["num_key_value_heads"]),
                _arrow(b["intermediate_size"], a["intermediate_size"]),
                _arrow(layer.params_before, layer.params_after, _count),
            ))
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]


def _arrow(before, after, fmt=str) -> str:
    return fmt(before) if before == after else f"{fmt(before)} -> {fmt(after)}"


def _count(value: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(int(value))


def _ranges(indices: list[int]) -> str:
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ", ".join(parts)


def _schedule_text(schedule: dict) -> str:
    if schedule.get("total_steps") is None:
        return schedule["note"]
    steps = schedule["update_steps"]
    progress = schedule["progress"]
    shown = [f"{s} ({100 * p:.1f}%)" for s, p in zip(steps, progress)]
    if len(shown) > 8:
        shown = shown[:4] + ["..."] + shown[-3:]
    return (
        f"{schedule['total_steps']} optimizer steps ({schedule['source']}); pruning stage {schedule['pruning_steps']} "
        f"steps ({schedule['schedule']}), {len(steps)} mask updates at step (share of the target): "
        f"{', '.join(shown)}; then "
        f"{schedule['total_steps'] - schedule['pruning_steps']} recovery steps"
    ) + (f"\n  WARNING: {schedule['warning']}" if schedule.get("warning") else "")


# ---- the dry run --------------------------------------------------------------------------------------------


def placeholder_scores(structure) -> dict:
    """Zero for every group: `allocate` then removes the lowest indices (its sorts are stable)."""
    from .importance import GroupScores

    return {
        layer.index: GroupScores(
            heads=torch.zeros(layer.num_heads),
            kv_groups=torch.zeros(layer.num_kv_heads),
            channels=torch.zeros(layer.intermediate_size),
        )
        for layer in structure.prunable_layers
    }


def _layer_params(layer) -> int:
    return layer.attention_params + layer.mlp_params


def dry_run(
    recipe_or_model_config: Any,
    pruning_config: Optional[PruningConfig] = None,
    *,
    total_steps: Optional[int] = None,
    uniform: Optional[bool] = None,
    with_lora: bool = False,
    memory: bool = True,
    world_size: Optional[int] = None,
    model_config: Any = None,
    steps_source: str = "given",
) -> PlanResult:
    """Plan the pruning of a model without its weights (see the module docstring).

    Args:
        recipe_or_model_config: a `Recipe` (its `model.model_config`, else `model.name_or_path`, its
            pruning, LoRA, training and export settings are used), or a model config: a short name
            from hfprune/model_configs ("llama-65b"), a config.json / directory path, a hub id or a
            `PretrainedConfig`.
        pruning_config: overrides the recipe's; default `PruningConfig()` for a bare model config.
        total_steps: optimizer steps of the run (default: the recipe's, estimated from its data).
        uniform: the export's `uniform` setting (default: the recipe's, else the config's `uniform`).
        with_lora: also wrap the meta model with the recipe's LoRA (peft) before surgery.
        memory: add the memory estimate for the recipe's settings.
        world_size: data-parallel processes, for the step count (default: $WORLD_SIZE or 1).
        model_config: a `PretrainedConfig` to use instead of the recipe's (the real run passes the
            downloaded model's own config).
        steps_source: how `total_steps` was found, for the printout.
    """
    from .allocation import allocate, check_feasible, target_fraction
    from .estimate import load_model_config, model_shapes
    from .recipes import Recipe
    from .schedule import PruningSchedule
    from .sparsity import removed_params
    from .structure import discover, discover_for_config
    from .surgery import remove_pruned_groups

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    recipe = recipe_or_model_config if isinstance(recipe_or_model_config, Recipe) else None
    if recipe is not None:
        config_source = recipe.model.model_config or recipe.model.name_or_path
        config = pruning_config or recipe.pruning
        if uniform is None:
            uniform = recipe.export.uniform
        if total_steps is None:
            total_steps, steps_source = planned_steps(recipe, world_size)
    else:
        config_source = recipe_or_model_config
        config = pruning_config or PruningConfig()
    if uniform is None and config.uniform:
        uniform = True
    given_config = model_config
    try:
        model_config = load_model_config(model_config if model_config is not None else config_source)
    except (OSError, ValueError) as error:
        hint = " (add model.model_config: a short name from hfprune/model_configs or a config.json path)"
        hint = hint if recipe else ""
        raise ValueError(f"model config {config_source!r}: {' '.join(str(error).split())}{hint}") from None
    if recipe is not None and given_config is not None:
        name = recipe.model.name_or_path  # the real config of a download: name it as the recipe does
    else:
        name = str(getattr(model_config, "name_or_path", "") or config_source)

    model = build_meta_model(model_config)
    timings["build on meta"] = time.perf_counter() - clock
    # The estimate measures the model as it is before pruning (LoRA and surgery change it below).
    shapes = model_shapes(model) if memory and recipe is not None else None
    notes = [PLACEHOLDER_NOTE]
    if config.ranking == "global":
        notes.append(
            "ranking='global': how the budget splits across layers depends on the real scores; this is one "
            "feasible split, the totals are what carry over"
        )
    if with_lora:
        clock = time.perf_counter()
        lora = recipe.lora if recipe is not None and recipe.lora is not None else None
        if lora is None:
            from .adapters import default_lora_config

            lora = default_lora_config()
        from peft import get_peft_model

        model = get_peft_model(model, lora)
        timings["LoRA on meta"] = time.perf_counter() - clock
        notes.append("LoRA adapters were added on meta and sliced with the base weights (A columns, B rows)")

    clock = time.perf_counter()
    structure = discover_for_config(model, config)
    check_feasible(structure, config)
    params_before = _model_params(model)
    before = {layer.index: (layer.widths(), _layer_params(layer)) for layer in structure}
    prunable = structure.prunable_params()
    protected = set(structure.protected)
    masks = allocate(structure, placeholder_scores(structure), config, 1.0)
    removed = removed_params(structure, masks)
    timings["allocate"] = time.perf_counter() - clock

    clock = time.perf_counter()
    try:
        records = remove_pruned_groups(structure, masks)
    except Exception as error:  # the plan must still report what it could compute
        surgery_error = f"{type(error).__name__}: {' '.join(str(error).split())}"
        notes.append(f"physical removal FAILED on meta tensors: {surgery_error}")
        after_widths = {i: _widths_from_mask(before[i][0], masks[i]) for i in before}
        params_after = params_before - removed
        checkpoint = {"kind": "unknown", "loading": "unknown", "reason": f"surgery failed: {surgery_error}"}
    else:
        notes.append(f"physical removal ran on meta tensors: {len(records)} tensors sliced by remove_pruned_groups")
        after = discover(model, protected_layers=())
        after_widths = {layer.index: layer.widths() for layer in after}
        params_after = _model_params(model)
        if params_before - params_after != removed:
            notes.append(
                f"parameter count after surgery ({params_before - params_after} removed) differs from the "
                f"masks' count ({removed})"
            )
        checkpoint = _checkpoint_kind(model, after, uniform, model_config)
    timings["surgery + export config"] = time.perf_counter() - clock
    if recipe is not None and recipe.model.load_in_8bit:
        notes.append(
            "the run loads an 8-bit base: slicing int8 rows/columns and their scales (Linear8bitLt) is not exercised "
            "on meta, only in the tests on real int8 layers"
        )
    if recipe is not None and recipe.model.load_in_4bit:
        notes.append(
            "the run loads a 4-bit base: de-quantizing, slicing and re-quantizing Linear4bit weights is not exercised "
            "on meta, only in the tests on real 4-bit layers (on the CPU, pruned widths must stay multiples of the "
            "block size 64: round_channels_to)"
        )

    layers = []
    for index, (widths, params) in before.items():
        layer_after = after_widths[index]
        params_after_layer = params - _removed_in_layer(widths, layer_after, structure.layers[index])
        layers.append(LayerPlan(index, index in protected, widths, layer_after, params, params_after_layer))

    schedule = None
    if total_steps is not None or config.pruning_steps is not None:
        schedule = _schedule(config, total_steps, steps_source, PruningSchedule)
    elif recipe is not None:
        schedule = {"total_steps": None, "note": f"unknown: {steps_source}"}

    memory_text = None
    if shapes is not None:
        memory_text = _memory(recipe, shapes, notes)

    return PlanResult(
        model=name,
        model_type=model_config.model_type,
        num_layers=len(structure.layers),
        pruning=config.to_dict(),
        layers=layers,
        params_before=params_before,
        params_after=params_after,
        prunable_params=prunable,
        removed_params=removed,
        target_sparsity=target_fraction(structure, config),
        reached_sparsity=removed / max(1, prunable),
        checkpoint=checkpoint,
        schedule=schedule,
        memory=memory_text,
        notes=notes,
        timings=timings,
    )


def _model_params(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)


def _widths_from_mask(widths: dict, mask) -> dict:
    kv = int(mask.kv_groups(widths["num_key_value_heads"]).sum())
    return {"num_attention_heads": int(mask.heads.sum()), "num_key_value_heads": kv,
            "intermediate_size": int(mask.channels.sum())}


def _removed_in_layer(before: dict, after: dict, layer) -> int:
    # `layer` describes the layer's current shapes; per-unit costs do not depend on the widths.
    return (
        (before["num_attention_heads"] - after["num_attention_heads"]) * layer.params_per_query_head
        + (before["num_key_value_heads"] - after["num_key_value_heads"]) * layer.params_per_kv_head
        + (before["intermediate_size"] - after["intermediate_size"]) * layer.params_per_channel
    )


def _checkpoint_kind(model, structure, uniform: Optional[bool], model_config) -> dict:
    from .export.config import build_export_config
    from .structure import unwrap_model

    inner = unwrap_model(model)
    dtype = getattr(model_config, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = getattr(torch, str(dtype).removeprefix("torch."), torch.float32) if dtype else torch.float32
    exported = build_export_config(inner.config, structure, uniform=uniform, dtype=dtype,
                                   architecture=type(inner).__name__)
    config = exported.config
    if exported.heterogeneous:
        kind = "heterogeneous"
        # The export config lists exactly the layers that differ from its global (unpruned) widths. Reading
        # those from the model's config would fail for a model pruned before (a per-layer attribute).
        narrowed = len(config.per_layer_config or {})
        loading = (f"{config.model_type} config with per_layer_config for the {narrowed} narrowed layers; loads "
                   "with AutoModelForCausalLM.from_pretrained after `import hfprune`, or with trust_remote_code=True")
    else:
        kind = "uniform"
        loading = f"stock {config.model_type} config; loads with AutoModelForCausalLM.from_pretrained, no remote code"
    return {"kind": kind, "model_type": config.model_type, "architecture": (config.architectures or [None])[0],
            "loading": loading, "reason": exported.reason}


def _schedule(config: PruningConfig, total_steps: Optional[int], source: str, schedule_class) -> dict:
    steps = config.pruning_steps or max(1, round(config.pruning_fraction * total_steps))
    if total_steps is not None and steps > total_steps:
        raise ValueError(
            f"pruning_steps={steps} exceeds the run's {total_steps} optimizer steps ({source}): lower "
            "pruning.pruning_steps or train longer"
        )
    schedule = schedule_class(total_steps=steps, schedule=config.schedule, warmup_ratio=config.warmup_ratio,
                              cooldown_ratio=config.cooldown_ratio, prune_every=config.prune_every)
    updates = schedule.update_steps()
    return {
        "total_steps": total_steps if total_steps is not None else steps,
        "source": source,
        "pruning_steps": steps,
        "schedule": config.schedule,
        "first_step": schedule.first_step,
        "last_step": schedule.last_step,
        "update_steps": updates,
        "progress": [round(schedule.progress(s), 6) for s in updates],
        "warning": schedule.coarse_ramp(),  # None, or why the ramp is in effect one shot
    }


def planned_steps(recipe, world_size: Optional[int] = None) -> tuple[Optional[int], str]:
    """Optimizer steps of the recipe's run, as the Trainer will count them, and how that was found."""
    args = recipe.training
    if args.max_steps and args.max_steps > 0:
        return args.max_steps, "training.max_steps"
    examples, how = count_examples(recipe)
    if examples is None:
        return None, how
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    return steps_for(examples, args, world), (
        f"{how}: {examples} examples x {args.num_train_epochs:g} epochs, batch {args.per_device_train_batch_size} "
        f"x {args.gradient_accumulation_steps} accumulation x {world} processes"
    )


def steps_for(examples: int, args, world_size: int = 1) -> int:
    """transformers' count: batches per process, ceil-divided by accumulation, times epochs."""
    batches = math.ceil(examples / (args.per_device_train_batch_size * world_size))
    per_epoch = max(1, math.ceil(batches / args.gradient_accumulation_steps))
    return math.ceil(args.num_train_epochs * per_epoch)


def count_examples(recipe) -> tuple[Optional[int], str]:
    """Training records of the recipe: `num_examples` hints, else counted in local files."""
    sources = recipe.data.train
    if not sources:
        return None, "no data.train in the recipe (pass --steps or set training.max_steps)"
    counts = []
    for source in sources:
        count = source.num_examples
        if count is None:
            if not source.local:
                return None, (f"data source {source.path!r} is on the hub: give it num_examples, or set "
                              "training.max_steps (or pass --steps)")
            count = _count_local_records(source.path)
        count = max(0, count - source.skip_samples)
        if source.max_samples is not None:
            count = min(count, source.max_samples)
        counts.append(count)
    weights = [s.weight for s in sources]
    if weights[0] is None:
        total = sum(counts)
    else:
        probabilities = [w / sum(weights) for w in weights]
        lengths = [c / p for c, p in zip(counts, probabilities)]
        total = int(min(lengths) if recipe.data.mixing == "first_exhausted" else max(lengths))
    total -= recipe.data.val_set_size
    return max(total, 0), "estimated from the data sources"


def _count_local_records(path: str) -> int:
    import json

    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r}: no such file")
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".json"):
            data = json.load(handle)
            return len(data) if isinstance(data, list) else len(next(iter(data.values()), []))
        return sum(1 for line in handle if line.strip())


def _memory(recipe, shapes, notes: list[str]) -> Optional[str]:
    """The memory estimate of what the recipe runs, for the model `shapes` describes."""
    from .estimate import estimate_recipe

    try:
        estimate = estimate_recipe(recipe, shapes)
    except (ValueError, TypeError) as error:
        notes.append(f"memory estimate unavailable: {' '.join(str(error).split())}")
        return None
    fits = ", ".join(f"{gb} GB: {'fits' if estimate.fits(gb * 1e9) else 'does not fit'}" for gb in (24, 40, 80, 141))
    return estimate.to_markdown() + f"\n\nOne GPU of {fits}."
