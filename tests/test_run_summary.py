"""The run explains itself: the start-of-training summary and the warning of a schedule that is in effect one shot,
asserted on the Trainer's log."""

from __future__ import annotations

import logging

import datasets
import pytest
from transformers import TrainingArguments

from hfprune import PruningCallback, PruningConfig, PruningTrainer
from hfprune.schedule import MIN_RAMP_UPDATES, PruningSchedule

from .tiny_models import alpaca_records, save_tiny, tiny_model, tiny_tokenizer


@pytest.fixture
def trainer_log():
    """What reaches the Trainer's logger (transformers' loggers do not propagate to the root one)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    logger = logging.getLogger("transformers.trainer")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), max_steps=20, per_device_train_batch_size=2, learning_rate=2e-3,
                  report_to=[], save_strategy="no", use_cpu=True, seed=0, log_level="info", logging_steps=5)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _messages(records, level):
    return [r.getMessage() for r in records if r.levelno == level and "hfprune" in r.getMessage()]


# ---- the schedule's own verdict -----------------------------------------------------------------------------


def test_a_short_pruning_stage_with_the_default_prune_every_is_one_jump():
    schedule = PruningSchedule(total_steps=10, prune_every=10)  # max_steps=20, pruning_fraction=0.5
    assert schedule.update_steps() == [1, 9] and schedule.removing_updates() == [9]
    warning = schedule.coarse_ramp()
    assert warning.startswith("schedule='cubic' over a 10-step pruning stage with prune_every=10 updates the masks "
                              "at steps 1 (0.0%), 9 (100.0%) only: the target is removed in one jump")
    fix = schedule.prune_every_for()
    assert fix == 3 and f"prune_every={fix} removes it in 3 updates, at steps 4 (75.6%), 7 (98.4%), 9 (100.0%)" in warning
    fixed = PruningSchedule(total_steps=10, prune_every=fix)
    assert len(fixed.removing_updates()) >= MIN_RAMP_UPDATES and fixed.coarse_ramp() is None


def test_ramps_with_their_steps_and_one_shot_on_purpose_are_not_warned_about():
    assert PruningSchedule(total_steps=100).coarse_ramp() is None  # LoRAPrune's setting: 8 updates
    assert PruningSchedule(total_steps=10, schedule="one_shot").coarse_ramp() is None
    two = PruningSchedule(total_steps=10, schedule="linear", prune_every=4)  # 50% then 100%: two jumps
    assert "removed in 2 jumps" in two.coarse_ramp()
    tiny = PruningSchedule(total_steps=3)  # no prune_every helps: only a longer stage does
    assert tiny.prune_every_for() is None
    assert "removed in one jump" in tiny.coarse_ramp() and "lengthen the pruning stage" in tiny.coarse_ramp()


# ---- on the Trainer's log -----------------------------------------------------------------------------------


def test_the_run_logs_its_summary_and_warns_of_a_one_shot_jump(tmp_path, trainer_log):
    save_tiny("llama", tmp_path / "base")
    trainer = PruningTrainer(
        model=str(tmp_path / "base"), args=_args(tmp_path),  # 8-bit base, default LoRA, 20 steps
        pruning_config=PruningConfig(target_sparsity=0.3, importance="lora", head_granularity="kv_group",
                                     protected_layers=[0]),
        train_dataset=datasets.Dataset.from_list(alpaca_records(16)), processing_class=tiny_tokenizer(),
    )
    trainer.train()
    (summary,) = [m for m in _messages(trainer_log, logging.INFO) if m.startswith("hfprune: pruning run")]
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in summary.splitlines()[1:]}
    assert lines["base"] == f"{tmp_path / 'base'}, 8-bit (bitsandbytes int8), other weights float32, on cpu"
    assert lines["LoRA"].startswith("rank 8, alpha 16 on 28 modules "
                                    "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj); ")
    assert lines["criterion"] == "lora (reads LoRA gradients); scores: EMA 0.9, per-module L2 normalisation, layer by layer"
    ridge = PruningConfig().compensation_ridge
    assert lines["compensation"] == ("least_squares: removed heads / channels predicted from the kept ones, folded "
                                     f"into o_proj / down_proj when sliced (ridge {ridge:g}) (compensation='auto')")  # the default, as the run resolved it
    assert lines["target"].startswith("30% of the ") and "(heads + channels, kv_group, ranking local)" in lines["target"]
    assert lines["protected"] == "layers 0"
    assert lines["steps"] == "20 optimizer steps: pruning 1-10, recovery 11-20"
    assert lines["mask updates"] == "2, at steps 1 (0.0%), 9 (100.0%)"
    assert lines["removal"] == "weights sliced after step 10; recovery trains the smaller model"
    (warning,) = _messages(trainer_log, logging.WARNING)
    assert "removed in one jump, as one_shot would" in warning and "prune_every=3" in warning


def test_a_ramp_with_its_steps_is_summarised_without_a_warning(tmp_path, trainer_log):
    from peft import LoraConfig

    config = PruningConfig(target_sparsity=0.3, prune_every=2, protected_layers=[0, 3], compensation="least_squares",
                           importance="activation_taylor", physical_removal="at_end")
    trainer = PruningTrainer(
        model=tiny_model("qwen2"), args=_args(tmp_path, max_steps=16), pruning_config=config,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        train_dataset=datasets.Dataset.from_list(alpaca_records(16)), processing_class=tiny_tokenizer(),
    )
    trainer.train()
    (summary,) = [m for m in _messages(trainer_log, logging.INFO) if m.startswith("hfprune: pruning run")]
    assert ", float32, on cpu" in summary.splitlines()[1]
    assert "rank 4, alpha 8 on 8 modules (q_proj, v_proj)" in summary
    assert "activation_taylor (activation gradients, no weight gradient)" in summary
    assert ("compensation:  least_squares: removed heads / channels predicted from the kept ones, folded into "
            f"o_proj / down_proj when sliced (ridge {config.compensation_ridge:g})\n") in summary and "protected:     layers 0, 3" in summary
    assert "mask updates:  4, at steps 1 (0.0%), 3 (70.4%), 5 (96.3%), 7 (100.0%)" in summary
    assert "weights sliced after step 16, the end of training (physical_removal='at_end')" in summary
    assert not _messages(trainer_log, logging.WARNING)


def test_the_callback_explains_itself_inside_any_trainer(tmp_path, trainer_log):
    trl = pytest.importorskip("trl")
    from peft import LoraConfig

    texts = [{"text": r["instruction"] + " " + r["output"]} for r in alpaca_records(16)]
    callback = PruningCallback(PruningConfig(target_sparsity=0.3, prune_every=1, protected_layers=(0,)))
    trainer = trl.SFTTrainer(
        model=tiny_model("llama"), train_dataset=datasets.Dataset.from_list(texts), processing_class=tiny_tokenizer(),
        args=trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, per_device_train_batch_size=2,
                           report_to=[], save_strategy="no", use_cpu=True, max_length=64, log_level="info"),
        peft_config=LoraConfig(r=4, target_modules="all-linear"), callbacks=[callback],
    )
    trainer.train()
    (summary,) = [m for m in _messages(trainer_log, logging.INFO) if m.startswith("hfprune: pruning run")]
    assert "steps:         4 optimizer steps: pruning 1-2, recovery 3-4" in summary
    assert "on 28 modules" in summary  # all-linear: the seven projections of the four layers


def test_hfprune_plan_prints_the_same_warning_before_any_run(capsys):
    from hfprune.cli import main

    assert main(["plan", "smollm2-135m", "--steps", "20", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "2 mask updates at step (share of the target): 1 (0.0%), 9 (100.0%)" in out
    assert "WARNING: schedule='cubic' over a 10-step pruning stage" in out and "prune_every=3" in out
    assert main(["plan", "smollm2-135m", "--steps", "200", "--no-memory"]) == 0
    assert "WARNING" not in capsys.readouterr().out
