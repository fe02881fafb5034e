"""Nothing silent, nothing lost (issue #12): bad input refused up front with the value and what is valid,
results short of the target refused or reported, non-finite weights never exported silently."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from hfprune import PruningConfig, PruningTrainer, prune_model
from hfprune.allocation import check_feasible, shortfall
from hfprune.cli import main
from hfprune.export import PickleCheckpointError, save_pruned
from hfprune.masking import PruningMasks
from hfprune.structure import discover, discover_for_config

from .tiny_models import alpaca_records, batch, tiny_model, tiny_recipe, tiny_tokenizer


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err



def _recipe(tmp_path: Path, base, **sections) -> Path:
    return tiny_recipe(tmp_path, base, target_sparsity=0.3, **sections)


def _args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=2, learning_rate=2e-3,
                  logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# ---- data loss: an export that would replace the Trainer's checkpoints ------------------------------------------


@pytest.mark.parametrize("inside", [False, True])
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_dir_that_holds_the_training_dir_is_refused_before_training(capsys, tmp_path, tiny_base,
                                                                           no_model_load, inside, overwrite):
    training = tmp_path / "out" / "trainer" if inside else tmp_path / "out"
    (training / "checkpoint-2").mkdir(parents=True)
    path = _recipe(tmp_path, tiny_base, training={"output_dir": str(training), "resume_from_checkpoint": "last"},
                   export={"output_dir": str(tmp_path / "out"), "overwrite": overwrite})
    code, _, err = _run(capsys, "prune", str(path))
    relation = "contains" if inside else "is"
    assert code == 2 and f"export.output_dir='{tmp_path / 'out'}' {relation} training.output_dir=" in err
    assert "would delete them" in err and "pass export.overwrite" not in err
    assert (training / "checkpoint-2").is_dir()


def test_export_into_the_runs_own_output_dir_is_refused_from_python(tmp_path):
    trainer = PruningTrainer(model=tiny_model("llama"), args=_args(tmp_path), processing_class=tiny_tokenizer(),
                             pruning_config=PruningConfig(importance="magnitude"),
                             train_dataset=datasets.Dataset.from_list(alpaca_records(4)))
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    for target in (tmp_path / "out", tmp_path):
        with pytest.raises(ValueError, match=r"output_dir=.* args.output_dir=.*would delete them"):
            trainer.save_model(str(target), overwrite=True)
    assert (tmp_path / "out" / "checkpoint-2").is_dir()


# ---- results short of the target: refused when the config and the model decide them -----------------------------


@pytest.mark.parametrize(
    "arch, kwargs, message",
    [
        ("llama", dict(target_sparsity=0.9, ranking="global", min_heads=6, min_channels=80),
         r"target_sparsity=0.9 with ranking='global': the prunable layers can give up at most 0.107 .*min_heads=6, "
         r"min_channels=80; layer 1 keeps all 8 query heads"),
        ("llama", dict(target_sparsity=0.3, round_channels_to=128),
         r"target_sparsity=0.3: layer 1 can give up at most 0.000 .*round_channels_to=128 is not below layer 1's "
         r"96 MLP channels"),
        ("llama", dict(head_sparsity=0.9),
         r"head_sparsity=0.9: layer 1 can give up at most 0.500 of its query heads.*one kv_group unit is 0.500"),
        ("llama", dict(channel_sparsity=0.9, min_channels=48),
         r"channel_sparsity=0.9: layer 1 can give up at most 0.500 of its MLP channels .*min_channels=48"),
        ("llama", dict(channel_sparsity=0.9, min_channels=48, ranking="global"),
         r"channel_sparsity=0.9 with ranking='global': .* at most 0.500 of their MLP channels"),
        ("llama", dict(head_sparsity=0.2),
         r"head_sparsity=0.2: rounds down to no query heads in layer 1 \(one kv_group unit is 0.500 of them\); ask "
         r"for at least 0.500"),
        ("llama", dict(target_sparsity=0.05, structures=["heads"]),
         r"target_sparsity=0.05 with structures=\('heads',\): one head unit \(kv_group\) is 0.179 of layer 1's "
         r"parameters, so the target rounds to none"),
        ("llama", dict(target_sparsity=0.05, structures=["heads"], ranking="global"),
         r"target_sparsity=0.05 with ranking='global' and structures=\('heads',\): one head unit \(kv_group\) is "
         r"0.0595 of the prunable parameters"),
        ("llama", dict(target_sparsity=0.3, structures=["heads"]),
         r"target_sparsity=0.3: layer 1 can give up at most 0.179 of its parameters"),
        ("llama_mha", dict(target_sparsity=0.2, structures=["heads"], head_granularity="query_head"),
         r"target_sparsity=0.2: layer 1 can give up at most 0.000 .*layer 1 has one query head per KV group \(4 "
         r"heads, 4 KV heads\), so head_granularity='query_head' cannot remove any: use head_granularity='kv_group'"),
        ("llama_mha", dict(head_sparsity=0.5, head_granularity="query_head"),
         r"head_sparsity=0.5: layer 1 can give up at most 0.000 of its query heads.*one query head per KV group"),
    ],
)
def test_targets_the_floors_or_rounding_cannot_reach_are_refused_up_front(arch, kwargs, message):
    config = PruningConfig(importance="magnitude", protected_layers=(0,), **{"head_granularity": "kv_group", **kwargs})
    with pytest.raises(ValueError, match=message):
        check_feasible(discover_for_config(tiny_model(arch), config), config)
    with pytest.raises(ValueError, match=message):  # prune_model checks before it scores
        prune_model(tiny_model(arch), config)


@pytest.mark.parametrize("kwargs", [dict(target_sparsity=0.5, ranking="global"), dict(target_sparsity=0.15,
                                    structures=["heads"]), dict(head_sparsity=0.5, channel_sparsity=0.5),
                                    dict(target_sparsity=0.3, round_channels_to=64)])
def test_targets_within_rounding_are_accepted_and_reached(kwargs):
    config = PruningConfig(importance="magnitude", protected_layers=(0,), head_granularity="kv_group", **kwargs)
    model = tiny_model("llama")
    structure = discover_for_config(model, config)
    check_feasible(structure, config)
    from hfprune.allocation import allocate, target_fraction
    from hfprune.importance import make_accumulator, make_criterion, score_model
    from hfprune.sparsity import removed_params

    accumulator = make_accumulator(config, make_criterion(config), one_shot=True)
    score_model(structure, make_criterion(config), accumulator)
    masks = allocate(structure, accumulator.layer_scores(structure.prunable_layers), config, 1.0)
    assert shortfall(structure, masks, config) is None
    reached = removed_params(structure, masks) / structure.prunable_params()
    assert reached >= target_fraction(structure, config) - 0.1


def test_plan_refuses_what_the_run_would_miss(capsys, tiny_base):
    code, _, err = _run(capsys, "plan", str(tiny_base), "pruning.head_sparsity=0.9", "pruning.head_granularity=kv_group")
    assert code == 2 and "head_sparsity=0.9: layer 0 can give up at most 0.500 of its query heads" in err


def test_a_result_short_of_the_target_is_a_warning_in_the_report_and_on_the_card(tmp_path, monkeypatch, caplog):
    """What only the scores decide (a global split) cannot be refused up front: it is logged, and the report and
    the card say so. Here the allocation is made to stop at half the target."""
    import hfprune.prune
    from hfprune.allocation import allocate

    def half(structure, scores, config, progress, previous=None):
        return allocate(structure, scores, config, progress / 2, previous)

    monkeypatch.setattr(hfprune.prune, "allocate", half)
    config = PruningConfig(importance="magnitude", target_sparsity=0.5, ranking="global", protected_layers=(0,))
    with caplog.at_level(logging.WARNING, logger="hfprune"):
        model = prune_model(tiny_model("llama"), config)
    assert any("short of the target 0.5000" in r.getMessage() for r in caplog.records)
    out = save_pruned(model, tmp_path / "model", tokenizer=tiny_tokenizer())
    report = json.loads((out / "pruning_report.json").read_text())
    assert len(report["warnings"]) == 1 and "short of the target 0.5000" in report["warnings"][0]
    assert "> **Warning:** reached sparsity" in (out / "README.md").read_text()


def test_the_callback_reports_a_shortfall_in_its_training_report(tmp_path, monkeypatch):
    import hfprune.callback
    from hfprune.allocation import allocate

    monkeypatch.setattr(hfprune.callback, "allocate",
                        lambda s, scores, config, progress, previous=None: allocate(s, scores, config, progress / 2,
                                                                                    previous))
    trainer = PruningTrainer(model=tiny_model("llama"), args=_args(tmp_path, max_steps=4),
                             pruning_config=PruningConfig(importance="magnitude", target_sparsity=0.5, prune_every=1,
                                                          protected_layers=(0,)),
                             train_dataset=datasets.Dataset.from_list(alpaca_records(16)),
                             processing_class=tiny_tokenizer())
    trainer.train()
    report = trainer.pruning_callback.training_report(trainer)
    assert report.warnings and "short of the target 0.5000" in report.warnings[0]
    out = trainer.save_model()
    assert json.loads((out / "pruning_report.json").read_text())["warnings"] == report.warnings


def test_shortfall_names_reached_and_target():
    config = PruningConfig(target_sparsity=0.4, protected_layers=(0,))
    structure = discover(tiny_model("llama"), protected_layers=(0,))
    message = shortfall(structure, PruningMasks.full(structure), config)
    assert message.startswith("reached sparsity 0.0000 of the prunable parameters is short of the target 0.4000")


# ---- sequences beyond max_position_embeddings ------------------------------------------------------------------


def test_calibration_longer_than_the_positions_is_warned_about(caplog):
    long = {"input_ids": batch(seq_len=160)}  # the tiny models have max_position_embeddings=128
    with caplog.at_level(logging.WARNING, logger="hfprune"):
        prune_model(tiny_model("llama"), PruningConfig(importance="taylor", protected_layers=(0,)), [long])
    assert any("calibration_data[0]: 160 tokens per sequence, more than the model's max_position_embeddings=128"
               in r.getMessage() for r in caplog.records)


def test_training_data_longer_than_the_positions_is_warned_about(tmp_path, caplog):
    records = [{"text": "a long line " * 20} for _ in range(4)]  # 240 characters = tokens
    with caplog.at_level(logging.WARNING, logger="hfprune"):
        PruningTrainer(model=tiny_model("llama"), args=_args(tmp_path), processing_class=tiny_tokenizer(),
                       pruning_config=PruningConfig(importance="magnitude"),
                       train_dataset=datasets.Dataset.from_list(records))
    assert any("train_dataset: its longest sequence has 241 tokens, more than the model's "
               "max_position_embeddings=128" in r.getMessage() and "max_length=128" in r.getMessage()
               for r in caplog.records)


# ---- non-finite loss and weights -------------------------------------------------------------------------------


class PoisonAt(TrainerCallback):
    """At the end of step `step`, a NaN in one LoRA weight: the next forward's loss is NaN, as in a diverged run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(math.nan)


def test_a_nan_loss_stops_pruning_and_the_export_refuses_non_finite_weights(tmp_path):
    trainer = PruningTrainer(model=tiny_model("llama"), args=_args(tmp_path, max_steps=8), processing_class=tiny_tokenizer(),
                             pruning_config=PruningConfig(target_sparsity=0.3, importance="lora", prune_every=1,
                                                          protected_layers=(0,)),
                             train_dataset=datasets.Dataset.from_list(alpaca_records(32)), callbacks=[PoisonAt(2)])
    with pytest.raises(RuntimeError, match=r"step 3: the loss or the gradients were not finite, and the optimizer "
                                           r"step made \d+ trainable tensors NaN / Inf.*pruning stops here"):
        trainer.train()
    with pytest.raises(ValueError, match=r"\d+ of \d+ tensors of the model hold NaN or Inf \(.*lora.*\): the "
                                         r"training diverged.*allow_non_finite=True"):
        trainer.save_model(str(tmp_path / "model"))
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model*"))
    out = trainer.save_model(str(tmp_path / "model"), allow_non_finite=True)
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["export"]["non_finite_tensors"] and "NaN or Inf" in report["warnings"][-1]
    assert "> **Warning:**" in (out / "README.md").read_text()


def test_save_pruned_refuses_a_model_with_nan_weights_before_writing(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"1 of \d+ tensors of the model hold NaN or Inf "
                                         r"\(model.layers.1.mlp.up_proj.weight\)"):
        save_pruned(model, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


# ---- prune_model and a calibration batch that overflows --------------------------------------------------------


def _removal(model):
    from hfprune.removal import attached

    return attached(model).masks.state_dict()


def _nan_loss_batch():
    ids = batch(seed=3)
    return {"input_ids": ids, "labels": torch.full_like(ids, -100)}  # no token to predict: the mean loss is NaN


class InfGradientOnce:
    """A gradient hook that makes the next backward pass's gradient of one weight infinite (loss stays finite)."""

    def __init__(self, model):
        self.armed = False
        model.lm_head.weight.register_hook(self)

    def __call__(self, grad):
        if self.armed:
            self.armed = False
            return grad * math.inf
        return grad


@pytest.mark.parametrize("importance", ["taylor", "activation_taylor"])
def test_one_overflowing_calibration_batch_is_skipped(importance, caplog):
    config = PruningConfig(importance=importance, target_sparsity=0.3, protected_layers=(0,))
    good = {"input_ids": batch(seed=1)}
    reference = prune_model(tiny_model("llama"), config, [good])
    with caplog.at_level(logging.WARNING, logger="hfprune"):
        pruned = prune_model(tiny_model("llama"), config, [_nan_loss_batch(), good])
    assert any("1 of 2 calibration batches skipped (non-finite loss in batch [0])" in r.getMessage()
               for r in caplog.records)
    a, b = _removal(reference), _removal(pruned)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_batch_whose_gradients_overflow_is_skipped_without_poisoning_the_others(caplog):
    config = PruningConfig(importance="taylor", target_sparsity=0.3, protected_layers=(0,))
    good = [{"input_ids": batch(seed=1)}, {"input_ids": batch(seed=2)}]
    reference = prune_model(tiny_model("llama"), config, good)
    model = tiny_model("llama")
    hook = InfGradientOnce(model)

    def batches():
        yield good[0]
        hook.armed = True
        yield {"input_ids": batch(seed=5)}
        yield good[1]

    with caplog.at_level(logging.WARNING, logger="hfprune"):
        prune_model(model, config, batches())
    assert any("(non-finite gradients in batch [1])" in r.getMessage() for r in caplog.records)
    a, b = _removal(reference), _removal(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_usable_calibration_batch_is_an_error_that_fits_prune_model():
    config = PruningConfig(importance="taylor", target_sparsity=0.3, protected_layers=(0,))
    with pytest.raises(ValueError, match=r"prune_model: none of the 2 calibration batches gave finite scores "
                                         r"\(non-finite loss in batches \[0, 1\]\).*bfloat16 or float32") as caught:
        prune_model(tiny_model("llama"), config, [_nan_loss_batch(), _nan_loss_batch()])
    assert "warmup_ratio" not in str(caught.value)


# ---- unclear or late errors: one line naming the value, before any model load ---------------------------------


@pytest.mark.parametrize(
    "calibration, error, message",
    [
        ([batch()], TypeError, r"calibration_data\[0\] is a Tensor of shape \[2, 12\]: each batch is a dict with "
                               r"input_ids"),
        ({"input_ids": batch()}, TypeError, r"calibration_data is one dict: pass a list"),
        ([{"input_ids": batch(vocab_size=500)}], ValueError,
         r"calibration_data\[0\]: token id \d{3} is outside the model's vocabulary \(its embedding has 128 rows, ids "
         r"0 to 127\)"),
        ([{"input_ids": batch()}, {"input_ids": -batch() - 1}], ValueError,
         r"calibration_data\[1\]: token id -\d+ is outside the model's vocabulary"),
        ([{"attention_mask": batch()}], TypeError, r"calibration_data\[0\] has no input_ids tensor \(keys: "
                                                   r"\['attention_mask'\]\)"),
        ([{"input_ids": batch().float()}], TypeError, r"calibration_data\[0\]: input_ids are torch.float32"),
    ],
)
def test_bad_calibration_data_is_refused_before_scoring(calibration, error, message, monkeypatch):
    import hfprune.prune

    monkeypatch.setattr(hfprune.prune, "_score_with_gradients", lambda *a: pytest.fail("scored before the check"))
    with pytest.raises(error, match=message):
        prune_model(tiny_model("llama"), PruningConfig(importance="taylor"), calibration)


def test_a_model_path_that_does_not_exist_is_named(tmp_path, capsys, monkeypatch):
    import hfprune.trainer

    monkeypatch.setattr(hfprune.trainer, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=rf"model='{missing}': no such directory, and not a hub id "
                                                r"\('namespace/name'\)"):
        PruningTrainer(model=str(missing), args=_args(tmp_path))
    code, _, err = _run(capsys, "prune", str(_recipe(tmp_path, missing)))
    assert code == 2 and f"FileNotFoundError: model.name_or_path='{missing}': no such directory" in err
    code, _, err = _run(capsys, "eval", str(missing), "--ppl-source", "wikitext2")
    assert code == 2 and f"FileNotFoundError: MODEL='{missing}': no such directory" in err


def test_pickle_weights_are_refused_by_pruning_trainer(tmp_path, tiny_base, monkeypatch):
    import hfprune.trainer

    hostile = tmp_path / "hostile"
    shutil.copytree(tiny_base, hostile)
    (hostile / "pytorch_model.bin").write_bytes(b"not really a pickle")
    monkeypatch.setattr(hfprune.trainer, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(PickleCheckpointError, match=r"contains pickle files \['pytorch_model.bin'\]: hfprune never "
                                                    "loads pickles"):
        PruningTrainer(model=str(hostile), args=_args(tmp_path))


def test_an_empty_data_file_is_named(tmp_path, tiny_base, capsys, no_model_load):
    path = _recipe(tmp_path, tiny_base)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "none.json").write_text("[]")
    code, _, err = _run(capsys, "prune", str(path), "data.train=empty.jsonl")
    assert code == 2 and f"data file '{tmp_path / 'empty.jsonl'}' is empty: no records" in err
    code, _, err = _run(capsys, "prune", str(path), "data.train=none.json")
    assert code == 2 and f"data file '{tmp_path / 'none.json'}' holds no records" in err


@pytest.mark.parametrize(
    "dataset, message",
    [
        (datasets.Dataset.from_dict({"instruction": [], "output": []}),
         r"train_dataset is empty \(0 records, columns \['instruction', 'output'\]\): give at least one record"),
        (datasets.Dataset.from_list([]), r"train_dataset is empty \(0 records, columns \[\]\)"),
        (datasets.Dataset.from_dict({"question": ["why?"]}),
         r"train_dataset: data set columns \['question'\] match no known format; expected one of: alpaca"),
    ],
)
def test_an_empty_or_unusable_dataset_is_refused_before_the_model_load(tmp_path, tiny_base, monkeypatch, dataset,
                                                                       message):
    import hfprune.trainer

    monkeypatch.setattr(hfprune.trainer, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(ValueError, match=message):
        PruningTrainer(model=str(tiny_base), args=_args(tmp_path), train_dataset=dataset)


def test_a_heterogeneous_hfprune_checkpoint_is_pruned_again_through_the_cli(capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    from hfprune.export import register_auto_classes
    from hfprune.sparsity import count_parameters

    model = prune_model(tiny_model("llama"), PruningConfig(importance="magnitude", target_sparsity=0.3,
                                                           protected_layers=(0,)))
    first = save_pruned(model, tmp_path / "first", tokenizer=tiny_tokenizer(), uniform=False)
    path = _recipe(tmp_path, first, export={"output_dir": str(tmp_path / "second")})
    code, out, err = _run(capsys, "plan", str(path))
    assert code == 0, err
    assert "checkpoint: heterogeneous" in out
    code, _, err = _run(capsys, "prune", str(path))
    assert code == 0, err
    register_auto_classes()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "second")
    report = json.loads((tmp_path / "second" / "pruning_report.json").read_text())
    assert count_parameters(again) == report["parameters"]["after"] < count_parameters(model)
    assert [layer.intermediate_size for layer in discover(again).layers][1] < 96 * 0.7
