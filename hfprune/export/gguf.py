"""`export_gguf`: a checkpoint becomes one GGUF file for llama.cpp (and so Ollama and LM Studio).

    from hfprune.export import export_gguf
    export_gguf("out/pruned", "out/pruned.gguf", outtype="q8_0")

Which llama.cpp architecture a checkpoint becomes:

    family            uniform widths                       widths differ per layer
    llama, mistral    llama                                deci (per-layer head_count, head_count_kv,
    qwen2             qwen2 (llama when heads were pruned)       feed_forward_length arrays)
    qwen3             qwen3                                refused: deci has no q/k norms
    gemma2, gemma3    gemma2, gemma3                       refused: deci has no Gemma blocks

llama.cpp's own architectures build every layer at layer 0's widths; `deci` (NVIDIA's
Nemotron-NAS) is the one that reads each layer's widths. It is a Llama block (RMSNorm, rotary
attention with optional q/k/v/o biases, SiLU-gated MLP), so it also holds a Qwen2 block, and
`llama` holds a Qwen2 whose query width no longer equals the hidden size (llama.cpp's `qwen2`
cannot). The per-layer widths come from one function, `layer_widths`.

Tensors: llama.cpp's names (gguf's tensor map); Q and K rows of the `llama`/`deci` layouts
permuted from transformers' rotate-half order to interleaved pairs; Gemma norms stored as
1 + weight (Gemma's RMSNorm multiplies by 1 + w). Vectors and norms stay float32 (what llama.cpp
expects); matrices become `outtype`, and a q8_0 matrix whose rows are not a multiple of 32 values
(llama.cpp's block) stays f16. Tensors are read one at a time from the safetensors shards and
written straight to a temporary file beside the output, renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    RopeScalingType,
    get_tensor_name_map,
    quant_shape_to_byte_shape,
    quants,
)
from safetensors import safe_open

from ..atomic import atomic_file
from .gguf_tokenizer import TokenizerMetadata, checkpoint_tokenizer, read_gguf_tokenizer
from .safety import check_no_pickles, config_layer_widths, read_shapes, safetensors_files, validate_checkpoint_shapes

logger = logging.getLogger(__name__)

# outtype -> (type of the matrices, llama.cpp's file type)
OUTTYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
_NUMPY_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}

# Families whose attention is a plain Llama block (deci can hold their heterogeneous layers).
_LLAMA_BLOCK_FAMILIES = ("llama", "mistral", "qwen2")
_UNIFORM_ARCH = {"llama": MODEL_ARCH.LLAMA, "mistral": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2,
                 "qwen3": MODEL_ARCH.QWEN3, "gemma2": MODEL_ARCH.GEMMA2, "gemma3_text": MODEL_ARCH.GEMMA3}
# What llama.cpp lacks to run a heterogeneous checkpoint of the other families.
_NOT_EXPRESSIBLE = {
    "qwen3": "llama.cpp's qwen3 architecture builds every layer at layer 0's widths, and deci (its only "
             "architecture with per-layer widths) has no per-head q_norm/k_norm",
    "gemma2": "llama.cpp's gemma2 architecture builds every layer at layer 0's widths, and deci (its only "
              "architecture with per-layer widths) has no Gemma block (embedding scale, post-norms, GELU, "
              "soft-capping, sliding-window layers)",
    "gemma3_text": "llama.cpp's gemma3 architecture builds every layer at layer 0's widths, and deci (its only "
                   "architecture with per-layer widths) has no Gemma block (embedding scale, q/k norms, "
                   "post-norms, GELU, sliding-window layers)",
}
_ACTIVATIONS = {"llama": "silu", "mistral": "silu", "qwen2": "silu", "qwen3": "silu",
                "gemma2": "gelu_pytorch_tanh", "gemma3_text": "gelu_pytorch_tanh"}
# Gemma's layer counts that llama.cpp treats as the 27B model, whose attention scale it derives
# from hidden_size / heads instead of head_dim.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}
_SKIPPED_TENSORS = (".rotary_emb.inv_freq",)
EMBEDDING = "model.embed_tokens.weight"


@dataclass(frozen=True)
class LayerWidths:
    heads: int
    kv_heads: int
    intermediate: int


def layer_widths(config: dict) -> list[LayerWidths]:
    """Each decoder layer's widths: the global config overridden by `per_layer_config` (safety.py)."""
    layers = []
    for index in range(config["num_hidden_layers"]):
        widths = config_layer_widths(config, index)
        layers.append(LayerWidths(widths["num_attention_heads"], widths["num_key_value_heads"],
                                  widths["intermediate_size"]))
    return layers


@dataclass(frozen=True)
class GgufLayout:
    """How a checkpoint maps onto a llama.cpp architecture."""

    family: str
    arch: MODEL_ARCH
    layers: list[LayerWidths]
    head_dim: int
    hidden_size: int

    @property
    def arch_name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]

    @property
    def per_layer(self) -> bool:
        return self.arch == MODEL_ARCH.DECI

    @property
    def interleaved_rope(self) -> bool:
        # llama.cpp rotates adjacent pairs in these (rope type NORM); transformers rotates halves
        return self.arch in (MODEL_ARCH.LLAMA, MODEL_ARCH.DECI)

    @property
    def norm_offset(self) -> float:
        return 1.0 if self.family.startswith("gemma") else 0.0


def _family(config: dict) -> str:
    """`llama` for a stock llama config and an hfprune_llama one; ValueError for a family llama.cpp lacks here."""
    model_type = config.get("model_type")
    family = model_type.removeprefix("hfprune_") if isinstance(model_type, str) else None
    if family not in _UNIFORM_ARCH:
        raise ValueError(
            f"model_type={model_type!r}: the GGUF export supports {sorted(_UNIFORM_ARCH)} (and their hfprune_* "
            "pruned configs)"
        )
    return family


def gguf_layout(config: dict) -> GgufLayout:
    """The llama.cpp architecture for a checkpoint's (complete) config, or ValueError naming what it lacks."""
    family, model_type = _family(config), config["model_type"]
    activation = config.get("hidden_activation") or config.get("hidden_act")
    if activation != _ACTIVATIONS[family]:
        raise ValueError(f"hidden_act={activation!r}: llama.cpp's {family} architecture computes "
                         f"{_ACTIVATIONS[family]!r} only")
    layers = layer_widths(config)
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    for index, layer in enumerate(layers):
        if layer.heads < 1 or layer.kv_heads < 1 or layer.heads % layer.kv_heads or layer.intermediate < 1:
            raise ValueError(
                f"layer {index}: {layer.heads} query heads, {layer.kv_heads} KV heads, {layer.intermediate} MLP "
                "channels: the GGUF export needs at least one of each, query heads a multiple of KV heads"
            )
    uniform = all(layer == layers[0] for layer in layers)
    if uniform:
        arch = _UNIFORM_ARCH[family]
        if arch == MODEL_ARCH.QWEN2 and layers[0].heads * head_dim != hidden:
            arch = MODEL_ARCH.LLAMA  # llama.cpp's qwen2 sizes q/o as hidden x hidden; llama reads head_count
    elif family in _LLAMA_BLOCK_FAMILIES:
        arch = MODEL_ARCH.DECI
    else:
        raise ValueError(
            f"{model_type} checkpoint with per-layer widths ({_describe(layers)}): {_NOT_EXPRESSIBLE[family]}. Prune "
            "it uniformly (PruningConfig(uniform=True, protected_layers=())) to export a GGUF"
        )
    if family in _GEMMA_27B_LAYERS:
        _check_gemma_attention_scale(config, family, layers[0], head_dim)
    if family == "gemma2" and not config.get("tie_word_embeddings", True):
        raise ValueError("tie_word_embeddings=False: llama.cpp's gemma2 architecture always uses the token "
                         "embedding as the output layer, so a separate lm_head cannot be expressed")
    layout = GgufLayout(family, arch, layers, head_dim, hidden)
    _check_rope(layout, config)
    return layout


def _describe(layers: list[LayerWidths]) -> str:
    shown = ", ".join(f"{i}: {l.heads}/{l.kv_heads} heads, {l.intermediate} MLP" for i, l in enumerate(layers[:4]))
    return f"layers {shown}{', ...' if len(layers) > 4 else ''}"


def _check_gemma_attention_scale(config: dict, family: str, first: LayerWidths, head_dim: int) -> None:
    # transformers scales scores by query_pre_attn_scalar ** -0.5; llama.cpp fixes the scale itself
    scalar = config.get("query_pre_attn_scalar") or head_dim
    llama_cpp = config["hidden_size"] / first.heads if config["num_hidden_layers"] == _GEMMA_27B_LAYERS[family] \
        else head_dim
    if not math.isclose(scalar, llama_cpp):
        raise ValueError(
            f"query_pre_attn_scalar={scalar}: llama.cpp's {family} architecture scales attention by "
            f"1/sqrt({llama_cpp:g}) for this model ({config['num_hidden_layers']} layers, {first.heads} heads), "
            "and has no key to change it; the GGUF would compute other logits"
        )


# ---- the tensors -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the GGUF: where it comes from and how it is stored."""

    name: str                      # llama.cpp's name
    source: Optional[str]          # the checkpoint's name (None: computed, e.g. rope_freqs)
    layer: Optional[int]
    shape: tuple[int, ...]         # torch order (rows, columns)
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        if self.qtype in _NUMPY_TYPES:
            return math.prod(self.shape) * np.dtype(_NUMPY_TYPES[self.qtype]).itemsize
        return math.prod(quant_shape_to_byte_shape(self.shape, self.qtype))


def plan_tensors(layout: GgufLayout, config: dict, shapes: dict[str, tuple[int, ...]],
                 matrix_type: GGMLQuantizationType) -> list[GgufTensor]:
    """Every tensor of the GGUF, from the safetensors headers (nothing is loaded)."""
    names = get_tensor_name_map(layout.arch, len(layout.layers))
    tied = config.get("tie_word_embeddings", False)
    planned = []
    for source, shape in shapes.items():
        if source.endswith(_SKIPPED_TENSORS) or (source == "lm_head.weight" and tied):
            continue  # llama.cpp computes rotary angles itself, and reuses token_embd as the output when tied
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"tensor {source} has no place in llama.cpp's {layout.arch_name} architecture")
        layer = _layer_index(source)
        vector = len(shape) == 1 or name.endswith("_norm.weight")
        qtype = GGMLQuantizationType.F32 if vector else matrix_type
        if qtype == GGMLQuantizationType.Q8_0 and shape[-1] % GGML_QUANT_SIZES[qtype][0]:
            qtype = GGMLQuantizationType.F16  # q8_0 quantizes blocks of 32 values along a row
        planned.append(GgufTensor(name, source, layer, tuple(shape), qtype))
    rope_freqs = _llama3_rope_factors(layout, config)
    if rope_freqs is not None:
        planned.append(GgufTensor("rope_freqs.weight", None, None, tuple(rope_freqs.shape), GGMLQuantizationType.F32))
    return planned


def _layer_index(name: str) -> Optional[int]:
    for part in name.split("."):
        if part.isdecimal():
            return int(part)
    return None


def _tensor_data(tensor: GgufTensor, handles: dict[str, safe_open], sources: dict[str, Path],
                 layout: GgufLayout, config: dict) -> np.ndarray:
    """The tensor as llama.cpp stores it: permuted / shifted, in float32, then converted to its type."""
    if tensor.source is None:
        data = _llama3_rope_factors(layout, config)
    else:
        file = sources[tensor.source]
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt")
        data = handles[file].get_tensor(tensor.source).to(torch.float32)
        if layout.interleaved_rope and tensor.layer is not None:
            widths = layout.layers[tensor.layer]
            if tensor.name.startswith(f"blk.{tensor.layer}.attn_q."):
                data = _interleave_rope_rows(data, widths.heads)
            elif tensor.name.startswith(f"blk.{tensor.layer}.attn_k."):
                data = _interleave_rope_rows(data, widths.kv_heads)
        if layout.norm_offset and tensor.source.endswith("norm.weight"):
            data = data + layout.norm_offset
        data = data.numpy()
    if tensor.qtype in _NUMPY_TYPES:
        return np.ascontiguousarray(data.astype(_NUMPY_TYPES[tensor.qtype]))
    return quants.quantize(data, tensor.qtype)


def _interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's rows [x_0..x_{d/2-1}, y_0..y_{d/2-1}] (rotate-half) -> [x_0, y_0, x_1, y_1, ...]."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# ---- hyper-parameters --------------------------------------------------------------------------------------


def _rope_parameters(config: dict) -> tuple[dict, dict]:
    """(global-attention rope parameters, sliding-window ones) from transformers 5 or older configs."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        return dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
    if "rope_theta" not in rope and "rope_theta" in config:
        rope["rope_theta"] = config["rope_theta"]
    return rope, {}


def _rope_type(rope: dict) -> str:
    return str(rope.get("rope_type", rope.get("type", "default")))


def _check_rope(layout: GgufLayout, config: dict) -> None:
    rope_type = _rope_type(_rope_parameters(config)[0])
    supported = ("default", "linear", "llama3") if layout.interleaved_rope else ("default", "linear")
    if rope_type not in supported:
        raise ValueError(
            f"rope_type={rope_type!r}: the GGUF export writes {', '.join(supported)} rotary embeddings for "
            f"llama.cpp's {layout.arch_name} architecture"
        )


def _llama3_rope_factors(layout: GgufLayout, config: dict) -> Optional[np.ndarray]:
    """Llama 3.1's frequency-dependent rope scaling as llama.cpp's per-frequency divisors (rope_freqs)."""
    rope = _rope_parameters(config)[0]
    if _rope_type(rope) != "llama3":
        return None
    base, dim = rope.get("rope_theta", 10000.0), layout.head_dim
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    original = rope.get("original_max_position_embeddings", 8192)
    wavelengths = 2 * math.pi * base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = np.clip((original / wavelengths - low) / (high - low), 0.0, 1.0)
    # transformers divides a frequency by `factor` (long wavelengths), keeps it (short) or blends the two
    divisors = 1.0 / ((1.0 - smooth) / factor + smooth)
    return divisors.astype(np.float32)


def _write_hyperparameters(writer: GGUFWriter, layout: GgufLayout, config: dict, n_vocab: int,
                           file_type: LlamaFileType, name: str) -> None:
    layers = layout.layers
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(len(layers))
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(layout.hidden_size)
    writer.add_vocab_size(n_vocab)
    if layout.per_layer:
        writer.add_feed_forward_length([l.intermediate for l in layers])
        writer.add_head_count([l.heads for l in layers])
        writer.add_head_count_kv([l.kv_heads for l in layers])
    else:
        writer.add_feed_forward_length(layers[0].intermediate)
        writer.add_head_count(layers[0].heads)
        writer.add_head_count_kv(layers[0].kv_heads)
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))

    rope, sliding_rope = _rope_parameters(config)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if _rope_type(rope) == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if layout.family.startswith("gemma"):
        _write_gemma(writer, layout, config, sliding_rope)
    else:
        _warn_ignored_sliding_window(layout, config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)


def _write_gemma(writer: GGUFWriter, layout: GgufLayout, config: dict, sliding_rope: dict) -> None:
    layer_types = config.get("layer_types") or []
    if config.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if "sliding_attention" in layer_types and config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
        # explicit per-layer pattern: llama.cpp's default (every 2nd / 6th layer global) is a guess
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        if sliding_rope.get("rope_theta") is not None:
            writer.add_rope_freq_base_swa(sliding_rope["rope_theta"])
    elif layout.family == "gemma2":
        writer.add_sliding_window(0)


def _warn_ignored_sliding_window(layout: GgufLayout, config: dict) -> None:
    window = config.get("sliding_window")
    uses = config.get("use_sliding_window", layout.family == "mistral")
    if window and uses and window < config.get("max_position_embeddings", window + 1):
        logger.warning(
            "sliding_window=%d: llama.cpp's %s architecture attends to the whole context, so beyond %d tokens "
            "its logits differ from transformers'", window, layout.arch_name, window,
        )


# ---- the export --------------------------------------------------------------------------------------------


def export_gguf(
    checkpoint_dir: Union[str, Path],
    output_file: Union[str, Path],
    *,
    outtype: str = "f16",
    tokenizer_from: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
) -> Path:
    """Write the safetensors checkpoint in `checkpoint_dir` (hfprune's, uniform or heterogeneous, or a stock
    one) as the GGUF file `output_file`, and return its path.

    Args:
        outtype: "f32", "f16" or "q8_0": the type of the weight matrices (norms and vectors stay f32).
        tokenizer_from: a GGUF of the unpruned model whose tokenizer metadata is reused, instead of building
            it from the checkpoint's tokenizer.json.
        overwrite: replace an existing `output_file` (atomically); else FileExistsError.

    Every check (outtype, output path, checkpoint files, pickles, config, shapes, tokenizer) runs before the
    first tensor is read; the file appears only when complete.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r}: expected one of {', '.join(OUTTYPES)}")
    matrix_type, file_type = OUTTYPES[outtype]
    checkpoint, output = Path(checkpoint_dir), Path(output_file)
    _check_output(output, overwrite)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint_dir={str(checkpoint)!r}: no such directory")
    check_no_pickles(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"checkpoint_dir={str(checkpoint)!r} has no config.json: it is not a model checkpoint")
    config = read_config(checkpoint)
    layout = gguf_layout(config)
    validate_checkpoint_shapes(checkpoint)
    shapes = read_shapes(checkpoint)
    tensors = plan_tensors(layout, config, shapes, matrix_type)
    if EMBEDDING not in shapes:
        raise ValueError(f"{checkpoint} has no {EMBEDDING} tensor: it is not a {layout.family} checkpoint")
    n_vocab = shapes[EMBEDDING][0]
    tokenizer = _tokenizer_metadata(checkpoint, tokenizer_from, n_vocab)
    fallback = [t.name for t in tensors if matrix_type == GGMLQuantizationType.Q8_0 and t.qtype ==
                GGMLQuantizationType.F16]
    if fallback:
        logger.warning("%d matrices have rows that are not a multiple of 32 values and stay f16 in the q8_0 GGUF "
                       "(e.g. %s)", len(fallback), fallback[0])
    logger.info("GGUF: %s as llama.cpp's %s architecture (%s), %d tensors, tokenizer from %s",
                checkpoint, layout.arch_name, outtype, len(tensors), tokenizer.source)

    sources = {name: file for file in safetensors_files(checkpoint) for name in _tensor_names(file)}
    with atomic_file(output) as tmp:
        writer = GGUFWriter(tmp, layout.arch_name)
        _write_hyperparameters(writer, layout, config, n_vocab, file_type, checkpoint.resolve().name)
        tokenizer.write_to(writer)
        for tensor in tensors:
            placeholder = np.float32 if tensor.qtype not in _NUMPY_TYPES else _NUMPY_TYPES[tensor.qtype]
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(placeholder), tensor.nbytes,
                                   raw_dtype=tensor.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        handles: dict[Path, safe_open] = {}
        try:
            for tensor in tensors:  # one at a time: a 65B checkpoint never sits in memory
                writer.write_tensor_data(_tensor_data(tensor, handles, sources, layout, config))
        finally:
            handles.clear()
            writer.close()
        _check_output(output, overwrite)  # nobody created it meanwhile
    return output


def read_config(checkpoint: Path) -> dict:
    """config.json with the defaults of its config class filled in (save_pretrained omits them)."""
    _family(json.loads((checkpoint / "config.json").read_text()))  # before transformers guesses at it
    from transformers import AutoConfig

    from .registration import register_auto_classes

    register_auto_classes()
    return AutoConfig.from_pretrained(str(checkpoint)).to_dict()


def _tokenizer_metadata(checkpoint: Path, tokenizer_from: Optional[Union[str, Path]], n_vocab: int
                        ) -> TokenizerMetadata:
    if tokenizer_from is None:
        return checkpoint_tokenizer(checkpoint, n_vocab)
    path = Path(tokenizer_from)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer_from={str(path)!r}: no such GGUF file")
    metadata = read_gguf_tokenizer(path)
    if metadata.n_tokens != n_vocab:
        raise ValueError(
            f"tokenizer_from={str(path)!r} has {metadata.n_tokens} tokens but the checkpoint's embedding has "
            f"{n_vocab} rows: it is not a GGUF of this model's base"
        )
    return metadata


def _tensor_names(file: Path) -> Iterator[str]:
    with safe_open(str(file), framework="pt") as handle:
        yield from handle.keys()


def _check_output(output: Path, overwrite: bool) -> None:
    if output.is_dir():
        raise IsADirectoryError(f"output_file={str(output)!r} is a directory; give the path of the .gguf file")
    if output.exists() and not overwrite:
        raise FileExistsError(f"output_file={str(output)!r} exists; pass overwrite=True (--overwrite) to replace it")
