"""The shapes the estimate needs, read off a model by `hfprune.structure.discover`.

Layer widths, projection sizes, biases, norms and parameter counts come from the modules
themselves (a meta-device model built from the config costs no memory), so a pruned model
with narrower layers, or a heterogeneous checkpoint's config, is measured as it is. Only what a
module's shape cannot tell is read from the config: softcapping, and whether the norms return
fp32 (Gemma's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ..structure.arch import PROJECTION_ROLES

#: Families whose RMSNorm multiplies by ``(1 + weight)`` in fp32, so the normalised tensor it
#: keeps for the weight gradient is fp32 whatever the activations are.
FP32_NORM_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")


class Projection(NamedTuple):
    in_features: int
    out_features: int
    bias: bool

    @property
    def size(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class LayerShapes:
    """One decoder layer at its current widths."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    projections: dict[str, Projection]
    """By role (`PROJECTION_ROLES`)."""
    parameters: int
    """Every parameter of the layer: projections, biases, norms."""
    norms: int
    """Norms over the hidden state (2 in Llama, 4 in Gemma 2/3)."""
    qk_norm: bool
    """A per-head norm on q and k (Qwen3, Gemma 3)."""

    @property
    def query_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class ModelShapes:
    """What the estimate needs to know about a decoder-only model."""

    name: str
    model_type: str
    hidden: int
    head_dim: int
    vocab: int
    layers: tuple[LayerShapes, ...]
    num_parameters: int
    tied_embeddings: bool
    attention: str
    """The attention transformers runs by default: "eager" or "sdpa" (any fused kernel)."""
    fp32_norm_output: bool
    final_logit_softcap: bool
    attn_logit_softcap: bool

    def projection_parameters(self) -> int:
        return sum(p.size for layer in self.layers for p in layer.projections.values())

    def other_parameters(self) -> int:
        """Embeddings, LM head, norms and biases: what bitsandbytes leaves unquantised."""
        return self.num_parameters - self.projection_parameters()

    def largest_projection(self, roles=PROJECTION_ROLES) -> int:
        """out * in of the largest of the given projections over all layers."""
        roles = tuple(roles)
        return max((p.size for layer in self.layers for r, p in layer.projections.items() if r in roles), default=0)


def model_shapes(source: Any) -> ModelShapes:
    """Shapes of a model: a `ModelShapes` (returned as is), a model (meta or real, peft-wrapped or
    not, quantized or not), or anything `load_model_config` accepts (built on the meta device)."""
    if isinstance(source, ModelShapes):
        return source
    if hasattr(source, "named_modules"):
        return _shapes_of_model(source)
    from .model_configs import build_meta_model, load_model_config

    config = load_model_config(source)
    _check_decoder_config(config)
    return _shapes_of_model(build_meta_model(config))


def _check_decoder_config(config) -> None:
    from ..export.registration import register_auto_classes
    from ..structure import supported_model_types

    register_auto_classes()  # hfprune_<family> (heterogeneous exports) are supported families too
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None)
    if model_type not in supported_model_types():
        raise ValueError(
            f"config of model_type={model_type!r}: the estimator covers the decoder-only families hfprune prunes "
            f"({', '.join(supported_model_types())}): Llama-style attention and a gated MLP"
        )


def _shapes_of_model(model) -> ModelShapes:
    from ..structure import base_layer, discover, unwrap_model

    inner = unwrap_model(model)
    structure = discover(inner, protected_layers=())
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    projection_weights = {}
    layers = []
    for layer in structure:
        linears = {role: base_layer(layer.projection(role)) for role in PROJECTION_ROLES}
        projections = {
            role: Projection(linear.in_features, linear.out_features, linear.bias is not None)
            for role, linear in linears.items()
        }
        weights = {id(linear.weight) for linear in linears.values()}
        projection_weights.update({id(linear.weight): projections[role].size for role, linear in linears.items()})
        layers.append(LayerShapes(
            heads=layer.num_heads,
            kv_heads=layer.num_kv_heads,
            head_dim=layer.head_dim,
            intermediate=layer.intermediate_size,
            projections=projections,
            parameters=sum(p.size for p in projections.values()) + _parameters(layer.layer, skip=weights),
            norms=_children_with_parameters(layer.layer, skip=(layer.spec.attention, layer.spec.mlp)),
            qk_norm=_children_with_parameters(layer.attention, skip=layer.spec.projection_names) > 0,
        ))
    # Projection weights count by their shape: a 4-bit weight packs two values per byte.
    num_parameters = sum(projection_weights.values()) + _parameters(inner, skip=set(projection_weights))
    embeddings, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    model_type = str(getattr(config, "model_type", ""))
    family = getattr(config, "base_model_type", None) or model_type  # hfprune_<family>: its family's modeling
    return ModelShapes(
        name=str(getattr(inner.config, "name_or_path", "") or model_type),
        model_type=model_type,
        hidden=structure.layers[0].hidden_size,
        head_dim=structure.layers[0].head_dim,
        vocab=embeddings.weight.shape[0],
        layers=tuple(layers),
        num_parameters=num_parameters,
        tied_embeddings=head is not None and head.weight is embeddings.weight,
        attention="eager" if getattr(inner.config, "_attn_implementation", None) == "eager" else "sdpa",
        fp32_norm_output=family in FP32_NORM_MODEL_TYPES,
        final_logit_softcap=getattr(config, "final_logit_softcapping", None) is not None,
        attn_logit_softcap=getattr(config, "attn_logit_softcapping", None) is not None,
    )


def _parameters(module, skip: set) -> int:
    """Parameters of `module` (each tensor once) other than those in `skip` and the LoRA factors."""
    return sum(p.numel() for name, p in module.named_parameters() if id(p) not in skip and "lora_" not in name)


def _children_with_parameters(module, skip) -> int:
    return sum(1 for name, child in module.named_children()
               if name not in skip and any(True for _ in child.parameters()))
