"""Free-teacher distillation: the loss matches a hand computation, and the teacher forward
(masks and LoRA off) gives the dense model exactly while leaving the student untouched."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hfprune.distill import (
    DistillationConfig,
    dense_teacher,
    distillation_loss,
    distillation_step,
    hidden_state_loss,
    teacher_forward,
    teacher_logits,
)
from hfprune.importance import get_importance
from hfprune.masking import PruningMasks, apply_masks
from hfprune.structure import discover

from .tiny_models import batch, tiny_model

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _student_and_dense():
    """A LoRA model (B != 0) soft-pruned by masks, and a deep copy of its dense base taken before peft."""
    base = tiny_model("llama")
    dense = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.1))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    structure = discover(model, protected_layers=())
    masks = PruningMasks.full(structure)
    masks[1].heads[4:] = False  # drop KV group 1 of layer 1
    masks[2].channels[::3] = False
    hooks = apply_masks(structure, masks)
    return model, dense, structure, hooks


def _labels(ids):
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[1, -2:] = -100  # padding
    return labels


def _hand_loss(student, teacher, labels, temperature, alpha):
    """Position by position, with nothing but exp and log."""
    ce_terms, kl_terms = [], []
    for b in range(student.shape[0]):
        for t in range(student.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            s = student[b, t].double().tolist()
            log_z = math.log(sum(math.exp(v) for v in s))
            ce_terms.append(log_z - s[target])
            st = [v / temperature for v in s]
            tt = [v / temperature for v in teacher[b, t].double().tolist()]
            log_zs = math.log(sum(math.exp(v) for v in st))
            log_zt = math.log(sum(math.exp(v) for v in tt))
            kl_terms.append(sum(math.exp(q - log_zt) * ((q - log_zt) - (p - log_zs)) for p, q in zip(st, tt)))
    ce, kl = sum(ce_terms) / len(ce_terms), sum(kl_terms) / len(kl_terms)
    return (1 - alpha) * ce + alpha * temperature**2 * kl, ce, kl


def test_loss_equals_hand_computation_on_a_tiny_model():
    model, _, _, hooks = _student_and_dense()
    model.eval()  # no LoRA dropout: the student forward below is repeated
    ids = batch(batch_size=2, seq_len=10, seed=4)
    labels = _labels(ids)
    teacher = teacher_logits(model, {"input_ids": ids}, hooks)
    student = model(input_ids=ids).logits
    loss, parts = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.3)
    expected, ce, kl = _hand_loss(student.detach(), teacher, labels, 2.0, 0.3)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(parts["kl"]) == pytest.approx(kl, rel=1e-5)
    assert float(parts["kl"]) > 0  # masks and LoRA make the student differ from the teacher
    # alpha = 0 is exactly the model's own causal-LM loss (same shift, same ignore index)
    pure_ce, _ = distillation_loss(student, teacher, labels, alpha=0.0)
    torch.testing.assert_close(pure_ce, model(input_ids=ids, labels=labels).loss)
    # the gradient reaches the student (LoRA) and the teacher logits carry none
    assert loss.requires_grad and not teacher.requires_grad


def test_loss_reductions_and_options():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[1, :3] = -100
    # identical distributions: no KL
    _, parts = distillation_loss(teacher, teacher, labels)
    assert float(parts["kl"]) == pytest.approx(0.0, abs=1e-6)
    # num_items_in_batch: sums divided by the given count (gradient accumulation over micro-batches)
    mean_loss, _ = distillation_loss(student, teacher, labels, alpha=0.5)
    n = int((labels[:, 1:] != -100).sum())
    summed, _ = distillation_loss(student, teacher, labels, alpha=0.5, num_items_in_batch=2 * n)
    torch.testing.assert_close(summed, mean_loss / 2)
    # kl_tokens="all" with an attention mask averages over the kept positions, labels not needed
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, -1] = 0
    all_tokens, parts = distillation_loss(student, teacher, None, alpha=1.0, kl_tokens="all", attention_mask=mask)
    log_s, log_t = (torch.log_softmax(x / 2.0, dim=-1) for x in (student, teacher))
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    torch.testing.assert_close(parts["kl"], (per_token * mask).sum() / mask.sum())
    torch.testing.assert_close(all_tokens, 4.0 * parts["kl"])
    with pytest.raises(ValueError, match="labels=None"):
        distillation_loss(student, teacher, None, alpha=0.5)
    with pytest.raises(ValueError, match="alpha=1.5"):
        distillation_loss(student, teacher, labels, alpha=1.5)
    with pytest.raises(ValueError, match="temperature=0"):
        DistillationConfig(temperature=0)


def test_hidden_state_matching():
    torch.manual_seed(0)
    student = tuple(torch.randn(2, 5, 8) for _ in range(4))
    teacher = tuple(torch.randn(2, 5, 8) for _ in range(4))
    expected = ((student[1] - teacher[1]).pow(2).mean() + (student[-1] - teacher[-1]).pow(2).mean()) / 2
    torch.testing.assert_close(hidden_state_loss(student, teacher, (1, -1)), expected)
    assert float(hidden_state_loss(student, student, (0, 2))) == 0.0
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    plain, _ = distillation_loss(logits, logits, labels)
    with_hidden, parts = distillation_loss(logits, logits, labels, student_hidden=student, teacher_hidden=teacher,
                                           hidden_layers=(1, -1), hidden_weight=0.5)
    torch.testing.assert_close(with_hidden, plain + 0.5 * expected)
    torch.testing.assert_close(parts["hidden"], expected)


def test_teacher_is_the_dense_model_and_leaves_the_student_untouched():
    model, dense, _, hooks = _student_and_dense()
    ids = batch(batch_size=2, seq_len=10, seed=5)
    model.train()
    model.base_model.model.lm_head.eval()  # a mixed train/eval state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    student_before = model(input_ids=ids).logits
    model.train()
    model.base_model.model.lm_head.eval()

    teacher = teacher_logits(model, {"input_ids": ids, "labels": ids}, hooks)

    assert torch.equal(teacher, dense(input_ids=ids).logits)  # exactly the dense, adapter-free model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    assert hooks.enabled
    model.eval()
    student_after = model(input_ids=ids).logits
    assert torch.equal(student_after, student_before)
    assert not torch.allclose(student_after, teacher, atol=1e-3)
    # the LoRA path alone still changes the output (masks off, adapters on)
    hooks.enabled = False
    assert not torch.allclose(model(input_ids=ids).logits, teacher, atol=1e-3)


def test_teacher_restores_everything_when_the_forward_raises():
    model, _, structure, hooks = _student_and_dense()
    model.train()
    criterion = get_importance("activation")
    criterion.prepare(model, structure.layers)

    def boom(module, args):
        raise RuntimeError("boom")

    handle = structure.layers[2].projection("down_proj").register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        teacher_forward(model, {"input_ids": batch()}, [hooks, criterion])
    handle.remove()
    assert hooks.enabled and criterion.enabled and model.training
    assert model.get_model_status().enabled is True
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with dense_teacher(model, hooks):
        assert not hooks.enabled and not model.training
        assert model.get_model_status().enabled is False


def test_distillation_step_trains_lora_and_hides_the_teacher_from_criteria():
    model, _, structure, hooks = _student_and_dense()
    criterion = get_importance("activation")
    criterion.prepare(model, structure.layers)
    ids = batch(batch_size=2, seq_len=10, seed=6)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _labels(ids)}
    model.train()
    config = DistillationConfig(alpha=0.7, temperature=2.0, hidden_layers=(2,), hidden_weight=0.1)
    loss, outputs, parts = distillation_step(model, inputs, config, mask_hooks=[hooks, criterion])
    # the criterion saw the student's forward only: one batch of tokens per hooked projection
    assert {stats.count for stats in criterion._stats.values()} == {ids.numel()}
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert outputs.logits.shape == (2, 10, 128) and set(parts) == {"ce", "kl", "hidden", "loss"}
    assert torch.isfinite(loss)
