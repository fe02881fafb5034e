"""Check `hfprune.estimate` against the memory a real pruning step takes.

    python benchmarks/validate_estimator.py           # measure, write results/estimator_validation.md
    python benchmarks/validate_estimator.py --table   # estimates for LLaMA 7B..65B and Llama-2-70B
    python benchmarks/validate_estimator.py --smoke   # one tiny model, the 8-bit and 4-bit setups, seq 128;
                                                      # prints, writes nothing

Validation: three random Llama models (~25M, ~60M, ~120M parameters, vocabulary
32000), and a ~100M one with a 4096-token vocabulary whose peak, like a 7B-70B
model's, comes from the decoder's backward rather than the loss, run one step of each setup on the CPU, every measurement in a fresh
subprocess:

* ``lora-8bit`` / ``lora-8bit-ckpt``: the random model is saved, reloaded with
  ``BitsAndBytesConfig(load_in_8bit=True)`` and ``device_map="cpu"``, prepared
  with peft's ``prepare_model_for_kbit_training``, LoRA r=8 on the 7 projections,
  AdamW; forward + backward, the LoRAPrune score of every LoRA module
  (G = dB·A + B·dA − dB·dA against the de-quantised W + scale·B·A), optimizer step.
  Without and with gradient checkpointing.
* ``lora-4bit`` / ``lora-4bit-ckpt`` / ``activation_taylor-4bit-ckpt``: the same on a
  bitsandbytes 4-bit base (``BitsAndBytesConfig(load_in_4bit=True)``, NF4 with double
  quantization, float32 compute on the CPU); the scores are hfprune's own criteria
  (``score_layer`` of ``lora``, reading bitsandbytes' de-quantised weight in row blocks, and
  of ``activation_taylor``, from the activation gradients its hooks record).
* ``taylor-fp32`` / ``taylor-bf16``: the dense model with every weight requiring
  grad; forward + backward and the |W·g| score of every projection (no optimizer:
  LLM-Pruner scores, it does not train, the weights).

A warm-up step runs first (it creates the AdamW states and touches every code
path); the second step is measured.

How the peak is measured, and why. The estimator predicts the bytes tensors
occupy at the peak, the quantity ``torch.cuda.max_memory_allocated`` reports on
a GPU. Its faithful CPU counterpart is the allocator: ``torch.profiler`` with
``profile_memory=True`` records every allocation and free of the CPU allocator
(op-internal workspaces included); the running sum over the measured step gives
the peak above the bytes live when it starts. Those are counted directly: every
tensor storage reachable from Python (parameters, bitsandbytes' int8 matrices
and scales, optimizer states), each storage once. measured = live at start +
allocator peak over the step.

Peak RSS is reported as a cross-check, not as the reference: it also holds
Python objects, glibc arenas that freed memory does not leave, and pages of
libraries first touched in the step. To keep it close, the subprocess runs with
a fixed ``MALLOC_MMAP_THRESHOLD_`` (large tensors are mmap-ed and given back on
free), ``/proc/self/clear_refs`` resets the high-water mark before the measured
step, and RSS peak = live tensors at start + (VmHWM − VmRSS at start).

The activations saved for backward are also counted exactly, tensor by tensor,
with ``torch.autograd.graph.saved_tensors_hooks`` (setups without checkpointing)
and compared with the estimator's formula.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hfprune.estimate import (  # noqa: E402
    compare_criteria,
    comparison_markdown,
    estimate_memory,
    model_shapes,
)
from hfprune.bnb4bit import logical_numel  # noqa: E402
from hfprune.structure import PROJECTION_ROLES as PROJECTIONS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MiB = 1024**2
SEQ_LEN = 512
BATCH_SIZE = 1
LORA_R = 8

SIZES = {
    "llama-25m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=12, num_attention_heads=4,
                      num_key_value_heads=2),
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=10, num_attention_heads=8,
                      num_key_value_heads=4),
    "llama-120m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4),
    # a small vocabulary: the decoder's backward, not the loss, makes the peak (as for 7B-70B models)
    "llama-100m-v4k": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                           num_key_value_heads=8, vocab_size=4096),
}
SETUPS = {
    "lora-8bit": dict(criterion="lora", load_in_8bit=True, gradient_checkpointing=False, dtype="float32"),
    "lora-8bit-ckpt": dict(criterion="lora", load_in_8bit=True, gradient_checkpointing=True, dtype="float32"),
    "lora-4bit": dict(criterion="lora", load_in_4bit=True, gradient_checkpointing=False, dtype="float32"),
    "lora-4bit-ckpt": dict(criterion="lora", load_in_4bit=True, gradient_checkpointing=True, dtype="float32"),
    "activation_taylor-4bit-ckpt": dict(criterion="activation_taylor", load_in_4bit=True,
                                        gradient_checkpointing=True, dtype="float32"),
    "taylor-fp32": dict(criterion="taylor", load_in_8bit=False, gradient_checkpointing=False, dtype="float32"),
    "taylor-bf16": dict(criterion="taylor", load_in_8bit=False, gradient_checkpointing=False, dtype="bfloat16"),
}
# --smoke: seconds, widths bitsandbytes' 4-bit CPU kernels take (multiples of the block size 64)
SMOKE_SIZE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024)
SMOKE_SETUPS = ("lora-8bit", "lora-4bit", "lora-4bit-ckpt", "activation_taylor-4bit-ckpt")
SMOKE_SEQ_LEN = 128
TABLE_MODELS = ("llama-7b", "llama-13b", "llama-30b", "llama-65b", "llama-2-70b", "llama-3-8b", "llama-3.1-70b")
#: The 4-bit columns: QLoRA's base (NF4 with double quantization, bf16 compute), for the LoRA criterion and
#: for activation_taylor, which needs no weight at all to score.
FOUR_BIT_COLUMNS = {"lora (4-bit)": "lora", "activation_taylor (4-bit)": "activation_taylor"}


def llama_config(size: str):
    from transformers import LlamaConfig

    sizes = SMOKE_SIZE if size == "smoke" else SIZES[size]
    return LlamaConfig(**{"vocab_size": 32000, "max_position_embeddings": 2048, **sizes})


def _quantized(spec: dict) -> bool:
    return bool(spec.get("load_in_8bit") or spec.get("load_in_4bit"))


def estimate_for(size: str, setup: str, seq_len: int = SEQ_LEN):
    spec = SETUPS[setup]
    lora = spec["criterion"] == "lora" or _quantized(spec)  # a quantized base trains LoRA adapters
    return estimate_memory(
        llama_config(size),
        criterion=spec["criterion"],
        load_in_8bit=bool(spec.get("load_in_8bit")),
        load_in_4bit=bool(spec.get("load_in_4bit")),
        double_quant=bool(spec.get("load_in_4bit")),
        seq_len=seq_len,
        batch_size=BATCH_SIZE,
        lora_r=LORA_R if lora else 0,
        gradient_checkpointing=spec["gradient_checkpointing"],
        compute_dtype=spec["dtype"],
        optimizer="adamw" if lora else None,
    )


# ---------------------------------------------------------------------------
# measurement (runs in a fresh subprocess)


def _live_tensor_bytes() -> int:
    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - tensors without storage (meta, sparse, ...)
            continue
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _lora_scores(model) -> None:
    """LoRAPrune's importance of every LoRA module, with 3 out x in fp32 buffers at most."""
    import torch

    for module in model.modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        grad_a, grad_b = a.grad, b.grad
        base = module.get_base_layer()
        state = base.state
        int8 = state.CB if state.CB is not None else base.weight.CB
        scales = state.SCB if state.SCB is not None else base.weight.SCB
        with torch.no_grad():
            gradient = grad_b @ a  # buffer 1: G = dB·A + B·dA − dB·dA
            gradient.addmm_(b, grad_a)
            gradient.addmm_(grad_b, grad_a, alpha=-1.0)
            weight = int8.to(torch.float32)  # buffer 2: W + scale·B·A
            weight.mul_(scales.unsqueeze(1) / 127.0)
            weight.addmm_(b, a, alpha=module.scaling["default"])
            score = (gradient * weight).abs_()  # buffer 3
            module._score_rows = score.sum(1)
            module._score_cols = score.sum(0)
            del gradient, weight, score


def _hfprune_scores(criterion):
    """Score every layer with hfprune's own criterion (what PruningCallback runs each step)."""
    from hfprune.structure import discover

    def score(model) -> None:
        for layer in discover(model, protected_layers=()).layers:
            scores = criterion.score_layer(layer)
            layer.layer._scores = scores
            del scores

    return score


def _taylor_scores(model) -> None:
    """LLM-Pruner's element-wise first-order Taylor score |W·g| of every projection."""
    import torch

    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            with torch.no_grad():
                score = (module.weight * module.weight.grad).float().abs()
                module._score_rows = score.sum(1)
                module._score_cols = score.sum(0)
                del score


def measure(size: str, setup: str, model_dir: str, seq_len: int = SEQ_LEN) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    spec = SETUPS[setup]
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    if _quantized(spec):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if spec.get("load_in_4bit"):
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        else:
            quantization = BitsAndBytesConfig(load_in_8bit=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["gradient_checkpointing"])
        model = get_peft_model(
            model, LoraConfig(r=LORA_R, lora_alpha=16, lora_dropout=0.0, target_modules=list(PROJECTIONS))
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        if spec.get("load_in_4bit"):
            from hfprune.importance import get_importance
            from hfprune.structure import discover

            criterion = get_importance(spec["criterion"])
            criterion.prepare(model, discover(model, protected_layers=()).layers)
            score = _hfprune_scores(criterion)
        else:
            score = _lora_scores
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map="cpu")
        if spec["gradient_checkpointing"]:
            model.gradient_checkpointing_enable()
        for p in model.parameters():
            p.requires_grad_(True)
        optimizer = None
        score = _taylor_scores
    model.train()
    model.config.use_cache = False

    def step(ids, hooks=None):
        with record_function("phase:forward"):
            if hooks is None:
                loss = model(input_ids=ids, labels=ids).loss  # output and logits dropped, as Trainer does
            else:
                with torch.autograd.graph.saved_tensors_hooks(*hooks):
                    loss = model(input_ids=ids, labels=ids).loss
        with record_function("phase:backward"):
            loss.backward()
        del loss
        with record_function("phase:scoring"):
            score(model)
        with record_function("phase:optimizer"):
            if optimizer is not None:
                optimizer.step()
        model.zero_grad(set_to_none=True)

    # Mark where the backward leaves the LM head and enters the decoder: the gradient of the
    # final norm's output is ready.
    def enter_decoder_backward(_grad):
        with record_function("mark:decoder backward"):
            pass

    def on_final_norm(_module, _inputs, output):
        if output.requires_grad:
            output.register_hook(enter_decoder_backward)

    final_norm = [module for name, module in model.named_modules() if name.endswith("model.norm")][-1]
    final_norm.register_forward_hook(on_final_norm)

    # A short warm-up step starts the thread pools and kernels and creates the AdamW states
    # (they are sized by the parameters, not by the sequence), at an eighth of a full step's cost.
    step(torch.randint(0, model.config.vocab_size, (BATCH_SIZE, seq_len // 8)))
    gc.collect()

    # Without checkpointing, the measured step also counts the tensors saved for backward
    # (checkpointing installs its own saved-tensor hooks).
    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    hooks = None if spec["gradient_checkpointing"] else (pack, lambda tensor: tensor)
    ids = torch.randint(0, model.config.vocab_size, (BATCH_SIZE, seq_len))

    live = _live_tensor_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss_start = _proc_status_kib("VmRSS") * 1024
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(ids, hooks)
    seconds = time.perf_counter() - started
    rss_peak = _proc_status_kib("VmHWM") * 1024

    events = prof.profiler.kineto_results.events()
    memory = sorted(
        ((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"),
    )
    phases = {e.name().removeprefix("phase:"): (e.start_ns(), e.end_ns()) for e in events
              if e.name().startswith("phase:")}
    marks = [e.start_ns() for e in events if e.name() == "mark:decoder backward"]
    backward_start, backward_end = phases.pop("backward")
    phases["loss backward"] = (backward_start, marks[-1])
    phases["decoder backward"] = (marks[-1], backward_end)
    # level above the start after each event; a phase's peak includes the level it starts at
    levels, current = [], 0
    for when, nbytes in memory:
        current += nbytes
        levels.append((when, current))
    peak = max((level for _, level in levels), default=0)
    phase_peaks = {}
    for name, (start, end) in phases.items():
        before = [level for when, level in levels if when < start]
        inside = [level for when, level in levels if start <= when <= end]
        phase_peaks[name] = max([before[-1] if before else 0, *inside])
    return {
        "size": size,
        "setup": setup,
        "parameters": sum(logical_numel(p) for p in model.parameters()),  # a packed 4-bit weight: its [out, in]
        "live_at_start": live,
        "allocator_peak": live + peak,
        "phase_peaks": {name: live + value for name, value in phase_peaks.items()},
        "rss_peak": live + (rss_peak - rss_start),
        "saved_activations": sum(saved.values()) if hooks else None,
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------
# driver


def _save_random_model(size: str, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(size))
    model.save_pretrained(folder)


def _run_subprocess(size: str, setup: str, model_dir: Path, seq_len: int = SEQ_LEN) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, __file__, "--measure", size, setup, str(model_dir), "--seq-len", str(seq_len)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {size} {setup} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(estimate: int, measured: int) -> str:
    return f"{estimate / measured:.3f}"


def _measured_peak_phase(phases: dict[str, int]) -> str:
    """The measured phase with the highest peak, named as the estimator names it."""
    named = {
        "forward + loss backward": max(phases["forward"], phases["loss backward"]),
        "decoder backward": phases["decoder backward"],
        "importance scoring": phases["scoring"],
        "optimizer step": phases["optimizer"],
    }
    return max(named, key=named.get)


def validate(sizes, setups, seq_len: int = SEQ_LEN) -> str:
    rows, saved_rows, phase_rows, worst = [], [], [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            folder = Path(tmp) / size
            _save_random_model(size, folder)
            vocab = llama_config(size).vocab_size
            for setup in setups:
                result = _run_subprocess(size, setup, folder, seq_len)
                estimate = estimate_for(size, setup, seq_len)
                measured, rss = result["allocator_peak"], result["rss_peak"]
                worst = max(worst, abs(estimate.total / measured - 1.0))
                measured_phases = result["phase_peaks"]
                rows.append(
                    f"| {size} | {result['parameters'] / 1e6:.1f}M | {vocab} | {setup} | {estimate.total / MiB:.1f} | "
                    f"{measured / MiB:.1f} | {_ratio(estimate.total, measured)} | {rss / MiB:.1f} | "
                    f"{_ratio(estimate.total, rss)} | {estimate.peak_phase} | "
                    f"{_measured_peak_phase(measured_phases)} | {result['seconds']:.1f} |"
                )
                if result["saved_activations"] is not None:
                    # the hooks also see the loss's fp32 log-softmax (estimator: part of the loss buffers)
                    log_softmax = 4 * seq_len * BATCH_SIZE * vocab
                    predicted = estimate.components["saved_activations"] + log_softmax
                    saved_rows.append(
                        f"| {size} | {setup} | {predicted / MiB:.2f} | {result['saved_activations'] / MiB:.2f} | "
                        f"{_ratio(predicted, result['saved_activations'])} |"
                    )
                est = {name: sum(parts.values()) for name, parts in estimate.phases.items()}
                pairs = [
                    (est["forward + loss backward"], max(measured_phases["forward"], measured_phases["loss backward"])),
                    (est["decoder backward"], measured_phases["decoder backward"]),
                    (est["importance scoring"], measured_phases["scoring"]),
                    (est["optimizer step"], measured_phases["optimizer"]),
                ]
                phase_rows.append(
                    f"| {size} | {setup} | "
                    + " | ".join(f"{e / MiB:.1f} / {m / MiB:.1f} ({_ratio(e, m)})" for e, m in pairs)
                    + " |"
                )
                print(rows[-1], flush=True)
    lines = [
        "# Memory estimator against measured peaks (CPU)",
        "",
        f"Generated by `python benchmarks/validate_estimator.py`. Random Llama models, seq {seq_len}, "
        f"batch {BATCH_SIZE}; `lora-8bit*`: bitsandbytes int8 base on the CPU, LoRA r={LORA_R} on all 7 "
        "projections, AdamW, LoRAPrune scores; `*-4bit*`: bitsandbytes NF4 base with double quantization "
        "(float32 compute), the same LoRA and AdamW, hfprune's `lora` / `activation_taylor` scores; "
        "`taylor-*`: dense weights requiring grad, |W·g| scores. "
        "The estimator is called with the CPU's dtypes (`compute_dtype='float32'`, or bf16 for `taylor-bf16`). "
        "`measured` = tensors live at the start of the step + the CPU allocator's peak over the step "
        "(torch.profiler memory events); `RSS` = live tensors + the rise of peak RSS. MiB.",
        "",
        "| model | parameters | vocab | setup | estimate | measured | estimate / measured | RSS | estimate / RSS "
        "| estimated peak phase | measured peak phase | step s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|---:|",
        *rows,
        "",
        f"Largest deviation from the allocator measurement: {worst * 100:.1f}%.",
        "",
        "## Activations saved for backward (saved_tensors_hooks, without checkpointing)",
        "",
        "| model | setup | formula MiB | counted MiB | ratio |",
        "|---|---|---:|---:|---:|",
        *saved_rows,
        "",
        "## Peak by phase: estimate / measured (ratio), MiB",
        "",
        "The backward is split where the gradient reaches the final norm's output (LM head done).",
        "",
        "| model | setup | forward + loss backward | decoder backward | importance scoring | optimizer step |",
        "|---|---|---|---|---|---|",
        *phase_rows,
        "",
    ]
    return "\n".join(lines)


def estimates_table() -> str:
    rows = {}
    for name in TABLE_MODELS:
        shapes = model_shapes(name)  # built on meta and measured once per model
        settings = dict(seq_len=SEQ_LEN, batch_size=BATCH_SIZE, lora_r=LORA_R)
        rows[name] = compare_criteria(shapes, **settings)
        for column, criterion in FOUR_BIT_COLUMNS.items():
            rows[name][column] = estimate_memory(shapes, criterion=criterion, load_in_4bit=True, double_quant=True,
                                                 **settings)
    lines = [
        "# Estimated peak memory: LoRA criterion on an 8-bit base vs Taylor on bf16, and a 4-bit base",
        "",
        f"Generated by `python benchmarks/validate_estimator.py --table` from the configs in "
        f"`hfprune/model_configs`. seq {SEQ_LEN}, batch {BATCH_SIZE}, LoRA r={LORA_R} on all 7 projections, "
        "AdamW on the LoRA weights, gradient checkpointing. 'fits' adds 1 GiB of CUDA context and 5% "
        "allocator slack to the peak and compares with 80 GB (80e9 bytes, 74.5 GiB). 4-bit: bitsandbytes "
        "NF4 with double quantization and bf16 compute (QLoRA's base), embeddings, LM head and norms in fp32 "
        "(peft's prepare_model_for_kbit_training); `activation_taylor` scores from activation gradients, so it "
        "needs no work buffer the size of a weight.",
        "",
        comparison_markdown(rows, gpu_bytes=80e9),
        "",
        "## The 4-bit base on smaller GPUs",
        "",
        four_bit_fits(rows),
        "",
        "## Breakdown",
        "",
    ]
    for name, row in rows.items():
        for estimate in row.values():
            lines += [estimate.to_markdown(), ""]
    return "\n".join(lines)


def four_bit_fits(rows, gpus_gb=(16, 24, 48)) -> str:
    """Which GPU sizes the 4-bit columns fit (the same context and slack as above; GB = 1e9 bytes)."""
    header = "| model | " + " | ".join(f"{column} GiB | fits" for column in FOUR_BIT_COLUMNS) + " |"
    lines = [header, "|---|" + "---:|---|" * len(FOUR_BIT_COLUMNS)]
    for model, row in rows.items():
        cells = []
        for column in FOUR_BIT_COLUMNS:
            estimate = row[column]
            fits = [f"{gb} GB" for gb in gpus_gb if estimate.fits(gb * 1e9)]
            cells += [f"{estimate.total_gib:.1f}", ", ".join(fits) or f"none of {', '.join(map(str, gpus_gb))} GB"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="write the 7B..70B estimates instead of validating")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny model, the quantized setups, seq 128: prints, writes nothing")
    parser.add_argument("--measure", nargs=3, metavar=("SIZE", "SETUP", "MODEL_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:
        print(json.dumps(measure(*args.measure, seq_len=args.seq_len)))
        return
    if args.smoke:
        print(validate(["smoke"], SMOKE_SETUPS, SMOKE_SEQ_LEN))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.table:
        text = estimates_table()
        (RESULTS / "estimates.md").write_text(text)
    else:
        text = validate(args.sizes, args.setups)
        (RESULTS / "estimator_validation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
