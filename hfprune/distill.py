"""Free-teacher distillation: the frozen base model is the dense teacher.

While pruning is soft (masks on o_proj / down_proj inputs) and the base weights
are frozen (LoRA trains beside them), switching the masks and the LoRA adapters
off gives back the unpruned model exactly. One extra no-grad forward per step
therefore yields the dense teacher's logits with no second copy of the model:

    with dense_teacher(model, [mask_hooks]):      # masks off, adapters off, eval mode
        teacher = model(**inputs)
    student = model(**inputs)                      # masks on, LoRA on, as the trainer left them
    loss, parts = distillation_loss(student.logits, teacher.logits, labels)

    loss = (1 − α)·CE(student, labels) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T))
           [+ β·mean over chosen layers of MSE(student hidden, teacher hidden)]

This holds until the weights are physically sliced: after that the frozen base
is the *pruned* model and no longer a dense teacher. Distil during the masked
stage, or keep masks to the end (`PruningConfig(physical_removal="at_end")`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
KL_TOKENS = ("labeled", "all")


@dataclass
class DistillationConfig:
    """How the student is distilled from the dense (unmasked, adapter-free) base.

    Parameters:
        alpha: weight of the distillation term; the label cross-entropy gets 1 − alpha.
        temperature: softmax temperature T of the KL term (scaled by T², Hinton et al.).
        kl_tokens: "labeled" averages the KL over the positions whose next token has a
            label (the positions the cross-entropy uses); "all" over every position the
            attention mask keeps (prompt tokens included).
        hidden_layers: hidden states to match with MSE (indices into `output_hidden_states`:
            0 = embeddings, i = output of decoder layer i; negative counts from the end).
        hidden_weight: weight of the hidden-state term.
    """

    alpha: float = field(default=0.5, metadata={"help": "Weight of the KL term; cross-entropy gets 1 - alpha."})
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the KL term."})
    kl_tokens: str = field(default="labeled", metadata={"help": "KL over 'labeled' positions or 'all' positions."})
    hidden_layers: tuple[int, ...] = field(default=(), metadata={"help": "Hidden states matched with MSE."})
    hidden_weight: float = field(default=1.0, metadata={"help": "Weight of the hidden-state MSE term."})

    def __post_init__(self) -> None:
        _check_loss_arguments(self.temperature, self.alpha, self.kl_tokens)
        self.hidden_layers = tuple(int(i) for i in self.hidden_layers)
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight={self.hidden_weight}: must be >= 0")


def _check_loss_arguments(temperature: float, alpha: float, kl_tokens: str) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: must be in [0, 1]")
    if kl_tokens not in KL_TOKENS:
        raise ValueError(f"kl_tokens={kl_tokens!r}: must be one of {', '.join(KL_TOKENS)}")


# ---- the loss ---------------------------------------------------------------------------------------------------


def _token_weights(
    logits: torch.Tensor, labels: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor], kl_tokens: str
) -> torch.Tensor:
    """Float [batch, seq] selecting the logit positions the KL is averaged over."""
    batch, seq = logits.shape[:2]
    if kl_tokens == "labeled":
        # Position t predicts token t + 1: it counts when labels[t + 1] is a real label.
        selected = torch.zeros(batch, seq, dtype=torch.bool, device=logits.device)
        selected[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    elif attention_mask is not None:
        selected = attention_mask.bool()
    else:
        selected = torch.ones(batch, seq, dtype=torch.bool, device=logits.device)
    return selected.float()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    kl_tokens: str = "labeled",
    attention_mask: Optional[torch.Tensor] = None,
    student_hidden: Optional[Sequence[torch.Tensor]] = None,
    teacher_hidden: Optional[Sequence[torch.Tensor]] = None,
    hidden_layers: Sequence[int] = (),
    hidden_weight: float = 1.0,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`(1 − alpha)·CE + alpha·T²·KL(teacher ‖ student) [+ hidden_weight·MSE]` and its detached parts.

    Logits are `[batch, seq, vocab]`; `labels` `[batch, seq]` with `-100` for ignored
    tokens, shifted as in a causal LM (position t predicts labels[t + 1]). Both terms
    are means over their tokens; with `num_items_in_batch` (the Trainer's count of
    labelled tokens over all gradient-accumulation micro-batches) they are sums
    divided by it instead, matching how transformers normalises the causal-LM loss.
    `parts` holds "ce", "kl" (before T² and alpha), "hidden" when used, and "loss".
    """
    _check_loss_arguments(temperature, alpha, kl_tokens)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    if labels is None and (alpha < 1.0 or kl_tokens == "labeled"):
        raise ValueError(
            f"labels=None: the cross-entropy (alpha={alpha} < 1) and kl_tokens='labeled' need labels; "
            "pass labels, or alpha=1.0 with kl_tokens='all'"
        )
    student = student_logits.float()
    parts: dict[str, torch.Tensor] = {}
    loss = student.new_zeros(())

    if labels is not None:
        shifted = labels[:, 1:].reshape(-1).to(student.device)
        ce_sum = F.cross_entropy(student[:, :-1].reshape(-1, student.shape[-1]), shifted, ignore_index=IGNORE_INDEX,
                                 reduction="sum")
        ce_count = num_items_in_batch if num_items_in_batch is not None else (shifted != IGNORE_INDEX).sum()
        ce = ce_sum / _at_least_one(ce_count, student.device)
        parts["ce"] = ce.detach()
        if alpha < 1.0:
            loss = loss + (1.0 - alpha) * ce

    weights = _token_weights(student, labels, attention_mask, kl_tokens)
    student_log_probs = F.log_softmax(student / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float().to(student.device) / temperature, dim=-1)
    per_token = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(dim=-1)
    kl_count = num_items_in_batch if (num_items_in_batch is not None and kl_tokens == "labeled") else weights.sum()
    kl = (per_token * weights).sum() / _at_least_one(kl_count, student.device)
    parts["kl"] = kl.detach()
    if alpha > 0.0:
        loss = loss + alpha * temperature**2 * kl

    if hidden_layers:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError(f"hidden_layers={tuple(hidden_layers)} needs student_hidden and teacher_hidden "
                             "(run both forwards with output_hidden_states=True)")
        mask = attention_mask.float() if attention_mask is not None else None
        hidden = hidden_state_loss(student_hidden, teacher_hidden, hidden_layers, mask)
        parts["hidden"] = hidden.detach()
        loss = loss + hidden_weight * hidden

    parts["loss"] = loss.detach()
    return loss, parts


def _at_least_one(count, device) -> torch.Tensor:
    return torch.as_tensor(count, device=device, dtype=torch.float32).clamp(min=1.0)


def hidden_state_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    layers: Sequence[int],
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean over `layers` of the MSE between student and teacher hidden states ([batch, seq, hidden]),
    averaged over the positions `attention_mask` keeps (all when None)."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student vs {len(teacher_hidden)} teacher hidden states")
    total = None
    for index in layers:
        if not -len(student_hidden) <= index < len(student_hidden):
            raise ValueError(f"hidden layer {index}: out of range for {len(student_hidden)} hidden states")
        s, t = student_hidden[index].float(), teacher_hidden[index].float().to(student_hidden[index].device)
        squared = (s - t).pow(2).mean(dim=-1)  # [batch, seq]
        if attention_mask is None:
            term = squared.mean()
        else:
            term = (squared * attention_mask).sum() / attention_mask.sum().clamp(min=1.0)
        total = term if total is None else total + term
    return total / len(layers)


# ---- the teacher ------------------------------------------------------------------------------------------------


def _find_peft_model(model: nn.Module) -> Optional[nn.Module]:
    """The PeftModel under DDP / accelerate wrappers, if any."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
            return model
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            model = inner
    return None


def _as_switches(hooks) -> list:
    """The objects with an `enabled` flag among `hooks` (one object or an iterable; others are ignored,
    so a trainer can pass its criterion whatever kind it is)."""
    if hooks is None:
        return []
    if hasattr(hooks, "enabled"):
        return [hooks]
    return [h for h in hooks if hasattr(h, "enabled")]


@contextlib.contextmanager
def dense_teacher(model: nn.Module, mask_hooks=None) -> Iterator[nn.Module]:
    """Inside: `model` computes the dense teacher — pruning masks, LoRA adapters and dropout off.

    `mask_hooks`: a `MaskHooks`, or an iterable of objects with an `enabled` flag (mask hooks,
    hook-based importance criteria that should not see the teacher's forward). Everything —
    the flags, the adapters, each module's train/eval mode and each parameter's
    `requires_grad` (peft's re-enabling would otherwise switch on frozen adapters) — is restored
    on exit, also when the forward raises.
    """
    switches = _as_switches(mask_hooks)
    flags = [switch.enabled for switch in switches]
    modes = [(module, module.training) for module in model.modules()]
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    peft_model = _find_peft_model(model)
    with contextlib.ExitStack() as stack:
        try:
            for switch in switches:
                switch.enabled = False
            model.eval()
            if peft_model is not None:
                stack.enter_context(peft_model.disable_adapter())
            yield model
        finally:
            stack.close()  # re-enable the adapters before the flags below are restored
            for switch, flag in zip(switches, flags):
                switch.enabled = flag
            for module, training in modes:
                module.training = training
            for param, flag in requires_grad:
                param.requires_grad_(flag)


def teacher_forward(model: nn.Module, inputs: dict, mask_hooks=None, output_hidden_states: bool = False):
    """One no-grad forward of the dense teacher (see `dense_teacher`); labels are not passed."""
    inputs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    with torch.no_grad(), dense_teacher(model, mask_hooks):
        return model(**inputs, output_hidden_states=output_hidden_states, use_cache=False)


def teacher_logits(model: nn.Module, inputs: dict, mask_hooks=None) -> torch.Tensor:
    """The dense model's logits for `inputs`, from the student's own weights (no grad)."""
    return teacher_forward(model, inputs, mask_hooks).logits


def distillation_step(
    model: nn.Module,
    inputs: dict,
    config: Optional[DistillationConfig] = None,
    mask_hooks=None,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
):
    """Teacher forward, student forward, distillation loss: what a Trainer's `compute_loss` needs.

    Returns `(loss, student_outputs, parts)`.
    """
    config = config or DistillationConfig()
    hidden = bool(config.hidden_layers)
    teacher = teacher_forward(model, inputs, mask_hooks, output_hidden_states=hidden)
    labels = inputs.get("labels")
    student_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if hidden:
        student_inputs["output_hidden_states"] = True
    student = model(**student_inputs)
    loss, parts = distillation_loss(
        student.logits,
        teacher.logits,
        labels,
        temperature=config.temperature,
        alpha=config.alpha,
        kl_tokens=config.kl_tokens,
        attention_mask=inputs.get("attention_mask"),
        student_hidden=student.hidden_states if hidden else None,
        teacher_hidden=teacher.hidden_states if hidden else None,
        hidden_layers=config.hidden_layers,
        hidden_weight=config.hidden_weight,
        num_items_in_batch=num_items_in_batch,
    )
    return loss, student, parts


__all__ = [
    "DistillationConfig",
    "dense_teacher",
    "distillation_loss",
    "distillation_step",
    "hidden_state_loss",
    "teacher_forward",
    "teacher_logits",
]
