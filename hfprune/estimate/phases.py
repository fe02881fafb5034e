"""What is alive together at the peak of each phase of a pruning step.

A training step goes through four phases, and each has its own peak:

1. forward + loss backward: weights, optimizer states, every activation saved
   for backward, and the log-softmax of the logits with its gradient;
2. decoder backward: layer by layer, saved activations are released while
   gradients appear; one layer's recompute (gradient checkpointing), its
   de-quantised weight and its gradient temporaries are alive on top;
3. importance scoring (after backward, before the optimizer step): gradients and
   the criterion's work buffers;
4. optimizer step: gradients, optimizer states and the optimizer's temporaries.

Each phase is a dict of parts of the components (`components`), so the numbers add up by construction.
A criterion that scores with forward passes of its own (`forward_loss`: bonsai, in `prune_model`) has no
training step: its one phase is a no-grad forward pass with labels (`forward_components`).
"""

from __future__ import annotations

from .activations import Activations
from .settings import FP32, CriterionCost, Settings
from .shapes import ModelShapes
from .storage import Storage

#: Alive in every phase.
PERSISTENT = ("base_weights", "other_weights", "lora_weights", "optimizer_states", "score_buffers")


def components(storage: Storage, acts: Activations, importance_workspace: int) -> dict[str, int]:
    """Every buffer at its largest."""
    return {
        "base_weights": storage.base_weights,
        "other_weights": storage.other_weights,
        "lora_weights": storage.lora_weights,
        "optimizer_states": storage.optimizer_states,
        "score_buffers": storage.score_buffers,
        "saved_activations": acts.saved,
        "loss_buffers": acts.loss_buffers,
        "layer_backward_workspace": acts.layer_backward_workspace,
        "lora_gradients": storage.lora_gradients,
        "weight_gradients": storage.weight_gradients,
        "importance_workspace": importance_workspace,
        "optimizer_workspace": storage.optimizer_workspace,
    }


def forward_components(storage: Storage, acts: Activations, forward_workspace: int, loss_buffers: int) -> dict[str, int]:
    """A no-grad forward pass with labels: the stored weights (no optimizer, no gradient), one layer's
    transient and the logits with their log-softmax."""
    return {
        "base_weights": storage.base_weights,
        "other_weights": storage.other_weights,
        "lora_weights": storage.lora_weights,
        "score_buffers": storage.score_buffers,
        "forward_workspace": forward_workspace,
        "forward_loss_buffers": loss_buffers,
    }


def phases(parts: dict[str, int], storage: Storage, acts: Activations) -> dict[str, dict[str, int]]:
    persistent = {name: parts[name] for name in PERSISTENT}
    return {
        "forward + loss backward": forward_and_loss(persistent, parts),
        "decoder backward": decoder_backward(persistent, parts, storage, acts),
        "importance scoring": importance_scoring(persistent, parts),
        "optimizer step": optimizer_step(persistent, parts),
    }


def forward_and_loss(persistent: dict, parts: dict) -> dict[str, int]:
    """Every saved activation, then the loss's log-softmax and its gradients."""
    return {**persistent, "saved_activations": parts["saved_activations"], "loss_buffers": parts["loss_buffers"]}


def decoder_backward(persistent: dict, parts: dict, storage: Storage, acts: Activations) -> dict[str, int]:
    """The worst layer of the backward, which runs from the last layer down: at layer l the
    gradients of the LM head and of the layers above l exist, the saved tensors of layers <= l too."""
    worst = None
    for index in range(len(acts.kept_layers)):
        pending = sum(acts.kept_layers[: index + 1]) + acts.outside_layers
        done = storage.head_gradients + sum(storage.layer_gradients[index + 1:])
        if worst is None or pending + done > worst[0] + worst[1]:
            worst = (pending, done)
    pending_activations, done_gradients = worst
    return {
        **persistent, "saved_activations": pending_activations, "weight_gradients": done_gradients,
        "lora_gradients": parts["lora_gradients"], "layer_backward_workspace": parts["layer_backward_workspace"],
    }


def importance_scoring(persistent: dict, parts: dict) -> dict[str, int]:
    """Every gradient, and the criterion's work buffers."""
    return {**persistent, **_gradients(parts), "importance_workspace": parts["importance_workspace"]}


def optimizer_step(persistent: dict, parts: dict) -> dict[str, int]:
    """Every gradient, and the optimizer's temporaries."""
    return {**persistent, **_gradients(parts), "optimizer_workspace": parts["optimizer_workspace"]}


def _gradients(parts: dict) -> dict[str, int]:
    return {"lora_gradients": parts["lora_gradients"], "weight_gradients": parts["weight_gradients"]}


def importance_workspace(shapes: ModelShapes, settings: Settings, cost: CriterionCost) -> int:
    """The criterion's fp32 work buffers, the size of the largest weight it scores; a criterion that
    reads a 4-bit weight also holds it de-quantised to the compute dtype (bitsandbytes
    de-quantises a whole matrix)."""
    largest = shapes.largest_projection(cost.scored_roles(settings.lora_target_modules))
    dequantized = largest * settings.weight_bytes if settings.load_in_4bit and cost.work_buffers else 0
    return cost.work_buffers * largest * FP32 + dequantized
