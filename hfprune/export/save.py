"""`save_pruned`: a pruned model becomes a checkpoint that loads everywhere.

What it writes (to a temporary directory beside `output_dir`, renamed into place at the end):

    model.safetensors | model-0000i-of-0000N.safetensors + model.safetensors.index.json
    config.json                stock config (uniform) or hfprune_<family> config (heterogeneous)
    configuration_hfprune.py   } heterogeneous only: the loading code, for
    modeling_hfprune.py        } `from_pretrained(..., trust_remote_code=True)` without hfprune
    generation_config.json, tokenizer files, pruning_report.json
    README.md + pruned_widths.png  the model card (hfprune.model_card), from the report

Where the weights come from, tensor by tensor:
  * the original checkpoint (when given, and always for an 8-bit base): read shard by shard,
    sliced by the masks, LoRA delta added in float32 -- for every weight that is frozen in
    memory (a LoRA base, an int8 weight, frozen norms and embeddings). A frozen full-precision
    weight must match what the model holds (else LoRA was merged away, or the original is
    another model: ValueError);
  * memory: tensors the model may have trained (requires_grad, peft `modules_to_save` copies),
    and everything when no original checkpoint is used.
Weights are merged in the checkpoint's dtype (`dtype`, else the original's, else config.dtype): the
original's dtype, not necessarily float32 (SmolLM2 and most hub models are bf16). config.json gets
inference defaults (`use_cache: true`), whatever the training run set.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..atomic import atomic_directory, check_output_dir
from ..compensator import CompensationRecord
from ..masking import PruningMasks
from .._version import __version__
from ..removal import attached
from ..report import PruningReport
from ..structure import ModelStructure, discover, unwrap_model
from .config import REMOTE_CODE_FILES, ExportConfig, build_export_config
from .merge import ModelTensor, is_merged_in_memory, lora_delta, merged_tensor, model_tensors
from .safety import check_no_pickles, config_layer_widths, validate_checkpoint_shapes
from .shards import ShardWriter
from .streaming import OriginalCheckpoint, commit_from_cache_path, repo_id_from_cache_path, slice_original, slice_rules

logger = logging.getLogger(__name__)

_CHECK_CHUNK = 1 << 18  # elements compared at a time by _check_frozen_tensor_matches
REMOTE_CODE_DIR = Path(__file__).parent / "remote_code"


def save_pruned(
    model: nn.Module,
    output_dir: Union[str, Path],
    *,
    masks: Optional[PruningMasks] = None,
    compensation: Optional[CompensationRecord] = None,
    original_checkpoint: Optional[Union[str, Path]] = None,
    tokenizer: Any = None,
    report: Union[PruningReport, dict, None] = None,
    dtype: Optional[Union[torch.dtype, str]] = None,
    overwrite: bool = False,
    max_shard_size: Union[int, str] = "5GB",
    uniform: Optional[bool] = None,
    model_card: bool = True,
    allow_non_finite: bool = False,
) -> Path:
    """Write `model` (physically pruned; a PeftModel with LoRA, possibly on an 8-bit base, or a
    PreTrainedModel) as a dense safetensors checkpoint with LoRA merged, and return its path.

    Args:
        masks: the removal masks, in the ORIGINAL index space. Needed to slice the original
            checkpoint; also give the report the original indices of what was kept. Default:
            the record `prune_model` / `PruningCallback` attached to the model (`hfprune.removal`).
        compensation: the compensation maps of that removal (`hfprune.compensator`), replayed on
            the original's full-precision o_proj / down_proj weights before they are sliced.
            Default: the attached record's, when its masks are the ones used.
        original_checkpoint: local directory or hub id of the unpruned safetensors checkpoint.
            Frozen weights are re-read from it (streaming, shard by shard). Required for an
            8-bit base (default: `config.name_or_path`); LoRA is never merged into int8 values.
        tokenizer: saved with `save_pretrained` next to the weights.
        report: what the caller knows about the run (`PruningReport` or a dict, e.g.
            `PruningCallback.training_report(trainer)`), merged into `pruning_report.json`: its known
            values win over the computed ones, mappings are merged key by key.
        dtype: dtype of the saved weights, a torch.dtype or its name (default / "auto": the original
            checkpoint's, else config.dtype; the report and the log say which).
        overwrite: replace an existing non-empty `output_dir` (atomically); else FileExistsError.
        max_shard_size: shard size, e.g. "5GB" or bytes; larger checkpoints get an index.
        uniform: None picks a stock config when every layer has the same widths, else the
            heterogeneous format; True insists on a stock config (ValueError if impossible);
            False always writes the heterogeneous format.
        model_card: also write README.md and the kept-width chart (`hfprune.model_card`).
        allow_non_finite: write weights that hold NaN or Inf (a diverged training run) anyway, listed in the
            report's `export.non_finite_tensors`; by default such a model is refused (ValueError) before a
            file is written.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    from ..distributed import sharding

    if sharding(model):
        raise ValueError(
            f"the model's parameters are {sharding(model)} shards: export with "
            "hfprune.export.save_pruned_from_adapters (original checkpoint + removal masks + gathered LoRA factors)"
        )
    non_finite = _check_finite(model, allow_non_finite)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else _parse_dtype(dtype)
    inner = unwrap_model(model)
    structure = discover(model, protected_layers=())
    entries = model_tensors(model)
    tied = _tied_names(inner, entries)
    record = attached(model)
    if record is not None:
        if masks is None:
            masks = record.masks
        if compensation is None and record.masks == masks:
            compensation = record.compensation
    if masks is not None:
        _check_masks_fit_model(structure, masks, inner.config)

    quantized = sorted(name for name, entry in entries.items() if entry.quantized and name not in tied)
    if quantized and original_checkpoint is None:
        original_checkpoint = inner.config.name_or_path or None
        if not original_checkpoint:
            raise ValueError(
                f"{len(quantized)} weights (e.g. {quantized[0]}) are quantized (int8 / 4-bit) in memory: pass "
                "original_checkpoint= (the "
                "unpruned safetensors checkpoint, local path or hub id) so the full-precision weights can be re-read; "
                "hfprune never merges LoRA into de-quantised values"
            )
    original = OriginalCheckpoint(original_checkpoint) if original_checkpoint is not None else None
    if original is not None:
        if output_dir.resolve() == original.path.resolve():
            raise ValueError(f"output_dir={str(output_dir)!r} is the original checkpoint; write to another directory")
        if masks is None and _is_pruned(entries, structure, original):
            raise ValueError(
                "the model is pruned but masks=None: pass the removal masks (original index space) so the original "
                f"checkpoint {original.name} can be sliced to the pruned shapes"
            )
    export_dtype = dtype or _checkpoint_dtype(inner.config, original, entries)
    architecture = type(inner).__name__.removeprefix("Hfprune")
    exported = build_export_config(
        inner.config, structure, uniform=uniform, dtype=export_dtype, architecture=architecture
    )

    with atomic_directory(output_dir, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size)
        stats = _write_weights(writer, entries, tied, original, masks, compensation, structure, dtype, export_dtype)
        written_non_finite = sorted(set(stats.pop("non_finite")) - set(non_finite))
        if written_non_finite and not allow_non_finite:  # e.g. a finite LoRA delta that overflows the dtype
            raise ValueError(_non_finite_message(written_non_finite, len(stats["written"]), "the merged weights"))
        non_finite = sorted(set(non_finite) | set(written_non_finite))
        stats.pop("written")
        files = writer.finish()
        stats["params_after"] = writer.total_numel
        exported.config.to_json_file(str(tmp / "config.json"), use_diff=True)
        if exported.heterogeneous:
            for name in REMOTE_CODE_FILES:
                shutil.copyfile(REMOTE_CODE_DIR / name, tmp / name)
        generation_config = getattr(inner, "generation_config", None)
        if generation_config is not None and inner.can_generate():
            generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        exported_report = _report(inner, structure, masks, exported, original, stats, files, export_dtype)
        # What prune_model found short of its target (a global split), and non-finite weights written on request.
        warnings = list(getattr(record, "warnings", None) or [])
        if non_finite:
            exported_report.export["non_finite_tensors"] = non_finite
            warnings.append(f"{len(non_finite)} weight tensors hold NaN or Inf (exported with allow_non_finite=True, "
                            f"e.g. {non_finite[0]}): this checkpoint will not generate sensible text")
        given = report.to_dict() if isinstance(report, PruningReport) else dict(report or {})
        warnings = list(dict.fromkeys([*(given.get("warnings") or []), *warnings]))
        exported_report.update(report)
        exported_report.warnings = warnings or None
        exported_report.save(tmp)
        if model_card:
            from ..model_card import write_model_card

            write_model_card(tmp, model_name=output_dir.resolve().name)
        check_no_pickles(tmp)
        validate_checkpoint_shapes(tmp)
    logger.info("exported %s (%s, %s)", output_dir, "heterogeneous" if exported.heterogeneous else "uniform",
                str(export_dtype).removeprefix("torch."))
    return output_dir


# ---- weights ---------------------------------------------------------------------------------------------


def _non_finite_message(names: list[str], total: int, where: str) -> str:
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return (
        f"{len(names)} of {total} tensors of {where} hold NaN or Inf ({shown}): the training diverged (a NaN or "
        "infinite loss?), and the checkpoint would generate garbage. Resume from an earlier checkpoint with a "
        "lower learning rate (or max_grad_norm, bf16 instead of fp16), or pass allow_non_finite=True to write "
        "it anyway"
    )


def _check_finite(model: nn.Module, allow: bool) -> list[str]:
    """The model's floating parameters that hold NaN or Inf; refused (ValueError) unless `allow`, before any
    file is written. Integer (int8, packed 4-bit) tensors cannot hold either."""
    tensors = list(model.named_parameters())
    bad = sorted(name for name, t in tensors
                 if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()))
    if bad and not allow:
        raise ValueError(_non_finite_message(bad, len(tensors), "the model"))
    if bad:
        logger.warning("exporting %d tensors that hold NaN or Inf (allow_non_finite=True): %s", len(bad), bad[:4])
    return bad


class _FiniteCheckingWriter:
    """The shard writer, noting each written tensor that holds NaN or Inf (the merge can overflow a dtype)."""

    def __init__(self, writer: ShardWriter, stats: dict):
        self._writer, self._stats = writer, stats

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            self._stats["non_finite"].append(name)
        self._stats["written"].append(name)
        self._writer.add(name, tensor)


def _write_weights(
    writer: ShardWriter,
    entries: dict[str, ModelTensor],
    skip: set[str],
    original: Optional[OriginalCheckpoint],
    masks: Optional[PruningMasks],
    compensation: Optional[CompensationRecord],
    structure: ModelStructure,
    dtype: Optional[torch.dtype],
    export_dtype: torch.dtype,
) -> dict:
    """Every tensor into `writer`: first those re-read from the original, then the rest from memory.

    Returns counts for the report.
    """
    stats = {"from_original": 0, "from_memory": 0, "lora_merged": [], "compensated": [], "ignored_original_tensors": [],
             "params_before": 0, "original_dtypes": {}, "non_finite": [], "written": []}
    writer = _FiniteCheckingWriter(writer, stats)
    written: set[str] = set()
    if original is not None:
        written = _stream_original(writer, entries, skip, original, masks, compensation, structure, dtype, stats)
    for name, entry in entries.items():
        if name in skip or name in written:
            continue
        if entry.quantized:
            where = f"the original checkpoint {original.name}" if original is not None else "an original checkpoint"
            raise ValueError(
                f"{name} is quantized (int8 / 4-bit) in memory and not in {where}: its full-precision value is "
                "unknown; hfprune never exports de-quantised weights"
            )
        if entry.tensor.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (offloaded?): load the model fully before exporting")
        delta = None if is_merged_in_memory(entry) else lora_delta(entry)
        if delta is not None:
            stats["lora_merged"].append(name)
        tensor = entry.tensor
        if tensor.is_floating_point():
            tensor = merged_tensor(tensor, delta, dtype or stats["original_dtypes"].get(name) or export_dtype)
        writer.add(name, tensor)
        stats["from_memory"] += 1
    return stats


def _stream_original(
    writer: ShardWriter,
    entries: dict[str, ModelTensor],
    skip: set[str],
    original: OriginalCheckpoint,
    masks: Optional[PruningMasks],
    compensation: Optional[CompensationRecord],
    structure: ModelStructure,
    dtype: Optional[torch.dtype],
    stats: dict,
) -> set[str]:
    """Original tensor by tensor, shard after shard: slice by the masks, add the LoRA delta, write.

    Returns the names written. Tensors the model may have trained are left for the memory pass.
    """
    written: set[str] = set()
    rules = slice_rules(structure)
    head_dims = {layer.index: layer.head_dim for layer in structure}
    column_maps = _column_maps(structure, compensation)
    for name, lazy in original.tensors():
        entry = entries.get(name)
        if name in skip:
            continue
        if entry is None:
            stats["ignored_original_tensors"].append(name)
            continue
        shape, original_dtype = original.headers()[name]
        stats["params_before"] += math.prod(shape)
        stats["original_dtypes"][name] = original_dtype
        if entry.from_memory:
            continue
        loaded = lazy.load()
        rule = rules.get(name)
        source = loaded
        if name in column_maps:  # the kept columns absorbed the removed ones: replay it on the original
            source = loaded.to(torch.float32, copy=True)  # a float32 copy: the update is not rounded to the original's dtype twice
            column_map = column_maps[name]
            source[:, column_map.kept] = column_map.apply(loaded)
            stats["compensated"].append(name)
        tensor = slice_original(source, rule, masks, head_dims.get(rule.layer) if rule else 0, name)
        if tuple(tensor.shape) != entry.shape:
            raise ValueError(
                f"{name}: the original checkpoint's tensor, sliced by the masks, has shape {list(tensor.shape)} but "
                f"the model's has {list(entry.shape)}; the masks must be the ones that pruned this model, "
                "in the original checkpoint's index space"
            )
        delta = lora_delta(entry)  # the original never contains it, merged in memory or not
        if delta is not None:
            stats["lora_merged"].append(name)
        if not entry.quantized:
            _check_frozen_tensor_matches(name, entry, tensor, delta if is_merged_in_memory(entry) else None)
        if tensor.is_floating_point():
            tensor = merged_tensor(tensor, delta, dtype or loaded.dtype)
        if tensor.untyped_storage().data_ptr() == loaded.untyped_storage().data_ptr():
            # Unchanged (a norm, an embedding): own a copy, or the pending shard would keep the
            # memory-mapped original shard alive.
            tensor = tensor.clone()
        writer.add(name, tensor)
        del loaded, source, tensor, delta
        written.add(name)
        stats["from_original"] += 1
    if stats["ignored_original_tensors"]:
        logger.warning(
            "tensors of %s that the model does not have were not exported: %s",
            original.name, stats["ignored_original_tensors"],
        )
    return written


def _column_maps(structure: ModelStructure, compensation: Optional[CompensationRecord]) -> dict:
    """Tensor name -> the ColumnMap of its weight (o_proj / down_proj of a compensated layer)."""
    if not compensation:
        return {}
    spec = structure.spec
    out = {}
    for (index, role), column_map in compensation.maps.items():
        parent = spec.attention if role == "o_proj" else spec.mlp
        out[f"{spec.layers}.{index}.{parent}.{spec.name(role)}.weight"] = column_map
    return out


def _check_frozen_tensor_matches(
    name: str, entry: ModelTensor, original: torch.Tensor, merged_delta: Optional[torch.Tensor]
) -> None:
    """A frozen full-precision weight re-read from the original must be what the model holds.

    Catches a LoRA merged into the weights before the export (`merge_and_unload()`: the
    wrappers are gone, the deltas would be lost) and an `original_checkpoint` of another model.
    Tolerance: the rounding of the coarser of the two dtypes.
    """
    if not (original.is_floating_point() and entry.tensor.is_floating_point()) or entry.tensor.device.type == "meta":
        return  # nothing to compare: quantized, or a skeleton's (save_pruned_from_adapters)
    held = entry.tensor.detach()
    if merged_delta is None and held.dtype == original.dtype and torch.equal(held.cpu(), original):
        return  # the common case, without float32 copies
    coarse = max(torch.finfo(original.dtype).eps, torch.finfo(entry.tensor.dtype).eps)
    original, held = original.reshape(-1), held.reshape(-1)
    delta = merged_delta.reshape(-1) if merged_delta is not None else None
    chunks = [slice(start, start + _CHECK_CHUNK) for start in range(0, original.numel(), _CHECK_CHUNK)]
    # In chunks of float32 copies: a full-size comparison would cost several times the tensor.
    total = sum(float(original[c].float().abs().sum()) for c in chunks)
    atol = 2 * coarse * total / max(1, original.numel())
    for c in chunks:
        expected = original[c].float() if delta is None else original[c].float() + delta[c]
        difference = (held[c].to(device="cpu", dtype=torch.float32) - expected).abs()
        if bool((difference > atol + 2 * coarse * expected.abs()).any()):
            raise ValueError(
                f"{name} is frozen in memory but differs from the original checkpoint (by up to "
                f"{float(difference.max()):.3g}): was LoRA merged into the weights before the export (then pass the "
                "PeftModel, not merge_and_unload()'s result), or is original_checkpoint another model? Without "
                "original_checkpoint the in-memory weights are exported"
            )


def _tied_names(inner: nn.Module, entries: dict[str, ModelTensor]) -> set[str]:
    """Tied copies (lm_head tied to the embeddings): written once, under the source name."""
    tied = getattr(inner, "all_tied_weights_keys", None) or {}
    return {target for target, source in tied.items() if target in entries and source in entries}


def _checkpoint_dtype(config, original: Optional[OriginalCheckpoint], entries: dict[str, ModelTensor]) -> torch.dtype:
    if original is not None and original.floating_dtype() is not None:
        return original.floating_dtype()
    configured = getattr(config, "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    if isinstance(configured, torch.dtype) and configured.is_floating_point:
        return configured
    for entry in entries.values():
        if entry.tensor.is_floating_point():
            return entry.tensor.dtype
    return torch.float32


def _parse_dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"dtype={name!r}: expected 'auto' or a floating dtype such as 'bfloat16', 'float16', 'float32'"
        )
    return value


def _is_pruned(entries: dict[str, ModelTensor], structure: ModelStructure, original: OriginalCheckpoint) -> bool:
    """Do the model's prunable tensors differ in shape from the original checkpoint's?"""
    headers = original.headers()
    return any(
        name in headers and name in entries and entries[name].shape != tuple(headers[name][0])
        for name in slice_rules(structure)
    )


def _check_masks_fit_model(structure: ModelStructure, masks: PruningMasks, config) -> None:
    """The masks must describe exactly the groups the model kept."""
    config_dict = config.to_dict()
    for layer in structure:
        if layer.index not in masks.layers:
            continue
        mask = masks[layer.index]
        kept = {"query heads": (int(mask.heads.sum()), layer.num_heads),
                "MLP channels": (int(mask.channels.sum()), layer.intermediate_size)}
        for what, (in_mask, in_model) in kept.items():
            if in_mask != in_model:
                raise ValueError(
                    f"masks for layer {layer.index} keep {in_mask} {what} but the model's layer {layer.index} has "
                    f"{in_model}: pass the masks that pruned this model (original index space)"
                )
        num_kv = _original_kv_heads(config_dict, layer.index, mask)
        if num_kv is not None and int(mask.kv_groups(num_kv).sum()) != layer.num_kv_heads:
            raise ValueError(
                f"masks for layer {layer.index} keep {int(mask.kv_groups(num_kv).sum())} of {num_kv} KV groups but "
                f"the model's layer {layer.index} has {layer.num_kv_heads} KV heads"
            )


def _original_kv_heads(config_dict: dict, index: int, mask) -> Optional[int]:
    """KV heads of layer `index` before pruning: the config still describes the unpruned widths."""
    try:
        num_kv = config_layer_widths(config_dict, index)["num_key_value_heads"]
    except (KeyError, TypeError):
        return None
    if num_kv < 1 or mask.heads.numel() % num_kv:
        return None
    return num_kv


# ---- report ----------------------------------------------------------------------------------------------


def _report(inner, structure, masks, exported: ExportConfig, original, stats, files, export_dtype) -> PruningReport:
    """What the export itself knows: the base model, the widths and kept indices, parameters, files."""
    config = inner.config
    params_after = stats["params_after"]
    config_dict = config.to_dict()
    layers = []
    params_before_from_masks = 0
    for layer in structure:
        entry: dict[str, Any] = {"index": layer.index, **layer.widths()}
        if masks is not None and layer.index in masks.layers:
            mask = masks[layer.index]
            num_kv = _original_kv_heads(config_dict, layer.index, mask) or layer.num_kv_heads
            kv_keep = mask.kv_groups(num_kv)
            entry["original"] = {
                "num_attention_heads": mask.heads.numel(),
                "num_key_value_heads": num_kv,
                "intermediate_size": mask.channels.numel(),
            }
            entry["kept_kv_groups"] = kv_keep.nonzero().squeeze(1).tolist()
            entry["kept_query_heads"] = mask.heads.nonzero().squeeze(1).tolist()
            entry["kept_channels"] = mask.channels.nonzero().squeeze(1).tolist()
            params_before_from_masks += (
                (mask.heads.numel() - layer.num_heads) * layer.params_per_query_head
                + (num_kv - layer.num_kv_heads) * layer.params_per_kv_head
                + (mask.channels.numel() - layer.intermediate_size) * layer.params_per_channel
            )
        layers.append(entry)
    if original is not None and stats["params_before"]:
        before = stats["params_before"]
    else:
        before = params_after + params_before_from_masks if masks is not None else None
    base_model, revision = _base_model(config, original)
    parameters = {"before": before, "after": params_after}
    if before:
        parameters.update(removed=before - params_after, removed_fraction=round(1 - params_after / before, 6))
    return PruningReport(
        base_model=base_model,
        base_model_revision=revision,
        model_type=exported.config.model_type,
        format="heterogeneous" if exported.heterogeneous else "uniform",
        format_reason=exported.reason,
        loading=(
            "AutoModelForCausalLM.from_pretrained(path) after `import hfprune`, or with trust_remote_code=True"
            if exported.heterogeneous else "AutoModelForCausalLM.from_pretrained(path)"
        ),
        dtype=str(export_dtype).removeprefix("torch."),
        parameters=parameters,
        layers=layers,
        export={
            "hfprune_version": __version__,
            "streamed_from_original": original is not None,
            "tensors_from_original": stats["from_original"],
            "tensors_from_memory": stats["from_memory"],
            "lora_merged_tensors": len(stats["lora_merged"]),
            "compensated_tensors": len(stats["compensated"]),
            "ignored_original_tensors": stats["ignored_original_tensors"],
            "files": files,
        },
    )


def _base_model(config, original: Optional[OriginalCheckpoint]) -> tuple[Optional[str], Optional[str]]:
    """(hub id of the base, its commit): a snapshot in the Hugging Face cache is named by its repo, not its path."""
    if original is not None:
        return repo_id_from_cache_path(original.path) or original.name, original.commit
    name = config.name_or_path or None
    if name is None:
        return None, None
    return repo_id_from_cache_path(Path(name)) or name, commit_from_cache_path(Path(name))
