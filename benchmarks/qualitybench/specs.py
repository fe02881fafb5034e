"""What a quality run is, as data: a method, a budget, and the run that combines them.

* A *method* is a flat dict: `PruningConfig` fields (applied over the package's own defaults, so
  `{}` is whatever `PruningConfig()` is today) and a few run options (`RUN_OPTIONS`).
* A *budget* is a protocol: how many optimizer steps, of which batches, on which text. Every
  method in a budget gets the same text and the same number of steps.
* A *run* (`RunSpec`) is one method in one budget at one sparsity, structures and seed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

DENSE = "dense"
PEER = "torch-pruning"
# `structures` entry of a plan: the method's own structures (its overrides, else PruningConfig's default).
OWN = "own"
STRUCTURE_NAMES = {"channels": ("channels",), "heads+channels": ("heads", "channels"), "heads": ("heads",)}

BASES = ("auto", "8bit", "fp32")  # auto: fp32 when the criterion needs full weight gradients, else the 8-bit base
DATA_ORDERS = ("mix", "c4-first", "phases")
# Method keys that are not PruningConfig fields: how the run goes around the pruning.
RUN_OPTIONS = {
    "base": f"one of {BASES} (default auto)",
    "distillation": "DistillationConfig fields as a dict ({} = its defaults); absent or None: plain loss",
    "data": f"data order, one of {DATA_ORDERS} (default: the budget's)",
}
# Set by the plan for every run alike; a method that set them would not be compared at the same point.
RUN_DIMENSIONS = ("target_sparsity", "seed")


@dataclass(frozen=True)
class Budget:
    """A protocol. `steps=0`: one shot, no recovery (scores from the run's calibration batches).

    Otherwise `steps` batches of `batch_size` x `seq_len` tokens: hfprune prunes progressively over
    the first `pruning_steps` (masks updated every `prune_every`, LoRA training), then recovers on the
    rest; Torch-Pruning calibrates on those same `pruning_steps` batches, prunes once, then trains LoRA on
    the rest: the same text, the same recovery steps, the same backward passes. `eval_every`: perplexity in the loop every that many steps
    (the curve); 0: at the end only.
    """

    steps: int = 0
    batch_size: int = 4
    seq_len: int = 128
    pruning_steps: int = 0
    prune_every: int = 1
    learning_rate: float = 1e-3
    warmup_steps: int = 1
    data: str = "c4-first"
    eval_every: int = 0

    def __post_init__(self):
        if self.data not in DATA_ORDERS:
            raise ValueError(f"data={self.data!r}: must be one of {DATA_ORDERS}")
        if self.steps and not 1 <= self.pruning_steps <= self.steps:
            raise ValueError(f"pruning_steps={self.pruning_steps}: must be in [1, steps={self.steps}]")

    @property
    def one_shot(self) -> bool:
        return self.steps == 0


@dataclass(frozen=True)
class RunSpec:
    budget: str
    method: str
    sparsity: float
    structures: tuple = ()  # what the run may remove (resolved: never OWN)
    seed: int = 0
    calibration: str = ""  # one-shot budgets: "NxL" sequences x tokens
    # The method's own structures (what its user gets); an explicit plan entry may coincide with them.
    own_structures: bool = field(default=True, compare=False)

    @property
    def key(self) -> str:
        parts = [self.budget, self.method, f"{self.sparsity:g}", structures_label(self.structures)]
        return ".".join(parts + ([self.calibration] if self.calibration else []) + [f"seed{self.seed}"])


def structures_label(structures) -> str:
    return "+".join(structures) if structures else "-"


def parse_structures(text: str):
    """`channels`, `heads+channels` or `own` (the method's own)."""
    if text == OWN:
        return OWN
    if text not in STRUCTURE_NAMES:
        raise ValueError(f"structures {text!r}: must be one of {', '.join([OWN, *STRUCTURE_NAMES])}")
    return STRUCTURE_NAMES[text]


def parse_calibration(text: str) -> tuple[int, int]:
    """`"10x64"` -> (10 sequences, 64 tokens)."""
    try:
        count, length = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"calibration {text!r}: must be SEQUENCESxTOKENS, e.g. 10x64 or 64x256") from None
    if count < 1 or length < 2:
        raise ValueError(f"calibration {text!r}: needs at least 1 sequence of 2 tokens")
    return count, length


# ---------------------------------------------------------------- methods


def split_method(name: str, method: dict) -> tuple[dict, dict]:
    """(PruningConfig overrides, run options) of a method; unknown keys are errors that name the valid ones."""
    from hfprune import PruningConfig

    config_fields = {f.name for f in fields(PruningConfig)}
    unknown = [k for k in method if k not in config_fields and k not in RUN_OPTIONS]
    if unknown:
        raise ValueError(f"method {name!r}: unknown keys {unknown}; valid: PruningConfig fields "
                         f"({', '.join(sorted(config_fields))}) or run options ({', '.join(RUN_OPTIONS)})")
    fixed = [k for k in method if k in RUN_DIMENSIONS]
    if fixed:
        raise ValueError(f"method {name!r}: {fixed} are set by the plan for every run, not by a method")
    options = {k: v for k, v in method.items() if k in RUN_OPTIONS}
    if options.get("base", "auto") not in BASES:
        raise ValueError(f"method {name!r}: base={options['base']!r}: must be one of {BASES}")
    if options.get("data") is not None and options["data"] not in DATA_ORDERS:
        raise ValueError(f"method {name!r}: data={options['data']!r}: must be one of {DATA_ORDERS}")
    return {k: v for k, v in method.items() if k not in RUN_OPTIONS}, options


def pruning_config(spec: RunSpec, method: dict, budget: Budget):
    """The PruningConfig of a run: the package's defaults, the budget's schedule, the method, the run's point."""
    from hfprune import PruningConfig

    overrides, _ = split_method(spec.method, method)
    values = dict(pruning_steps=budget.pruning_steps, prune_every=budget.prune_every) if budget.steps else {}
    values.update(overrides)
    values.update(target_sparsity=spec.sparsity, structures=list(spec.structures), seed=spec.seed)
    return PruningConfig(**values)


def own_structures(name: str, method: dict) -> tuple:
    from hfprune import PruningConfig

    overrides, _ = split_method(name, method)
    return tuple(PruningConfig(**{k: v for k, v in overrides.items() if k == "structures"}).structures)


def base_of(config, options: dict) -> str:
    """`8bit` or `fp32`: the option, or (auto) fp32 exactly when the criterion needs full weight gradients."""
    from hfprune.importance import make_criterion

    base = options.get("base", "auto")
    if base != "auto":
        return base
    return "fp32" if make_criterion(config).needs_weight_gradients else "8bit"


def data_order(options: dict, budget: Budget) -> str:
    return options.get("data") or budget.data


def distillation_config(options: dict):
    from hfprune import DistillationConfig

    value = options.get("distillation")
    return None if value is None else DistillationConfig(**value)


# ---------------------------------------------------------------- the plan


def expand_plan(plan: dict, methods: dict, budgets: dict) -> list[RunSpec]:
    """Every run of `plan` ({budget: {methods, sparsities, structures, seeds, calibrations}}), each once."""
    runs: dict[str, RunSpec] = {}
    for budget_name, entry in plan.items():
        if budget_name not in budgets:
            raise ValueError(f"plan: unknown budget {budget_name!r}; budgets: {', '.join(budgets)}")
        budget = budgets[budget_name]
        calibrations = tuple(entry.get("calibrations") or ("10x64",)) if budget.one_shot else ("",)
        for calibration in calibrations:
            if calibration:
                parse_calibration(calibration)
        for name in entry["methods"]:
            if name != PEER and name not in methods:
                raise ValueError(f"plan[{budget_name!r}]: unknown method {name!r}; methods: "
                                 f"{', '.join([*methods, PEER])}")
            own = ("channels",) if name == PEER else own_structures(name, methods[name])
            for structures in entry.get("structures") or (OWN,):
                resolved = own if structures == OWN else tuple(structures)
                if name == PEER and resolved != own:
                    continue  # Torch-Pruning prunes MLP channels only (see torch_pruning_runs.py)
                for sparsity in entry["sparsities"]:
                    for seed in entry.get("seeds") or (0,):
                        for calibration in calibrations:
                            spec = RunSpec(budget_name, name, float(sparsity), resolved, int(seed), calibration,
                                           own_structures=resolved == own)
                            if spec.key in runs and not runs[spec.key].own_structures:
                                runs[spec.key] = spec  # the same run, asked for as the method's own
                            runs.setdefault(spec.key, spec)
    return list(runs.values())


def wants_zero_shot(zero_shot: dict, spec: RunSpec) -> bool:
    """`zero_shot`: {budget: methods, or None for all}; the dense model is measured whenever any run is."""
    if spec.method == DENSE:
        return bool(zero_shot)
    return spec.budget in zero_shot and (zero_shot[spec.budget] is None or spec.method in zero_shot[spec.budget])


def fingerprint(spec: RunSpec, method: Optional[dict], budget: Optional[Budget], settings: dict) -> dict:
    """Everything a finished run's numbers depend on (JSON types): a cached run is reused only if it matches.

    The PruningConfig is resolved, so a change of the package's defaults reruns "default"."""
    value = {"spec": asdict(spec), "settings": settings}
    if budget is not None:
        value["budget"] = asdict(budget)
    if method is not None and spec.method != PEER:
        config = pruning_config(spec, method, budget)
        _, options = split_method(spec.method, method)
        value.update(config=config.to_dict(), options=options, base=base_of(config, options),
                     data=data_order(options, budget))
    value["spec"].pop("own_structures")
    return json.loads(json.dumps(value, default=str))
