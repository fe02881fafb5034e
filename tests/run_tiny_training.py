"""A small PruningTrainer run, as a separate process: used by the kill/resume and 2-process tests.

    python -m tests.run_tiny_training OUT [--kill-at N [--kill-in WHERE]] [--resume] [--max-steps N]

--kill-in (with --kill-at N, kill -9 at the step-N checkpoint):
    on_save        after the checkpoint is complete (default)
    trainer_state  inside the Trainer's write: half of trainer_state.json written, the rest of the Trainer's
                   files and pruning_state.safetensors already there
    pruning_state  inside hfprune's write of pruning_state.safetensors (its temporary file half written)

Writes OUT/final.safetensors (masks, removal masks, LoRA weights) on every rank
(OUT/final-rank{R}.safetensors under torchrun).
"""

from __future__ import annotations

import argparse
import os
import signal

import datasets
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback, TrainingArguments

from hfprune import PruningConfig, PruningTrainer

from .tiny_models import alpaca_records, save_tiny, tiny_tokenizer


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            _kill()


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no atexit: as a crash


def kill_inside_writes(where: str, step: int) -> None:
    """Patch the writer `where` names to die half-way through the step-`step` checkpoint."""
    target = f"{os.sep}checkpoint-{step}{os.sep}"
    if where == "trainer_state":
        from transformers.trainer_callback import TrainerState

        real = TrainerState.save_to_json

        def save_to_json(self, json_path):
            if target in str(json_path):
                with open(json_path, "w", encoding="utf-8") as handle:
                    handle.write('{"global_step": ')
                    handle.flush()
                _kill()
            return real(self, json_path)

        TrainerState.save_to_json = save_to_json
    elif where == "pruning_state":
        import safetensors.torch

        real_save = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            if target in str(filename):
                with open(filename, "wb") as handle:
                    handle.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a header cut short
                _kill()
            return real_save(tensors, filename, metadata=metadata)

        safetensors.torch.save_file = save_file


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--kill-in", choices=("on_save", "trainer_state", "pruning_state"), default="on_save")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--granularity", default="kv_group")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    model_dir = os.path.join(cli.out, "base")
    if rank == 0 and not os.path.exists(model_dir):
        save_tiny("llama", model_dir)
    if "RANK" in os.environ:
        import time

        while not os.path.exists(os.path.join(model_dir, "config.json")):
            time.sleep(0.1)
        time.sleep(0.5)
    args = TrainingArguments(
        output_dir=os.path.join(cli.out, "run"),
        max_steps=cli.max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=2e-3,
        logging_steps=1,
        save_steps=4,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        seed=7,
        data_seed=7,
        ddp_backend="gloo" if "RANK" in os.environ else None,
        dataloader_num_workers=0,
    )
    config = PruningConfig(target_sparsity=0.4, prune_every=2, protected_layers=(0,), head_granularity=cli.granularity)
    trainer = PruningTrainer(
        model=model_dir,
        args=args,
        pruning_config=config,
        load_in_8bit=False,
        model_init_kwargs={"dtype": torch.float32},
        train_dataset=datasets.Dataset.from_list(alpaca_records(64)),
        processing_class=tiny_tokenizer(),
        callbacks=[KillAt(cli.kill_at)] if cli.kill_at and cli.kill_in == "on_save" else None,
    )
    if cli.kill_at and cli.kill_in != "on_save":
        kill_inside_writes(cli.kill_in, cli.kill_at)
    trainer.train(resume_from_checkpoint=True if cli.resume else None)
    callback = trainer.pruning_callback
    tensors = {k: v for k, v in callback.masks.state_dict().items()}
    if callback.removal_masks is not None:
        tensors.update({f"removal.{k}": v for k, v in callback.removal_masks.state_dict().items()})
    tensors.update({k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k})
    name = f"final-rank{rank}.safetensors" if "RANK" in os.environ else "final.safetensors"
    save_file(tensors, os.path.join(cli.out, name))


if __name__ == "__main__":
    main()
