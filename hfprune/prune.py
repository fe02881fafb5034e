"""`prune_model`: score, decide and remove in one call, for users who do not train."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import nn

from .allocation import allocate, check_feasible, removal_targets, shortfall
from .bnb_logging import quiet_int8_cast_warning
from .config import PruningConfig
from .distributed import check_resident
from .compensator import make_compensator, prepare_or_drop
from .importance import make_accumulator, make_criterion, score_layers, score_model
from .masking import PruningMasks
from .quantization import check_quantized_base
from .removal import record_removal
from .structure import discover_for_config, unwrap_model
from .surgery import remove_pruned_groups

logger = logging.getLogger(__name__)


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
    `compensation`. Each batch is one forward (and backward) pass, or one pass per
    sequence for criteria that square per-sample gradients (`per_sample_gradients`:
    taylor2, param_second); gradient criteria score the mean gradient over all of it.
    A batch (or sequence) whose loss or gradients are not finite (an overflow) is
    skipped and the skips are logged; only when none is usable does it fail. A
    `forward_loss` criterion (bonsai) runs its own forward passes over sub-models
    sampled at the target (`ImportanceCriterion.sample_submodels`). What was removed
    (masks in the original index space, compensation maps) is attached to the model
    (`hfprune.removal`), so `save_pruned(model, dir, original_checkpoint=...)` can
    re-read and slice the full-precision original.
    """
    structure = discover_for_config(model, config)
    criterion = make_criterion(config)
    check_quantized_base(model, structure, config, criterion)  # what the base can do at all comes first
    check_resident(model, structure)
    check_feasible(structure, config)
    compensator = make_compensator(config, sees_activations=calibration_data is not None)
    if calibration_data is None and (criterion.needs != "nothing" or compensator is not None):
        what = {"forward": "forward passes", "nothing": "forward passes",
                "forward_loss": "forward passes with labels"}.get(criterion.needs, "gradients")
        why = f"importance={config.importance!r}" if criterion.needs != "nothing" else \
            f"compensation={config.compensation!r}"
        raise ValueError(
            f"{why} needs {what}: pass calibration_data (batches of input_ids)"
            + (", or use importance='magnitude' or 'random'" if criterion.needs != "nothing" else
               ", or compensation='none'")
        )
    if calibration_data is not None:
        calibration_data = _checked_calibration(model, calibration_data)
    quiet_int8_cast_warning()
    accumulator = make_accumulator(config, criterion, one_shot=True)
    try:
        # its statistics come from the same passes ("auto" goes without when they do not fit)
        compensator, _ = prepare_or_drop(compensator, config.compensation, model, structure.prunable_layers)
        if criterion.needs == "nothing":
            if compensator is not None:
                _forward_passes(model, calibration_data)
            score_model(structure, criterion, accumulator)
        elif criterion.needs == "forward":
            _score_with_forward_passes(model, structure, criterion, accumulator, calibration_data)
        elif criterion.needs == "forward_loss":
            calibration_data = list(calibration_data)  # read twice with compensation
            if compensator is not None:
                compensator.enabled = False  # the sampled sub-models are not the model being compensated
            _score_with_sampled_losses(model, structure, config, criterion, accumulator, calibration_data)
            if compensator is not None:
                compensator.enabled = True
                _forward_passes(model, calibration_data)
        else:
            _score_with_gradients(model, structure, criterion, accumulator, calibration_data)
        masks = allocate(structure, accumulator.layer_scores(structure.prunable_layers), config, 1.0)
        short = shortfall(structure, masks, config)
        if short is not None:
            logger.warning("prune_model: %s", short)
        if compensator is not None:
            compensator.apply(structure, PruningMasks.full(structure), masks)
            compensator.fold(structure)
    finally:
        criterion.release()  # hooks must not outlive the call, unfrozen weights are frozen again
        if compensator is not None:
            compensator.release()
    remove_pruned_groups(structure, masks)
    record = record_removal(model, masks, compensator.record if compensator is not None else None)
    if short is not None:
        record.warnings.append(short)  # save_pruned puts it in the report and on the card
    return model


def _checked_calibration(model: nn.Module, calibration_data):
    """Every batch checked before its forward pass: a dict with an integer `input_ids` tensor [batch, tokens]
    whose ids the embedding has. A list is checked whole before anything runs; an iterator batch by batch."""
    if isinstance(calibration_data, Mapping) or torch.is_tensor(calibration_data):
        raise TypeError(
            f"calibration_data is one {type(calibration_data).__name__}: pass a list (or any iterable) of batches, "
            "each a dict with input_ids, e.g. [{'input_ids': ids}]"
        )
    vocab = model.get_input_embeddings().num_embeddings
    positions = getattr(unwrap_model(model).config, "max_position_embeddings", None)
    warned = []

    def check(index: int, batch):
        where = f"calibration_data[{index}]"
        if not isinstance(batch, Mapping):
            shape = f" of shape {list(batch.shape)}" if torch.is_tensor(batch) else ""
            raise TypeError(
                f"{where} is a {type(batch).__name__}{shape}: each batch is a dict with input_ids (and optionally "
                "attention_mask, labels), e.g. {'input_ids': ids}"
            )
        ids = batch.get("input_ids")
        if not torch.is_tensor(ids):
            raise TypeError(f"{where} has no input_ids tensor (keys: {sorted(map(str, batch))}): each batch is a "
                            "dict with input_ids, a LongTensor [batch, tokens]")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{where}: input_ids are {ids.dtype}: token ids are integers (torch.long)")
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"{where}: input_ids of shape {list(ids.shape)}: expected [batch, tokens], both >= 1")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = high if high >= vocab else low
            raise ValueError(
                f"{where}: token id {bad} is outside the model's vocabulary (its embedding has {vocab} rows, ids "
                f"0 to {vocab - 1}): tokenise the calibration text with this model's tokenizer"
            )
        if positions and ids.shape[1] > positions and not warned:
            warned.append(index)
            logger.warning(
                "%s: %d tokens per sequence, more than the model's max_position_embeddings=%d: positions beyond "
                "it were never trained, so scores measured there may not reflect the model; use sequences of at "
                "most %d tokens", where, ids.shape[1], positions, positions,
            )
        return batch

    if isinstance(calibration_data, Sequence):
        return [check(i, batch) for i, batch in enumerate(calibration_data)]
    return (check(i, batch) for i, batch in enumerate(calibration_data))


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


def _backward_passes(batches: Iterable[dict], per_sample: bool) -> Iterator[tuple[Union[int, str], dict]]:
    """(index, what one backward pass sees): every batch (index i), or every sequence of every batch (index "i.j",
    sequence j of batch i), lazily: an iterator of batches is read one batch at a time."""
    for i, batch in enumerate(batches):
        if not per_sample:
            yield i, batch
            continue
        for j in range(batch["input_ids"].shape[0]):
            yield f"{i}.{j}", {k: v[j : j + 1] for k, v in batch.items()}


def _score_with_gradients(model, structure, criterion, accumulator, calibration_data) -> None:
    """Backward passes batch by batch (sequence by sequence for `per_sample_gradients` criteria; a pass is then
    one sequence wherever this says batch). A batch whose loss or gradients are not finite (an overflow) is skipped,
    as the trainer skips such a step, so one bad batch cannot poison the others: weight (and LoRA) gradients
    are summed over the finite batches only (scores of the mean gradient, as before); criteria that record
    activation gradients are scored after each batch and the finite batches' scores averaged."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    embedding_hook = None
    per_batch_scores = criterion.needs == "activation_gradients"
    if per_batch_scores:
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
    used, skipped, total = 0, {}, None
    try:
        model.zero_grad(set_to_none=True)
        parameters = [p for p in model.parameters() if p.requires_grad]
        for index, batch in _backward_passes(_batches_on(model, calibration_data), criterion.per_sample_gradients):
            batch.setdefault("labels", batch["input_ids"])
            loss = model(**batch).loss
            if not bool(torch.isfinite(loss)):
                skipped[index] = "loss"  # no backward: nothing of this batch reaches a gradient or a hook
                criterion.reset()
                continue
            if per_batch_scores:
                loss.backward()
                scores = score_layers(structure, criterion)
                if not scores or not all(bool(torch.isfinite(t).all()) for s in scores.values() for t in s.values()):
                    skipped[index] = "gradients"
                    continue
                total = scores if total is None else {
                    i: {role: total[i][role] + t for role, t in s.items()} for i, s in scores.items()
                }
            elif not _backward_into_finite_sum(loss, parameters):
                skipped[index] = "gradients"
                continue
            used += 1
        if used == 0:
            if not skipped:
                raise ValueError("calibration_data is empty: pass at least one batch")
            raise ValueError(_no_usable_batch(skipped))
        if skipped:
            units = "sequences" if _pass_unit(skipped) == "sequence" else "batches"
            logger.warning("prune_model: %d of %d calibration %s skipped (%s); scores from the other %d",
                           len(skipped), len(skipped) + used, units, _describe_skips(skipped), used)
        if per_batch_scores:
            accumulator.update({i: {role: t / used for role, t in s.items()} for i, s in total.items()})
        else:
            # Gradients are summed over the used batches; the mean keeps scores comparable across sizes.
            for p in parameters:
                if p.grad is not None:
                    p.grad.div_(used)
            score_model(structure, criterion, accumulator)
        if accumulator.num_updates == 0 and accumulator.num_skipped:
            raise ValueError(
                f"prune_model: the importance scores are not finite although the {used} used calibration batches had "
                f"finite losses and gradients (importance={criterion.name!r} keeps statistics of every backward pass, "
                "a skipped batch included): load the model in bfloat16 or float32, or pass other calibration_data"
            )
    finally:
        if embedding_hook is not None:
            embedding_hook.remove()
        model.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)


def _backward_into_finite_sum(loss: torch.Tensor, parameters: list) -> bool:
    """Backward into fresh gradients; add them to the running sum if all are finite, else drop them.
    Costs one more gradient-sized buffer per parameter while the batch's gradients are checked."""
    summed = [p.grad for p in parameters]
    for p in parameters:
        p.grad = None
    loss.backward()
    finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in parameters)
    for p, previous in zip(parameters, summed):
        if not finite or p.grad is None:
            p.grad = previous
        elif previous is not None:
            p.grad.add_(previous)
    return finite


def _pass_unit(skipped: dict) -> str:
    """Per-sequence passes are indexed "batch.sequence"."""
    return "sequence" if any(isinstance(index, str) for index in skipped) else "batch"


def _describe_skips(skipped: dict) -> str:
    unit = _pass_unit(skipped)
    parts = []
    for what in ("loss", "gradients"):
        passes = [i for i, why in skipped.items() if why == what]
        if passes:
            plural = ("s" if unit == "sequence" else "es") if len(passes) > 1 else ""
            where = "[" + ", ".join(map(str, passes)) + "]" + (" (batch.sequence)" if unit == "sequence" else "")
            parts.append(f"non-finite {what} in {unit}{plural} {where}")
    return "; ".join(parts)


def _no_usable_batch(skipped: dict) -> str:
    units = "sequences" if _pass_unit(skipped) == "sequence" else "batches"
    return (
        f"prune_model: none of the {len(skipped)} calibration {units} gave finite scores ({_describe_skips(skipped)}): "
        "the model overflows on this data (float16 often does); load it in bfloat16 or float32, or pass other "
        "calibration_data"
    )


@torch.no_grad()
def _score_with_sampled_losses(model, structure, config, criterion, accumulator, calibration_data) -> None:
    """`forward_loss` criteria (bonsai): the criterion runs its own forward passes over masked sub-models."""
    batches = list(_batches_on(model, calibration_data))
    if not batches:
        raise ValueError("calibration_data is empty: pass at least one batch")
    for batch in batches:
        batch.setdefault("labels", batch["input_ids"])
    criterion.prepare(model, structure.prunable_layers)
    was_training = model.training
    model.eval()
    try:
        criterion.sample_submodels(model, batches, removal_targets(structure, config))
    finally:
        model.train(was_training)
    score_model(structure, criterion, accumulator)
