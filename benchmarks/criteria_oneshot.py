"""One-shot pruning without recovery, criterion by criterion (issue #11 section 3): taylor, taylor2,
param_second and bonsai on SmolLM2-135M-Instruct.

    python benchmarks/criteria_oneshot.py --criteria dense taylor taylor2 param_second
    python benchmarks/criteria_oneshot.py --criteria bonsai --bonsai samples=64 sequences=2
    python benchmarks/criteria_oneshot.py --smoke

Protocol: the real SmolLM2-135M-Instruct in fp32; `PruningConfig(target_sparsity=0.2,
structures=("channels",))` with the default protected layers (MLP channels of layers 3..28); calibration
`calibration_batches(tokenizer, c4[40:300], num_samples=64, seq_len=256)` (16 batches of 4 sequences);
held-out perplexity `perplexity(model, tokenizer, texts, seq_len=128, batch_size=8, max_windows=16)` on
wiki_demo.txt and on C4 documents [0:40).

The full-gradient criteria are scored from one set of backward passes, one per calibration sequence (what
`prune_model` runs for taylor2 and param_second, which declare `per_sample_gradients`; taylor's mean gradient is
the same over batches or sequences), each into its own one-shot accumulator; each criterion's groups are then
allocated and removed from a copy of the model, exactly as `prune_model` does after scoring. The table also
gives, at 20% and 50%, the fraction of the removed channels that taylor would not remove. bonsai runs through
`prune_model` itself (its options with `--bonsai KEY=VALUE`). Every run merges its rows into
`criteria_oneshot.json` and rewrites the table from all rows.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

GRADIENT_CRITERIA = ("taylor", "taylor2", "param_second")
NAME = "criteria_oneshot"


def _setting(args):
    from transformers import AutoTokenizer

    from hfprune import PruningConfig
    from hfprune.data import calibration_batches, read_texts

    c4 = common.read_c4()
    if args.smoke:
        import tempfile

        path = common.tiny_llama_checkpoint(Path(tempfile.mkdtemp(prefix="hfprune-criteria-")) / "tiny")
        tokenizer = AutoTokenizer.from_pretrained(path)
        calibration = calibration_batches(tokenizer, c4[40:60], num_samples=8, seq_len=32)
        evaluation = dict(seq_len=32, batch_size=2, max_windows=2)
    else:
        path = common.smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        calibration = calibration_batches(tokenizer, c4[40:300], num_samples=64, seq_len=256)
        evaluation = dict(seq_len=128, batch_size=8, max_windows=16)
    texts = {"wiki": read_texts(str(common.DATA_DIR / "wiki_demo.txt")), "c4": c4[:40]}
    config = PruningConfig(target_sparsity=0.2, structures=("channels",))
    return common.load_causal_lm(path).eval(), tokenizer, calibration, texts, evaluation, config


def _perplexities(model, tokenizer, texts, evaluation) -> dict:
    from hfprune.evaluation import perplexity

    return {name: round(perplexity(model, tokenizer, source, **evaluation).ppl, 2) for name, source in texts.items()}


def _removed(masks) -> set:
    return {(i, int(c)) for i, m in masks.layers.items() for c in (~m.channels).nonzero().squeeze(1)}


def _gradient_scores(model, config, calibration, names):
    """One backward pass per calibration sequence, as prune_model runs it; every criterion scores from it."""
    from hfprune.importance import make_accumulator, make_criterion, score_layers
    from hfprune.prune import _backward_passes, _batches_on, _scoring_mode
    from hfprune.structure import discover_for_config

    structure = discover_for_config(model, config)
    criteria = {name: make_criterion(replace(config, importance=name)) for name in names}
    accumulators = {name: make_accumulator(config, c, one_shot=True) for name, c in criteria.items()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for criterion in criteria.values():
        criterion.prepare(model, structure.prunable_layers)
    _scoring_mode(model)
    with common.Stopwatch() as watch:
        passes = 0
        for _, batch in _backward_passes(_batches_on(model, calibration), per_sample=True):
            batch.setdefault("labels", batch["input_ids"])
            model(**batch).loss.backward()  # each pass its own mean loss; the mean gradient below
            passes += 1
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(passes)
        raw = {}
        for name, criterion in criteria.items():
            raw[name] = score_layers(structure, criterion)  # before the accumulator's normalisation
            accumulators[name].update(raw[name])
    for criterion in criteria.values():
        criterion.release()
    model.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad[name])
    model.eval()
    return structure, accumulators, raw, watch.seconds, passes


def _second_order_ratio(structure, raw) -> dict:
    """Per channel group, ½·Σ W²F over Σ |W·g| (param_second's and taylor's raw sums): how much taylor2's
    second-order term can move its first-order one."""
    import torch

    from hfprune.importance import group_scores

    ratios = torch.cat([
        0.5 * group_scores(raw["param_second"][layer.index], layer.n_rep).channels
        / group_scores(raw["taylor"][layer.index], layer.n_rep).channels
        for layer in structure.prunable_layers
    ])
    return {"median": float(ratios.median()), "max": float(ratios.max())}


def _prune_copy(model, masks, config):
    from hfprune.structure import discover_for_config
    from hfprune.surgery import remove_pruned_groups

    pruned = copy.deepcopy(model)
    remove_pruned_groups(discover_for_config(pruned, config), masks)
    return pruned


def run_gradient_criteria(model, tokenizer, calibration, texts, evaluation, config, names) -> list[dict]:
    from hfprune.allocation import allocate

    wanted = list(dict.fromkeys(["taylor", *names]))  # taylor: the reference of the overlap columns
    structure, accumulators, raw, seconds, passes = _gradient_scores(model, config, calibration, wanted)
    ratio = _second_order_ratio(structure, raw) if {"taylor", "param_second"} <= set(raw) else None
    masks = {}
    for name in wanted:
        scores = accumulators[name].layer_scores(structure.prunable_layers)
        masks[name] = {s: allocate(structure, scores, replace(config, target_sparsity=s), 1.0) for s in (0.2, 0.5)}
    rows = []
    for name in names:
        differ = {}
        for sparsity in (0.2, 0.5):
            mine, reference = _removed(masks[name][sparsity]), _removed(masks["taylor"][sparsity])
            differ[str(sparsity)] = round(len(mine - reference) / max(len(mine), 1), 4)
        pruned = _prune_copy(model, masks[name][0.2], config)
        rows.append({
            "label": name, "criterion": name, "ppl": _perplexities(pruned, tokenizer, texts, evaluation),
            "differs_from_taylor": differ, "scoring_seconds": round(seconds, 1),
            "how": f"{passes} per-sequence backward passes shared by {', '.join(wanted)}",
        })
        if name == "taylor2" and ratio is not None:
            rows[-1]["second_order_ratio"] = ratio
        del pruned
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def run_with_prune_model(model, tokenizer, calibration, texts, evaluation, config, name) -> dict:
    from hfprune import prune_model

    pruned = copy.deepcopy(model)
    with common.Stopwatch() as watch:
        prune_model(pruned, replace(config, importance=name), calibration_data=calibration)
    row = {"label": name, "criterion": name, "ppl": _perplexities(pruned, tokenizer, texts, evaluation),
           "scoring_seconds": round(watch.seconds, 1), "how": "prune_model"}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def _bonsai_options(pairs) -> dict:
    options = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        options[key] = None if value == "None" else (value if key == "prior" else json.loads(value))
    return options


def run_bonsai(model, tokenizer, calibration, texts, evaluation, config, options) -> dict:
    from hfprune import prune_model, register_importance
    from hfprune.importance.bonsai import BonsaiImportance

    probe = BonsaiImportance(**options)
    label = "bonsai " + " ".join(f"{k}={getattr(probe, k)}" for k in ("samples", "sequences", "rounds", "ridge", "prior"))
    captured = {}

    def factory():
        captured["criterion"] = BonsaiImportance(**options)
        return captured["criterion"]

    register_importance("benchmark_bonsai", factory, overwrite=True)
    pruned = copy.deepcopy(model)
    with common.Stopwatch() as watch:
        prune_model(pruned, replace(config, importance="benchmark_bonsai"), calibration_data=calibration)
    row = {"label": label, "criterion": "bonsai", "options": options,
           "ppl": _perplexities(pruned, tokenizer, texts, evaluation), "scoring_seconds": round(watch.seconds, 1),
           "how": "prune_model", "rounds": captured["criterion"].history}
    print(json.dumps(row, default=str), file=sys.stderr, flush=True)
    return row


def markdown(rows: list[dict], info: dict, smoke: bool) -> str:
    lines = common.header("One-shot criteria on SmolLM2-135M-Instruct" + (" (smoke test)" if smoke else ""), info,
                          __doc__.split("Protocol: ", 1)[1].split("\n\n")[0].replace("\n", " "))
    order = {"dense": 0, **{name: 1 for name in GRADIENT_CRITERIA}, "bonsai": 3}
    body = []
    for row in sorted(rows, key=lambda r: order.get(r["criterion"], 2)):
        differ = row.get("differs_from_taylor", {})
        body.append([row["label"], common.fmt(row["ppl"]["wiki"]), common.fmt(row["ppl"]["c4"]),
                     common.fmt(differ.get("0.2")), common.fmt(differ.get("0.5")),
                     common.fmt(row.get("scoring_seconds"), 0), row.get("how", "")])
    lines.append(common.table(["method", "wiki ppl", "C4 ppl", "removed unlike taylor, 20%", "same, 50%",
                               "scoring s", "how"], body, align="lrrrrrl"))
    lines += ["", "Rows are merged from these runs (load average of the shared machine when each started):", ""]
    for command, load in dict.fromkeys((row.get("command"), row.get("load_average_at_start")) for row in rows):
        if command:
            lines.append(f"- `{command}` (load {load})")
    ratio = next((row["second_order_ratio"] for row in rows if "second_order_ratio" in row), None)
    if ratio is not None:
        lines += ["", f"taylor2's second-order term ½·Σ W²F against its first-order Σ |W·g|, per channel group: "
                  f"median {ratio['median']:.2e}, largest {ratio['max']:.2e}."]
    lines += ["", "Target: issue #11 section 3 asks whether taylor2's Fisher term changes what is removed; "
              "the overlap columns say it. Times are on a shared 2-core CPU under load, one torch thread."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--criteria", nargs="+", default=["dense", *GRADIENT_CRITERIA, "bonsai"],
                   help="dense, taylor, taylor2, param_second, bonsai, or any registered criterion (run by prune_model)")
    p.add_argument("--bonsai", nargs="*", metavar="KEY=VALUE", help="BonsaiImportance options, e.g. samples=64")
    p.add_argument("--table-only", action="store_true", help="rewrite the table from the JSON, measure nothing")
    args = p.parse_args(argv)
    common.setup(args.threads)
    out = common.output_dir(args)
    if args.table_only:
        data = json.loads((out / f"{NAME}.json").read_text())
        common.write_outputs(out, NAME, markdown(data["rows"], data["machine"], args.smoke), data)
        return 0
    model, tokenizer, calibration, texts, evaluation, config = _setting(args)
    rows = []  # the load is read when the run starts, before the model loads
    start_load = os.getloadavg()[0]
    if "dense" in args.criteria:
        rows.append({"label": "dense", "criterion": "dense", "ppl": _perplexities(model, tokenizer, texts, evaluation)})
    gradient = [name for name in GRADIENT_CRITERIA if name in args.criteria]
    if gradient:
        rows += run_gradient_criteria(model, tokenizer, calibration, texts, evaluation, config, gradient)
    for name in args.criteria:
        if name not in ("dense", "bonsai", *GRADIENT_CRITERIA):
            rows.append(run_with_prune_model(model, tokenizer, calibration, texts, evaluation, config, name))
    if "bonsai" in args.criteria:
        options = _bonsai_options(args.bonsai)
        if args.smoke:
            options = {"samples": 4, **options}
        rows.append(run_bonsai(model, tokenizer, calibration, texts, evaluation, config, options))
    for row in rows:
        row["command"] = common.command_line()
        row["load_average_at_start"] = round(start_load, 2)
    path = out / f"{NAME}.json"
    earlier = json.loads(path.read_text())["rows"] if path.exists() else []
    merged = {row["label"]: row for row in earlier}
    merged.update({row["label"]: row for row in rows})
    info = common.machine()
    common.write_outputs(out, NAME, markdown(list(merged.values()), info, args.smoke),
                         {"machine": info, "rows": list(merged.values())})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
