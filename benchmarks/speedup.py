"""Prefill and decode speed of pruned SmolLM2 on this CPU, beside the FLOPs limit.

    python benchmarks/speedup.py             # SmolLM2-135M-Instruct, writes results/speedup.md (+ .json)
    python benchmarks/speedup.py --smoke     # tiny random Llama, seconds, temp dir

Models: the dense fp32 SmolLM2-135M-Instruct and copies pruned one-shot with
`prune_model(importance="magnitude")` (speed does not depend on the criterion) to 20% and
50% of the prunable parameters, with the default `PruningConfig` structures (query heads
inside KV groups + MLP channels, local ranking), each without rounding and with kept widths
rounded to hardware-friendly multiples: `round_channels_to=64` (MLP widths a multiple of 64)
and `round_heads_to=3` (query heads a multiple of SmolLM2's 3 KV heads; with `head_dim=64`
every attention width is then a multiple of 192).

Timing (`hfprune.evaluation.measure_speed`): batch 1, a 1024-token prompt (prefill: one
forward pass building the KV cache, logits of the last position only), then 64 greedy
decode steps reusing the cache; `torch.set_num_threads(2)`. The models are measured in
turn, one round each, repeated `--repeats` times after one untimed warm-up round, so a
burst of load from other processes on this shared machine hits all of them alike; medians
are reported.

FLOPs limit (`hfprune.evaluation.flops_speedup_limit`): dense FLOPs / pruned FLOPs per
token, matrix multiplies only (projections, attention, LM head). Prefill: averaged over a
1024-token causal prefill. Decode: one token attending to the mean context of the decode
steps (prompt + 32 tokens). Target: measured prefill speed-up >= 90% of the limit.

llama.cpp rows (when llama-cpp-python is installed, `pip install hfprune[serve]`): every model
above saved with `save_pruned`, exported with `export_gguf` (`--gguf-outtypes`, default f16
and q8_0; the dense model becomes llama.cpp's `llama` architecture, the heterogeneous pruned
ones `deci`) and timed in llama.cpp with the same prompt length, decode steps and threads:
prefill is one `llama_decode` of the prompt, decode `--new-tokens` greedy steps reusing the
KV cache; models in turn, median of the rounds. The smoke model then has SmolLM2's vocabulary
(49152 tokens) and tokenizer, which a GGUF needs.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "speedup"
TARGET = 0.90
ROUNDING = {"none": dict(), "rounded": dict(round_channels_to=64, round_heads_to=3)}
SMOKE_ROUNDING = {"none": dict(), "rounded": dict(round_channels_to=16, round_heads_to=4)}
GGUF_OUTTYPES = ("f16", "q8_0")
SMOKE_VOCAB = 49152  # SmolLM2's: the smoke GGUFs carry its tokenizer


def build_models(path: str, sparsities, rounding: dict) -> dict:
    from hfprune import PruningConfig, prune_model
    from hfprune.sparsity import count_parameters
    from hfprune.structure import discover

    models = {}
    dense = common.load_causal_lm(path).eval()
    prunable = discover(dense).prunable_params()
    dense_params = count_parameters(dense)
    models["dense"] = {"model": dense, "sparsity": 0.0, "rounding": "-", "params": dense_params, "reached": 0.0}
    for sparsity in sparsities:
        for name, kwargs in rounding.items():
            model = common.load_causal_lm(path).eval()
            prune_model(model, PruningConfig(target_sparsity=sparsity, importance="magnitude", **kwargs))
            params = count_parameters(model)
            models[f"{int(round(sparsity * 100))}% {name}"] = {
                "model": model, "sparsity": sparsity, "rounding": name, "params": params,
                "reached": (dense_params - params) / prunable, "widths": widths_summary(model),
            }
    return models


def widths_summary(model) -> str:
    from hfprune.structure import discover

    layers = discover(model, protected_layers=()).layers
    heads = sorted({layer.num_heads for layer in layers})
    mlp = sorted({layer.intermediate_size for layer in layers})
    return f"heads {'/'.join(map(str, heads))}, MLP {'/'.join(map(str, mlp))}"


def measure_all(models: dict, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    from hfprune.evaluation import measure_speed

    times = {name: {"prefill": [], "decode": []} for name in models}
    for round_index in range(repeats + 1):
        for name, entry in models.items():
            result = measure_speed(entry["model"], batch_size=1, prompt_len=prompt_len, new_tokens=new_tokens,
                                   repeats=1, warmup=0)
            if round_index > 0:  # round 0 is the warm-up
                times[name]["prefill"].append(result.prefill_latency_s)
                times[name]["decode"].append(result.decode_latency_s)
            print(f"round {round_index} {name}: prefill {result.prefill_latency_s:.2f} s, "
                  f"decode {result.decode_latency_s:.2f} s", file=sys.stderr, flush=True)
    return times


def summarise(models: dict, times: dict, prompt_len: int, new_tokens: int) -> list[dict]:
    from hfprune.evaluation import flops_speedup_limit

    dense = models["dense"]["model"]
    dense_prefill = statistics.median(times["dense"]["prefill"])
    dense_decode = statistics.median(times["dense"]["decode"])
    decode_context = prompt_len + new_tokens // 2
    rows = []
    for name, entry in models.items():
        prefill = statistics.median(times[name]["prefill"])
        decode = statistics.median(times[name]["decode"])
        row = {
            "name": name, "sparsity": entry["sparsity"], "rounding": entry["rounding"], "params": entry["params"],
            "reached": entry["reached"], "widths": entry.get("widths", "dense"),
            "prefill_s": prefill, "prefill_tokens_per_s": prompt_len / prefill,
            "decode_s": decode, "decode_tokens_per_s": new_tokens / decode,
            "prefill_speedup": dense_prefill / prefill, "decode_speedup": dense_decode / decode,
            "prefill_times": times[name]["prefill"], "decode_times": times[name]["decode"],
        }
        # A decode token attending to C keys costs what the mean token of a (2C - 1)-token prefill does.
        row["prefill_limit"] = flops_speedup_limit(dense, entry["model"], prompt_len)
        row["decode_limit"] = flops_speedup_limit(dense, entry["model"], 2 * decode_context - 1)
        row["prefill_ratio_of_limit"] = row["prefill_speedup"] / row["prefill_limit"]
        row["decode_ratio_of_limit"] = row["decode_speedup"] / row["decode_limit"]
        rows.append(row)
    return rows


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def export_ggufs(models: dict, tokenizer, outtypes, directory: Path) -> dict:
    """Each model as GGUF files: {(model name, outtype): path}. The checkpoints are removed once exported."""
    import shutil

    from hfprune.export import export_gguf, save_pruned

    paths = {}
    for index, (name, entry) in enumerate(models.items()):
        checkpoint = directory / f"model-{index}"
        save_pruned(entry["model"], checkpoint, tokenizer=tokenizer)
        for outtype in outtypes:
            paths[name, outtype] = export_gguf(checkpoint, directory / f"model-{index}-{outtype}.gguf", outtype=outtype)
        shutil.rmtree(checkpoint)
    return paths


def measure_llama_cpp(paths: dict, prompt_len: int, new_tokens: int, repeats: int, threads: int) -> dict:
    """Median prefill / decode seconds of each GGUF in llama.cpp, models in turn (round 0 is a warm-up)."""
    import llama_cpp
    import numpy as np

    generator = np.random.default_rng(0)
    times = {key: {"prefill": [], "decode": []} for key in paths}
    models = {key: llama_cpp.Llama(str(path), n_ctx=prompt_len + new_tokens + 8, n_batch=prompt_len,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
              for key, path in paths.items()}
    try:
        for round_index in range(repeats + 1):
            for key, llm in models.items():
                prompt = generator.integers(0, llm.n_vocab(), prompt_len).tolist()
                llm.reset()
                start = time.perf_counter()
                llm.eval(prompt)
                prefill = time.perf_counter() - start
                start = time.perf_counter()
                for _ in range(new_tokens):  # greedy, as measure_speed decodes
                    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
                    llm.eval([int(logits.argmax())])
                decode = time.perf_counter() - start
                if round_index > 0:
                    times[key]["prefill"].append(prefill)
                    times[key]["decode"].append(decode)
                print(f"round {round_index} llama.cpp {key[0]} {key[1]}: prefill {prefill:.2f} s, decode {decode:.2f} s",
                      file=sys.stderr, flush=True)
    finally:
        for llm in models.values():
            llm.close()
    return times


def summarise_llama_cpp(paths: dict, times: dict, models: dict, prompt_len: int, new_tokens: int) -> list[dict]:
    from gguf import GGUFReader

    rows = []
    for (name, outtype), path in paths.items():
        prefill = statistics.median(times[name, outtype]["prefill"])
        decode = statistics.median(times[name, outtype]["decode"])
        dense_prefill = statistics.median(times["dense", outtype]["prefill"])
        dense_decode = statistics.median(times["dense", outtype]["decode"])
        rows.append({
            "name": name, "outtype": outtype, "widths": models[name].get("widths", "dense"),
            "architecture": GGUFReader(path).fields["general.architecture"].contents(),
            "file_mb": path.stat().st_size / 1e6,
            "prefill_s": prefill, "prefill_tokens_per_s": prompt_len / prefill, "prefill_speedup": dense_prefill / prefill,
            "decode_s": decode, "decode_tokens_per_s": new_tokens / decode, "decode_speedup": dense_decode / decode,
            "prefill_times": times[name, outtype]["prefill"], "decode_times": times[name, outtype]["decode"],
        })
    return rows


def llama_cpp_report(rows: list[dict], args) -> list[str]:
    if not rows:
        return ["## llama.cpp", "", "Not measured: llama-cpp-python is not installed (`pip install hfprune[serve]`).", ""]
    headers = ["model", "GGUF", "llama.cpp arch", "file", "prefill tok/s", "prefill speed-up", "decode tok/s",
               "decode speed-up"]
    table_rows = [[
        r["name"], r["outtype"], r["architecture"], f"{r['file_mb']:.0f} MB", f"{r['prefill_tokens_per_s']:.0f}",
        "1.00" if r["name"] == "dense" else f"**{r['prefill_speedup']:.2f}x**", f"{r['decode_tokens_per_s']:.1f}",
        "1.00" if r["name"] == "dense" else f"{r['decode_speedup']:.2f}x",
    ] for r in sorted(rows, key=lambda r: (r["outtype"], r["name"] != "dense"))]
    return [
        "## llama.cpp",
        "",
        f"The same models exported with `hfprune.export_gguf` and run in llama.cpp (llama-cpp-python "
        f"{common.package_version('llama-cpp-python')}, CPU backend, threads: {args.threads}): prompt "
        f"{args.prompt_len} tokens in one batch, {args.new_tokens} greedy decode steps with the KV cache, median of "
        f"{args.repeats} rounds. Speed-up = dense GGUF time / pruned GGUF time, for the same GGUF type.",
        "",
        common.table(headers, table_rows, "lllrrrrr"),
        "",
    ]


def report(rows: list[dict], args, info: dict, smoke: bool, gguf_rows: list[dict]) -> tuple[str, dict]:
    model = "tiny random Llama (smoke test: numbers mean nothing)" if smoke else "SmolLM2-135M-Instruct"
    lines = common.header(f"Speed of pruned models on this CPU: {model}", info)
    rounding = SMOKE_ROUNDING if smoke else ROUNDING
    lines += [
        f"Settings: fp32, batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} greedy decode tokens with "
        f"the KV cache, torch threads {args.threads}, median of {args.repeats} rounds (models measured in turn, "
        f"after one warm-up round). Pruned one-shot with `importance=\"magnitude\"`, default structures; "
        f"rounded = `{rounding['rounded']}`. Speed-up = dense time / pruned time; FLOPs limit = dense FLOPs / "
        "pruned FLOPs per token; \"of limit\" = speed-up / limit.",
        "",
    ]
    headers = ["model", "widths (prunable layers)", "params", "sparsity", "prefill tok/s", "prefill speed-up",
               "FLOPs limit", "of limit", "decode tok/s", "decode speed-up", "decode FLOPs limit"]
    table_rows = []
    for r in rows:
        dense = r["name"] == "dense"
        table_rows.append([
            r["name"], r["widths"], f"{r['params'] / 1e6:.1f}M", "-" if dense else f"{r['reached']:.3f}",
            f"{r['prefill_tokens_per_s']:.0f}", "1.00" if dense else f"**{r['prefill_speedup']:.2f}x**",
            "-" if dense else f"{r['prefill_limit']:.2f}x",
            "-" if dense else f"{r['prefill_ratio_of_limit']:.0%}",
            f"{r['decode_tokens_per_s']:.1f}", "1.00" if dense else f"{r['decode_speedup']:.2f}x",
            "-" if dense else f"{r['decode_limit']:.2f}x",
        ])
    lines += [common.table(headers, table_rows, "llrrrrrrrrr"), ""]
    verdict = {r["name"]: r["prefill_ratio_of_limit"] >= TARGET for r in rows if r["name"] != "dense"}
    lines += [
        common.target_line(f"prefill speed-up >= {TARGET:.0%} of the FLOPs limit", verdict),
        "",
        "Prefill of 1024 tokens is compute-bound: removed heads and channels are removed matrix-multiply work. "
        "Decode of one token is bound by reading the weights (the LM head and embeddings, 28M of the 135M "
        "parameters, are never pruned), so its speed-up follows the parameter count more than the FLOPs. "
        "Per-round times are in speedup.json.",
        "",
    ]
    lines += llama_cpp_report(gguf_rows, args)
    return "\n".join(lines), {"target": TARGET, "met": verdict}


def main(argv=None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], threads=None)
    p.add_argument("--prompt-len", type=int, default=None, help="default 1024; smoke 64")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64; smoke 4")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; smoke 2)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--gguf-outtypes", nargs="*", default=None,
                   help=f"GGUF types timed in llama.cpp (default {' '.join(GGUF_OUTTYPES)}; smoke q8_0; none: skip)")
    args = p.parse_args(argv)
    args.gguf_outtypes = args.gguf_outtypes if args.gguf_outtypes is not None else (
        ["q8_0"] if args.smoke else list(GGUF_OUTTYPES))
    args.prompt_len = args.prompt_len or (64 if args.smoke else 1024)
    args.new_tokens = args.new_tokens or (4 if args.smoke else 64)
    args.repeats = args.repeats or (2 if args.smoke else 7)
    # The setting is 2 threads; the tiny smoke model only suffers from thread barriers.
    args.threads = args.threads or (1 if args.smoke else 2)
    common.setup(args.threads)
    out = common.output_dir(args)
    info = common.machine()
    gguf = bool(args.gguf_outtypes) and llama_cpp_available()
    with tempfile.TemporaryDirectory(prefix="hfprune-speedup-") as tmp:
        # 8 query heads in 2 KV groups of 4 and 96 MLP channels: rounding to 4 heads / 16 channels.
        path = (common.tiny_llama_checkpoint(Path(tmp) / "tiny", **({"vocab_size": SMOKE_VOCAB} if gguf else {}))
                if args.smoke else common.smollm2_path())
        models = build_models(path, args.sparsities, SMOKE_ROUNDING if args.smoke else ROUNDING)
        times = measure_all(models, args.prompt_len, args.new_tokens, args.repeats)
        rows = summarise(models, times, args.prompt_len, args.new_tokens)
        gguf_rows = []
        if gguf:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(common.smollm2_path())
            paths = export_ggufs(models, tokenizer, args.gguf_outtypes, Path(tmp))
            for entry in models.values():  # llama.cpp is timed alone, without the torch models in memory
                entry.pop("model")
            gc.collect()
            gguf_times = measure_llama_cpp(paths, args.prompt_len, args.new_tokens, args.repeats, args.threads)
            gguf_rows = summarise_llama_cpp(paths, gguf_times, models, args.prompt_len, args.new_tokens)
    del models
    gc.collect()
    markdown, verdict = report(rows, args, info, args.smoke, gguf_rows)
    common.write_outputs(out, NAME, markdown, {"machine": info, "settings": {
        k: getattr(args, k) for k in ("prompt_len", "new_tokens", "repeats", "sparsities", "threads", "gguf_outtypes")},
        "rows": rows, "llama_cpp_rows": gguf_rows, **verdict})
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
