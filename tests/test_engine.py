"""The structural engine: discovery, masks, physical removal — on every architecture."""

from __future__ import annotations

import pytest
import torch

from hfprune import PruningConfig, PruningMasks, apply_masks, discover, prune_model, remove_pruned_groups
from hfprune.allocation import allocate
from hfprune.sparsity import count_parameters, removed_params
from hfprune.importance import ScoreAccumulator, get_importance
from hfprune.masking import LayerMask
from hfprune.importance import score_model
from hfprune.structure import head_rows

from .tiny_models import ARCHITECTURES, batch, tiny_model


def _random_masks(structure, config):
    criterion = get_importance("random")
    criterion.seed = 3
    accumulator = ScoreAccumulator(normalize=False)
    score_model(structure, criterion, accumulator)
    return allocate(structure, accumulator.layer_scores(structure.prunable_layers), config, 1.0)


CASES = [
    dict(target_sparsity=0.4, head_granularity="kv_group"),
    dict(target_sparsity=0.4, head_granularity="query_head"),
    dict(head_sparsity=0.5, channel_sparsity=0.25, head_granularity="query_head"),
]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_physical_removal_equals_masks(arch, case):
    model = tiny_model(arch)
    config = PruningConfig(importance="random", protected_layers=(0,), **CASES[case])
    structure = discover(model, protected_layers=config.protected_layers)
    masks = _random_masks(structure, config)
    assert not masks.is_full()
    ids = batch()
    with torch.no_grad():
        dense = model(ids).logits
        hooks = apply_masks(structure, masks)
        masked = model(ids).logits
        masked_generation = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        hooks.remove()
    assert not torch.allclose(dense, masked, atol=1e-3), "the masks changed nothing"
    before = count_parameters(model)
    kv_before = {layer.index: layer.num_kv_heads for layer in structure}
    expected_removed = removed_params(structure, masks)
    remove_pruned_groups(structure, masks)
    with torch.no_grad():
        pruned = model(ids).logits
        pruned_generation = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    assert torch.equal(pruned_generation, masked_generation)
    assert before - count_parameters(model) == expected_removed
    # widths are re-read from the modules, and recorded in the config
    for layer in discover(model):
        mask = masks[layer.index]
        assert layer.num_heads == int(mask.heads.sum())
        assert layer.num_kv_heads == int(mask.kv_groups(kv_before[layer.index]).sum())
        assert layer.intermediate_size == int(mask.channels.sum())
    assert model.config.pruned_layer_widths


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_gqa_oracle_mask_matches_hand_zeroing(arch):
    """Removing KV group g == zeroing by hand k/v head g, query heads h with h // n_rep == g and their o_proj columns."""
    model = tiny_model(arch)
    structure = discover(model, protected_layers=())
    ids = batch()
    layer = structure.layers[1]
    n_rep, hd = layer.n_rep, layer.head_dim
    for g in range(layer.num_kv_heads):
        heads = torch.ones(layer.num_heads, dtype=torch.bool)
        heads.view(layer.num_kv_heads, n_rep)[g] = False
        masks = PruningMasks.full(structure)
        masks.layers[1] = LayerMask(heads, masks[1].channels)
        with torch.no_grad():
            hooks = apply_masks(structure, masks)
            engine = model(ids).logits
            hooks.remove()
            oracle_model = tiny_model(arch)
            attn = oracle_model.model.layers[1].self_attn
            query_heads = [h for h in range(layer.num_heads) if h // n_rep == g]
            q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in query_heads])
            kv_rows = torch.arange(g * hd, (g + 1) * hd)
            attn.q_proj.weight[q_rows] = 0
            attn.k_proj.weight[kv_rows] = 0
            attn.v_proj.weight[kv_rows] = 0
            attn.o_proj.weight[:, q_rows] = 0
            if attn.v_proj.bias is not None:
                attn.v_proj.bias[kv_rows] = 0
            oracle = oracle_model(ids).logits
        torch.testing.assert_close(engine, oracle, atol=1e-5, rtol=1e-5)
        # ... and physical removal of that group gives the same logits too
        pruned = tiny_model(arch)
        remove_pruned_groups(discover(pruned, protected_layers=()), masks)
        with torch.no_grad():
            torch.testing.assert_close(pruned(ids).logits, oracle, atol=1e-5, rtol=1e-5)


def test_gqa_oracle_scores_read_exactly_the_group_slices():
    """The magnitude score of KV group g is the sum of |W| over exactly its slices."""
    model = tiny_model("llama")
    structure = discover(model, protected_layers=())
    accumulator = ScoreAccumulator(normalize=False)
    score_model(structure, get_importance("magnitude"), accumulator)
    for layer in structure:
        attn = model.model.layers[layer.index].self_attn
        scores = accumulator.group_scores(layer.index, layer.n_rep)
        for g in range(layer.num_kv_heads):
            heads = torch.tensor([h for h in range(layer.num_heads) if h // layer.n_rep == g])
            q = head_rows(heads, layer.head_dim)
            kv = head_rows(torch.tensor([g]), layer.head_dim)
            expected = (
                attn.q_proj.weight[q].abs().sum() + attn.o_proj.weight[:, q].abs().sum()
                + attn.k_proj.weight[kv].abs().sum() + attn.v_proj.weight[kv].abs().sum()
            )
            torch.testing.assert_close(scores.kv_groups[g], expected, rtol=1e-5, atol=1e-4)


def test_prune_model_reaches_target_and_keeps_protected_layers():
    model = tiny_model("llama", num_hidden_layers=6)
    config = PruningConfig(target_sparsity=0.3, importance="magnitude", protected_layers=(0, 5))
    structure = discover(model, protected_layers=config.protected_layers)
    prunable = structure.prunable_params()
    before = count_parameters(model)
    widths_before = [layer.widths() for layer in structure]
    prune_model(model, config)
    removed = before - count_parameters(model)
    channel_params = 3 * 64
    assert abs(removed - 0.3 * prunable) <= 4 * channel_params  # within one channel per layer
    after = discover(model)
    assert after.layers[0].widths() == widths_before[0] and after.layers[5].widths() == widths_before[5]
    assert all(after.layers[i].intermediate_size < 96 for i in range(1, 5))


def test_query_head_granularity_keeps_every_kv_head_and_equal_groups():
    model = tiny_model("llama")
    config = PruningConfig(head_sparsity=0.5, importance="magnitude", structures=("heads",),
                           head_granularity="query_head", protected_layers=())
    prune_model(model, config)
    for layer in discover(model):
        assert layer.num_kv_heads == 2 and layer.num_heads == 4
        assert model.model.layers[layer.index].self_attn.num_key_value_groups == 2


def test_rounding_of_kept_channels():
    model = tiny_model("llama")
    config = PruningConfig(target_sparsity=0.3, importance="magnitude", structures=("channels",),
                           round_channels_to=16, protected_layers=())
    prune_model(model, config)
    assert all(layer.intermediate_size % 16 == 0 for layer in discover(model))


def test_magnitude_scores_a_dead_head_lowest():
    model = tiny_model("llama")
    with torch.no_grad():
        attn = model.model.layers[2].self_attn
        rows = head_rows(torch.tensor([1]), 8)  # KV group 1
        attn.k_proj.weight[rows] *= 1e-3
        attn.v_proj.weight[rows] *= 1e-3
        q = head_rows(torch.tensor([4, 5, 6, 7]), 8)
        attn.q_proj.weight[q] *= 1e-3
        attn.o_proj.weight[:, q] *= 1e-3
    config = PruningConfig(head_sparsity=0.5, structures=("heads",), importance="magnitude", protected_layers=(),
                           head_granularity="kv_group")
    structure = discover(model, protected_layers=())
    accumulator = ScoreAccumulator()
    score_model(structure, get_importance("magnitude"), accumulator)
    masks = allocate(structure, accumulator.layer_scores(structure.prunable_layers), config, 1.0)
    assert masks[2].kv_groups(2).tolist() == [True, False]


# ---- bad input: clear errors before any weight is touched -------------------------------------------------


def test_unsupported_model_type_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported.*llama"):
        discover(model)


def test_mask_emptying_a_layer_is_refused_before_touching_weights():
    model = tiny_model("llama")
    structure = discover(model)
    masks = PruningMasks.full(structure)
    masks.layers[1].heads[:] = False
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 1: the mask removes every attention head"):
        remove_pruned_groups(structure, masks)
    masks = PruningMasks.full(structure)
    masks.layers[2].channels[:] = False
    with pytest.raises(ValueError, match="layer 2: the mask removes every MLP channel"):
        remove_pruned_groups(structure, masks)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


def test_unequal_query_heads_per_group_is_refused():
    model = tiny_model("llama")
    structure = discover(model)
    masks = PruningMasks.full(structure)
    masks.layers[1].heads[0] = False  # group 0 keeps 3, group 1 keeps 4
    with pytest.raises(ValueError, match=r"kept query heads per KV group are \[3, 4\]"):
        remove_pruned_groups(structure, masks)


def test_non_linear_module_is_refused():
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj = torch.nn.Identity()
    with pytest.raises(TypeError, match="layer 1 up_proj is Identity: expected torch.nn.Linear"):
        discover(model)


def test_target_that_would_empty_a_layer_is_refused():
    model = tiny_model("llama")
    config = PruningConfig(target_sparsity=0.9, importance="magnitude", structures=("heads",), protected_layers=())
    with pytest.raises(ValueError, match="target_sparsity=0.9: layer 0 can give up at most"):
        prune_model(model, config)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_sparsity=1.2), r"target_sparsity=1.2: must be in \[0, 1\)"),
        (dict(target_sparsity=-0.1), r"target_sparsity=-0.1: must be in \[0, 1\)"),
        (dict(structures=("layers",)), "structures=.*subset of"),
        (dict(schedule="exp"), "schedule='exp': must be one of"),
        (dict(head_granularity="head"), "head_granularity='head'"),
        (dict(prune_every=0), "prune_every=0: must be an integer >= 1"),
        (dict(uniform=True, ranking="global"), "uniform=True with ranking='global'"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


def test_unknown_criterion_lists_the_valid_ones():
    with pytest.raises(ValueError, match="importance=.foo.: unknown criterion; available: .*lora.*magnitude"):
        prune_model(tiny_model("llama"), PruningConfig(importance="foo"))


def test_global_allocation_respects_floors_and_the_exact_target():
    model = tiny_model("llama", num_hidden_layers=6)
    config = PruningConfig(target_sparsity=0.35, importance="magnitude", ranking="global", protected_layers=(0,),
                           min_channels=40, min_heads=4, normalize="none", global_spread=None)
    structure = discover(model, protected_layers=config.protected_layers)
    prunable = structure.prunable_params()
    # make layer 3 much less important, so a global ranking takes more from it
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.mul_(0.01)
    accumulator = ScoreAccumulator(normalize=False)
    score_model(structure, get_importance("magnitude"), accumulator)
    masks = allocate(structure, accumulator.layer_scores(structure.prunable_layers), config, 1.0)
    removed = removed_params(structure, masks)
    assert abs(removed - 0.35 * prunable) <= 3 * 64  # within one channel
    kept_channels = {i: int(masks[i].channels.sum()) for i in range(1, 6)}
    assert all(kept >= 40 for kept in kept_channels.values())
    assert kept_channels[3] == min(kept_channels.values()) == 40  # the floor binds where scores are lowest
    assert all(int(masks[i].heads.sum()) >= 4 for i in range(1, 6))
    assert masks[0].heads.all() and masks[0].channels.all()


@pytest.mark.parametrize("spread", [0.2, 0.5])
def test_bounded_global_allocation_keeps_every_layer_within_its_spread(spread):
    """Global ranking takes more from the least important layer, but no layer gives up more than (1 + spread) or
    less than (1 - spread) times its share, and the total is the target."""
    model = tiny_model("llama", num_hidden_layers=6)
    config = PruningConfig(target_sparsity=0.3, importance="magnitude", ranking="global", protected_layers=(0,),
                           structures=("channels",), global_spread=spread)
    assert config.score_normalization == "global"  # auto: comparable across layers
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.mul_(0.01)  # layer 3 barely matters
    structure = discover(model, protected_layers=config.protected_layers)
    accumulator = ScoreAccumulator(normalize=config.score_normalization)
    score_model(structure, get_importance("magnitude"), accumulator)
    masks = allocate(structure, accumulator.layer_scores(structure.prunable_layers), config, 1.0)
    share = 0.3 * (structure.layers[1].attention_params + structure.layers[1].mlp_params)
    per_channel = structure.layers[1].params_per_channel
    removed = {i: (96 - int(masks[i].channels.sum())) * per_channel for i in range(1, 6)}
    assert abs(sum(removed.values()) - 5 * share) <= per_channel
    for i, r in removed.items():
        assert (1 - spread) * share - per_channel <= r <= (1 + spread) * share + per_channel, (i, r, share)
    assert removed[3] == max(removed.values()) and removed[3] >= (1 + spread) * share - per_channel


@pytest.mark.parametrize("granularity", ["kv_group", "query_head"])
def test_global_allocation_keeps_the_local_split_between_heads_and_channels(granularity):
    """Heads and channels are scored from different projections: a global ranking moves each across layers
    (layer 3's heads and channels barely matter, so it gives more of both) but removes as many head units in
    all as the per-layer share does, and channels for the rest of the exact target."""
    model = tiny_model("llama", num_hidden_layers=6)
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight.mul_(0.01)
        model.model.layers[3].mlp.down_proj.weight.mul_(0.01)
    masks = {}
    for ranking in ("local", "global"):
        config = PruningConfig(target_sparsity=0.5, importance="magnitude", ranking=ranking, protected_layers=(0,),
                               head_granularity=granularity, global_spread=None)
        structure = discover(model, protected_layers=config.protected_layers)
        accumulator = ScoreAccumulator(normalize=config.score_normalization)
        score_model(structure, get_importance("magnitude"), accumulator)
        masks[ranking] = allocate(structure, accumulator.layer_scores(structure.prunable_layers), config, 1.0)
    heads = {r: sum(8 - int(m[i].heads.sum()) for i in range(1, 6)) for r, m in masks.items()}
    assert heads["global"] == heads["local"] > 0
    per_channel = structure.layers[1].params_per_channel
    assert abs(removed_params(structure, masks["global"]) - 0.5 * structure.prunable_params()) <= per_channel
    removed_channels = {i: 96 - int(masks["global"][i].channels.sum()) for i in range(1, 6)}
    assert removed_channels[3] == max(removed_channels.values()) > min(removed_channels.values())
    assert int(masks["global"][3].heads.sum()) == min(int(masks["global"][i].heads.sum()) for i in range(1, 6))


def test_global_normalization_keeps_the_size_of_a_layer_relative_to_the_others():
    from hfprune.importance import normalize_module_scores
    from hfprune.importance.base import normalize_role_scores

    step = {0: {"down_proj": torch.tensor([3.0, 4.0])}, 1: {"down_proj": torch.tensor([0.3, 0.4])}}
    by_role = normalize_role_scores(step)
    assert torch.allclose(by_role[0]["down_proj"] / by_role[1]["down_proj"], torch.tensor([10.0, 10.0]))
    assert torch.allclose(normalize_module_scores(step[0])["down_proj"], normalize_module_scores(step[1])["down_proj"])
