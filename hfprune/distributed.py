"""What pruning needs from a process group: per-rank scores made one, sharded models recognised, LoRA gathered.

* `average_scores(step_scores, structure)`: criteria that watch activations (`needs` "forward" or
  "activation_gradients") see only their own rank's batches; their step scores are averaged over the
  ranks (one all-reduce of one flat tensor) so every rank folds the same numbers into its EMA. Gradient
  criteria need none of it: DDP / FSDP already all-reduce the gradients they read.
* `sharding(model)`: "fsdp" (FSDP2 `fully_shard` DTensor parameters, or FSDP1's wrapper), "deepspeed"
  (ZeRO-3 partitioned parameters) or None. A sharded model keeps its parameters as shards: hfprune scores
  it only with criteria that read no weight, masks it with hooks (they act on activations, which
  sharding keeps whole) and never slices it in memory: the export re-reads the original checkpoint and
  applies the removal masks and the gathered LoRA factors (`hfprune.export.save_pruned_from_adapters`).
* `gather_lora_state(model)`: the full LoRA factors, on every rank (a collective), in the CPU memory.
* `check_resident(model, structure)`: one process over several devices (`device_map`) works while every
  weight of the pruned layers is resident on some device; a layer accelerate offloads (to the CPU or disk,
  its weights on the meta device between forwards) cannot be read or sliced, and is refused.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .importance.base import ROLES, ModuleScores
from .structure import ModelStructure

#: What a criterion may need to score a sharded model: nothing of the weights.
SHARDABLE_NEEDS = ("activation_gradients",)


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def needs_score_averaging(criterion) -> bool:
    """Hook criteria score from their rank's own activations; gradient criteria from all-reduced gradients."""
    return criterion.needs in ("forward", "activation_gradients") and world_size() > 1


def average_scores(step_scores: dict[int, ModuleScores], structure: ModelStructure) -> dict[int, ModuleScores]:
    """The ranks' step scores averaged (every rank gets the same); {} on every rank if any rank had none."""
    if world_size() == 1:
        return step_scores
    layers = structure.prunable_layers
    pieces, shapes = [torch.tensor([1.0 if step_scores else 0.0])], []
    for layer in layers:
        sizes = {"head": layer.num_heads, "kv": layer.num_kv_heads, "channel": layer.intermediate_size}
        scores = step_scores.get(layer.index)
        for role, _, unit in ROLES:
            value = scores[role].detach().float().cpu().reshape(-1) if scores else torch.zeros(sizes[unit])
            pieces.append(value)
            shapes.append((layer.index, role, value.numel()))
    flat = torch.cat(pieces).to(_collective_device())
    torch.distributed.all_reduce(flat)
    flat = flat.cpu()
    if int(flat[0].item()) < world_size():
        return {}
    averaged: dict[int, ModuleScores] = {}
    offset = 1
    for index, role, numel in shapes:
        averaged.setdefault(index, {})[role] = flat[offset : offset + numel] / world_size()
        offset += numel
    return averaged


def sharding(model: nn.Module) -> Optional[str]:
    """"fsdp", "deepspeed" or None: whether the model's parameters are held as shards."""
    for module in model.modules():
        name = type(module).__name__
        if name == "FullyShardedDataParallel" or name.startswith("FSDP"):
            return "fsdp"
    for param in model.parameters():
        if type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor":
            return "fsdp"
        if hasattr(param, "ds_id") or hasattr(param, "ds_status"):
            return "deepspeed"
    return None


def check_sharded_criterion(kind: Optional[str], criterion, importance: str) -> None:
    """Before any step: a sharded model is scored by criteria that read no weight, and not under ZeRO-3."""
    if kind is None:
        return
    if kind == "deepspeed":
        raise ValueError(
            "DeepSpeed ZeRO-3 partitions every parameter and owns the optimizer step: hfprune does not prune under "
            "it; use FSDP2 with importance='activation_taylor' (see docs/distributed.md), or data parallelism"
        )
    if criterion.needs not in SHARDABLE_NEEDS:
        raise ValueError(
            f"importance={importance!r} (needs={criterion.needs!r}) reads weights, LoRA factors or their gradients, "
            "which FSDP keeps as shards: under FSDP use importance='activation_taylor' (or 'activation_taylor_sq'), "
            "which scores from activation gradients alone"
        )


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective), or the tensor itself."""
    if hasattr(tensor, "full_tensor"):
        return tensor.full_tensor()
    return tensor


def gather_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA factor of `model` in full, on the CPU, on every rank (call it on all ranks together), under
    the names peft's `get_peft_model_state_dict` uses (no adapter name, `base_model.model.` kept)."""
    state = {}
    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        full = _full(param.detach()).to("cpu").clone()
        key = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        state[key] = full
    return state


def check_resident(model: nn.Module, structure: ModelStructure) -> None:
    """Refuse, before any work, a prunable layer whose weights a `device_map` offloaded (meta until its forward)."""
    device_map = getattr(getattr(model, "get_base_model", lambda: model)(), "hf_device_map", None) or {}
    for layer in structure.prunable_layers:
        for name, param in layer.layer.named_parameters():
            if param.device.type == "meta":
                placed = sorted({where for module, where in device_map.items() if where in ("cpu", "disk")
                                 and (f".{layer.index}." in f"{module}." or module.endswith(f".{layer.index}"))})
                raise ValueError(
                    f"layer {layer.index} {name} is on the meta device: the device_map offloads it"
                    + (f" ({', '.join(map(str, placed))})" if placed else "")
                    + " and accelerate loads it for its forward only; hfprune reads and slices the weights of "
                    "every layer it prunes: use a device_map that keeps them on the GPUs (device_map='auto' with "
                    "enough max_memory, a quantized base), or protect the offloaded layers (protected_layers)"
                )
