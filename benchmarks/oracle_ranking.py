"""How closely does each importance criterion rank groups the way removing them does?

    python benchmarks/oracle_ranking.py                      # tiny + SmolLM2, writes results/oracle_ranking.md
    python benchmarks/oracle_ranking.py --settings tiny      # the tiny model only (about a minute on 2 cores)

The oracle: for each group — every KV group, every query head, and a sample of
MLP channels, in a few layers — actually remove it (a pruning mask zeroing its
o_proj / down_proj inputs, which is exactly its removal) and measure the loss
increase on fixed held-out batches. Each criterion scores the same model from
separate calibration batches; Spearman's rho between its group scores and the
oracle says how well it ranks. Scores are used raw (no per-module
normalisation), so the pooled columns also test whether scores of different
layers are on one scale (what global ranking needs).

The model being pruned is what LoRAPrune prunes: a base with LoRA adapters on
every projection, trained for a few steps so that B != 0. The oracle, and every
criterion, see the adapted model (W + s·B·A). "taylor" gets full weight
gradients of the base (fp32 here); "lora" only the LoRA gradients.

Settings:
  tiny     a Llama-architecture model (hidden 128, 16 query heads in 4 KV groups,
           256 MLP channels, 4 layers), trained from random init on Wikipedia
           characters, then LoRA-adapted; all 4 layers, 64 sampled channels each,
           8192 held-out tokens (about 6 minutes on one CPU thread).
  smollm2  the real pretrained SmolLM2-135M-Instruct (9 query heads, 3 KV groups,
           1536 channels, 30 layers) on Wikipedia text, LoRA-adapted for 20 steps;
           3 layers, 32 sampled channels each, 1024 held-out tokens (about 25 minutes
           on one busy CPU thread). Skipped when the offline model is not installed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hfprune.importance import ScoreAccumulator, get_importance  # noqa: E402
from hfprune.masking import MaskHooks, PruningMasks  # noqa: E402
from hfprune.importance import score_model
from hfprune.prune import _score_with_gradients  # noqa: E402
from hfprune.structure import discover  # noqa: E402

CRITERIA = (
    "activation_taylor", "activation_taylor_sq", "taylor", "taylor2", "vector", "lora",
    "activation", "flap", "magnitude", "random",
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DATA = ROOT.parent / "shared" / "data" / "wiki_demo.txt"


@dataclass
class Setting:
    name: str
    layers: tuple[int, ...]
    channel_sample: Optional[int]  # None: every channel
    eval_batches: list
    calibration_batches: list
    model: torch.nn.Module = None
    notes: dict = field(default_factory=dict)


# ---- ranking statistics -----------------------------------------------------------------------------------------


def rank(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties given their average rank."""
    values = values.double()
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    for value in values.unique():
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = ra.norm() * rb.norm()
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


# ---- the oracle -------------------------------------------------------------------------------------------------


@torch.no_grad()
def mean_loss(model, batches) -> float:
    return sum(float(model(input_ids=ids, labels=ids).loss) for ids in batches) / len(batches)


@torch.no_grad()
def oracle(model, structure, layers, channels: dict[int, torch.Tensor], eval_batches) -> dict:
    """Loss increase from removing each group alone: {(layer, "kv"|"head"|"channel"): tensor}."""
    model.eval()
    masks = PruningMasks.full(structure)
    hooks = MaskHooks(structure, masks)  # no validation: a lone query head may go, the math is the same
    base = mean_loss(model, eval_batches)
    deltas = {}
    try:
        for index in layers:
            layer, mask = structure.layers[index], masks[index]

            def removal_cost(attribute: str, units) -> float:
                getattr(mask, attribute)[units] = False
                hooks.update(masks)
                cost = mean_loss(model, eval_batches) - base
                getattr(mask, attribute)[units] = True
                return cost

            deltas[(index, "head")] = torch.tensor([removal_cost("heads", [h]) for h in range(layer.num_heads)])
            deltas[(index, "kv")] = torch.tensor(
                [removal_cost("heads", list(range(g * layer.n_rep, (g + 1) * layer.n_rep)))
                 for g in range(layer.num_kv_heads)]
            )
            deltas[(index, "channel")] = torch.tensor([removal_cost("channels", [int(c)]) for c in channels[index]])
    finally:
        hooks.remove()
    return deltas


# ---- the criteria -----------------------------------------------------------------------------------------------


def criterion_scores(model, structure, name: str, calibration_batches) -> ScoreAccumulator:
    """Raw (unnormalised) scores of every layer from the calibration batches."""
    criterion = get_importance(name)
    accumulator = ScoreAccumulator(decay=0.0, normalize=False, signed=criterion.signed)
    model.eval()
    if criterion.needs == "nothing":
        score_model(structure, criterion, accumulator)
    elif criterion.needs == "forward":
        criterion.prepare(model, structure.layers)
        with torch.no_grad():
            for ids in calibration_batches:
                model(input_ids=ids)
        score_model(structure, criterion, accumulator)
    else:
        _score_with_gradients(model, structure, criterion, accumulator, [{"input_ids": ids} for ids in calibration_batches])
    criterion.release()
    return accumulator


def group_table(structure, accumulator, layers, channels) -> dict:
    out = {}
    for index in layers:
        groups = accumulator.group_scores(index, structure.layers[index].n_rep)
        out[(index, "head")] = groups.heads
        out[(index, "kv")] = groups.kv_groups
        out[(index, "channel")] = groups.channels[channels[index]]
    return out


def correlations(scores: dict, deltas: dict, layers) -> dict[str, float]:
    result = {}
    for kind in ("kv", "head", "channel"):
        pooled_scores = torch.cat([scores[(i, kind)] for i in layers])
        pooled_deltas = torch.cat([deltas[(i, kind)] for i in layers])
        result[f"{kind}_pooled"] = spearman(pooled_scores, pooled_deltas)
        within = [spearman(scores[(i, kind)], deltas[(i, kind)]) for i in layers]
        within = [r for r in within if not math.isnan(r)]
        result[f"{kind}_within"] = sum(within) / len(within) if within else float("nan")
    return result


# ---- models and data --------------------------------------------------------------------------------------------


def _windows(ids: torch.Tensor, seq_len: int, batch_size: int, count: int, offset: int) -> list[torch.Tensor]:
    stride = seq_len * batch_size
    return [ids[offset + k * stride: offset + (k + 1) * stride].view(batch_size, seq_len) for k in range(count)]


def _train(model, params, batches, lr: float, steps: int) -> None:
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        ids = batches[step % len(batches)]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def _add_lora(model, r: int, train_batches, steps: int, lr: float):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS, lora_dropout=0.0))
    _train(model, [p for p in model.parameters() if p.requires_grad], train_batches, lr, steps)
    return model


def char_ids(text: str) -> torch.Tensor:
    """Ids of the tests' character-level tokenizer (3 specials, printable ASCII, newline; unknown -> 0)."""
    table = {chr(c): 3 + c - 32 for c in range(32, 127)}
    table["\n"] = 98
    return torch.tensor([table.get(ch, 0) for ch in text])


def tiny_setting(pretrain_steps: int = 300, lora_steps: int = 40, seed: int = 0, layers=(0, 1, 2, 3),
                 channel_sample: Optional[int] = 64, eval_count: int = 16, calibration_count: int = 16,
                 **model_overrides) -> Setting:
    from tests.tiny_models import tiny_model

    torch.manual_seed(seed)
    ids = char_ids(DATA.read_text()[:400_000]) if DATA.exists() else torch.randint(0, 128, (400_000,))
    overrides = dict(hidden_size=128, num_attention_heads=16, num_key_value_heads=4, head_dim=8,
                     intermediate_size=256)
    overrides.update(model_overrides)
    model = tiny_model("llama", seed=seed, **overrides)
    with torch.no_grad():  # from tiny_model's N(0, 0.2) to a trainable init
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 0.02 if "embed" in name or "lm_head" in name else 1 / math.sqrt(param.shape[1]))
    train = _windows(ids, 64, 16, 60, offset=0)
    if pretrain_steps:
        _train(model, list(model.parameters()), train, lr=3e-3, steps=pretrain_steps)
    lora_batches = _windows(ids, 64, 8, 20, offset=60 * 64 * 16)
    model = _add_lora(model, r=8, train_batches=lora_batches, steps=lora_steps, lr=3e-3)
    start = 60 * 64 * 16 + 20 * 64 * 8
    calibration = _windows(ids, 64, 8, calibration_count, offset=start)
    evaluation = _windows(ids, 64, 8, eval_count, offset=start + calibration_count * 64 * 8)
    return Setting("tiny", tuple(layers), channel_sample, evaluation, calibration, model,
                   {"pretrain_steps": pretrain_steps, "lora_steps": lora_steps})


def smollm2_setting(layers=(6, 15, 24), channel_sample: int = 32, lora_steps: int = 20) -> Optional[Setting]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfprune.offline import OfflineModelUnavailableError, ensure_offline_model

    try:
        path = ensure_offline_model()
    except OfflineModelUnavailableError as error:
        print(f"smollm2 skipped: {error}")
        return None
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    ids = torch.tensor(tokenizer(DATA.read_text()[:600_000])["input_ids"])
    lora_batches = _windows(ids, 128, 4, lora_steps, offset=0)
    model = _add_lora(model, r=8, train_batches=lora_batches, steps=lora_steps, lr=1e-3)
    start = lora_steps * 128 * 4
    calibration = _windows(ids, 256, 2, 2, offset=start)
    evaluation = _windows(ids, 256, 2, 2, offset=start + 2 * 256 * 2)
    return Setting("smollm2", tuple(layers), channel_sample, evaluation, calibration, model, {"lora_steps": lora_steps})


# ---- driver -----------------------------------------------------------------------------------------------------


def run(setting: Setting, criteria=CRITERIA, seed: int = 0, sources=("held_out", "in_sample")) -> dict[str, dict]:
    """{source: {criterion: rhos}}: with scores from the calibration batches ("held_out") and from the
    oracle's own batches ("in_sample", which isolates the criterion from batch-to-batch noise)."""
    model = setting.model
    structure = discover(model, protected_layers=())
    generator = torch.Generator().manual_seed(seed)
    channels = {}
    for index in setting.layers:
        width = structure.layers[index].intermediate_size
        if setting.channel_sample is None or setting.channel_sample >= width:
            channels[index] = torch.arange(width)
        else:
            channels[index] = torch.randperm(width, generator=generator)[: setting.channel_sample].sort().values
    started = time.time()
    deltas = oracle(model, structure, setting.layers, channels, setting.eval_batches)
    setting.notes["oracle_seconds"] = round(time.time() - started, 1)
    setting.notes["eval_loss"] = round(mean_loss(model, setting.eval_batches), 4)
    print(f"{setting.name}: oracle in {setting.notes['oracle_seconds']} s", flush=True)
    sources = {source: {"held_out": setting.calibration_batches, "in_sample": setting.eval_batches}[source]
               for source in sources}
    results = {source: {} for source in sources}
    for name in criteria:
        for source, batches in sources.items():
            accumulator = criterion_scores(model, structure, name, batches)
            results[source][name] = correlations(group_table(structure, accumulator, setting.layers, channels), deltas,
                                                 setting.layers)
    return results


COLUMNS = (("kv_pooled", "KV groups"), ("head_pooled", "query heads"), ("head_within", "query heads, within layer"),
           ("channel_pooled", "channels"), ("channel_within", "channels, within layer"))
SOURCES = {
    "held_out": "scores from calibration batches, oracle on held-out batches",
    "in_sample": "scores from the oracle's own batches",
}


def markdown(setting: Setting, results: dict) -> str:
    channels = "all" if setting.channel_sample is None else setting.channel_sample
    lines = [f"### {setting.name}: layers {list(setting.layers)}, {channels} channels per layer", ""]
    for source, rows in results.items():
        lines += [
            f"{SOURCES[source]}:",
            "",
            "| criterion | " + " | ".join(title for _, title in COLUMNS) + " | mean |",
            "|---|" + "---:|" * (len(COLUMNS) + 1),
        ]
        for name, row in sorted(rows.items(), key=lambda item: -_mean(item[1])):
            cells = " | ".join(f"{row[key]:+.3f}" for key, _ in COLUMNS)
            lines.append(f"| `{name}` | {cells} | {_mean(row):+.3f} |")
        lines.append("")
    return "\n".join(lines)


def _mean(row: dict) -> float:
    values = [row[key] for key, _ in COLUMNS if not math.isnan(row[key])]
    return sum(values) / len(values)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "oracle_ranking.md"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is fastest for the tiny model on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = []
    for name in args.settings:
        started = time.time()
        setting = tiny_setting() if name == "tiny" else smollm2_setting()
        if setting is None:
            continue
        results = run(setting)
        notes = ", ".join(f"{key} {value}" for key, value in setting.notes.items())
        text = markdown(setting, results) + f"\n_{notes}; {time.time() - started:.0f} s in all._\n"
        print(text, flush=True)
        sections.append(text)
        out.write_text(HEADER + "\n".join(sections))  # after every setting, so a later failure keeps it
    print(f"wrote {out}")


HEADER = """# Criterion ranking vs the removal oracle

Spearman's rho between each criterion's group scores and the loss increase measured by removing
each group alone (higher is better; 1 = the oracle's order). *Pooled* ranks the groups of all
listed layers together with raw, unnormalised scores (what global ranking needs); *within layer*
averages the per-layer rho (local ranking). The oracle's loss changes are signed: removing some
groups, MLP channels especially, *lowers* the loss on the oracle's batches, which a non-negative
score cannot express. "In-sample" scores come from the oracle's own batches; "held-out" scores
from separate calibration batches, so they also carry batch-to-batch noise.
Regenerate with `python benchmarks/oracle_ranking.py --threads 1`.

"""


if __name__ == "__main__":
    main()
