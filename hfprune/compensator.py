"""The engine's use of compensation: Gram statistics while scoring, the kept columns updated at each
mask update, and the record that lets the export replay it on the full-precision weights.

    compensator = Compensator(method="least_squares", ridge=1.0)
    compensator.prepare(model, structure.prunable_layers)   # Gram hooks on o_proj / down_proj inputs
    ... forward passes (training steps, calibration batches) ...
    compensator.apply(structure, old_masks, new_masks)       # the map M for the newly removed groups
    mask_hooks.update(new_masks, compensator.record.maps)    # masked features become M x_K (weights untouched)
    compensator.fold(structure)                              # before slicing: W_K += W_R M, LoRA A_K += A_R M
    compensator.release()                                    # hooks off; the record stays

The record holds, per layer and consumer projection (o_proj: query heads, down_proj: MLP
channels), the input features removed so far `R`, those kept `K` and one matrix `M` such that
the kept columns of the *original* weight become `W_K + W_R @ M`. Successive updates compose
into that one matrix (an update only ever adds removed columns into kept ones):

    after removing R' from K (K' = K \\ R', map M' on the current weight):
        M_new[R rows]  = M[:, K'] + M[:, R'] @ M'
        M_new[R' rows] = M'

so the export applies one matrix product per projection, whatever the schedule did. Indices
are in the layer's input-feature space when the record was started (the original checkpoint's,
for a model pruned once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from .compensation import ROLES, GramHooks, InputGram, compensate_columns_, layer_gram_bytes, least_squares_map
from .masking import LayerMask, PruningMasks
from .structure import LayerStructure, ModelStructure

logger = logging.getLogger(__name__)

METHODS = ("none", "least_squares")
APPLIED = "_hfprune_compensation_applied"  # set on a model whose base weights carry its compensation


def kept_features(layer: LayerStructure, mask: LayerMask, role: str) -> torch.Tensor:
    """Bool [in_features] of `role`'s input that the mask keeps: head_dim columns per query head of
    o_proj, one column per channel of down_proj."""
    if role == "o_proj":
        return mask.heads.repeat_interleave(layer.head_dim)
    return mask.channels


@dataclass
class ColumnMap:
    """The kept columns of one projection: `W[:, kept] + W[:, removed] @ matrix` (original index space)."""

    kept: torch.Tensor  # long [|K|]
    removed: torch.Tensor  # long [|R|]
    matrix: torch.Tensor  # float32 [|R|, |K|], on the CPU

    def then(self, removed_now: torch.Tensor, m_now: torch.Tensor) -> "ColumnMap":
        """This map followed by moving `removed_now` (original indices, a subset of `kept`) into the rest."""
        stays = ~torch.isin(self.kept, removed_now)
        goes = ~stays
        kept = self.kept[stays]
        m_now = m_now.float().cpu()
        old_rows = self.matrix[:, stays] + self.matrix[:, goes] @ m_now
        return ColumnMap(kept, torch.cat([self.removed, self.kept[goes]]), torch.cat([old_rows, m_now]))

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """The compensated kept columns `W[:, K] + W[:, R] @ M` of a full-width `[out, in]` weight, float32."""
        kept = weight.index_select(1, self.kept.to(weight.device)).float()
        if self.removed.numel() == 0:
            return kept
        removed = weight.index_select(1, self.removed.to(weight.device)).float()
        return kept + removed @ self.matrix.to(weight.device)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.kept": self.kept, f"{prefix}.removed": self.removed, f"{prefix}.matrix": self.matrix}


class CompensationRecord:
    """Every `ColumnMap` of a model, by (layer index, role); what the export replays."""

    def __init__(self, maps: Optional[dict[tuple[int, str], ColumnMap]] = None):
        self.maps: dict[tuple[int, str], ColumnMap] = dict(maps or {})

    def __bool__(self) -> bool:
        return bool(self.maps)

    def get(self, layer_index: int, role: str) -> Optional[ColumnMap]:
        return self.maps.get((layer_index, role))

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for (index, role), column_map in sorted(self.maps.items()):
            out.update(column_map.state_dict(f"compensation.{index}.{role}"))
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "CompensationRecord":
        maps = {}
        for key in state:
            parts = key.split(".")
            if len(parts) == 4 and parts[0] == "compensation" and parts[3] == "matrix":
                prefix = ".".join(parts[:3])
                maps[(int(parts[1]), parts[2])] = ColumnMap(
                    state[f"{prefix}.kept"].long(), state[f"{prefix}.removed"].long(), state[key].float()
                )
        return cls(maps)


class Compensator:
    """Gram statistics of the consumer inputs, and the least-squares update at every mask update."""

    def __init__(self, method: str = "least_squares", ridge: float = 1.0, max_tokens: Optional[int] = None,
                 device=None):
        if method not in METHODS:
            raise ValueError(f"compensation={method!r}: must be one of {', '.join(METHODS)}")
        self.method = method
        self.ridge = ridge
        self.hooks = GramHooks(max_tokens=max_tokens, device=device)
        self.record = CompensationRecord()
        self.updates = 0

    @property
    def enabled(self) -> bool:
        return self.hooks.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:  # paused like the hook-based criteria (a teacher's forward)
        self.hooks.enabled = value

    def prepare(self, model: nn.Module, layers: Iterable[LayerStructure]) -> None:
        layers = list(layers)
        if self.hooks.device is None and any(p.is_cuda for p in model.parameters()):
            # An accelerator's memory is for the model: the Gram matrices (in x in per projection) live in host
            # memory; each step's update is computed on the device and added there.
            self.hooks.device = torch.device("cpu")
        check_gram_memory(layers, self.hooks.device)
        self.hooks.prepare(model, layers)
        self._install_restored()

    def release(self) -> None:
        self.hooks.release()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The record and, while statistics are being collected, the Gram matrices (in x in float32 per
        projection: saved with the pruning state so a resumed run compensates exactly as an uninterrupted one)."""
        out = self.record.state_dict()
        for (index, role), gram in sorted(self.hooks.grams.items()):
            if gram.gram is not None:
                prefix = f"gram.{index}.{role}"
                out[f"{prefix}.matrix"] = gram.gram.cpu()
                out[f"{prefix}.sums"] = gram.sums.cpu()
                out[f"{prefix}.count"] = torch.tensor(gram.count)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The record, and the Gram matrices to continue from (installed when `prepare` runs)."""
        self.record = CompensationRecord.from_state_dict(state)
        self._restored = {}
        for key in state:
            parts = key.split(".")
            if len(parts) == 4 and parts[0] == "gram" and parts[3] == "matrix":
                prefix = ".".join(parts[:3])
                self._restored[(int(parts[1]), parts[2])] = (
                    state[key], state[f"{prefix}.sums"], int(state[f"{prefix}.count"]))

    def _install_restored(self) -> None:
        for key, (matrix, sums, count) in getattr(self, "_restored", {}).items():
            gram = InputGram(matrix.shape[0], self.hooks.device or matrix.device, matrix.dtype, self.hooks.max_tokens)
            gram.gram.copy_(matrix)
            gram.sums.copy_(sums)
            gram.count = count
            self.hooks.grams[key] = gram
        self._restored = {}

    def effective_ridge(self, kept: int, tokens: int) -> float:
        """`ridge x (1 + kept / tokens)`: a Gram estimated from few tokens (fewer than the features it
        relates) is regularised more. benchmarks/compensation_probe.py: with 640 calibration tokens for 1229
        kept channels the best ridge was about 5x the one for 16k tokens."""
        return self.ridge * (1.0 + kept / max(1, tokens))

    def tokens_seen(self) -> int:
        return max((gram.count for gram in self.hooks.grams.values()), default=0)

    @torch.no_grad()
    def apply(self, structure: ModelStructure, before: PruningMasks, after: PruningMasks) -> int:
        """Compute the maps for the groups `after` removes that `before` kept, composed into the record;
        returns the projections updated. The weights are not touched: the mask hooks reconstruct the removed
        features from the record until `fold` writes it into the weights (before slicing).

        Raises when a projection that loses features has no statistics (no forward pass was seen)."""
        updated = 0
        for layer in structure.prunable_layers:
            for role in ROLES:
                was = kept_features(layer, before[layer.index], role)
                now = kept_features(layer, after[layer.index], role)
                newly = was & ~now
                if not newly.any():
                    continue
                gram = self.hooks.gram(layer.index, role)
                if gram is None or gram.count == 0:
                    raise RuntimeError(
                        f"compensation: no input statistics for layer {layer.index} {role} (no forward pass was "
                        "seen since compensation started): run forward passes before removing groups"
                    )
                sigma, tokens = _all_reduced(gram.gram, gram.count)
                m_now = least_squares_map(sigma, now, newly, ridge=self.effective_ridge(int(now.sum()), tokens),
                                          excluded=~was)
                self._record(layer.index, role, was, newly, m_now)
                updated += 1
        self.updates += 1
        return updated

    @torch.no_grad()
    def fold(self, structure: ModelStructure) -> int:
        """Write the record into the weights the forward uses (`W_K += W_R M`, every LoRA `A_K += A_R M`), as
        the mask hooks computed it; call it once, right before the removed columns are sliced away."""
        if getattr(structure.model, APPLIED, False):
            return 0
        for (index, role), column_map in self.record.maps.items():
            compensate_columns_(structure.layers[index].projection(role), column_map.kept, column_map.removed,
                                column_map.matrix)
        object.__setattr__(structure.model, APPLIED, True)
        return len(self.record.maps)

    def _record(self, index: int, role: str, was: torch.Tensor, newly: torch.Tensor, m_now: torch.Tensor) -> None:
        current = self.record.get(index, role)
        if current is None:  # first removal in this projection: nothing removed before
            current = ColumnMap(was.nonzero().squeeze(1), torch.zeros(0, dtype=torch.long),
                                torch.zeros(0, int(was.sum())))
        self.record.maps[(index, role)] = current.then(newly.nonzero().squeeze(1), m_now)


@torch.no_grad()
def replay_on_base(structure: ModelStructure, record: CompensationRecord) -> int:
    """Apply `record`'s maps to the frozen base weights of a freshly loaded, unsliced model (resuming a run
    after its weights were sliced: the checkpoint's adapters were folded already, the frozen base was not
    saved). Returns the projections updated."""
    from .structure import base_layer

    if getattr(structure.model, APPLIED, False):
        return 0  # the same model object, compensated in this process already
    updated = 0
    for (index, role), column_map in record.maps.items():
        layer = structure.layers[index]
        compensate_columns_(base_layer(layer.projection(role)), column_map.kept, column_map.removed,
                            column_map.matrix)
        updated += 1
    object.__setattr__(structure.model, APPLIED, True)
    return updated


def gram_bytes(layers: Iterable[LayerStructure]) -> int:
    """The Gram statistics of the o_proj and down_proj inputs of `layers`."""
    return sum(layer_gram_bytes(layer.num_heads * layer.head_dim, layer.intermediate_size) for layer in layers)


class GramMemoryError(MemoryError):
    """The Gram matrices of the prunable layers would not fit where they go (`check_gram_memory`)."""

    def __init__(self, needed: int, free: int, where: str, layers: int):
        self.summary = (f"Gram matrices of {needed / 2**30:.1f} GiB in {where} ({layers} layers), more than half of "
                        f"the {free / 2**30:.1f} GiB available")
        super().__init__(f"compensation='least_squares' keeps {self.summary}: pass PruningConfig(compensation='none'), "
                         "or prune fewer layers at a time (protected_layers)")


def prepare_or_drop(compensator: Optional["Compensator"], compensation: str, model: nn.Module,
                    layers: Iterable[LayerStructure]) -> tuple[Optional["Compensator"], Optional[str]]:
    """`compensator.prepare(model, layers)`, and why there is none when "auto" had to drop it.

    compensation="auto" means least squares where it can run: when the Gram matrices do not fit (a 65B
    model's take about 157 GB), the run goes on without compensation and says so (a warning, the run's
    summary); compensation="least_squares" asked by name raises `GramMemoryError` before any work."""
    if compensator is None:
        return None, None
    try:
        compensator.prepare(model, layers)
    except GramMemoryError as error:
        if compensation != "auto":
            raise
        reason = f"compensation='auto' runs without compensation: it would keep {error.summary}"
        logger.warning("%s; PruningConfig(compensation='none') says so up front", reason)
        return None, reason
    return compensator, None


def check_gram_memory(layers: list[LayerStructure], device) -> None:
    """Refuse before any work when the Gram matrices would take more than half of the memory left where they go."""
    needed = gram_bytes(layers)
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        where = "GPU memory"
    else:
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil is a dependency of accelerate
            return
        free, where = psutil.virtual_memory().available, "host memory"
    if needed > free / 2:
        raise GramMemoryError(needed, free, where, len(layers))


def make_compensator(config, sees_activations: bool = True) -> Optional[Compensator]:
    """The compensator a `PruningConfig` asks for: None for `compensation="none"`, and for "auto" when no
    forward pass will be seen (`sees_activations=False`: a one-shot prune without calibration data)."""
    if config.compensation == "none" or (config.compensation == "auto" and not sees_activations):
        return None
    return Compensator("least_squares", ridge=config.compensation_ridge, max_tokens=config.compensation_tokens)


def _all_reduced(sigma: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
    """Under data parallelism every rank saw other tokens: the Gram (and the token count) is the sum over
    ranks, so every rank computes the same map, as it holds the same weights and masks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        packed = torch.cat([sigma.reshape(-1), sigma.new_tensor([float(tokens)])])
        if torch.distributed.get_backend() == "nccl" and not packed.is_cuda:
            packed = packed.cuda()
        torch.distributed.all_reduce(packed)
        sigma, tokens = packed[:-1].reshape(sigma.shape).to(sigma.device), int(packed[-1].item())
    return sigma, tokens
