"""A bitsandbytes 4-bit base (Linear4bit, NF4 / FP4, double quantization) on the CPU: scoring reads
bitsandbytes' de-quantization, surgery re-quantizes in the layer's own format, all or nothing, the export
streams the full-precision original, and what bitsandbytes 0.50 cannot compute right is refused up front.

Tolerances (measured here, tiny Llama of FOUR_BIT_SIZES, weights N(0, 0.2), 16 tokens):
  * rows of q/k/v/gate/up and whole heads of o_proj (head_dim 64 = the block size) keep whole blocks, so they come
    back exactly (double quantization re-quantizes the absmax: up to 4.4e-2 on logits of max ~9.8, 0.5%);
  * removed MLP channels regroup down_proj's blocks, which must be re-quantized: each kept weight moves to the
    nearest code of its new block (measured up to 1.0 on logits of max ~9, top-1 agreement 84-94% with half the
    channels of 3 layers gone), the size of the 4-bit quantization error itself. The test checks that exactly
    this happened: the pruned down_proj is the re-quantized slice of the de-quantized original, bit for bit.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hfprune import PruningConfig, apply_masks, discover, prune_model, remove_pruned_groups
from hfprune.allocation import allocate
from hfprune.bnb4bit import dequantize_rows, is_4bit_linear, quantize_like, use_generic_cpu_kernels
from hfprune.importance import ScoreAccumulator, get_importance, score_model
from hfprune.importance.weights import dense_weight
from hfprune.structure import base_layer

from .tiny_models import FOUR_BIT_SIZES, LORA_TARGETS, batch, load_4bit, save_tiny

bnb = pytest.importorskip("bitsandbytes")

FORMATS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
FORMAT_IDS = ["nf4", "nf4-double", "fp4", "fp4-double"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("four_bit") / "base"
    save_tiny("llama", path, **FOUR_BIT_SIZES)
    return path


def _masks(structure, structures=("heads", "channels"), seed=5):
    accumulator = ScoreAccumulator(normalize=False)
    criterion = get_importance("random")
    criterion.seed = seed
    score_model(structure, criterion, accumulator)
    targets = {"heads": dict(head_sparsity=0.5), "channels": dict(channel_sparsity=0.5)}
    kwargs = {k: v for s in structures for k, v in targets[s].items()}
    config = PruningConfig(structures=list(structures), protected_layers=(0,), round_channels_to=64, **kwargs)
    return allocate(structure, accumulator.layer_scores(structure.prunable_layers), config, 1.0)


def _with_lora(model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---- reading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type,double_quant", FORMATS, ids=FORMAT_IDS)
def test_dense_weight_is_bitsandbytes_dequantization_in_row_blocks(base_dir, quant_type, double_quant):
    from bitsandbytes.functional import dequantize_4bit

    model = load_4bit(base_dir, quant_type, double_quant)
    for role in ("q_proj", "k_proj", "o_proj"):
        module = getattr(model.model.layers[1].self_attn, role)
        assert is_4bit_linear(module) and module.weight.dtype == torch.uint8  # packed codes
        expected = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        assert expected.shape == (module.out_features, module.in_features)
        torch.testing.assert_close(dense_weight(module), expected, atol=0, rtol=0)
        torch.testing.assert_close(dense_weight(module, slice(16, 48)), expected[16:48], atol=0, rtol=0)
    # not the bytes: the de-quantized weight is close to the full-precision original
    from safetensors.torch import load_file

    weights = load_file(base_dir / "model.safetensors")
    q_proj = model.model.layers[1].self_attn.q_proj
    original = weights["model.layers.1.self_attn.q_proj.weight"]
    error = (dense_weight(q_proj) - original).abs().max() / original.abs().max()
    assert error < 0.17  # half the widest code gap: NF4 0.152 (-1 to -0.696), FP4 0.167 (2/3 to 1)


def test_magnitude_on_4bit_ranks_like_full_precision(base_dir):
    """Scores from de-quantized weights agree with the fp32 model's; scores from packed bytes would not."""
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    quantized = load_4bit(base_dir)
    scores = []
    for model in (full, quantized):
        structure = discover(model, protected_layers=(0,))
        accumulator = ScoreAccumulator(normalize=False)
        score_model(structure, get_importance("magnitude"), accumulator)
        scores.append(accumulator.layer_scores(structure.prunable_layers))
    for index in scores[0]:
        channels = torch.stack([scores[0][index].channels, scores[1][index].channels])
        assert torch.corrcoef(channels)[0, 1] > 0.95
        torch.testing.assert_close(scores[1][index].heads, scores[0][index].heads, rtol=0.05, atol=0)


# ---- surgery ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type,double_quant", FORMATS, ids=FORMAT_IDS)
def test_removing_whole_heads_equals_masking(base_dir, quant_type, double_quant):
    """Rows and whole-block columns keep their codes: exact without double quantization."""
    model = load_4bit(base_dir, quant_type, double_quant)
    use_generic_cpu_kernels(model)
    structure = discover(model, protected_layers=(0,))
    masks = _masks(structure, structures=("heads",))
    ids = batch(seq_len=16)
    hooks = apply_masks(structure, masks)
    masked = _logits(model, ids)
    hooks.remove()
    remove_pruned_groups(structure, masks)
    assert model.model.layers[1].self_attn.o_proj.in_features == 128
    # measured: 0 without double quantization; with it, the re-quantized absmax moves logits by up to 0.5% of the
    # largest (3.6e-2 and 4.4e-2 of ~9.8 for two masks)
    tolerance = 0.01 * float(masked.abs().max()) if double_quant else 1e-5
    torch.testing.assert_close(_logits(model, ids), masked, atol=tolerance, rtol=0)


@pytest.mark.parametrize("quant_type,double_quant", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_removing_channels_requantizes_down_proj_in_its_own_format(base_dir, quant_type, double_quant, lora):
    model = load_4bit(base_dir, quant_type, double_quant)
    model = _with_lora(model) if lora else model
    use_generic_cpu_kernels(model)
    structure = discover(model, protected_layers=(0,))
    masks = _masks(structure)
    ids = batch(seq_len=16)
    hooks = apply_masks(structure, masks)
    masked = _logits(model, ids)
    hooks.remove()
    layer = structure.layers[2]
    down = base_layer(layer.projection("down_proj"))
    gate = base_layer(layer.projection("gate_proj"))
    kept = masks[2].channels.nonzero().squeeze(1)
    expected_down = dequantize_rows(quantize_like(down, dequantize_rows(down.weight)[:, kept]))
    expected_gate = dequantize_rows(gate.weight)[kept]
    settings = (down.weight.quant_state.quant_type, down.weight.quant_state.blocksize, down.weight.quant_state.nested)

    remove_pruned_groups(structure, masks)
    assert (down.in_features, gate.out_features) == (len(kept), len(kept))
    assert is_4bit_linear(down) and down.weight.dtype == torch.uint8 and down.weight.quant_state.shape == (128, 128)
    state = down.weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested) == settings == (quant_type, 64, double_quant)
    assert down.quant_state is state and down.compute_dtype == torch.float32
    torch.testing.assert_close(dequantize_rows(down.weight), expected_down, atol=0, rtol=0)
    rows_tolerance = 1e-2 if double_quant else 0.0
    torch.testing.assert_close(dequantize_rows(gate.weight), expected_gate, atol=rows_tolerance, rtol=0)
    pruned = _logits(model, ids)
    scale = masked.abs().max()
    assert (pruned - masked).abs().max() < 0.15 * scale  # measured <= 0.11 x: the re-quantization of down_proj
    assert (pruned.argmax(-1) == masked.argmax(-1)).float().mean() >= 0.75
    if lora:
        wrapped = layer.projection("down_proj")
        assert wrapped.lora_A["default"].weight.shape == (4, len(kept))
        assert layer.projection("gate_proj").lora_B["default"].weight.shape == (len(kept), 4)


def test_lora_and_optimizer_state_follow_the_4bit_surgery(base_dir):
    from hfprune.surgery import slice_optimizer_state

    model = _with_lora(load_4bit(base_dir))
    use_generic_cpu_kernels(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model(input_ids=batch(seq_len=16), labels=batch(seq_len=16)).loss.backward()
    optimizer.step()
    structure = discover(model, protected_layers=(0,))
    masks = _masks(structure)
    records = remove_pruned_groups(structure, masks)
    assert slice_optimizer_state(optimizer, records) > 0
    for param in trainable:
        state = optimizer.state[param]
        assert state["exp_avg"].shape == param.shape == state["exp_avg_sq"].shape
        assert param.grad is None or param.grad.shape == param.shape
    optimizer.zero_grad()
    model(input_ids=batch(seq_len=16), labels=batch(seq_len=16)).loss.backward()
    optimizer.step()  # trains on the new shapes


# ---- all or nothing --------------------------------------------------------------------------------------------


def _snapshot(model) -> dict:
    """Every tensor (values, dtype, shape, gradient), quant state and width attribute of the model."""
    snap = {}
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        grad = getattr(tensor, "grad", None)
        snap[name] = (tensor.detach().clone(), None if grad is None else grad.clone())
    for name, module in model.named_modules():
        for attr in ("in_features", "out_features", "num_key_value_groups", "num_heads", "num_key_value_heads",
                     "intermediate_size"):
            if attr in vars(module):
                snap[f"{name}.{attr}"] = getattr(module, attr)
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            snap[f"{name}.quant_state"] = {k: v.clone() if torch.is_tensor(v) else v
                                           for k, v in state.as_dict().items()}
            snap[f"{name}.module_quant_state"] = vars(module).get("quant_state", "absent") is state
        for holder, attr in ((weight, "SCB"), (getattr(module, "state", None), "SCB")):
            value = getattr(holder, attr, None) if holder is not None else None
            if torch.is_tensor(value):
                snap[f"{name}.{attr}"] = value.clone()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    snap["pruned_layer_widths"] = getattr(inner.config, "pruned_layer_widths", "absent")
    return snap


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, old in before.items():
        new = after[key]
        if isinstance(old, tuple):
            assert old[0].dtype == new[0].dtype and torch.equal(old[0], new[0]), key
            assert (old[1] is None) == (new[1] is None) and (old[1] is None or torch.equal(old[1], new[1])), key
        elif isinstance(old, dict):
            assert old.keys() == new.keys(), key
            for k in old:
                same = torch.equal(old[k], new[k]) if torch.is_tensor(old[k]) else old[k] == new[k]
                assert same, f"{key}.{k}"
        elif torch.is_tensor(old):
            assert torch.equal(old, new), key
        else:
            assert old == new, key


def _models(kind, base_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "4bit":
        model = load_4bit(base_dir, "nf4", double_quant=True)
    elif kind == "8bit":
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu",
            dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = _with_lora(model)
    use_generic_cpu_kernels(model)
    model.train()
    model(input_ids=batch(seq_len=16), labels=batch(seq_len=16)).loss.backward()  # LoRA gradients to slice too
    model.eval()
    with torch.no_grad():
        model(input_ids=batch(seq_len=16))  # int8: moves the row scales into the layer state
    return model


@pytest.mark.parametrize("kind", ["fp32", "8bit", "4bit"])
def test_a_failure_half_way_through_surgery_leaves_every_tensor_unchanged(base_dir, kind, monkeypatch):
    from hfprune import surgery

    calls = {"n": 0, "fail_at": None}
    for name in ("set", "slice_tensor", "set_4bit_weight"):
        real = getattr(surgery._Edits, name)

        def counted(self, *args, _real=real, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                raise RuntimeError("injected failure")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(surgery._Edits, name, counted)
    reference = _models(kind, base_dir)
    structure = discover(reference, protected_layers=(0,))
    masks = _masks(structure)
    remove_pruned_groups(structure, masks)
    total = calls["n"]
    assert total > 20

    model = _models(kind, base_dir)
    structure = discover(model, protected_layers=(0,))
    ids = batch(seq_len=16)
    logits = _logits(model, ids)
    before = _snapshot(model)
    for fail_at in (total // 2, total - 1):
        calls.update(n=0, fail_at=fail_at)
        with pytest.raises(RuntimeError, match="injected failure"):
            remove_pruned_groups(structure, masks)
        _assert_same(before, _snapshot(model))
    torch.testing.assert_close(_logits(model, ids), logits, atol=0, rtol=0)
    calls.update(n=0, fail_at=None)
    remove_pruned_groups(structure, masks)  # and the same call then succeeds
    assert discover(model).layers[1].intermediate_size == 128


def test_checks_before_any_change(base_dir):
    """An unquantized 4-bit layer is refused before the first slice."""
    model = load_4bit(base_dir)
    structure = discover(model, protected_layers=(0,))
    masks = _masks(structure)
    before = _snapshot(model)
    model.model.layers[3].mlp.down_proj.weight.quant_state = None
    with pytest.raises(TypeError, match="layer 3 down_proj: Linear4bit is not quantized"):
        remove_pruned_groups(structure, masks)
    model.model.layers[3].mlp.down_proj.weight.quant_state = model.model.layers[3].mlp.down_proj.quant_state
    _assert_same(before, _snapshot(model))


# ---- the CPU kernels -------------------------------------------------------------------------------------------


def test_the_generic_cpu_kernels_train_after_an_evaluation(base_dir):
    """bitsandbytes re-packs a 4-bit weight for its CPU inference kernel on the first eval forward, after which it
    cannot back-propagate; hfprune keeps its models on the generic kernels and restores a re-packed layer."""
    model = load_4bit(base_dir)
    ids = batch(seq_len=16)
    with torch.no_grad():
        model(input_ids=ids)  # eval mode, no grad: re-packed where the CPU has AVX512-BF16
    repacked = any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if is_4bit_linear(m))
    restored = use_generic_cpu_kernels(model)
    assert restored == (28 if repacked else 0)  # 7 projections x 4 layers
    reference = load_4bit(base_dir)
    use_generic_cpu_kernels(reference)
    for a, b in zip(model.modules(), reference.modules()):
        if is_4bit_linear(a):  # the re-packed layout kept the absmax in bfloat16: within its rounding
            torch.testing.assert_close(dequantize_rows(a.weight), dequantize_rows(b.weight), atol=1e-6, rtol=2**-8)
    model = _with_lora(model)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_cpu_widths_bitsandbytes_computes_wrongly_are_refused_before_work(tmp_path):
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from hfprune.bnb4bit import cpu_dequantize_is_wrong

    # the bitsandbytes behaviour the rule stands for: its CPU kernel de-quantizes a 96-wide matrix wrongly
    weight = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4")
    blocks = weight.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    error = ((dequantize_4bit(packed, state) - weight).reshape(-1, 64).abs() / blocks).max()
    assert error > 0.2  # a right de-quantization is within half the widest code gap, 0.152 of the block's absmax
    assert cpu_dequantize_is_wrong(96, 64) and not cpu_dequantize_is_wrong(128, 64)
    assert not cpu_dequantize_is_wrong(100, 64) and not cpu_dequantize_is_wrong(67, 64)

    save_tiny("llama", tmp_path / "wide96", **{**FOUR_BIT_SIZES, "intermediate_size": 96})
    model = load_4bit(tmp_path / "wide96")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj: in_features=96: on the CPU, a 4-bit "
                                         r"layer's in_features must be a multiple of the block size 64"):
        prune_model(model, PruningConfig(importance="magnitude", protected_layers=(0,), round_channels_to=64))

    save_tiny("llama", tmp_path / "ok", **FOUR_BIT_SIZES)
    model = load_4bit(tmp_path / "ok")
    with pytest.raises(ValueError, match=r"layer 1 down_proj: pruning may leave in_features=.*round_channels_to=1"
                                         r".*e\.g\. round_channels_to=64"):
        prune_model(model, PruningConfig(importance="magnitude", protected_layers=(0,)))
    assert model.model.layers[1].mlp.down_proj.in_features == 256  # nothing was done


# ---- compensation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_compensation_on_a_4bit_base_requantizes_the_updated_weight(base_dir, double_quant):
    from hfprune.compensation import compensate_columns_

    model = load_4bit(base_dir, "nf4", double_quant)
    down = model.model.layers[1].mlp.down_proj
    weight = down.weight
    dense = dequantize_rows(weight)
    keep, remove = torch.arange(0, 192), torch.arange(192, 256)
    M = torch.randn(64, 192, generator=torch.Generator().manual_seed(0)) * 0.05
    expected = dense.clone()
    expected[:, keep] += dense[:, remove] @ M
    compensate_columns_(down, keep, remove, M)
    assert down.weight is weight and down.quant_state is weight.quant_state
    assert weight.quant_state.nested == double_quant and weight.quant_state.quant_type == "nf4"
    result = dequantize_rows(weight)
    torch.testing.assert_close(result, dequantize_rows(quantize_like(down, expected)), atol=0, rtol=0)
    # every weight within half the widest NF4 code gap (0.152 of its block's absmax) of the float result
    blocks = expected.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    assert bool(((result - expected).reshape(-1, 64).abs() <= 0.153 * blocks + 1e-3).all())
