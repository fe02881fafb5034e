"""`save_pruned_from_adapters`: the pruned checkpoint of a model that was never sliced in memory.

Sharded training (FSDP) keeps every parameter as a shard, so hfprune masks it and never slices it; what
the run produces is the removal masks (original index space) and the trained LoRA factors. This export
builds the model's skeleton on the meta device (no memory), puts the LoRA factors in it, slices the
skeleton and the factors by the masks exactly as in-memory surgery would, and hands it to `save_pruned`,
which re-reads every base tensor from the original checkpoint, shard by shard, adds the LoRA deltas in
float32 and writes the smaller checkpoint. No process ever holds the full-precision model.

    lora = hfprune.distributed.gather_lora_state(model)          # on every rank (a collective)
    if rank == 0:
        save_pruned_from_adapters("out/", original_checkpoint="org/model", masks=callback.masks,
                                  lora_config=model.peft_config["default"], lora_state=lora)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..masking import PruningMasks
from ..structure import discover
from ..surgery import remove_pruned_groups
from .save import save_pruned
from .streaming import OriginalCheckpoint


def _skeleton(config, lora_config, lora_state: dict[str, torch.Tensor]):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)  # every base tensor is frozen: save_pruned re-reads it from the original
    if lora_config is None:
        if lora_state:
            raise ValueError(f"lora_state holds {len(lora_state)} tensors but lora_config is None: pass the LoraConfig")
        return model
    if getattr(lora_config, "modules_to_save", None):
        raise ValueError(
            f"lora_config.modules_to_save={lora_config.modules_to_save}: those trained copies are not LoRA factors; "
            "export from a consolidated model with save_pruned instead"
        )
    from peft import get_peft_model

    model = get_peft_model(model, lora_config)
    expected = {name for name, _ in model.named_parameters() if "lora_" in name}
    given = set(lora_state)
    if expected != given:
        missing, unknown = sorted(expected - given), sorted(given - expected)
        raise ValueError(
            "lora_state does not match lora_config's adapters: "
            + (f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"unexpected {unknown[:3]}{' ...' if len(unknown) > 3 else ''}" if unknown else "")
        )
    model.load_state_dict(lora_state, strict=False, assign=True)
    for name, param in model.named_parameters():
        if "lora_" in name and param.device.type == "meta":
            raise ValueError(f"{name}: still on the meta device after loading lora_state")
    return model


def save_pruned_from_adapters(
    output_dir: Union[str, Path],
    *,
    original_checkpoint: Union[str, Path],
    masks: PruningMasks,
    lora_config=None,
    lora_state: Optional[dict[str, torch.Tensor]] = None,
    **save_kwargs: Any,
) -> Path:
    """Write the pruned, LoRA-merged checkpoint of `original_checkpoint` (local directory or hub id) from the
    removal `masks` (original index space) and the full LoRA factors (`lora_state`, named as the PeftModel's
    parameters, e.g. `hfprune.distributed.gather_lora_state`) of `lora_config`'s adapters. `save_kwargs` go to
    `save_pruned` (tokenizer, report, dtype, overwrite, max_shard_size, uniform)."""
    from transformers import AutoConfig

    original = OriginalCheckpoint(original_checkpoint)
    config = AutoConfig.from_pretrained(str(original.path))
    model = _skeleton(config, lora_config, dict(lora_state or {}))
    remove_pruned_groups(discover(model, protected_layers=()), masks)
    return save_pruned(model, output_dir, masks=masks, original_checkpoint=original_checkpoint, **save_kwargs)
