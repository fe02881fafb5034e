"""The settings of one estimate, checked once, and what the chosen criterion costs.

A criterion's cost is read from the attributes it declares on `ImportanceCriterion` (the
registry is asked, so a criterion a user registered is estimated like a built-in one):

    needs                 weight_gradients: a gradient for every weight (no quantized base);
                          lora_gradients: LoRA factors (and so adapters) must exist;
                          activation_gradients: a probe on the inputs of o_proj / down_proj keeps
                          them for the backward; forward: hooks read those inputs in the forward;
                          forward_loss: no training step at all, the criterion's own no-grad forward
                          passes (bonsai, in prune_model), with its prior's hooks
    work_buffers          fp32 buffers the size of the largest scored weight, while scoring
    weight_state_buffers  buffers the size of every scored weight, kept between steps

`lora_gradients` criteria score the modules that carry adapters, the others all seven projections.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..structure.arch import PROJECTION_ROLES

FP32 = 4
#: Bytes of optimizer state per trainable parameter.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "sgd": 0, "none": 0}
#: Bytes of optimizer temporaries per trainable parameter (torch's foreach AdamW
#: materialises one fp32 tensor list the size of the parameters).
OPTIMIZER_WORK_BYTES = {"adamw": 4, "adamw_8bit": 0, "sgd": 0, "none": 0}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
#: Hooks that read the inputs of the projections each head / channel feeds (hfprune's activation criteria).
HOOKED_ROLES = ("o_proj", "down_proj")


@dataclass(frozen=True)
class CriterionCost:
    """What a registered criterion asks of memory (see the module docstring)."""

    name: str
    needs: str
    work_buffers: int
    weight_state_buffers: int

    @classmethod
    def of(cls, name: str) -> "CriterionCost":
        from ..importance import available_importances, get_importance

        if name not in available_importances():
            raise ValueError(f"criterion={name!r}: must be one of {list(available_importances())} "
                             "(hfprune.importance.register_importance adds one)")
        criterion = get_importance(name)
        return cls(name, criterion.needs, criterion.work_buffers, criterion.weight_state_buffers)

    @property
    def full_gradients(self) -> bool:
        return self.needs == "weight_gradients"

    @property
    def probes_activations(self) -> bool:
        """The probe of `activation_gradients` criteria keeps o_proj's and down_proj's inputs for backward."""
        return self.needs == "activation_gradients"

    @property
    def hooked(self) -> bool:
        """Hooks keep per-unit statistics of the o_proj / down_proj inputs between scorings."""
        return self.needs in ("forward", "activation_gradients", "forward_loss")

    @property
    def forward_only(self) -> bool:
        """It scores with no-grad forward passes of its own (`prune_model` only): the step is one such pass."""
        return self.needs == "forward_loss"

    def scored_roles(self, lora_target_modules) -> tuple[str, ...]:
        return tuple(lora_target_modules) if self.needs == "lora_gradients" else PROJECTION_ROLES


@dataclass(frozen=True)
class Settings:
    """One pruning step's settings, as `estimate_memory` takes them (checked by `check`)."""

    criterion: str
    load_in_8bit: bool
    load_in_4bit: bool
    double_quant: bool
    seq_len: int
    batch_size: int
    lora_r: int
    lora_target_modules: tuple[str, ...]
    gradient_checkpointing: bool
    compute_dtype: str
    optimizer: str
    upcast_non_quantized: bool
    lora_dropout: float
    attn_implementation: str | None
    compensation: str = "auto"
    protected_layers: tuple[int, ...] | None = None

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def quantized(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit

    @property
    def weight_bytes(self) -> int:
        """Bytes of a dense weight (and of its gradient) in the compute dtype."""
        return DTYPE_BYTES[self.compute_dtype]

    @property
    def activation_bytes(self) -> int:
        """A quantized base prepared for k-bit training has fp32 norms, which promote the hidden
        states, and bitsandbytes returns its input's dtype: the activations are fp32 too."""
        return FP32 if self.quantized and self.upcast_non_quantized else self.weight_bytes

    def to_dict(self, attention: str) -> dict:
        """The settings as `MemoryEstimate.settings` reports them (with the attention actually run)."""
        return {
            "criterion": self.criterion, "load_in_8bit": self.load_in_8bit, "load_in_4bit": self.load_in_4bit,
            "double_quant": self.double_quant, "seq_len": self.seq_len, "batch_size": self.batch_size,
            "lora_r": self.lora_r, "lora_target_modules": self.lora_target_modules,
            "gradient_checkpointing": self.gradient_checkpointing, "compute_dtype": self.compute_dtype,
            "optimizer": self.optimizer, "upcast_non_quantized": self.upcast_non_quantized,
            "lora_dropout": self.lora_dropout, "attn_implementation": attention,
            "compensation": self.compensation, "protected_layers": self.protected_layers,
        }


def dtype_name(value) -> str:
    name = str(value).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"compute_dtype={value!r}: must be one of {sorted(DTYPE_BYTES)}")
    return name


def check(settings: Settings, cost: CriterionCost) -> None:
    """Every bad setting raises here, naming the value and what would be valid."""
    s = settings
    for name, value in (("seq_len", s.seq_len), ("batch_size", s.batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if isinstance(s.lora_r, bool) or not isinstance(s.lora_r, int) or s.lora_r < 0:
        raise ValueError(f"lora_r={s.lora_r!r}: must be an integer >= 0 (0 = no LoRA adapters)")
    unknown = [m for m in s.lora_target_modules if m not in PROJECTION_ROLES]
    if unknown:
        raise ValueError(
            f"lora_target_modules={list(s.lora_target_modules)!r}: {unknown} not among {list(PROJECTION_ROLES)}"
        )
    if s.optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer={s.optimizer!r}: must be one of {list(OPTIMIZER_STATE_BYTES)} or None")
    if s.attn_implementation is not None and s.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={s.attn_implementation!r}: must be one of {list(ATTENTION_IMPLEMENTATIONS)} or None"
        )
    if not 0.0 <= s.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={s.lora_dropout!r}: must be in [0, 1)")
    if s.load_in_8bit and s.load_in_4bit:
        raise ValueError("load_in_8bit=True with load_in_4bit=True: choose one quantized base")
    from ..config import COMPENSATIONS

    if s.compensation not in COMPENSATIONS:
        raise ValueError(f"compensation={s.compensation!r}: must be one of {list(COMPENSATIONS)}")
    if s.protected_layers is not None and not all(isinstance(i, int) and not isinstance(i, bool)
                                                  for i in s.protected_layers):
        raise ValueError(f"protected_layers={s.protected_layers!r}: must be layer indices (integers) or None")
    if s.double_quant and not s.load_in_4bit:
        raise ValueError("double_quant=True without load_in_4bit=True: double quantization is of 4-bit absmax scales")
    _check_criterion(s, cost)


def _scores_a_quantized_base(name: str) -> bool:
    from ..importance import get_importance

    try:
        return not get_importance(name).needs_weight_gradients
    except (TypeError, ValueError):  # a registered factory that does not build a valid criterion
        return False


def _check_criterion(s: Settings, cost: CriterionCost) -> None:
    from ..importance import available_importances

    if cost.full_gradients and s.quantized:
        flag = "load_in_4bit" if s.load_in_4bit else "load_in_8bit"
        stored = "4-bit weights are packed bytes" if s.load_in_4bit else "int8 weights are"
        valid = [name for name in available_importances() if _scores_a_quantized_base(name)]
        raise ValueError(
            f"criterion={s.criterion!r} with {flag}=True: {s.criterion!r} scores weights from their full "
            f"gradients, and bitsandbytes {stored} frozen (no .grad). Use {flag}=False (bf16/fp16 weights that "
            "require grad), or criterion='lora', which estimates the weight gradient from the LoRA factors. "
            f"Valid criteria on a quantized base (no weight gradients needed): {valid}"
        )
    if cost.needs == "lora_gradients" and (s.lora_r == 0 or not s.lora_target_modules):
        raise ValueError(
            f"criterion={s.criterion!r} with lora_r={s.lora_r} and "
            f"lora_target_modules={list(s.lora_target_modules)!r}: "
            f"{s.criterion!r} scores weights from LoRA gradients, so it needs lora_r >= 1 and target modules"
        )
    if cost.needs == "activation_gradients" and s.lora_r == 0:
        raise ValueError(
            f"criterion={s.criterion!r} with lora_r=0: {s.criterion!r} scores from activation gradients, which a "
            "backward pass only computes when something trains; give the step LoRA adapters (lora_r >= 1)"
        )
