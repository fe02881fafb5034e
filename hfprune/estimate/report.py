"""An estimate's result (`MemoryEstimate`) and its tables."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

GiB = 1024**3

COMPONENT_LABELS = {
    "base_weights": "base weights (decoder projections)",
    "other_weights": "embeddings, LM head, norms, biases",
    "lora_weights": "LoRA weights (fp32)",
    "optimizer_states": "optimizer states",
    "score_buffers": "pruning score buffers",
    "saved_activations": "activations saved for backward",
    "loss_buffers": "logits: log-softmax + gradients",
    "layer_backward_workspace": "one layer's backward (recompute, gradients, de-quantised weight)",
    "lora_gradients": "LoRA gradients (fp32)",
    "weight_gradients": "full weight gradients",
    "importance_workspace": "importance criterion work buffers",
    "optimizer_workspace": "optimizer step temporaries",
    "forward_workspace": "one layer's forward (no grad)",
    "forward_loss_buffers": "logits: log-softmax (no grad)",
    "compensation_grams": "compensation's Gram matrices (fp32, every prunable layer's o_proj / down_proj input)",
}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Peak accelerator memory of one pruning step, with what makes it up (bytes)."""

    model: str
    settings: dict[str, Any]
    num_parameters: int
    components: dict[str, int]
    """Every buffer at its largest."""
    phases: dict[str, dict[str, int]]
    """What is alive together at each phase's peak (parts of the components above)."""
    notes: tuple[str, ...] = ()
    host_memory: dict[str, int] = dataclasses.field(default_factory=dict)
    """Kept in host memory when the model is on a GPU (in the same memory as the rest on a CPU), outside
    `total`: compensation's Gram matrices."""

    @property
    def total(self) -> int:
        """Bytes at the peak: the largest phase."""
        return max(sum(parts.values()) for parts in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: sum(self.phases[name].values()))

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    def fits(self, gpu_bytes: float, *, context_bytes: float = 1 * GiB, fragmentation: float = 0.05) -> bool:
        """Whether the step fits a device of ``gpu_bytes``.

        Adds what tensors do not count: the CUDA context and kernels
        (``context_bytes``, about 0.5-1 GiB) and the caching allocator's slack
        (``fragmentation`` of the peak). Pass 0 for both to compare the bare peak.
        """
        if gpu_bytes <= 0:
            raise ValueError(f"gpu_bytes={gpu_bytes!r}: must be positive")
        return self.total * (1.0 + fragmentation) + context_bytes <= gpu_bytes

    def to_markdown(self) -> str:
        s = self.settings
        title = (
            f"**{self.model}** ({self.num_parameters / 1e9:.2f}B parameters): criterion `{s['criterion']}`, "
            f"{base_label(s)} base, seq {s['seq_len']} x batch "
            f"{s['batch_size']}, LoRA r={s['lora_r']}, gradient checkpointing "
            f"{'on' if s['gradient_checkpointing'] else 'off'}, optimizer {s['optimizer']}"
        )
        lines = [title, "", "| component | GiB |", "|---|---:|"]
        for name, value in self.components.items():
            if value:
                lines.append(f"| {COMPONENT_LABELS.get(name, name)} | {value / GiB:.2f} |")
        lines += ["", "| phase | GiB |", "|---|---:|"]
        for name, parts in self.phases.items():
            mark = " (peak)" if name == self.peak_phase else ""
            lines.append(f"| {name}{mark} | {sum(parts.values()) / GiB:.2f} |")
        lines += ["", f"Peak: **{self.total_gib:.2f} GiB** ({self.total / 1e9:.1f} GB)."]
        for name, value in self.host_memory.items():
            lines.append(f"Host memory besides (on the CPU when the model is on a GPU, added to the peak when "
                         f"it runs on the CPU): {COMPONENT_LABELS.get(name, name)} **{value / GiB:.2f} GiB**; "
                         "compensation='none' drops them.")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def base_label(settings: Mapping[str, Any]) -> str:
    """How the base decoder weights are stored: "8-bit", "4-bit" or the compute dtype."""
    if settings.get("load_in_4bit"):
        return "4-bit" + (" (double quantization)" if settings.get("double_quant") else "")
    return "8-bit" if settings["load_in_8bit"] else settings["compute_dtype"]


def comparison_markdown(estimates: Mapping[str, Mapping[str, MemoryEstimate]], gpu_bytes: float = 80e9) -> str:
    """A table of `compare_criteria` results (or any same-keyed rows of estimates), one row per model."""
    first = next(iter(estimates.values()))
    columns = list(first)
    header = "| model | parameters | " + " | ".join(f"{c} GiB | fits {gpu_bytes / 1e9:.0f} GB" for c in columns) + " |"
    lines = [header, "|---|---:|" + "---:|---|" * len(columns)]
    for model, row in estimates.items():
        cells = []
        for column in columns:
            estimate = row[column]
            cells += [f"{estimate.total_gib:.1f}", "yes" if estimate.fits(gpu_bytes) else "no"]
        lines.append(f"| {model} | {next(iter(row.values())).num_parameters / 1e9:.1f}B | " + " | ".join(cells) + " |")
    return "\n".join(lines)
