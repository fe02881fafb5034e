"""Development probe for issue #11 section 1: does compensating removed MLP channels help, and what does it cost?

    python benchmarks/compensation_probe.py --calibration 10x64     # SmolLM2, 10 windows of 64 calibration tokens
    python benchmarks/compensation_probe.py --calibration 64x256
    python benchmarks/compensation_probe.py --timing                # cost of the Gram hooks on a 512-token forward
    python benchmarks/compensation_probe.py --smoke                 # tiny random Llama, seconds

Protocol (one shot, no recovery, MLP channels only): the real SmolLM2-135M-Instruct in fp32; calibration
windows drawn from C4 documents [40:) of `c4_demo.jsonl` (documents [0:40) are held out by quality.py);
`GramHooks` collect Σ x xᵀ of down_proj's input in layers 3..28 from the same forward passes; each channel is
scored Wanda-style, Σ_i |W_down[i, c]| · RMS_t(x_c) (the RMS is read off the Gram's diagonal), and the lowest
20% of every layer's channels are removed by masking down_proj's inputs (hfprune's MaskHooks). Then held-out
perplexity on the first `--windows` 128-token windows of `wiki_demo.txt` (disjoint from the calibration text)
with: no compensation; least squares at each `--ridges` value (λ = ridge × mean diag Σ_KK); the mean (FLAP's
bias, a new down_proj bias). The masks are the same in every row of one run; weights are restored in between.
Prints a markdown table (and writes it with --out).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

SPARSITY = 0.2


def _load(args):
    from transformers import AutoTokenizer

    if args.smoke:
        import tempfile

        path = common.tiny_llama_checkpoint(Path(tempfile.mkdtemp(prefix="hfprune-probe-")) / "tiny")
    else:
        path = common.smollm2_path()
    model = common.load_causal_lm(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _layers(structure, smoke: bool):
    last = len(structure.layers) - 2  # 3..28 on SmolLM2's 30 layers; 1..2 on the tiny model's 4
    return [layer for layer in structure.layers if (1 if smoke else 3) <= layer.index <= last]


def _channel_masks(structure, layers, hooks):
    """Wanda-style scores from the Gram's diagonal; the lowest SPARSITY of each layer's channels removed."""
    import torch

    from hfprune.masking import LayerMask, PruningMasks

    masks = PruningMasks.full(structure)
    for layer in layers:
        gram = hooks.gram(layer.index, "down_proj")
        rms = (gram.gram.diagonal().double() / gram.count).sqrt().float()
        scores = layer.projection("down_proj").weight.detach().abs().sum(dim=0) * rms
        channels = torch.ones(layer.intermediate_size, dtype=torch.bool)
        channels[torch.argsort(scores)[: int(SPARSITY * layer.intermediate_size)]] = False
        masks.layers[layer.index] = LayerMask(masks[layer.index].heads, channels)
    return masks


def probe(args) -> str:
    import torch

    from hfprune.compensation import GramHooks, add_output_bias_, compensate_columns_, least_squares_map, mean_shift
    from hfprune.data import calibration_batches
    from hfprune.evaluation.perplexity import perplexity
    from hfprune.masking import MaskHooks
    from hfprune.structure import discover

    load_start = os.getloadavg()[0]
    model, tokenizer = _load(args)
    structure = discover(model, protected_layers=())
    layers = _layers(structure, args.smoke)
    samples, seq_len = (int(v) for v in args.calibration.split("x"))
    texts = common.read_c4()[40:]
    batches = calibration_batches(tokenizer, texts, num_samples=samples, seq_len=seq_len, batch_size=8, seed=0)
    hooks = GramHooks()
    hooks.prepare(model, layers)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    calibration_s = time.perf_counter() - start
    hooks.enabled = False
    masks = _channel_masks(structure, layers, hooks)
    wiki = str(common.DATA_DIR / "wiki_demo.txt")

    def ppl() -> float:
        return perplexity(model, tokenizer, wiki, seq_len=128, batch_size=8, max_windows=args.windows).ppl

    rows = [("dense", ppl(), None)]
    mask_hooks = MaskHooks(structure, masks)
    originals = {layer.index: layer.projection("down_proj").weight.detach().clone() for layer in layers}

    def restore():
        for layer in layers:
            module = layer.projection("down_proj")
            module.weight.data.copy_(originals[layer.index])
            module.bias = None

    def split(layer):
        keep = masks[layer.index].channels
        return keep.nonzero().squeeze(1), (~keep).nonzero().squeeze(1)

    rows.append(("none", ppl(), None))
    for ridge in args.ridges:
        start = time.perf_counter()
        for layer in layers:
            keep, remove = split(layer)
            M = least_squares_map(hooks.gram(layer.index, "down_proj"), keep, remove, ridge=ridge)
            compensate_columns_(layer.projection("down_proj"), keep, remove, M)
        seconds = time.perf_counter() - start
        rows.append((f"least squares, ridge {ridge:g}", ppl(), seconds))
        restore()
    start = time.perf_counter()
    for layer in layers:
        module = layer.projection("down_proj")
        add_output_bias_(module, mean_shift(hooks.gram(layer.index, "down_proj"), split(layer)[1], module))
    seconds = time.perf_counter() - start
    rows.append(("mean (new down_proj bias)", ppl(), seconds))
    restore()
    mask_hooks.remove()
    hooks.release()

    none = rows[1][1]
    table = common.table(
        ["compensation", "wiki ppl", "vs none", "solve + apply (s)"],
        [(name, f"{value:.3f}", "" if name == "dense" else f"{(value / none - 1) * 100:+.1f}%",
          "" if seconds is None else f"{seconds:.2f}") for name, value, seconds in rows],
    )
    removed = int(SPARSITY * layers[0].intermediate_size)
    return "\n".join([
        f"## Compensation probe: {args.calibration} calibration tokens"
        + (" (smoke: tiny random Llama)" if args.smoke else ""),
        "",
        f"Layers {layers[0].index}..{layers[-1].index}, {removed} of {layers[0].intermediate_size} MLP channels "
        f"each (down_proj inputs masked); {args.windows} x 128 tokens of wiki_demo.txt; calibration forward "
        f"with Gram hooks {calibration_s:.1f} s; load average {load_start:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end.",
        "",
        table,
    ])


def timing(args) -> str:
    """Wall time of a 1 x 512-token no-grad forward with and without GramHooks on the probe's layers.

    The CPU is shared, so plain and hooked forwards alternate (`hooks.enabled` toggled) and the overhead is the
    median of the per-pair ratios: each pair sees about the same load."""
    import torch

    from hfprune.compensation import GramHooks
    from hfprune.structure import discover

    model, _ = _load(args)
    structure = discover(model, protected_layers=())
    layers = _layers(structure, args.smoke)
    ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    hooks = GramHooks(max_tokens=args.max_tokens)
    hooks.prepare(model, layers)
    seconds = {True: [], False: []}
    with torch.no_grad():
        model(input_ids=ids)  # warm-up, and the Grams are allocated
        for pair in range(args.repeats):
            for enabled in ((True, False) if pair % 2 else (False, True)):
                hooks.enabled = enabled
                start = time.perf_counter()
                model(input_ids=ids)
                seconds[enabled].append(time.perf_counter() - start)
    counted = hooks.gram(layers[0].index, "down_proj").count
    hooks.release()
    # every hooked forward (and the warm-up) was counted, no plain one
    assert counted == min(512, args.max_tokens or 512) * (args.repeats + 1), counted
    ratios = [h / p for h, p in zip(seconds[True], seconds[False])]
    return "\n".join([
        "## Gram accumulation cost" + (" (smoke: tiny random Llama)" if args.smoke else ""),
        "",
        f"1 x 512 tokens, no grad, torch threads {torch.get_num_threads()}, GramHooks on o_proj and down_proj of "
        f"layers {layers[0].index}..{layers[-1].index} (fp32 Gram on the CPU, max_tokens={args.max_tokens}); "
        f"{args.repeats} alternating pairs "
        f"of forwards; load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        common.table(["forward", "median seconds"], [
            ("plain", f"{common.median(seconds[False]):.3f}"),
            ("with Gram hooks", f"{common.median(seconds[True]):.3f}"),
            ("overhead (median of per-pair ratios)", f"{(common.median(ratios) - 1) * 100:+.0f}%"),
        ]),
    ])


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--calibration", default="10x64", help="calibration windows x tokens, e.g. 64x256")
    p.add_argument("--ridges", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--windows", type=int, default=16, help="128-token wiki windows to evaluate")
    p.add_argument("--timing", action="store_true", help="measure the Gram hooks' cost instead")
    p.add_argument("--max-tokens", type=int, default=None, help="GramHooks(max_tokens=...) in --timing")
    p.add_argument("--repeats", type=int, default=8, help="pairs of forwards (plain, hooked) in --timing")
    args = p.parse_args(argv)
    common.setup(args.threads)
    if args.smoke:
        args.windows, args.repeats = min(args.windows, 2), min(args.repeats, 1)
    report = timing(args) if args.timing else probe(args)
    print(report)
    if args.out:
        out = common.output_dir(args)
        name = "compensation_timing" if args.timing else f"compensation_probe_{args.calibration}"
        (out / f"{name}.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
