"""`save_pruned` of a tiny pruned model, as a separate process that can be killed -9 half-way.

    python -m tests.run_tiny_save OUTPUT_DIR [--seed N] [--kill-in WHERE] [--no-exchange] [--hold-lock S]

--kill-in:
    writing   after the weights are written, inside the model card (the temporary directory half full)
    swap      inside the swap: after the atomic exchange, or with --no-exchange between the two renames
--no-exchange: swap with two renames, as on a system without renameat2(RENAME_EXCHANGE)
--hold-lock S: sleep S seconds inside the write (holding the directory's lock), for the concurrency test
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

from hfprune import PruningConfig, prune_model
from hfprune import atomic
from hfprune.export import save_pruned

from .tiny_models import tiny_model, tiny_tokenizer


def pruned_model(seed: int):
    model = tiny_model("llama", seed=seed)
    return prune_model(model, PruningConfig(importance="magnitude", target_sparsity=0.3, protected_layers=(0,)))


def _kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no atexit: as a crash


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-in", choices=("writing", "swap"))
    parser.add_argument("--no-exchange", action="store_true")
    parser.add_argument("--hold-lock", type=float, default=0.0)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    if cli.no_exchange:
        atomic._exchange = lambda a, b: False
    if cli.kill_in == "writing" or cli.hold_lock:
        import hfprune.model_card

        real_write = hfprune.model_card.write_model_card

        def write_model_card(*args, **kwargs):
            if cli.hold_lock:
                print("writing", flush=True)
                time.sleep(cli.hold_lock)
            if cli.kill_in == "writing":
                _kill()
            return real_write(*args, **kwargs)

        hfprune.model_card.write_model_card = write_model_card
    elif cli.kill_in == "swap":
        if cli.no_exchange:
            real_rename = os.rename

            def rename(src, dst, *args, **kwargs):
                real_rename(src, dst, *args, **kwargs)
                if os.path.basename(os.fspath(dst)).startswith(f".{os.path.basename(cli.output_dir)}.old-"):
                    _kill()  # the old directory is aside, the new one not yet in place

            atomic.os.rename = rename
        else:
            real_exchange = atomic._exchange

            def exchange(a, b):
                swapped = real_exchange(a, b)
                _kill()  # the old directory under the temporary name, not yet removed
                return swapped

            atomic._exchange = exchange
    save_pruned(pruned_model(cli.seed), cli.output_dir, tokenizer=tiny_tokenizer(), overwrite=True,
                report={"criterion": "magnitude", "seed": cli.seed})


if __name__ == "__main__":
    main()
