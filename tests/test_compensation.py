"""Compensation of removed input features (hfprune.compensation): the least-squares map against its closed
form and torch.linalg.lstsq, held-out error, int8 and LoRA layers, the Gram hooks, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hfprune import compensation as comp
from hfprune.compensation import (
    GramHooks, InputGram, add_output_bias_, compensate_columns_, least_squares_map, mean_shift,
)
from hfprune.importance.weights import dense_weight, effective_weight
from hfprune.masking import LayerMask, MaskHooks, PruningMasks
from hfprune.structure import discover, head_rows

from .tiny_models import batch, save_tiny, tiny_model, with_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def _correlated(tokens: int, features: int = 16, seed: int = 0, mixing_seed: int = 100) -> torch.Tensor:
    """[tokens, features] activations whose features are strongly correlated (a fixed random mixing,
    `mixing_seed`, of fewer latent factors plus a little noise), with a non-zero mean."""
    mixing = torch.randn(6, features, generator=torch.Generator().manual_seed(mixing_seed))
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 6, generator=g)
    return latent @ mixing + 0.1 * torch.randn(tokens, features, generator=g) + 0.5


def _split(features: int = 16, removed: int = 5, seed: int = 1):
    order = torch.randperm(features, generator=torch.Generator().manual_seed(seed))
    return order[removed:].sort().values, order[:removed].sort().values


def _reference_map(x: torch.Tensor, keep, remove, ridge: float) -> torch.Tensor:
    """The normal equations in float64: M (Σ_KK + λI) = Σ_RK."""
    sigma = x.double().T @ x.double()
    s_kk, s_rk = sigma[keep][:, keep], sigma[remove][:, keep]
    lam = ridge * s_kk.diagonal().mean()
    a = s_kk + lam * torch.eye(len(keep), dtype=torch.float64)
    return torch.linalg.solve(a, s_rk.T).T  # a is symmetric


def _gram(x: torch.Tensor) -> InputGram:
    gram = InputGram(x.shape[-1])
    for chunk in x.split(37):  # several calls, as during forward passes
        gram.add(chunk)
    return gram


def _compensated(weight: torch.Tensor, keep, remove, M) -> torch.Tensor:
    out = weight.clone()
    out[:, keep] += weight[:, remove] @ M
    return out


# ---- the map on one Linear --------------------------------------------------------------------------------


@pytest.mark.parametrize("ridge", [0.0, 0.05, 1.0])
def test_map_equals_the_closed_form(ridge):
    x = _correlated(400)
    keep, remove = _split()
    M = least_squares_map(x.double().T @ x.double(), keep, remove, ridge=ridge, dtype=torch.float64)
    assert M.shape == (len(remove), len(keep)) and M.dtype == torch.float64
    torch.testing.assert_close(M, _reference_map(x, keep, remove, ridge), rtol=1e-9, atol=1e-10)
    # bool masks mean the same as indices
    keep_mask = torch.zeros(16, dtype=torch.bool)
    keep_mask[keep] = True
    torch.testing.assert_close(least_squares_map(x.double().T @ x.double(), keep_mask, ~keep_mask, ridge=ridge,
                                                 dtype=torch.float64), M)


def test_input_gram_accumulates_the_closed_form_statistics():
    x = _correlated(400)
    keep, remove = _split()
    gram = _gram(x)
    assert gram.count == 400 and gram.gram.dtype == torch.float32
    torch.testing.assert_close(gram.gram, x.T @ x, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gram.mean, x.double().mean(dim=0), rtol=1e-9, atol=1e-9)
    # the float32 Gram is good enough for the map once a small ridge bounds the condition number
    torch.testing.assert_close(least_squares_map(gram, keep, remove, ridge=0.01).double(),
                               _reference_map(x, keep, remove, 0.01), rtol=1e-4, atol=1e-5)


def test_ridge_zero_is_the_least_squares_optimum():
    x = _correlated(400).double()
    keep, remove = _split()
    linear = nn.Linear(16, 8, bias=False).double()
    with torch.no_grad():
        linear.weight.normal_()
    weight = linear.weight.detach().clone()
    target = x @ weight.T
    optimum = torch.linalg.lstsq(x[:, keep], target).solution.T  # argmin ‖X_K W_Kᵀ − X Wᵀ‖
    M = least_squares_map(x.T @ x, keep, remove, ridge=0.0, dtype=torch.float64)
    compensate_columns_(linear, keep, remove, M)
    torch.testing.assert_close(linear.weight[:, keep], optimum, rtol=1e-6, atol=1e-6)
    # the removed columns are left in place for surgery
    torch.testing.assert_close(linear.weight[:, remove], weight[:, remove], rtol=0, atol=0)
    error = (x[:, keep] @ linear.weight[:, keep].T - target).norm()
    best = (x[:, keep] @ optimum.T - target).norm()
    torch.testing.assert_close(error, best, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ridge", [0.0, 0.01, 0.1])
def test_held_out_error_is_below_plain_removal(ridge):
    calibration, held_out = _correlated(200, seed=0), _correlated(500, seed=7)
    keep, remove = _split()
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight.normal_()
    target = linear(held_out).detach()
    dropped = held_out.clone()
    dropped[:, remove] = 0  # the removed features' inputs are gone (masked, then sliced)
    plain_error = (linear(dropped) - target).norm()
    compensate_columns_(linear, keep, remove, least_squares_map(_gram(calibration), keep, remove, ridge=ridge))
    compensated_error = (linear(dropped) - target).norm()
    assert compensated_error < 0.5 * plain_error, (float(compensated_error), float(plain_error))


def test_a_large_ridge_tends_to_plain_removal_and_singular_data_has_a_solution():
    x = _correlated(300)
    keep, remove = _split()
    assert least_squares_map(_gram(x), keep, remove, ridge=1e9).abs().max() < 1e-6
    # ridge 0 with a kept feature that is always 0: Σ_KK is singular, the minimum-norm solution is taken
    x[:, keep[0]] = 0
    M = least_squares_map(_gram(x), keep, remove, ridge=0.0)
    assert torch.isfinite(M).all() and M[:, 0].abs().max() < 1e-5
    others = keep[1:]
    torch.testing.assert_close(M[:, 1:].double(), _reference_map(x, others, remove, 0.0), rtol=1e-3, atol=1e-4)


def test_excluded_features_take_no_part():
    """Progressive use: features removed (and compensated) earlier are in neither set."""
    x = _correlated(300)
    keep, remove = torch.arange(0, 10), torch.arange(10, 13)
    M = least_squares_map(_gram(x), keep, remove, ridge=0.1, excluded=torch.arange(13, 16))
    torch.testing.assert_close(M.double(), _reference_map(x[:, :13], keep, remove, 0.1), rtol=1e-4, atol=1e-5)


def test_mean_shift_and_output_bias():
    x = _correlated(300)
    keep, remove = _split()
    gram = _gram(x)
    linear = nn.Linear(16, 8, bias=False)
    shift = mean_shift(gram, remove, linear)
    torch.testing.assert_close(shift, linear.weight[:, remove].detach() @ x[:, remove].mean(dim=0), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(mean_shift(gram.mean, remove, linear.weight.detach()), shift)
    add_output_bias_(linear, shift)
    assert isinstance(linear.bias, nn.Parameter) and not linear.bias.requires_grad
    assert linear.bias.dtype == linear.weight.dtype and linear.bias.device == linear.weight.device
    # with the removed inputs dropped, the output is the one where they were replaced by their mean
    dropped, at_mean = x.clone(), x.clone()
    dropped[:, remove] = 0
    at_mean[:, remove] = x[:, remove].mean(dim=0)
    with torch.no_grad():
        torch.testing.assert_close(linear(dropped), at_mean @ linear.weight.T, rtol=1e-5, atol=1e-5)
        add_output_bias_(linear, torch.ones(8))  # an existing bias is added to, the same Parameter
    torch.testing.assert_close(linear.bias.detach(), shift + 1)


# ---- LoRA and int8 layers ---------------------------------------------------------------------------------


def _map_for(width: int, removed: int, seed: int = 0):
    keep, remove = _split(width, removed, seed)
    x = _correlated(400, width, seed=seed)
    return keep, remove, least_squares_map(_gram(x), keep, remove, ridge=0.05)


def test_lora_on_linear_compensates_the_effective_weight():
    model = with_lora(tiny_model("llama"), b_std=0.05)
    layer = discover(model, protected_layers=()).layers[1]
    for role in ("o_proj", "down_proj"):
        module = layer.projection(role)
        params = [(p, p.data_ptr()) for p in module.parameters()]
        before = effective_weight(module)
        a_before = {name: a.weight.detach().clone() for name, a in module.lora_A.items()}
        keep, remove, M = _map_for(before.shape[1], before.shape[1] // 4)
        compensate_columns_(module, keep, remove, M)
        torch.testing.assert_close(effective_weight(module), _compensated(before, keep, remove, M), rtol=0, atol=2e-6)
        for name, adapter in module.lora_A.items():  # A_K += A_R M
            torch.testing.assert_close(adapter.weight.detach(), _compensated(a_before[name], keep, remove, M),
                                       rtol=0, atol=1e-6)
        assert [(p, p.data_ptr()) for p in module.parameters()] == params  # same objects, same storage
        means = torch.randn(before.shape[1], dtype=torch.float64)  # mean_shift reads the effective weight too
        torch.testing.assert_close(mean_shift(means, remove, module),
                                   (effective_weight(module)[:, remove].double() @ means[remove]).float())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "base"
    save_tiny("llama", path)
    return path


def _load_8bit(path, lora: bool):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu", dtype=torch.float32
    ).eval()
    return with_lora(model, b_std=0.05).eval() if lora else model


# Each re-quantised weight is within half a quantisation step (its row's new absmax / 254) of the float
# result, plus float32 rounding: rounding is the only error. Measured on these layers (weights ~N(0, 0.2)):
# max error 0.00309 on o_proj (64 x 64, largest bound 0.00318) and 0.00294 on down_proj (64 x 96, 0.00297),
# at most 1.000x each row's bound; through the int8 forward (inputs quantised too) the output is within ~0.02
# of x @ W_compensated and ~0.8-1.0 away from x @ W_old.
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("after_forward", [False, True])
def test_int8_base_is_requantized_within_half_a_step(tiny_dir, lora, after_forward):
    model = _load_8bit(tiny_dir, lora)
    ids = batch()
    if after_forward:  # the first forward moves CB / SCB from the weight into the layer state
        with torch.no_grad():
            model(input_ids=ids)
    layer = discover(model, protected_layers=()).layers[2]
    for role in ("o_proj", "down_proj"):
        module = layer.projection(role)
        int8 = module.base_layer if lora else module
        assert type(int8).__name__ == "Linear8bitLt" and int8.weight.dtype == torch.int8
        weight_param = int8.weight
        base_before, effective_before = dense_weight(module), effective_weight(module)
        keep, remove, M = _map_for(base_before.shape[1], base_before.shape[1] // 4, seed=3)
        compensate_columns_(module, keep, remove, M)
        assert int8.weight is weight_param and int8.weight.dtype == torch.int8
        scales = int8.weight.SCB if int8.weight.SCB is not None else int8.state.SCB
        bound = scales.view(-1, 1) / 254 + 1e-6
        expected = _compensated(base_before, keep, remove, M)
        error = (dense_weight(module) - expected).abs()
        assert bool((error <= bound).all()), float((error - bound).max())
        # the scales are the new rows' absmax, as bitsandbytes defines them
        torch.testing.assert_close(scales, expected.abs().amax(dim=1), rtol=0, atol=1e-6)
        if lora:  # the adapters take the same map exactly: W + s·B·A is off by the base's rounding only
            effective_expected = _compensated(effective_before, keep, remove, M)
            lora_part = effective_weight(module) - dense_weight(module)
            torch.testing.assert_close(lora_part, effective_expected - expected, rtol=0, atol=1e-6)
    # the forward uses the new weights (no stale cache): with the removed inputs zeroed, the layer's output
    # follows the compensated weight, not the old one
    module = layer.projection("down_proj")
    x = torch.randn(4, module.in_features) * 0.5 + 0.3
    x[:, remove] = 0
    with torch.no_grad():
        out = module(x)
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    new_error = (out - x @ effective_weight(module).T).abs().max()
    old_error = (out - x @ effective_before.T).abs().max()
    assert new_error < 0.25 * old_error, (float(new_error), float(old_error))
    # the mean variant on an int8 base: a new float32 bias, added to the output
    delta = torch.linspace(-1, 1, module.out_features)
    add_output_bias_(module, delta)
    assert int8.bias is not None and int8.bias.dtype == torch.float32 and not int8.bias.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(module(x), out + delta, rtol=0, atol=1e-5)


# ---- GramHooks --------------------------------------------------------------------------------------------


def _masks(structure):
    masks = PruningMasks.full(structure)
    for layer in structure:
        heads = torch.ones(layer.num_heads, dtype=torch.bool)
        heads[[1, 5]] = False  # one query head from each KV group
        channels = torch.ones(layer.intermediate_size, dtype=torch.bool)
        channels[::3] = False
        masks.layers[layer.index] = LayerMask(heads, channels)
    return masks


def _capture_inputs(structure):
    """Every o_proj / down_proj input (unmasked: prepended, so before the mask hooks) by (layer, role)."""
    seen: dict = {}
    handles = []
    for layer in structure:
        for role in ("o_proj", "down_proj"):
            def hook(module, args, key=(layer.index, role)):
                seen.setdefault(key, []).append(args[0].detach().clone())

            handles.append(layer.projection(role).register_forward_pre_hook(hook, prepend=True))
    return seen, handles


@pytest.mark.parametrize("masks_first", [True, False])
def test_gram_hooks_see_the_unmasked_input(masks_first):
    model = tiny_model("llama")
    structure = discover(model, protected_layers=())
    masks = _masks(structure)
    seen, _ = _capture_inputs(structure)
    hooks = GramHooks()
    if masks_first:
        MaskHooks(structure, masks)
        hooks.prepare(model, structure.layers)
    else:
        hooks.prepare(model, structure.layers)
        MaskHooks(structure, masks)
    with torch.no_grad():
        model(input_ids=batch(seed=2))
        model(input_ids=batch(seed=3))
    for layer in structure:
        for role, removed in (("o_proj", head_rows(torch.tensor([1, 5]), layer.head_dim)),
                              ("down_proj", torch.arange(0, layer.intermediate_size, 3))):
            x = torch.cat(seen[(layer.index, role)]).reshape(-1, layer.projection(role).in_features)
            gram = hooks.gram(layer.index, role)
            assert gram.count == x.shape[0] == 48
            torch.testing.assert_close(gram.gram, x.T @ x, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(gram.mean, x.double().mean(dim=0), rtol=1e-6, atol=1e-7)
            assert bool((gram.gram.diagonal()[removed] > 0).all())  # the masked features were seen unmasked


def test_gram_hooks_exclude_padding_and_subsample():
    model = tiny_model("llama")
    structure = discover(model, protected_layers=())
    ids = batch(seed=4)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 8:] = 0  # right padding of the second sequence
    seen, _ = _capture_inputs(structure)
    padded, capped = GramHooks(), GramHooks(max_tokens=7, exclude_padding=True)
    padded.prepare(model, structure.layers)
    capped.prepare(model, structure.layers)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention_mask)
    for layer in structure:
        x = seen[(layer.index, "down_proj")][0]
        real = x[attention_mask.bool()]
        gram = padded.gram(layer.index, "down_proj")
        assert gram.count == int(attention_mask.sum()) == 20
        torch.testing.assert_close(gram.gram, real.T @ real, rtol=1e-5, atol=1e-4)
        subset = real[torch.arange(7) * 20 // 7]
        torch.testing.assert_close(capped.gram(layer.index, "down_proj").gram, subset.T @ subset, rtol=1e-5,
                                   atol=1e-4)
    with torch.no_grad():  # no mask on the next call: every token counts again
        model(input_ids=ids)
    assert padded.gram(0, "down_proj").count == 20 + 24


def _train_step(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_tokens_once(reentrant, monkeypatch):
    ids = batch(seed=5)
    plain_model = with_lora(tiny_model("llama"), b_std=0.05)
    plain = GramHooks()
    plain.prepare(plain_model, discover(plain_model, protected_layers=()).layers)
    _train_step(plain_model, ids)  # a forward with gradients counts

    def checkpointed(guard: bool):
        model = with_lora(tiny_model("llama"), b_std=0.05)
        model.train()  # transformers checkpoints in training mode only (dropout is 0 here)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()
        hooks = GramHooks()
        hooks.prepare(model, discover(model, protected_layers=()).layers)
        with monkeypatch.context() as patch:
            if not guard:
                patch.setattr(comp, "_inside_backward", lambda: False)
            _train_step(model, ids)
        return hooks

    hooks = checkpointed(guard=True)
    for key, gram in plain.grams.items():
        assert hooks.grams[key].count == gram.count == ids.numel()
        torch.testing.assert_close(hooks.grams[key].gram, gram.gram, rtol=1e-5, atol=1e-4)
    # without the guard the recompute would be counted too: the test can tell
    unguarded = checkpointed(guard=False)
    assert any(g.count > ids.numel() for g in unguarded.grams.values())


def test_gram_hooks_prepare_is_idempotent_enabled_and_release():
    model = tiny_model("llama")
    structure = discover(model, protected_layers=())
    module = structure.layers[0].projection("down_proj")
    hooks = GramHooks()
    hooks.prepare(model, structure.layers)
    hooks.prepare(model, structure.layers[:2])
    with torch.no_grad():
        model(input_ids=batch())
    assert hooks.gram(0, "down_proj").count == 24 and hooks.gram(2, "down_proj") is None
    hooks.enabled = False
    with torch.no_grad():
        model(input_ids=batch())
    assert hooks.gram(0, "down_proj").count == 24
    hooks.enabled = True
    hooks.reset()
    assert hooks.gram(0, "down_proj") is None
    hooks.release()
    assert not module._forward_pre_hooks and not model.model._forward_pre_hooks
    with torch.no_grad():
        model(input_ids=batch())
    assert not hooks.grams


def test_gram_storage_device_and_dtype():
    x = _correlated(100)
    gram = InputGram(16, device="cpu", dtype=torch.float64, max_tokens=1000)
    gram.add(x.view(4, 25, 16), token_mask=torch.ones(4, 25, dtype=torch.bool))
    assert gram.gram.dtype == torch.float64 and gram.gram.device.type == "cpu"
    torch.testing.assert_close(gram.gram, (x.T @ x).double(), rtol=1e-5, atol=1e-3)


# ---- bad input --------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_the_value():
    x = _correlated(50)
    gram = _gram(x)
    keep, remove = torch.arange(0, 12), torch.arange(12, 16)
    for ridge in (-0.1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match=f"ridge={ridge!r}: must be a finite number >= 0"):
            least_squares_map(gram, keep, remove, ridge=ridge)
    with pytest.raises(ValueError, match=r"keep and remove share features \[11\]"):
        least_squares_map(gram, keep, torch.arange(11, 16))
    with pytest.raises(ValueError, match=r"features \[12\] \(of 16\) are in neither keep nor remove"):
        least_squares_map(gram, keep, torch.arange(13, 16))
    with pytest.raises(ValueError, match=r"remove holds features \[16\] outside \[0, 16\)"):
        least_squares_map(gram, keep, torch.tensor([12, 13, 14, 15, 16]))
    with pytest.raises(ValueError, match=r"remove repeats features \[13\]"):
        least_squares_map(gram, keep, torch.tensor([12, 13, 13, 14, 15]))
    with pytest.raises(ValueError, match=r"keep is a bool mask of 15 features: expected 16"):
        least_squares_map(gram, torch.ones(15, dtype=torch.bool), remove)
    with pytest.raises(ValueError, match=r"keep has dtype torch.float32"):
        least_squares_map(gram, keep.float(), remove)
    with pytest.raises(ValueError, match=r"gram has shape \(16, 15\): expected a square"):
        least_squares_map(gram.gram[:, :15], keep, remove)
    with pytest.raises(ValueError, match="keep is empty"):
        least_squares_map(gram, [], torch.arange(16))
    linear = nn.Linear(16, 8)
    M = least_squares_map(gram, keep, remove)
    with pytest.raises(ValueError, match=r"M has shape \(12, 4\): expected \[len\(remove\), len\(keep\)\] = \[4, 12\]"):
        compensate_columns_(linear, keep, remove, M.T)
    with pytest.raises(ValueError, match=r"keep and remove share features \[11\]"):
        compensate_columns_(linear, keep, torch.arange(11, 15), M)
    with pytest.raises(TypeError, match="cannot compensate Conv1d"):
        compensate_columns_(nn.Conv1d(16, 8, 1), keep, remove, M)
    with pytest.raises(ValueError, match=r"bias_delta has shape \(7,\): expected \[out_features\] = \[8\]"):
        add_output_bias_(linear, torch.zeros(7))
    with pytest.raises(ValueError, match=r"weight has shape \(8, 15\): expected \[out_features, 16\]"):
        mean_shift(gram, remove, torch.zeros(8, 15))
    with pytest.raises(ValueError, match="input has 15 features, this Gram 16"):
        gram.add(torch.zeros(3, 15))
    with pytest.raises(ValueError, match=r"token_mask has shape \(3,\): expected the input's token shape \(2, 3\)"):
        gram.add(torch.zeros(2, 3, 16), token_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_tokens=0: must be None"):
        GramHooks(max_tokens=0)
    with pytest.raises(ValueError, match="role='q_proj': must be one of o_proj, down_proj"):
        GramHooks().gram(0, "q_proj")


def test_an_unreadable_attention_mask_is_refused():
    model = tiny_model("llama")
    hooks = GramHooks()
    hooks.prepare(model, discover(model, protected_layers=()).layers)
    ids = batch()
    mask_4d = torch.ones(2, 1, 12, 12)
    with pytest.raises(ValueError, match=r"2-D attention_mask \[batch, seq\]; got shape \(2, 1, 12, 12\)"):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask_4d)
    hooks.release()
