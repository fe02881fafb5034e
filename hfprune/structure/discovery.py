"""Find the prunable groups of a model: KV groups, query heads and MLP channels.

Grouped-query attention, as transformers' `repeat_kv` lays it out: query head
`h` reads key/value head `h // n_rep`, with `n_rep = num_heads // num_kv_heads`.
So KV group `g` is

    k_proj, v_proj rows    [g*head_dim, (g+1)*head_dim)
    q_proj rows            [h*head_dim, (h+1)*head_dim)   for h in [g*n_rep, (g+1)*n_rep)
    o_proj input columns   the same ranges as the q_proj rows

and MLP channel `c` is row `c` of gate_proj and up_proj and column `c` of down_proj.

Widths are read from the modules' actual shapes, never from the global config,
so discovery also works on a model that was already pruned (heterogeneous
layers) or loaded from a pruned checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from torch import nn

from .arch import ATTENTION_ROLES, PROJECTION_ROLES, ArchitectureSpec, get_architecture

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PruningConfig


def base_layer(module: nn.Module) -> nn.Module:
    """The Linear under a peft LoRA wrapper (or the module itself)."""
    while hasattr(module, "base_layer") and isinstance(getattr(module, "base_layer"), nn.Module):
        module = module.base_layer
    return module


def is_lora_wrapped(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _get_submodule(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under peft / DDP / accelerate wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft PeftModel
            model = model.get_base_model()
    return model


@dataclass
class LayerStructure:
    """One decoder layer's prunable groups, at its current (possibly pruned) widths."""

    index: int
    layer: nn.Module
    spec: ArchitectureSpec
    head_dim: int
    hidden_size: int

    @property
    def attention(self) -> nn.Module:
        return getattr(self.layer, self.spec.attention)

    @property
    def mlp(self) -> nn.Module:
        return getattr(self.layer, self.spec.mlp)

    def projection(self, role: str) -> nn.Module:
        """The module currently at q_proj/k_proj/.../down_proj (a LoRA wrapper if peft added one)."""
        parent = self.attention if role in ATTENTION_ROLES else self.mlp
        return getattr(parent, self.spec.name(role))

    @property
    def num_heads(self) -> int:
        return base_layer(self.projection("q_proj")).out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return base_layer(self.projection("k_proj")).out_features // self.head_dim

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def intermediate_size(self) -> int:
        return base_layer(self.projection("gate_proj")).out_features

    def _has_bias(self, role: str) -> bool:
        return base_layer(self.projection(role)).bias is not None

    # Parameters that leave with one unit of each group type.
    @property
    def params_per_query_head(self) -> int:
        return 2 * self.head_dim * self.hidden_size + (self.head_dim if self._has_bias("q_proj") else 0)

    @property
    def params_per_kv_head(self) -> int:
        bias = self.head_dim * (int(self._has_bias("k_proj")) + int(self._has_bias("v_proj")))
        return 2 * self.head_dim * self.hidden_size + bias

    @property
    def params_per_channel(self) -> int:
        bias = int(self._has_bias("gate_proj")) + int(self._has_bias("up_proj"))
        return 3 * self.hidden_size + bias

    @property
    def attention_params(self) -> int:
        return self.num_heads * self.params_per_query_head + self.num_kv_heads * self.params_per_kv_head

    @property
    def mlp_params(self) -> int:
        return self.intermediate_size * self.params_per_channel

    def widths(self) -> dict[str, int]:
        return {
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
        }


@dataclass
class ModelStructure:
    """Every decoder layer of a model, and which ones may be pruned."""

    model: nn.Module
    spec: ArchitectureSpec
    layers: list[LayerStructure]
    protected: frozenset[int]

    @property
    def config(self):
        return self.model.config

    @property
    def prunable_layers(self) -> list[LayerStructure]:
        return [layer for layer in self.layers if layer.index not in self.protected]

    def __iter__(self) -> Iterator[LayerStructure]:
        return iter(self.layers)

    def prunable_params(self) -> int:
        """Parameters that pruning may remove: projections of the unprotected layers."""
        return sum(layer.attention_params + layer.mlp_params for layer in self.prunable_layers)

    def projection_params(self) -> int:
        return sum(layer.attention_params + layer.mlp_params for layer in self.layers)


def default_protected_layers(num_layers: int) -> tuple[int, ...]:
    """LoRAPrune's default: the first 10% of the layers and the last layer."""
    first = int(num_layers * 0.1)
    return tuple(sorted(set(range(first)) | {num_layers - 1}))


_LINEAR_HINT = "expected torch.nn.Linear, bitsandbytes Linear8bitLt, or a peft LoRA layer wrapping one"


def _check_linear(module: nn.Module, where: str) -> None:
    inner = base_layer(module)
    if not isinstance(inner, nn.Linear):
        raise TypeError(f"{where} is {type(inner).__name__}: {_LINEAR_HINT}")


def discover(model: nn.Module, protected_layers: Optional[tuple[int, ...]] = None) -> ModelStructure:
    """Describe `model`'s prunable structure. Raises before touching any weight if it cannot be pruned."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no `config`: expected a transformers PreTrainedModel")
    spec = get_architecture(getattr(config, "model_type", None))
    try:
        decoder_layers = _get_submodule(inner, spec.layers)
    except AttributeError:
        raise ValueError(
            f"{type(inner).__name__} (model_type={config.model_type!r}) has no `{spec.layers}`: expected a causal LM "
            "such as LlamaForCausalLM"
        ) from None
    hidden_size = config.hidden_size
    layers: list[LayerStructure] = []
    for index, layer in enumerate(decoder_layers):
        attention = getattr(layer, spec.attention)
        head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
        head_dim = head_dim or hidden_size // config.num_attention_heads
        structure = LayerStructure(index=index, layer=layer, spec=spec, head_dim=int(head_dim), hidden_size=hidden_size)
        for role in PROJECTION_ROLES:
            _check_linear(structure.projection(role), f"layer {index} {spec.name(role)}")
        if structure.num_heads % structure.num_kv_heads:
            raise ValueError(
                f"layer {index}: {structure.num_heads} query heads do not divide into {structure.num_kv_heads} KV heads"
            )
        layers.append(structure)
    num_layers = len(layers)
    if protected_layers is None:
        protected_layers = default_protected_layers(num_layers)
    bad = [i for i in protected_layers if not -num_layers <= i < num_layers]
    if bad:
        raise ValueError(f"protected_layers={tuple(protected_layers)}: {bad} out of range for {num_layers} layers")
    protected = frozenset(i % num_layers for i in protected_layers)
    return ModelStructure(model=inner, spec=spec, layers=layers, protected=protected)


def discover_for_config(model: nn.Module, config: "PruningConfig") -> ModelStructure:
    """`discover` with the config's protected layers (none by default in uniform mode,
    where every layer must end with the same widths)."""
    protected = config.protected_layers
    if config.uniform:
        if protected:
            raise ValueError(
                f"uniform=True with protected_layers={protected}: a stock config has one width for every layer, "
                "so uniform pruning cannot protect layers; pass protected_layers=() or uniform=False"
            )
        protected = ()
    return discover(model, protected_layers=protected)


def head_rows(head_indices: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a projection laid out head by head."""
    offsets = torch.arange(head_dim, device=head_indices.device)
    return (head_indices[:, None] * head_dim + offsets[None, :]).reshape(-1)
