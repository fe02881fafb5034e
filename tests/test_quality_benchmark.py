"""The quality benchmark's own logic, without running a model: run specs, the text each run reads, the
targets' arithmetic and the README rewrite. (`test_benchmarks.py` runs the whole script in --smoke mode.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
from qualitybench import report  # noqa: E402
from qualitybench.runs import RunResult  # noqa: E402
from qualitybench.specs import (  # noqa: E402
    OWN, PEER, Budget, RunSpec, base_of, expand_plan, fingerprint, parse_calibration, pruning_config, split_method,
)

from hfprune import PruningConfig  # noqa: E402

METHODS = {"default": {}, "act": {"importance": "activation_taylor"},
           "taylor-kd": {"importance": "taylor", "distillation": {}, "data": "mix"},
           "mlp": {"importance": "activation_taylor", "structures": ["channels"]}}
BUDGETS = {"oneshot": Budget(), "b16": Budget(steps=16, pruning_steps=8, prune_every=2)}


def test_default_is_the_packages_pruning_config_at_the_runs_point():
    spec = RunSpec("b16", "default", 0.5, ("heads", "channels"), seed=3)
    config = pruning_config(spec, METHODS["default"], BUDGETS["b16"])
    expected = PruningConfig(target_sparsity=0.5, structures=["heads", "channels"], seed=3, pruning_steps=8,
                             prune_every=2)
    assert config.to_dict() == expected.to_dict()
    # The fingerprint holds the resolved config: a change of the package's defaults changes it.
    stored = fingerprint(spec, METHODS["default"], BUDGETS["b16"], {})["config"]  # JSON types
    assert stored == {**expected.to_dict(), "structures": ["heads", "channels"]}


def test_run_options_are_split_from_the_config_and_bad_keys_are_refused():
    overrides, options = split_method("taylor-kd", METHODS["taylor-kd"])
    assert overrides == {"importance": "taylor"} and options == {"distillation": {}, "data": "mix"}
    with pytest.raises(ValueError, match="unknown keys \\['importanse'\\].*importance"):
        split_method("typo", {"importanse": "taylor"})
    with pytest.raises(ValueError, match="set by the plan"):
        split_method("fixed", {"target_sparsity": 0.5})
    with pytest.raises(ValueError, match="base='int4'"):
        split_method("base", {"base": "int4"})


def test_auto_base_is_fp32_exactly_for_full_weight_gradients():
    point = RunSpec("oneshot", "x", 0.2, ("channels",))
    assert base_of(pruning_config(point, {"importance": "taylor"}, Budget()), {}) == "fp32"
    assert base_of(pruning_config(point, {"importance": "activation_taylor"}, Budget()), {}) == "8bit"
    assert base_of(pruning_config(point, {"importance": "taylor"}, Budget()), {"base": "8bit"}) == "8bit"


def test_plan_expands_once_per_run_and_the_peer_prunes_mlp_channels_only():
    plan = {"oneshot": dict(methods=("mlp", "act", PEER), sparsities=(0.2, 0.5), structures=(("channels",), OWN),
                            calibrations=("10x64", "64x256"), seeds=(0, 1))}
    runs = expand_plan(plan, METHODS, BUDGETS)
    keys = [run.key for run in runs]
    assert len(keys) == len(set(keys))
    # mlp's own structures are channels: the explicit entry and OWN are one run, marked as its own
    mlp = [run for run in runs if run.method == "mlp"]
    assert len(mlp) == 2 * 2 * 2 and all(run.own_structures and run.structures == ("channels",) for run in mlp)
    act = {run.structures for run in runs if run.method == "act"}
    assert act == {("channels",), tuple(PruningConfig().structures)}
    assert {run.structures for run in runs if run.method == PEER} == {("channels",)}
    assert "oneshot.act.0.2.channels.64x256.seed1" in keys
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        expand_plan({"b16": dict(methods=("nope",), sparsities=(0.2,))}, METHODS, BUDGETS)
    with pytest.raises(ValueError, match="calibration '10-64'"):
        expand_plan({"oneshot": dict(methods=("act",), sparsities=(0.2,), calibrations=("10-64",))}, METHODS, BUDGETS)


def test_calibration_sizes_and_budgets_are_checked():
    assert parse_calibration("64x256") == (64, 256)
    with pytest.raises(ValueError, match="pruning_steps=20"):
        Budget(steps=16, pruning_steps=20)
    with pytest.raises(ValueError, match="data='c4'"):
        Budget(steps=16, pruning_steps=8, data="c4")


def test_streams_are_the_same_for_every_method_and_calibration_batches_have_the_asked_shape():
    from qualitybench import data

    from .tiny_models import alpaca_records, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    c4 = [f"document {i} " + "text " * 20 for i in range(12)]
    texts = data.Texts(wiki=["w"], c4_eval=["held out"], c4_train=c4, alpaca=alpaca_records(12))
    budget = Budget(steps=6, batch_size=2, seq_len=32, pruning_steps=2)
    first = data.training_stream(tokenizer, texts, "c4-first", budget, seed=0)
    assert first["input_ids"] == data.training_stream(tokenizer, texts, "c4-first", budget, seed=0)["input_ids"]
    assert first["input_ids"] != data.training_stream(tokenizer, texts, "c4-first", budget, seed=1)["input_ids"]
    # c4-first: the pruning stage's 2 x 2 records are C4 documents (every token is a target)
    assert all(-100 not in labels[1:] for labels in first["labels"][:4])
    phases = data.training_stream(tokenizer, texts, "phases", budget, seed=0)
    n_c4 = sum(all(label != -100 for label in labels[1:]) for labels in phases["labels"])
    assert all(-100 not in labels[1:] for labels in phases["labels"][:n_c4])  # all of C4, then the instructions
    batches = data.first_batches(first, tokenizer, 2, 2)
    assert [b["input_ids"].tolist() for b in batches] == [
        [first[i]["input_ids"] + [tokenizer.pad_token_id] * (b["input_ids"].shape[1] - len(first[i]["input_ids"]))
         for i in range(j * 2, j * 2 + 2)] for j, b in enumerate(batches)]
    calibration = data.calibration_batches(tokenizer, texts, "10x16", seed=0)
    assert [tuple(b["input_ids"].shape) for b in calibration] == [(10, 16)]
    assert [tuple(b["input_ids"].shape) for b in data.calibration_batches(tokenizer, texts, "64x256", 0)] == \
        [(8, 256)] * 8


def _run(method, budget, sparsity, wiki, c4, structures="channels", seconds=10.0, calibration="", own=True):
    return RunResult(key=f"{budget}.{method}.{sparsity}.{structures}.{calibration}", budget=budget, method=method,
                     sparsity=sparsity, structures=structures, own_structures=own, calibration=calibration,
                     after_recovery={"wiki": wiki, "c4": c4}, pruning_seconds=seconds)


TARGETS = {"one_shot": dict(budget="oneshot", method="default", sparsity=0.2, structures="channels", max_x_dense=1.35,
                            ahead_of_peer=0.15),
           "beats_peer": dict(method="default", margin=0.10),
           "allocation": dict(nonuniform="global", local="local", sparsity=0.5, margin=0.05),
           "compensation": {"with": "ls", "without": "local", "max_overhead": 0.15}}


def test_targets_are_checked_on_both_held_out_sets_with_their_margins():
    runs = [
        _run("dense", "dense", 0.0, 30.0, 40.0, structures="-"),
        _run("default", "oneshot", 0.2, 40.0, 50.0, calibration="10x64"),  # 1.33x / 1.25x dense
        _run(PEER, "oneshot", 0.2, 48.0, 60.0, calibration="10x64"),  # default 16.7% ahead on both
        _run("default", "b16", 0.5, 90.0, 100.0, structures="heads+channels"),  # what a user gets: compared
        _run("default", "b16", 0.5, 10.0, 10.0, own=False),  # the plan's explicit variant: not compared
        _run(PEER, "b16", 0.5, 95.0, 200.0),  # wiki only 5% better: missed
        _run("local", "b16", 0.5, 100.0, 100.0, seconds=20.0),
        _run("global", "b16", 0.5, 94.0, 95.0),  # 6% / 5% better: met
        _run("ls", "b16", 0.5, 90.0, 90.0, seconds=23.5),  # +17.5%: missed
    ]
    rows = {target: (measured, result) for target, measured, result in
            report.target_rows({r.key: r for r in runs}, TARGETS, ["oneshot", "b16"])}
    assert rows["one shot 20% channels: default <= 1.35x dense"] == ("10x64: wiki 1.33x, C4 1.25x", "met")
    assert rows["one shot 20% channels: default >= 15% ahead of Torch-Pruning's one shot"][1] == "met"
    assert rows["oneshot: default beats Torch-Pruning by >= 10% at every sparsity"][1] == "met"
    measured, result = rows["b16: default beats Torch-Pruning by >= 10% at every sparsity"]
    assert result == "**missed**" and measured.startswith("50% heads+channels: wiki 90.00 vs 95.00 (-5.3%)")
    assert rows["global beats local by >= 5% at 50%"][1] == "met"
    assert rows["compensation (ls vs local) adds <= 15% to the pruning stage's wall time"] == (
        "b16 50% channels: 20.0 s -> 23.5 s (+17.5%)", "**missed**")
    empty = report.target_rows({}, TARGETS, ["b16"])
    assert all(result == "n/a" for _, _, result in empty)


def test_readme_section_is_replaced_between_its_markers_only():
    text = f"# hfprune\n\nintro\n\n{report.README_BEGIN}\nold numbers\n{report.README_END}\n\n## Next\n"
    new = report.replace_between_markers(text, "new numbers\n")
    assert new == f"# hfprune\n\nintro\n\n{report.README_BEGIN}\n\nnew numbers\n\n{report.README_END}\n\n## Next\n"
    assert report.replace_between_markers(new, "new numbers") == new
    with pytest.raises(ValueError, match="marker lines"):
        report.replace_between_markers("# no markers\n", "x")


@pytest.mark.parametrize("pause", [True, False])
def test_in_loop_evaluation_changes_nothing_the_run_prunes_or_learns(tmp_path, monkeypatch, pause):
    """Perplexity measured every step (forward passes on held-out text) must not reach the scores, the
    compensation statistics or the training: the run prunes and learns exactly what it does without it.
    With the scoring hooks left on (pause=False) the held-out text does reach the scores: the check can fail."""
    import torch

    from hfprune import PruningTrainer
    from qualitybench import data, evaluation
    from qualitybench.runs import training_args

    from .tiny_models import alpaca_records, tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    texts = data.Texts(wiki=["w"], c4_eval=["held out"], c4_train=[f"doc {i} " + "abc " * 9 for i in range(16)],
                       alpaca=alpaca_records(16))
    budget = Budget(steps=6, batch_size=2, seq_len=24, pruning_steps=5)
    held_out = ["zzzz qqqq " * 30]  # text unlike the training text: its statistics would move the scores
    config = PruningConfig(target_sparsity=0.5, importance="flap", structures=["channels"], prune_every=1,
                           pruning_steps=5, compensation="least_squares", protected_layers=[0])

    def train(probe):
        torch.manual_seed(0)
        model = tiny_model("llama")
        trainer = PruningTrainer(model=model, args=training_args(budget, 0, tmp_path / f"run{probe is None}"),
                                 pruning_config=config, peft_config=common.lora_config(4),
                                 train_dataset=data.training_stream(tokenizer, texts, "c4-first", budget, 0),
                                 processing_class=tokenizer, max_length=24, callbacks=[probe] if probe else [])
        if probe is not None:
            probe.pruning_callback = trainer.pruning_callback
        trainer.train()
        with torch.no_grad():
            logits = trainer.model.eval()(torch.arange(3, 20)[None]).logits
        return trainer.pruning_callback.removal_masks.state_dict(), logits

    def measure(model):
        from hfprune.evaluation import perplexity

        return {"wiki": perplexity(model, tokenizer, held_out, seq_len=24).ppl, "seconds": 0.0}

    if not pause:
        monkeypatch.setattr(evaluation.Probe, "_switches", lambda self: [])
    probe = evaluation.Probe(measure, every=1)
    masks, logits = train(probe)
    plain_masks, plain_logits = train(None)
    assert len(probe.curve) == 5 and probe.after_pruning
    same = all(torch.equal(masks[k], plain_masks[k]) for k in plain_masks) and torch.equal(logits, plain_logits)
    assert same == pause
