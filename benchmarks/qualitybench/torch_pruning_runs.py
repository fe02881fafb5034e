"""The peer: Torch-Pruning 1.6.1, `MetaPruner` + `GroupTaylorImportance`, then the budget's LoRA recovery.

    load (fp32) -> Taylor scores from the calibration batches' gradients -> one-shot MLP pruning
    -> evaluate (after pruning) -> LoRA r on the rest of the stream, as many steps as hfprune recovers -> evaluate

One shot: the run's calibration batches (the same as hfprune's `prune_model` gets). Trained budgets: the
first `pruning_steps` batches of the run's stream are its calibration (the text hfprune's pruning stage
reads and trains on), then the `steps - pruning_steps` batches after them are its recovery (the ones
hfprune's recovery reads): the same text, the same recovery steps and the same number of backward
passes for both. Local ranking, the same protected layers and parameter count as hfprune.

MLP channels only: asked to prune SmolLM2's grouped-query attention heads, Torch-Pruning fails
(`head_pruning_error` records how, in a child process with a time limit); its attention projections
are therefore in `ignored_layers`.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import common
from qualitybench import data
from qualitybench.evaluation import Probe
from qualitybench.runs import Context, RunResult, finish, training_args
from qualitybench.specs import Budget, RunSpec

HEAD_PROBE_TIMEOUT_S = 90


def _mlp_channel_ratio(model, sparsity: float) -> float:
    """The fraction of MLP channels whose removal takes `sparsity` of the prunable parameters."""
    from hfprune.structure import discover

    layer = discover(model).prunable_layers[0]
    return sparsity * (layer.attention_params + layer.mlp_params) / layer.mlp_params


def prune_one_shot(model, sparsity: float, calibration: list[dict]) -> None:
    """Torch-Pruning's Taylor one shot on the MLP channels of the prunable layers, from `calibration`."""
    import torch_pruning as tp

    from hfprune.structure import default_protected_layers

    protected = set(default_protected_layers(len(model.model.layers)))
    ignored = [model.lm_head]
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        # Attention is left alone (it cannot prune GQA heads); ignoring down_proj keeps it from
        # building the huge residual-stream group, which it would not prune anyway (o_proj is ignored).
        ignored += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp.down_proj]
        if index in protected:
            ignored.append(layer.mlp)
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=calibration[0]["input_ids"][:1], importance=tp.importance.GroupTaylorImportance(),
        pruning_ratio=_mlp_channel_ratio(model, sparsity), ignored_layers=ignored, global_pruning=False,
        output_transform=lambda out: out.logits,
    )
    model.eval()
    model.zero_grad()
    for batch in calibration:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        inputs.setdefault("labels", inputs["input_ids"])
        model(**inputs).loss.backward()
    pruner.step()
    model.zero_grad(set_to_none=True)


def run(ctx: Context, spec: RunSpec, budget: Budget, workdir: Path) -> RunResult:
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    from hfprune.sparsity import count_parameters
    from hfprune.structure import discover

    result = RunResult.start(spec, base="fp32", data=f"calibration {spec.calibration} (C4)" if budget.one_shot
                             else budget.data)
    start = time.perf_counter()
    model = common.load_causal_lm(ctx.path)
    dense_params, prunable = count_parameters(model), discover(model).prunable_params()
    if budget.one_shot:
        stream = None
        calibration = data.calibration_batches(ctx.tokenizer, ctx.texts, spec.calibration, spec.seed)
    else:
        stream = data.training_stream(ctx.tokenizer, ctx.texts, budget.data, budget, spec.seed)
        calibration = data.first_batches(stream, ctx.tokenizer, budget.pruning_steps, budget.batch_size)
    clock = time.perf_counter()
    prune_one_shot(model, spec.sparsity, calibration)
    result.pruning_seconds = time.perf_counter() - clock
    result.reached = (dense_params - count_parameters(model)) / prunable
    if budget.one_shot:
        result.evaluated = "in memory"
        finish(ctx, spec, result, model, start)
        result.after_pruning = result.after_recovery
        return result

    result.after_pruning = ctx.perplexities(model.eval())
    result.curve.append({"step": budget.pruning_steps, "sparsity": result.reached, **result.after_pruning})
    set_seed(spec.seed)  # the same adapters as every hfprune run
    model = get_peft_model(model, common.lora_config(ctx.lora_r))
    probe = Probe(ctx.perplexities, budget.eval_every)
    recovery = dataclasses.replace(budget, steps=budget.steps - budget.pruning_steps)
    calibrated = budget.pruning_steps * budget.batch_size
    trainer = Trainer(
        model=model, args=training_args(recovery, spec.seed, workdir / "trainer"),
        train_dataset=stream.select(range(calibrated, len(stream))),
        data_collator=DataCollatorForSeq2Seq(ctx.tokenizer, padding=True, label_pad_token_id=-100), callbacks=[probe],
    )
    clock = time.perf_counter()
    trainer.train()
    result.train_seconds = time.perf_counter() - clock - probe.eval_seconds
    result.step_seconds, result.eval_seconds = probe.step_seconds, result.after_pruning["seconds"] + probe.eval_seconds
    # on hfprune's step axis: recovery starts after the calibration batches
    result.curve += [dict(point, step=point["step"] + budget.pruning_steps, sparsity=result.reached)
                     for point in probe.curve]
    result.evaluated = "in memory (fp32 base + LoRA)"
    finish(ctx, spec, result, model, start)
    result.curve.append({"step": budget.steps, "sparsity": result.reached, **result.after_recovery})
    return result


# ---------------------------------------------------------------- attention heads: recorded, not used


def head_probe(path: str) -> str:
    """Child process: ask Torch-Pruning for GQA head pruning, the way its LLM example does."""
    import torch
    import torch_pruning as tp

    model = common.load_causal_lm(path).eval()
    num_heads = {}
    # Only heads: the MLPs and the residual stream (o_proj / down_proj outputs) are left alone.
    ignored = [model.lm_head]
    for layer in model.model.layers:
        attn = layer.self_attn
        num_heads[attn.q_proj] = model.config.num_attention_heads
        num_heads[attn.k_proj] = model.config.num_key_value_heads
        num_heads[attn.v_proj] = model.config.num_key_value_heads
        ignored += [attn.o_proj, layer.mlp]
    example = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    try:
        pruner = tp.pruner.MetaPruner(
            model, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.0, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True,
            prune_head_dims=False, head_pruning_ratio=1 / 3, output_transform=lambda out: out.logits,
        )
        pruner.step()
        with torch.no_grad():
            model(example)
    except Exception as error:  # noqa: BLE001 - the error is the result
        return f"raises {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return "no error"


def head_pruning_error(script: str, path: str, timeout: int = HEAD_PROBE_TIMEOUT_S) -> str:
    """What Torch-Pruning does when asked to prune the model's heads: `script --tp-head-probe path`, a child."""
    env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
    try:
        done = subprocess.run([sys.executable, script, "--tp-head-probe", path], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return (f"did not finish building its dependency groups within {timeout} s "
                "(`DependencyGraph.get_all_groups`, 2 CPU cores)")
    lines = done.stdout.strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines else f"child failed: {done.stderr.strip()[-300:]}"
