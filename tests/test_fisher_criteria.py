"""taylor2's and param_second's Fisher diagonal: per-sample squares in prune_model, by hand on a tiny model."""

from __future__ import annotations

import pytest
import torch

from hfprune.importance import ROLES, ScoreAccumulator, get_importance
from hfprune.importance.base import reduce_to_units
from hfprune.importance.taylor import FisherImportance, SecondOrderTaylorImportance
from hfprune.prune import _score_with_gradients
from hfprune.structure import base_layer, discover

from .tiny_models import batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = 1


def _batches():
    return [{"input_ids": batch(batch_size=2, seq_len=10, seed=s)} for s in range(2)]


def _gradients(model, passes):
    """Per pass, the gradient of its own mean loss for every projection of layer LAYER."""
    layer = discover(model, protected_layers=()).layers[LAYER]
    weights = {role: base_layer(layer.projection(role)).weight for role, _, _ in ROLES}
    flags = {role: w.requires_grad for role, w in weights.items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    out = []
    for ids in passes:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        out.append({role: w.grad.detach().clone() for role, w in weights.items()})
    model.zero_grad(set_to_none=True)
    for role, weight in weights.items():
        weight.requires_grad_(flags[role])
    return layer, {role: w.detach() for role, w in weights.items()}, out


def _module_scores(layer, elements):
    """Reduce element scores the way the base class does: rows of q/k/v/gate/up, columns of o/down."""
    return {role: reduce_to_units(elements[role].sum(dim=1 - dim), unit, layer) for role, dim, unit in ROLES}


def _hand(model, passes, which):
    layer, weights, grads = _gradients(model, passes)
    elements = {}
    for role, _, _ in ROLES:
        w = weights[role]
        g = torch.stack([p[role] for p in grads]).mean(dim=0)
        fisher = torch.stack([p[role].pow(2) for p in grads]).mean(dim=0)
        elements[role] = w.pow(2) * fisher if which == "param_second" else (w * g - 0.5 * w.pow(2) * fisher).abs()
    return _module_scores(layer, elements)


def _criterion_scores(model, criterion):
    structure = discover(model, protected_layers=())
    accumulator = ScoreAccumulator(normalize=False)
    _score_with_gradients(model, structure, criterion, accumulator, _batches())
    return accumulator.scores[LAYER]


class _PerBatchTaylor2(SecondOrderTaylorImportance):
    per_sample_gradients = False


def _sequences():
    return [b["input_ids"][i : i + 1] for b in _batches() for i in range(2)]


@pytest.mark.parametrize("name", ["param_second", "taylor2"])
def test_fisher_criteria_square_per_sample_gradients(name):
    """prune_model's path: one backward per sequence, F = mean over sequences of the squared gradient of each
    sequence's own loss, g = their mean; the scores equal W²·F and |W·g − ½W²·F| reduced by hand."""
    model = tiny_model("llama")
    model.requires_grad_(False)
    criterion = get_importance(name)
    assert criterion.per_sample_gradients and criterion.needs_weight_gradients
    scores = _criterion_scores(model, criterion)
    assert not any(p.requires_grad for p in model.parameters())  # frozen again, as they were
    expected = _hand(model, _sequences(), name)
    for role, _, _ in ROLES:
        torch.testing.assert_close(scores[role], expected[role], rtol=1e-4, atol=1e-12)


def test_per_sample_fisher_differs_from_the_per_batch_one():
    """Squares of per-sequence gradients are larger than squares of batch means (their noise is not averaged
    away): the two Fisher estimates differ; each matches its hand computation, and g is the same mean."""
    model = tiny_model("llama")
    per_sample = _criterion_scores(model, get_importance("taylor2"))
    per_batch = _criterion_scores(model, _PerBatchTaylor2())
    batch_means = [b["input_ids"] for b in _batches()]
    for role, _, _ in ROLES:
        torch.testing.assert_close(per_batch[role], _hand(model, batch_means, "taylor2")[role], rtol=1e-4, atol=1e-12)
    assert not torch.allclose(per_sample["down_proj"], per_batch["down_proj"], rtol=1e-3)
    # the second-order term alone: per-sample F is larger everywhere it counts
    fisher_sample = _hand(model, _sequences(), "param_second")["down_proj"]
    fisher_batch = _hand(model, batch_means, "param_second")["down_proj"]
    assert bool((fisher_sample > fisher_batch).float().mean() > 0.9)


def test_per_sample_passes_score_the_same_mean_gradient():
    """taylor's W·g is the same whether prune_model runs one backward per batch or per sequence."""
    model = tiny_model("llama")

    class PerSampleTaylor(type(get_importance("taylor"))):
        per_sample_gradients = True

    per_batch = _criterion_scores(model, get_importance("taylor"))
    per_sample = _criterion_scores(model, PerSampleTaylor())
    for role, _, _ in ROLES:
        torch.testing.assert_close(per_sample[role], per_batch[role], rtol=1e-4, atol=1e-10)


def test_fisher_counts_micro_batches_as_shares_of_the_step():
    """Training path: a Trainer step's micro-batch gradients are shares of the step's mean loss
    (loss / gradient_accumulation_steps); F is then the mean square of each micro-batch's own mean gradient."""
    model = tiny_model("llama")
    structure = discover(model, protected_layers=())
    criterion = FisherImportance()
    criterion.loss_shares = True  # what PruningCallback declares
    criterion.prepare(model, structure.prunable_layers)
    micro = [b["input_ids"] for b in _batches()]
    for ids in micro:
        (model(input_ids=ids, labels=ids).loss / len(micro)).backward()
    criterion_scores = criterion.score_layer(structure.layers[LAYER])
    criterion.release()
    model.zero_grad(set_to_none=True)
    expected = _hand(model, micro, "param_second")
    for role, _, _ in ROLES:
        torch.testing.assert_close(criterion_scores[role], expected[role], rtol=1e-4, atol=1e-12)


def test_the_training_callback_declares_loss_shares():
    from hfprune import PruningCallback, PruningConfig

    assert PruningCallback(PruningConfig(importance="taylor2")).criterion.loss_shares
    assert not get_importance("taylor2").loss_shares  # prune_model's passes are each their own mean loss
