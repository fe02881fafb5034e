"""`PruningConfig`: what to prune, how to score it, and when.

A plain dataclass whose every field carries a `help`, so it works with
`transformers.HfArgumentParser` exactly like `TrainingArguments` or trl's configs.
Validation happens in `__post_init__`, before any model is touched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from . import validation as check

STRUCTURES = ("heads", "channels")
HEAD_GRANULARITIES = ("kv_group", "query_head")
SCHEDULES = ("cubic", "linear", "one_shot")
RANKINGS = ("local", "global")
NORMALIZATIONS = ("auto", "module", "global", "none")
PHYSICAL_REMOVAL = ("after_pruning", "at_end")
COMPENSATIONS = ("auto", "least_squares", "none")


@dataclass
class PruningConfig:
    """Configuration of structured pruning with hfprune.

    Sparsity is always counted in parameters: `target_sparsity=0.2` removes 20% of
    the *prunable decoder parameters* (the q/k/v/o and gate/up/down projection
    weights of the layers that may be pruned, i.e. all decoder layers but the
    protected ones). The fraction of all model parameters is reported beside it.

    Parameters:
        target_sparsity: fraction of prunable decoder parameters to remove, in [0, 1).
        importance: name of a registered importance criterion: "activation_taylor" (default:
            activation-gradient Taylor saliency, measured best; works on an 8-bit / 4-bit base),
            "lora" (LoRAPrune), "taylor", "taylor2", "vector", "param_second" (LLM-Pruner),
            "activation", "flap" (forward passes only), "magnitude", "random", "bonsai" (`prune_model`
            only), or one
            registered with `hfprune.importance.register_importance`.
        structures: which groups may be removed: "heads" and/or "channels".
        head_granularity: "query_head" (default) removes query heads inside KV groups,
            keeping every KV head and the same number of query heads per group;
            "kv_group" removes a key/value head together with the query heads that read it.
        head_sparsity / channel_sparsity: optional separate targets, as fractions of
            the heads (query heads) and MLP channels of each prunable layer. When
            either is set, `target_sparsity` is derived from them, not used.
        ranking: "local" prunes the same fraction of every prunable layer
            (LoRAPrune); "global" ranks groups across layers by score per parameter.
        schedule: "cubic", "linear" or "one_shot" ramp of the sparsity.
        pruning_steps: optimizer steps of the pruning stage. None: `pruning_fraction`
            of the run's total steps.
        pruning_fraction: fraction of all optimizer steps spent in the pruning stage
            when `pruning_steps` is None; the rest is recovery.
        warmup_ratio / cooldown_ratio: fractions of the pruning stage spent before the
            first and after the last mask update.
        prune_every: optimizer steps between two mask updates.
        ema_decay: weight of the old score in the exponential moving average.
        normalize: "module" L2-normalises each module's per-group scores, layer by layer,
            before they are summed into group scores (LoRAPrune); "global" normalises each
            projection role once over all layers, so scores stay comparable across layers;
            "none" keeps raw sums; "auto" (default): "module" for local ranking, "global"
            for global ranking.
        global_spread: with ranking="global", every layer gives up between (1 - spread) and
            (1 + spread) times its proportional share of the budget; None: no bound but the
            floors (a layer can be pruned to its floor or left untouched).
        protected_layers: layer indices never pruned. None: the first 10% of the
            layers and the last layer (LoRAPrune's default).
        min_heads / min_channels: floor on the width of every pruned layer.
        round_heads_to / round_channels_to: kept widths are rounded to multiples.
        uniform: every prunable layer keeps the same widths, so the checkpoint is a
            stock config that loads without remote code.
        physical_removal: "after_pruning" slices the weights at the end of the
            pruning stage (recovery then trains the smaller model); "at_end" keeps
            masks until training ends.
        seed: seed of the "random" criterion and of every tie-break.
        compensation: "least_squares" folds the contribution of removed heads and channels
            into the kept input columns of o_proj / down_proj (ridge-regularised least squares
            on the activations seen while scoring, `hfprune.compensator`); "none" drops it;
            "auto" (default): least squares whenever forward passes are seen (training, or
            `prune_model` with calibration data), none for a data-free one shot.
        compensation_ridge: ridge of the least-squares solve, as a multiple of the mean
            diagonal of the kept features' Gram matrix, scaled by (1 + kept features / tokens
            seen) so that few tokens regularise more (>= 0; larger = closer to no update).
        compensation_tokens: at most this many tokens of each forward pass enter the Gram
            matrices (an evenly spread subset), to bound the cost; None: every token.
    """

    target_sparsity: float = field(
        default=0.2, metadata={"help": "Fraction of the prunable decoder parameters to remove, in [0, 1)."}
    )
    # The defaults are what measured best in benchmarks/quality.py (README, "Quality"): activation_taylor with
    # least-squares compensation, query heads inside KV groups. LoRAPrune is importance="lora".
    importance: str = field(
        default="activation_taylor",
        metadata={"help": "Importance criterion: activation_taylor (default), lora (LoRAPrune), taylor, taylor2, "
                          "param_second, vector, activation, flap, magnitude, random, bonsai (prune_model only), "
                          "or a registered one."},
    )
    # Lists (stored as tuples) so that HfArgumentParser reads `--structures heads channels`.
    structures: list[str] = field(
        default_factory=lambda: list(STRUCTURES),
        metadata={"help": "Groups that may be removed: heads and/or channels.", "choices": STRUCTURES},
    )
    head_granularity: str = field(
        default="query_head",
        metadata={"help": "kv_group: remove a KV head with its query heads; query_head: remove query heads inside KV groups.",
                  "choices": HEAD_GRANULARITIES},
    )
    head_sparsity: Optional[float] = field(
        default=None, metadata={"help": "Separate target: fraction of the query heads of each prunable layer."}
    )
    channel_sparsity: Optional[float] = field(
        default=None, metadata={"help": "Separate target: fraction of the MLP channels of each prunable layer."}
    )
    ranking: str = field(
        default="local",
        metadata={"help": "local: same fraction in every prunable layer; global: rank across layers by score per parameter.",
                  "choices": RANKINGS},
    )
    schedule: str = field(default="cubic", metadata={"help": "Sparsity ramp: cubic, linear or one_shot.", "choices": SCHEDULES})
    pruning_steps: Optional[int] = field(
        default=None, metadata={"help": "Optimizer steps of the pruning stage (None: pruning_fraction of the run)."}
    )
    pruning_fraction: float = field(
        default=0.5, metadata={"help": "Fraction of the run's optimizer steps used for pruning when pruning_steps is None."}
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of the pruning stage before the first mask update."})
    cooldown_ratio: float = field(default=0.1, metadata={"help": "Fraction of the pruning stage after the last mask update."})
    prune_every: int = field(default=10, metadata={"help": "Optimizer steps between two mask updates."})
    ema_decay: float = field(default=0.9, metadata={"help": "EMA weight of the old score (LoRAPrune: 0.9)."})
    normalize: str = field(
        default="auto",
        metadata={"help": "Score normalisation: module (per layer), global (per role over all layers), none, or auto "
                          "(module for local ranking, global for global ranking).", "choices": NORMALIZATIONS},
    )
    # benchmarks/quality.py: 0.2 was better than 0.4 and than unbounded at 50% on SmolLM2 (one shot, channels).
    global_spread: Optional[float] = field(
        default=0.2, metadata={"help": "ranking=global: each layer gives up (1 +- spread) x its share (None: unbounded)."}
    )
    protected_layers: Optional[list[int]] = field(
        default=None, metadata={"help": "Layer indices never pruned (None: first 10% of layers and the last)."}
    )
    min_heads: int = field(default=1, metadata={"help": "Minimum query heads kept in every layer."})
    min_channels: int = field(default=1, metadata={"help": "Minimum MLP channels kept in every layer."})
    round_heads_to: int = field(default=1, metadata={"help": "Kept query heads per layer rounded to this multiple."})
    round_channels_to: int = field(default=1, metadata={"help": "Kept MLP channels per layer rounded to this multiple."})
    uniform: bool = field(default=False, metadata={"help": "Same widths in every prunable layer."})
    physical_removal: str = field(
        default="after_pruning",
        metadata={"help": "When weights are sliced: after_pruning or at_end.", "choices": PHYSICAL_REMOVAL},
    )
    seed: int = field(default=0, metadata={"help": "Seed for the random criterion and tie-breaks."})
    compensation: str = field(
        default="auto",
        metadata={"help": "least_squares: kept o_proj/down_proj columns absorb what removed groups did; none; auto "
                          "(least_squares whenever forward passes are seen: training, or calibration data).",
                  "choices": COMPENSATIONS},
    )
    # SmolLM2, one shot, 64 x 256 calibration tokens (benchmarks/quality.py): 0.3 beat 1.0 at 50% (x3.89 vs x4.00
    # dense) and tied it at 20%; the token scaling keeps small calibration sets safe (compensation_probe.py).
    compensation_ridge: float = field(
        default=0.5, metadata={"help": "Ridge of the least-squares compensation, x the mean Gram diagonal (>= 0)."}
    )
    compensation_tokens: Optional[int] = field(
        default=None, metadata={"help": "Tokens of each forward pass folded into the Gram matrices (None: all)."}
    )

    def __post_init__(self) -> None:
        self.structures = check.strings("structures", self.structures)
        if not self.structures or any(s not in STRUCTURES for s in self.structures):
            raise ValueError(f"structures={self.structures!r}: must be a non-empty subset of {STRUCTURES}")
        self.protected_layers = check.integers("protected_layers", self.protected_layers, optional=True)
        check.fraction("target_sparsity", self.target_sparsity)
        check.fraction("head_sparsity", self.head_sparsity, optional=True)
        check.fraction("channel_sparsity", self.channel_sparsity, optional=True)
        check.fraction("pruning_fraction", self.pruning_fraction, closed=True)
        check.fraction("warmup_ratio", self.warmup_ratio)
        check.fraction("cooldown_ratio", self.cooldown_ratio)
        check.fraction("ema_decay", self.ema_decay)
        if self.warmup_ratio + self.cooldown_ratio >= 1:
            raise ValueError(
                f"warmup_ratio={self.warmup_ratio} + cooldown_ratio={self.cooldown_ratio}: must sum to less than 1"
            )
        check.choice("head_granularity", self.head_granularity, HEAD_GRANULARITIES)
        check.choice("ranking", self.ranking, RANKINGS)
        check.choice("schedule", self.schedule, SCHEDULES)
        check.choice("normalize", self.normalize, NORMALIZATIONS)
        check.number("global_spread", self.global_spread, minimum=0, optional=True)
        if self.global_spread is not None and self.global_spread > 1:
            raise ValueError(f"global_spread={self.global_spread}: must be in [0, 1] or None (unbounded)")
        check.choice("physical_removal", self.physical_removal, PHYSICAL_REMOVAL)
        for name in ("prune_every", "min_heads", "min_channels", "round_heads_to", "round_channels_to"):
            check.integer(name, getattr(self, name), minimum=1)
        check.integer("pruning_steps", self.pruning_steps, minimum=1, optional=True)
        check.boolean("uniform", self.uniform)
        check.integer("seed", self.seed)
        check.choice("compensation", self.compensation, COMPENSATIONS)
        check.number("compensation_ridge", self.compensation_ridge, minimum=0)
        check.integer("compensation_tokens", self.compensation_tokens, minimum=1, optional=True)
        if self.head_sparsity is not None and "heads" not in self.structures:
            raise ValueError(f"head_sparsity={self.head_sparsity} but structures={self.structures} has no 'heads'")
        if self.channel_sparsity is not None and "channels" not in self.structures:
            raise ValueError(f"channel_sparsity={self.channel_sparsity} but structures={self.structures} has no 'channels'")
        if self.uniform and self.ranking == "global":
            raise ValueError("uniform=True with ranking='global': uniform widths need ranking='local'")
        if not isinstance(self.importance, str) or not self.importance:
            raise ValueError(f"importance={self.importance!r}: must be the name of a registered criterion")
        # The name itself is checked against the registry by the callback / prune_model,
        # so that criteria registered after this config was built are accepted.

    @property
    def score_normalization(self) -> str:
        """What `normalize` means for this ranking: "module", "global" or "none"."""
        if self.normalize != "auto":
            return self.normalize
        return "global" if self.ranking == "global" else "module"

    @property
    def separate_targets(self) -> bool:
        return self.head_sparsity is not None or self.channel_sparsity is not None

    def to_dict(self) -> dict:
        return asdict(self)
