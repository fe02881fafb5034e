"""PruningCallback on an FSDP2-sharded model (torch's `fully_shard`, as accelerate applies it for fsdp_version 2),
driven through the training loop's events, one process per rank; used by tests/test_fsdp.py.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.run_fsdp_pruning OUT     # sharded, gloo
    python -m tests.run_fsdp_pruning OUT --reference                                    # one process, no FSDP

Both see the same data: at every step rank r trains on its half of the step's batch; the reference trains on
the whole batch. Writes OUT/masks-rank{R}.safetensors (or OUT/masks-reference.safetensors) and the full LoRA
factors beside them; rank 0 exports with save_pruned_from_adapters to OUT/export-rank0, the reference (sliced in
memory at the end of the pruning stage) with save_pruned to OUT/export-reference.

Why not through the Trainer: accelerate switches to FSDP only for accelerator backends (MULTI_GPU, XPU, ...);
with use_cpu/gloo, `TrainingArguments(fsdp=..., fsdp_config={"version": 2})` silently trains DDP instead.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import zlib

import torch
from safetensors.torch import save_file

from .tiny_models import LORA_TARGETS, save_tiny

STEPS = 6
BATCH = 4  # sequences per step, all ranks together
SEQ_LEN = 16


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--reference", action="store_true")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    sharded = not cli.reference
    if sharded:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if sharded else 0
    world = torch.distributed.get_world_size() if sharded else 1

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerControl, TrainerState, TrainingArguments

    from hfprune import PruningCallback, PruningConfig, distributed
    from hfprune.export import save_pruned, save_pruned_from_adapters

    base = os.path.join(cli.out, "base")
    if rank == 0 and not os.path.exists(os.path.join(base, "config.json")):
        save_tiny("llama", base)
    if sharded:
        torch.distributed.barrier()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0)
    model = get_peft_model(model, lora_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert distributed.sharding(model) == "fsdp"
    model.train()
    # compensation="auto" is none under FSDP but least squares in the one-process reference, and compensated
    # forward passes change later scores: both runs say "none" so that they compare like with like
    config = PruningConfig(target_sparsity=0.4, importance="activation_taylor", pruning_steps=4, prune_every=1,
                           warmup_ratio=0.25, cooldown_ratio=0.0, protected_layers=(0,), compensation="none")
    callback = PruningCallback(config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=STEPS, report_to=[], use_cpu=True)
    state, control = TrainerState(max_steps=STEPS), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    generator = torch.Generator().manual_seed(1)
    share = BATCH // world
    for step in range(1, STEPS + 1):
        ids = torch.randint(0, 128, (BATCH, SEQ_LEN), generator=generator)[rank * share : (rank + 1) * share]
        model(input_ids=ids, labels=ids).loss.backward()
        callback.on_pre_optimizer_step(args, state, control)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.global_step = step
        callback.on_step_end(args, state, control, model=model, optimizer=optimizer)
    callback.on_train_end(args, state, control, optimizer=optimizer)
    assert not callback.physically_pruned if sharded else callback.physically_pruned

    lora_state = distributed.gather_lora_state(model)  # every rank: a collective
    masks = callback.masks if sharded else callback.removal_masks
    tag = f"rank{rank}" if sharded else "reference"
    save_file({**masks.state_dict(), **{f"lora.{k}": v for k, v in lora_state.items()}},
              os.path.join(cli.out, f"masks-{tag}.safetensors"))
    if sharded and rank == 0:  # the sharded model was never sliced: original + masks + gathered LoRA
        save_pruned_from_adapters(os.path.join(cli.out, f"export-{tag}"), original_checkpoint=base, masks=masks,
                                  lora_config=lora_config, lora_state=lora_state, overwrite=True)
    elif not sharded:  # the reference was sliced in memory: the usual export
        save_pruned(model, os.path.join(cli.out, f"export-{tag}"), original_checkpoint=base, overwrite=True)
    if sharded:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
