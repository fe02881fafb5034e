"""`prune_model`: score, decide and remove in one call, for users who do not train."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .allocation import allocate, check_feasible
from .bnb_logging import quiet_int8_cast_warning
from .config import PruningConfig
from .distributed import check_resident
from .compensator import make_compensator
from .importance import make_accumulator, make_criterion, score_model
from .masking import PruningMasks
from .quantization import check_quantized_base
from .removal import record_removal
from .structure import discover_for_config, unwrap_model
from .surgery import remove_pruned_groups


def _model_device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


def prune_model(
    model: nn.Module,
    config: PruningConfig,
    calibration_data: Optional[Iterable[dict]] = None,
) -> nn.Module:
    """Prune `model` to `config.target_sparsity` in one shot and return it, physically smaller.

    `calibration_data`: batches (dicts with `input_ids`, optionally `attention_mask`
    and `labels`) for criteria that need forward passes or gradients, and for
    `compensation`; each batch is one forward (and backward) pass and the scores are
    averaged. What was removed (masks in the original index space, compensation maps)
    is attached to the model (`hfprune.removal`), so `save_pruned(model, dir,
    original_checkpoint=...)` can re-read and slice the full-precision original.
    """
    structure = discover_for_config(model, config)
    check_feasible(structure, config)
    criterion = make_criterion(config)
    check_quantized_base(model, structure, config, criterion)
    check_resident(model, structure)
    compensator = make_compensator(config)
    if calibration_data is None and (criterion.needs != "nothing" or compensator is not None):
        what = {"forward": "forward passes", "nothing": "forward passes"}.get(criterion.needs, "gradients")
        why = f"importance={config.importance!r}" if criterion.needs != "nothing" else \
            f"compensation={config.compensation!r}"
        raise ValueError(
            f"{why} needs {what}: pass calibration_data (batches of input_ids)"
            + (", or use importance='magnitude' or 'random'" if criterion.needs != "nothing" else
               ", or compensation='none'")
        )
    quiet_int8_cast_warning()
    accumulator = make_accumulator(config, criterion, one_shot=True)
    try:
        if compensator is not None:
            compensator.prepare(model, structure.prunable_layers)  # its statistics come from the same passes
        if criterion.needs == "nothing":
            if compensator is not None:
                _forward_passes(model, calibration_data)
            score_model(structure, criterion, accumulator)
        elif criterion.needs == "forward":
            _score_with_forward_passes(model, structure, criterion, accumulator, calibration_data)
        else:
            _score_with_gradients(model, structure, criterion, accumulator, calibration_data)
        masks = allocate(structure, accumulator.layer_scores(structure.prunable_layers), config, 1.0)
        if compensator is not None:
            compensator.apply(structure, PruningMasks.full(structure), masks)
    finally:
        criterion.release()  # hooks must not outlive the call, unfrozen weights are frozen again
        if compensator is not None:
            compensator.release()
    remove_pruned_groups(structure, masks)
    record_removal(model, masks, compensator.record if compensator is not None else None)
    return model


def _activation_checkpointing(model: nn.Module) -> bool:
    inner = unwrap_model(model)
    flag = getattr(type(inner), "is_activation_checkpointing", None)
    return bool(inner.is_activation_checkpointing) if flag is not None else bool(
        getattr(inner, "gradient_checkpointing", False))


def _scoring_mode(model: nn.Module) -> None:
    """No dropout while scoring. transformers checkpoints activations in training mode only, so a model with
    activation checkpointing on stays in training mode with its dropout layers switched off."""
    if _activation_checkpointing(model):
        model.train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
    else:
        model.eval()


def _batches_on(model, calibration_data):
    device = _model_device(model)
    for batch in calibration_data:
        yield {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}


@torch.no_grad()
def _forward_passes(model, calibration_data) -> int:
    """No-grad forward passes over the calibration batches, in eval mode (what hooks record); returns the count."""
    was_training = model.training
    model.eval()
    try:
        batches = 0
        for batch in _batches_on(model, calibration_data):
            batch.pop("labels", None)
            model(**batch)
            batches += 1
    finally:
        model.train(was_training)
    if batches == 0:
        raise ValueError("calibration_data is empty: pass at least one batch")
    return batches


def _score_with_forward_passes(model, structure, criterion, accumulator, calibration_data) -> None:
    """Gradient-free criteria: activation statistics from forward passes only (inference memory)."""
    criterion.prepare(model, structure.prunable_layers)
    _forward_passes(model, calibration_data)
    score_model(structure, criterion, accumulator)


def _score_with_gradients(model, structure, criterion, accumulator, calibration_data) -> None:
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    embedding_hook = None
    if criterion.needs == "activation_gradients":
        # Activation gradients only: no weight needs a gradient, so none gets one (a plain fp32 model would
        # otherwise pay for a full weight gradient). Backpropagation starts at the embeddings' output instead.
        for p in model.parameters():
            p.requires_grad_(False)
        embedding_hook = model.get_input_embeddings().register_forward_hook(
            lambda module, args, output: output.requires_grad_(True)
        )
    criterion.prepare(model, structure.prunable_layers)
    was_training = model.training
    _scoring_mode(model)
    batches = 0
    try:
        model.zero_grad(set_to_none=True)
        for batch in _batches_on(model, calibration_data):
            batch.setdefault("labels", batch["input_ids"])
            loss = model(**batch).loss
            loss.backward()
            batches += 1
        if batches == 0:
            raise ValueError("calibration_data is empty: pass at least one batch")
        # Gradients are summed over batches; the mean keeps scores comparable across sizes.
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(batches)
        score_model(structure, criterion, accumulator)
    finally:
        if embedding_hook is not None:
            embedding_hook.remove()
        model.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)
