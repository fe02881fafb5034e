"""What a pruning run is about to do, in a few lines, at the start of training.

`log_run_summary` is called by `PruningCallback.on_train_begin` once discovery and the schedule
are known. The summary goes through the Trainer's own logger (`transformers.trainer`) at INFO,
beside its "***** Running training *****" block: `TrainingArguments(log_level="info")` shows
both (`hfprune prune` always does). A schedule that is in effect one shot (`PruningSchedule.coarse_ramp`)
is a WARNING on the same logger, shown by default.

    hfprune: pruning run                       (SmolLM2-135M-Instruct, PruningTrainer's defaults, importance="lora")
      base:          HuggingFaceTB/SmolLM2-135M-Instruct, 8-bit (bitsandbytes int8), other weights float32, on cpu
      LoRA:          rank 8, alpha 16 on 210 modules (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj); 2.44M trainable parameters
      criterion:     lora (reads LoRA gradients); scores: EMA 0.9, per-module L2 normalisation, layer by layer
      compensation:  least_squares: removed heads / channels predicted from the kept ones, folded into o_proj / down_proj when sliced (ridge 0.5) (compensation='auto')
      target:        20% of the 92.01M prunable parameters (heads + channels, kv_group, ranking local)
      protected:     layers 0-2, 29
      steps:         100 optimizer steps: pruning 1-50, recovery 51-100
      mask updates:  5, at steps 5 (0.0%), 15 (57.8%), 25 (87.5%), 35 (98.4%), 45 (100.0%)
      removal:       weights sliced after step 50; recovery trains the smaller model
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .structure import is_lora_wrapped, unwrap_model

if TYPE_CHECKING:  # pragma: no cover
    from .callback import PruningCallback

#: What each kind of criterion reads, in words (importance/base.py `Needs`).
NEEDS_TEXT = {
    "nothing": "weights only",
    "forward": "forward passes only",
    "activation_gradients": "activation gradients, no weight gradient",
    "lora_gradients": "reads LoRA gradients",
    "weight_gradients": "full weight gradients",
}


#: How scores are normalised before they are summed into groups (PruningConfig.normalize, resolved).
NORMALIZATION_TEXT = {
    "module": "per-module L2 normalisation, layer by layer",
    "global": "per-role normalisation over all layers",
    "none": "raw sums",
}


def trainer_logger():
    """The logger `transformers.Trainer` writes its own start-of-training block to."""
    from transformers.utils import logging as hf_logging

    return hf_logging.get_logger("transformers.trainer")


def log_run_summary(callback: "PruningCallback", args, state, model) -> None:
    """Log the summary (INFO) and any schedule warning (WARNING) on the main process."""
    if not state.is_world_process_zero:
        return
    logger = trainer_logger()
    logger.info(run_summary(callback, args, state, model))
    warning = callback.schedule.coarse_ramp()
    if warning is not None and state.global_step == 0:
        logger.warning("hfprune: %s", warning)


def run_summary(callback: "PruningCallback", args, state, model) -> str:
    """The summary text (see the module docstring)."""
    config, schedule, structure = callback.config, callback.schedule, callback.structure
    rows = [
        ("base", _base_text(model, callback.original_checkpoint)),
        ("LoRA", _lora_text(model)),
        ("criterion", f"{config.importance} ({NEEDS_TEXT.get(callback.criterion.needs, callback.criterion.needs)}); "
                      f"scores: EMA {config.ema_decay:g}, "
                      + NORMALIZATION_TEXT.get(config.score_normalization, config.score_normalization)),
        ("compensation", _compensation_text(callback)),
        ("target", _target_text(config, structure)),
        ("protected", ("layers " + _ranges(sorted(structure.protected))) if structure.protected else "none"),
        ("steps", _steps_text(schedule.total_steps, state.max_steps)),
        ("mask updates", f"{len(schedule.update_steps())}, at steps {schedule.updates_text()}"),
        ("removal", _removal_text(callback, schedule.total_steps, state.max_steps)),
    ]
    title = "hfprune: pruning run" if state.global_step == 0 else f"hfprune: pruning run, resumed at step {state.global_step}"
    if callback.physically_pruned:  # resumed after the slicing: scoring and the schedule are over
        done = ("removal", "done (the checkpoint holds the sliced weights); recovery continues")
        rows = [row for row in rows if row[0] in ("base", "LoRA", "target", "protected", "steps")] + [done]
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join([title] + [f"  {(name + ':').ljust(width)} {text}" for name, text in rows])


def _base_text(model, source) -> str:
    inner = unwrap_model(model)
    quantized = {}
    for module in inner.modules():
        kind = type(module).__name__
        if kind == "Linear8bitLt":
            quantized["8-bit (bitsandbytes int8)"] = True
        elif kind == "Linear4bit":
            quant_type = getattr(getattr(module, "weight", None), "quant_type", None) or "4-bit"
            quantized[f"4-bit (bitsandbytes {quant_type})"] = True
    float_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in inner.parameters() if p.is_floating_point()})
    devices = sorted({str(p.device) for p in inner.parameters()})
    precision = ", ".join(quantized)
    precision = (f"{precision}, other weights {'/'.join(float_dtypes)}" if precision else "/".join(float_dtypes))
    where = source or getattr(inner.config, "_name_or_path", None) or "a model built in memory"
    return f"{where}, {precision}, on {', '.join(devices)}"


def _lora_text(model) -> str:
    wrapped = [(name, module) for name, module in model.named_modules() if is_lora_wrapped(module)]
    if not wrapped:
        return "none (the base weights themselves train, or nothing does)"
    kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in wrapped))
    ranks = sorted({r for _, m in wrapped for r in getattr(m, "r", {}).values()})
    alphas = sorted({a for _, m in wrapped for a in getattr(m, "lora_alpha", {}).values()})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = ", ".join(filter(None, [
        "rank " + "/".join(str(r) for r in ranks) if ranks else "",
        "alpha " + "/".join(f"{a:g}" for a in alphas) if alphas else "",
    ]))
    return f"{shape} on {len(wrapped)} modules ({', '.join(kinds)}); {_count(trainable)} trainable parameters"


def _compensation_text(callback) -> str:
    compensator, asked = callback.compensator, callback.config.compensation
    if compensator is None:
        note = getattr(callback, "compensation_note", None)
        return f"none ({note})" if note else "none"
    text = (f"{compensator.method}: removed heads / channels predicted from the kept ones, folded into o_proj / "
            f"down_proj when sliced (ridge {compensator.ridge:g})")
    return text + (" (compensation='auto')" if asked == "auto" else "")


def _target_text(config, structure) -> str:
    structures = " + ".join(config.structures)
    detail = f"{structures}, {config.head_granularity}, ranking {config.ranking}" + (", uniform widths" if config.uniform else "")
    prunable = _count(structure.prunable_params())
    if config.separate_targets:
        parts = [f"{name}={value:g}" for name, value in (("head_sparsity", config.head_sparsity),
                                                         ("channel_sparsity", config.channel_sparsity))
                 if value is not None]
        return f"{', '.join(parts)} of each prunable layer, of {prunable} prunable parameters ({detail})"
    return f"{config.target_sparsity:.0%} of the {prunable} prunable parameters ({detail})"


def _steps_text(pruning_steps: int, max_steps: int) -> str:
    recovery = max_steps - pruning_steps
    text = f"{max_steps} optimizer steps: pruning 1-{pruning_steps}"
    return text + (f", recovery {pruning_steps + 1}-{max_steps}" if recovery > 0 else ", no recovery steps")


def _removal_text(callback, pruning_steps: int, max_steps: int) -> str:
    if callback.config.physical_removal == "after_pruning" and callback.allow_physical_removal:
        return f"weights sliced after step {pruning_steps}; recovery trains the smaller model"
    why = ("physical_removal='at_end'" if callback.config.physical_removal == "at_end"
           else "distributed training: DDP's buckets keep their shapes")
    return f"weights sliced after step {max_steps}, the end of training ({why}); masks until then"


def _count(value: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 29] -> '0-2, 29'."""
    parts: list[list[int]] = []
    for index in indices:
        if parts and index == parts[-1][1] + 1:
            parts[-1][1] = index
        else:
            parts.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)
