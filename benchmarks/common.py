"""What every benchmark shares: paths, the machine, quiet logs, models, tables.

Each script runs in two modes:

* full (default): the real SmolLM2-135M-Instruct, writes `benchmarks/results/<name>.md`
  (and `<name>.json` with the raw numbers);
* `--smoke`: a tiny random Llama, a few steps, a few seconds, written to a temporary
  directory (or `--out`), never over the committed results. `tests/test_benchmarks.py`
  runs every script this way so they never rot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS_DIR = ROOT / "benchmarks" / "results"
DATA_DIR = Path(os.environ.get("HFPRUNE_DATA_DIR", ROOT.parent / "shared" / "data"))
MIB = 2**20
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


# ---------------------------------------------------------------- command line and output


# On this shared 2-core machine other processes keep both cores busy; with 2 torch threads every
# OpenMP barrier then waits for a descheduled thread, and a training step was measured 4x slower
# than with 1 thread (SmolLM2, LoRA, 2 x 128 tokens: 17.7 s vs 4.0 s median). Training and scoring
# benchmarks therefore default to 1 thread; the speed benchmark uses 2 (see speedup.py).
DEFAULT_THREADS = 1


def parser(description: str, threads: int = DEFAULT_THREADS) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, a few steps, seconds; results to a temp dir")
    p.add_argument("--out", default=None, help="output directory (default: benchmarks/results, or a temp dir with --smoke)")
    p.add_argument("--threads", type=int, default=threads, help=f"torch intra-op threads (default {threads or 2})")
    return p


def output_dir(args) -> Path:
    """Where results go. Smoke runs never write into the committed results."""
    if args.out:
        out = Path(args.out)
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix="hfprune-bench-smoke-"))
    else:
        out = RESULTS_DIR
    if args.smoke and out.resolve() == RESULTS_DIR.resolve():
        raise SystemExit(f"--out={out}: smoke results must not overwrite the committed results in {RESULTS_DIR}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def command_line() -> str:
    return " ".join(["python", os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def write_outputs(out: Path, name: str, markdown: str, data: dict) -> Path:
    """`<out>/<name>.md` and `<out>/<name>.json`; returns the markdown path."""
    md = out / f"{name}.md"
    md.write_text(markdown.rstrip() + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {md}", file=sys.stderr)
    return md


def table(headers: Sequence[str], rows: Iterable[Sequence], align: Optional[str] = None) -> str:
    """A markdown table; `align` is one character per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def target_line(target: str, verdicts: dict) -> str:
    """`Target: <target>: <name> met; <name> **missed**.` — one verdict per measured setting."""
    return (f"Target: {target}: "
            + "; ".join(f"{name} {'met' if ok else '**missed**'}" for name, ok in verdicts.items()) + ".")


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# ---------------------------------------------------------------- machine and environment


def setup(threads: int = 2) -> None:
    """Thread count and quiet logs (bitsandbytes warns once per 8-bit matmul on the CPU)."""
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> Optional[str]:
    """Installed version, read from the metadata: no import (transformers alone takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def other_torch_processes() -> list[str]:
    """Other processes that have torch loaded (Linux: libtorch in /proc/PID/maps), this one and its own
    ancestors and children aside: two torch jobs on a few cores slow each other down several-fold, so every
    report says whether its benchmark ran alone. Empty where /proc cannot tell."""
    own = {os.getpid()}
    pid = os.getppid()
    while pid > 1 and pid not in own:
        own.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    found = []
    for entry in Path("/proc").glob("[0-9]*") if Path("/proc").is_dir() else ():
        try:
            pid = int(entry.name)
            if pid in own or int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) in own:
                continue
            if "libtorch" in (entry / "maps").read_text():
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{pid} {command[:80].strip()}")
        except (OSError, ValueError, IndexError):
            continue
    return found


def machine() -> dict:
    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "other_torch_processes": other_torch_processes(),
    }
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    for package in ("torch", "transformers", "peft", "bitsandbytes", "torch-pruning"):
        info[package.replace("-", "_")] = package_version(package)
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        pass
    return info


def machine_line(info: dict) -> str:
    load, end = info.get("load_average"), info.get("load_average_end")
    load = f", load average at start {load[0]:.1f}" if load else ""
    load += f", at end {end[0]:.1f}" if end else ""  # what else ran meanwhile, for a long benchmark
    if "other_torch_processes" in info:
        others = info["other_torch_processes"]
        load += (f", other torch processes at start: {len(others)} ({'; '.join(others)[:160]})" if others
                 else ", no other torch process at start")
    return (
        f"{info['date']}; {info['cpu']}, {info['cores']} CPU cores, torch threads {info.get('torch_threads')}{load}; "
        f"torch {info['torch']}, transformers {info.get('transformers')}, peft {info.get('peft')}, "
        f"bitsandbytes {info.get('bitsandbytes')}"
    )


def header(title: str, info: dict, extra: str = "") -> list[str]:
    lines = [f"# {title}", "", f"Command: `{command_line()}`", "", f"Machine: {machine_line(info)}.", ""]
    if extra:
        lines += [extra, ""]
    return lines


# ---------------------------------------------------------------- timing


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- models and data


def smollm2_path() -> str:
    from hfprune.offline import ensure_offline_model

    return str(ensure_offline_model())


def load_causal_lm(path: str, eight_bit: bool = False, dtype=None, four_bit: bool = False):
    """A causal LM from a local checkpoint: fp32 (default) or a bitsandbytes 8-bit / 4-bit base on the CPU
    (4-bit: QLoRA's NF4 with double quantization and bfloat16 compute, as PruningTrainer(load_in_4bit=True))."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if four_bit:
        from hfprune.quantization import bnb_config

        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=bnb_config(load_in_4bit=True), device_map="cpu", dtype=torch.float32
        )
    if eight_bit:
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)


def tiny_llama_checkpoint(directory: Path, **overrides) -> str:
    """A tiny random Llama (8 query heads, 2 KV heads, GQA) and a character tokenizer, saved to `directory`.

    `tests/tiny_models.py` builds it; smoke runs load it through `from_pretrained`, 8-bit included.
    """
    from tests.tiny_models import save_tiny

    settings = dict(num_hidden_layers=4, max_position_embeddings=512)
    settings.update(overrides)
    save_tiny("llama", directory, **settings)
    return str(directory)


def lora_config(r: int = 8):
    """LoRAPrune's setting, also the recovery adapter of every method: rank 8 on all projections."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")


def read_c4(limit: Optional[int] = None) -> list[str]:
    from hfprune.data import read_texts

    return read_texts(str(DATA_DIR / "c4_demo.jsonl"), limit=limit)


def read_alpaca() -> list[dict]:
    return json.loads((DATA_DIR / "alpaca_en_demo.json").read_text())
