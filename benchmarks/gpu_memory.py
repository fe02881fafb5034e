"""GPU check: the CUDA peak of real pruning steps on a random 7B-8B model, against `hfprune.estimate`.

    python benchmarks/gpu_memory.py                        # one H100/H200: Llama-3-8B config, ~3 minutes
    python benchmarks/gpu_memory.py --config llama-2-7b    # any config in hfprune/model_configs
    python benchmarks/gpu_memory.py --smoke                # CPU, a tiny config, seconds: the logic, no GPU numbers

No download: the model is built from its published config (`hfprune/model_configs`) with random
weights, directly on the device, in bf16. For a quantized setup every decoder projection is then
swapped for bitsandbytes' layer quantized on the device from its random weight (bitsandbytes'
own `int8_vectorwise_quant` / `quantize_4bit`, as `from_pretrained(quantization_config=...)` does
with a checkpoint's), prepared as `PruningTrainer` prepares a quantized base
(`prepare_model_for_kbit_training`, activation checkpointing, the default LoRA r=8 on the 7
projections). Each setup runs in a fresh process:

* `lora-8bit`: LoRAPrune's criterion on the int8 base (`Linear8bitLt`);
* `activation_taylor-4bit`: activation gradients on QLoRA's base (NF4, double quantization,
  bf16 compute);
* `taylor-bf16`: LLM-Pruner's full-gradient criterion on the bf16 base (LoRA for recovery, the
  projection weights unfrozen while scoring).

Real pruning steps: `PruningCallback`, driven by hand through the events the stock training
loop sends (`on_train_begin`, forward + backward, `on_pre_optimizer_step` -- the scores --,
AdamW's step, `on_step_end` -- mask updates, and at the last pruning step the physical removal
with the optimizer state transplanted --), `PRUNING_STEPS` steps of seq 512, batch 1, then one
recovery step on the smaller model. `torch.cuda.max_memory_allocated` is read per step (reset
before each) and over the whole run (reset once the model is built and prepared), and compared
with `estimate_memory(...)` for exactly that setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "gpu_memory"
GIB = 2**30
SETUPS = {
    "lora-8bit": dict(criterion="lora", base="8bit"),
    "activation_taylor-4bit": dict(criterion="activation_taylor", base="4bit"),
    "taylor-bf16": dict(criterion="taylor", base="bf16"),
}
PRUNING_STEPS = 3  # masks after steps 1, 2 and 3; weights sliced after step 3
RECOVERY_STEPS = 1
LORA_R = 8
# --smoke: widths bitsandbytes' 4-bit CPU kernels take (multiples of the block size 64)
SMOKE_CONFIG = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024)
TARGET = 0.10  # the estimate within 10% of the measured CUDA peak


def _config(name: str):
    from transformers import AutoConfig

    from hfprune.estimate.model_configs import load_model_config

    if name == "smoke":
        settings = dict(SMOKE_CONFIG)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)
    return load_model_config(name)


def quantize_projections_(model, base: str) -> int:
    """Swap every decoder projection `nn.Linear` for bitsandbytes' 8-bit or 4-bit layer, quantized on the weight's
    device from its current (random) values; returns how many were swapped."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] not in common.LORA_TARGETS:
            continue
        weight = module.weight.data
        if base == "8bit":
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=False, has_fp16_weights=False,
                                        threshold=6.0, device="meta")
            codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
            layer.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
        else:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
            packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True,
                                                         quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=64,
                                             compress_statistics=True, quant_type="nf4", module=layer,
                                             bnb_quantized=True)
            layer.quant_state = state
        layer.requires_grad_(False)
        model.set_submodule(name, layer)
        del module, weight
        swapped += 1
    # what from_pretrained(quantization_config=...) records, and what peft / prepare_model_for_kbit_training read
    setattr(model, "is_loaded_in_8bit" if base == "8bit" else "is_loaded_in_4bit", True)
    return swapped


def build(setup: str, config, device: str):
    """The setup's model on `device`, prepared as PruningTrainer prepares it."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    spec = SETUPS[setup]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.config.use_cache = False
    if spec["base"] != "bf16":
        quantize_projections_(model, spec["base"])
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, common.lora_config(LORA_R))
    model.train()
    return model


def estimate(setup: str, config, seq_len: int, batch_size: int):
    from hfprune.estimate import estimate_memory

    spec = SETUPS[setup]
    return estimate_memory(
        config, criterion=spec["criterion"], load_in_8bit=spec["base"] == "8bit", load_in_4bit=spec["base"] == "4bit",
        double_quant=spec["base"] == "4bit", seq_len=seq_len, batch_size=batch_size, lora_r=LORA_R,
        gradient_checkpointing=True, compute_dtype="bfloat16", optimizer="adamw",
    )


def child(setup: str, config_name: str, seq_len: int, batch_size: int, threads: int) -> dict:
    common.setup(threads)
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hfprune import PruningCallback, PruningConfig
    from hfprune.sparsity import count_parameters

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    config = _config(config_name)
    started = time.perf_counter()
    model = build(setup, config, device)
    build_seconds = time.perf_counter() - started
    spec = SETUPS[setup]
    pruning = PruningConfig(
        target_sparsity=0.2, importance=spec["criterion"], pruning_steps=PRUNING_STEPS, prune_every=1,
        warmup_ratio=0.0, cooldown_ratio=0.0,
        # bitsandbytes' CPU kernels need 4-bit widths in multiples of the block size; GPUs take any
        round_channels_to=1 if cuda or spec["base"] != "4bit" else 64,
    )
    callback = PruningCallback(pruning)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    total = PRUNING_STEPS + RECOVERY_STEPS
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=total, report_to=[], use_cpu=not cuda)
    state, control = TrainerState(max_steps=total), TrainerControl()
    params_before = count_parameters(model)
    generator = torch.Generator().manual_seed(0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    callback.on_train_begin(args, state, control, model=model)
    steps = []
    for step in range(1, total + 1):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        clock = time.perf_counter()
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        callback.on_pre_optimizer_step(args, state, control)  # scores, from the gradients of this step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.global_step = step
        callback.on_step_end(args, state, control, model=model, optimizer=optimizer)  # masks, removal
        if cuda:
            torch.cuda.synchronize()
        steps.append({"step": step, "loss": float(loss), "seconds": time.perf_counter() - clock,
                      "peak": torch.cuda.max_memory_allocated() if cuda else None,
                      "sliced": callback.physically_pruned})
        del loss, ids
    callback.on_train_end(args, state, control, optimizer=optimizer)
    figure = estimate(setup, config, seq_len, batch_size)
    pruning_peaks = [s["peak"] for s in steps if s["peak"] is not None and s["step"] <= PRUNING_STEPS]
    return {
        "setup": setup, "config": config_name, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "seq_len": seq_len, "batch_size": batch_size, "build_seconds": build_seconds,
        "loaded": loaded if cuda else None, "steps": steps,
        "peak": max(pruning_peaks) if pruning_peaks else None,
        "estimate": figure.total, "estimate_peak_phase": figure.peak_phase,
        "estimate_components": dict(figure.components),
        "params_before": params_before, "params_after": count_parameters(model),
        "physically_pruned": callback.physically_pruned,
        "sparsity": callback.sparsity().sparsity,
    }


def run_child(setup: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(common.ROOT), "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    command = [sys.executable, __file__, "--child", setup, "--config", args.config, "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.child_timeout)
    if done.returncode:
        raise RuntimeError(f"{setup} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(runs: list[dict], args, info: dict) -> tuple[str, dict]:
    gpu = runs[0]["device"] if runs else "?"
    title = f"CUDA peak of pruning steps: {args.config} (random weights) on {gpu}"
    if args.smoke:
        title = "CUDA peak of pruning steps: tiny config on the CPU (smoke test: no GPU numbers)"
    gib = lambda b: "n/a" if b is None else f"{b / GIB:.2f}"  # noqa: E731
    lines = common.header(title, info)
    lines += [
        f"Settings: seq {args.seq_len}, batch {args.batch_size}, activation checkpointing, LoRA r={LORA_R} on the 7 "
        f"projections, AdamW; {PRUNING_STEPS} pruning steps (PruningCallback: scores every step, masks after each, "
        f"weights sliced after the last) and {RECOVERY_STEPS} recovery step. `measured` = the largest "
        "`torch.cuda.max_memory_allocated` of the pruning steps (reset before each step); `estimate` = "
        "`hfprune.estimate.estimate_memory` for the same setting. GiB.",
        "",
    ]
    rows, verdicts = [], {}
    for run in runs:
        ratio = run["estimate"] / run["peak"] if run["peak"] else None
        if ratio is not None:
            verdicts[run["setup"]] = abs(ratio - 1) <= TARGET
        step_peaks = ", ".join(gib(s["peak"]) for s in run["steps"])
        rows.append([run["setup"], gib(run["loaded"]), gib(run["estimate"]), gib(run["peak"]), common.fmt(ratio, 3),
                     run["estimate_peak_phase"], step_peaks, f"{run['build_seconds']:.0f}",
                     f"{sum(s['seconds'] for s in run['steps']):.1f}", f"{run['sparsity']:.3f}"])
    lines += [common.table(["setup", "loaded", "estimate", "measured", "estimate / measured", "estimated peak phase",
                            "peak per step (last: recovery)", "build s", "steps s", "sparsity"], rows,
                           "lrrrrllrrr"), ""]
    if verdicts:
        lines += [common.target_line(f"the estimate within {TARGET:.0%} of the measured CUDA peak", verdicts), ""]
    else:
        lines += ["Target: the estimate within 10% of the measured CUDA peak: not measured (no GPU).", ""]
    return "\n".join(lines), {"verdicts": verdicts, "target": TARGET}


def main(argv=None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="hfprune/model_configs name (default llama-3-8b; smoke: tiny)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; smoke 64)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--child-timeout", type=int, default=240, help="seconds per setup")
    p.add_argument("--child", choices=sorted(SETUPS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.config = args.config or ("smoke" if args.smoke else "llama-3-8b")
    args.seq_len = args.seq_len or (64 if args.smoke else 512)
    if args.child:
        print(json.dumps(child(args.child, args.config, args.seq_len, args.batch_size, args.threads)))
        return 0
    common.setup(args.threads)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_memory.py measures CUDA memory: run it on a GPU, or pass --smoke to check the logic")
    out = common.output_dir(args)
    info = common.machine()
    runs = []
    for setup in args.setups:  # one at a time: each owns the GPU
        runs.append(run_child(setup, args))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "estimate_components"}), file=sys.stderr,
              flush=True)
    markdown, verdict = report(runs, args, info)
    common.write_outputs(out, NAME, markdown, {"machine": info, "settings": {
        "config": args.config, "seq_len": args.seq_len, "batch_size": args.batch_size}, "runs": runs, **verdict})
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
