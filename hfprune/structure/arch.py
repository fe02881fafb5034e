"""Declarative descriptions of the model families hfprune knows how to prune.

An `ArchitectureSpec` names where the decoder layers live and what their
projections are called. Every supported family (Llama, Mistral, Qwen2, Qwen3,
Gemma 2, Gemma 3) shares the same shape: a self-attention block with q/k/v/o
projections and a gated MLP with gate/up/down projections. A new family with
the same shape is one `register_architecture(...)` call away.

Per-head norms: Qwen3 and Gemma 3 have `q_norm`/`k_norm` over `head_dim` only
(one weight shared by every head), so removing heads leaves them untouched. A
family whose norm weight spans `num_heads * head_dim` lists it in
`per_head_q_norms` / `per_head_kv_norms` and surgery slices it with the heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The projections of every supported family, by role. An `ArchitectureSpec` maps each role to the
#: module's name in that family (the same names for every family hfprune ships).
ATTENTION_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_ROLES = ("gate_proj", "up_proj", "down_proj")
PROJECTION_ROLES = ATTENTION_ROLES + MLP_ROLES


@dataclass(frozen=True)
class ArchitectureSpec:
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    per_head_q_norms: tuple[str, ...] = field(default=())
    per_head_kv_norms: tuple[str, ...] = field(default=())

    def name(self, role: str) -> str:
        """The module name of a projection role (`"q_proj"` -> this family's query projection)."""
        if role not in PROJECTION_ROLES:
            raise ValueError(f"role={role!r}: must be one of {', '.join(PROJECTION_ROLES)}")
        return getattr(self, role)

    @property
    def projection_names(self) -> tuple[str, ...]:
        """Module names of the seven projections, in `PROJECTION_ROLES` order."""
        return tuple(getattr(self, role) for role in PROJECTION_ROLES)


_REGISTRY: dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec, overwrite: bool = False) -> ArchitectureSpec:
    """Make a model family prunable. `spec.model_types` are `config.model_type` values."""
    for model_type in spec.model_types:
        if model_type in _REGISTRY and not overwrite:
            raise ValueError(f"model_type={model_type!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[model_type] = spec
    return spec


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_architecture(model_type: str) -> ArchitectureSpec:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ValueError(
            f"model_type={model_type!r} is not supported by hfprune; supported: "
            f"{', '.join(supported_model_types())}. A family with q/k/v/o attention projections and a "
            "gate/up/down MLP can be added with hfprune.structure.register_architecture(ArchitectureSpec(...))."
        ) from None


LLAMA_LIKE = register_architecture(
    ArchitectureSpec(model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"))
)
