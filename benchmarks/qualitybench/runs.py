"""hfprune's runs (and the dense reference): one shot with `prune_model`, or progressive with `PruningTrainer`.

    one shot     load -> prune_model(calibration batches) -> evaluate
    progressive  load -> PruningTrainer(budget's stream, steps, LoRA r) .train() -> export (8-bit base) -> evaluate

The context (`Context`) is what every run shares: the model, the tokenizer, the texts, the evaluation.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import common
from qualitybench import data
from qualitybench.evaluation import EvalSettings, Probe, perplexities, zero_shot
from qualitybench.specs import (
    Budget, RunSpec, base_of, data_order, distillation_config, pruning_config, split_method, structures_label,
    wants_zero_shot,
)


@dataclass
class Context:
    path: str  # the dense checkpoint
    tokenizer: object
    texts: data.Texts
    evaluation: EvalSettings
    workdir: Path
    lora_r: int = 8
    zero_shot: dict = field(default_factory=dict)  # {budget: methods or None (all)} whose final models get it

    def perplexities(self, model) -> dict:
        held_out = {"wiki": self.texts.wiki, "c4": self.texts.c4_eval}
        return perplexities(model, self.tokenizer, held_out, self.evaluation)


@dataclass
class RunResult:
    key: str
    budget: str
    method: str
    sparsity: float
    structures: str
    own_structures: bool = True
    seed: int = 0
    calibration: str = ""
    base: str = "fp32"
    data: str = ""
    config: dict = field(default_factory=dict)  # the resolved PruningConfig
    params: int = 0
    reached: float = 0.0
    widths: str = ""
    after_pruning: dict = field(default_factory=dict)
    after_recovery: dict = field(default_factory=dict)  # one shot: the same as after_pruning
    curve: list = field(default_factory=list)  # [{step, sparsity, wiki, c4, ...}]
    zero_shot: dict = field(default_factory=dict)
    step_seconds: list = field(default_factory=list)
    pruning_seconds: float = 0.0  # the pruning stage: prune_model, or the steps of the progressive stage
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    total_seconds: float = 0.0
    evaluated: str = ""
    note: str = ""

    @classmethod
    def start(cls, spec: RunSpec, **values) -> "RunResult":
        return cls(key=spec.key, budget=spec.budget, method=spec.method, sparsity=spec.sparsity,
                   structures=structures_label(spec.structures), own_structures=spec.own_structures, seed=spec.seed,
                   calibration=spec.calibration, **values)


def widths_summary(model) -> str:
    from hfprune.structure import discover

    layers = discover(model, protected_layers=()).layers
    kv = [layer.num_kv_heads for layer in layers]
    mlp = [layer.intermediate_size for layer in layers]
    return f"KV heads {min(kv)}-{max(kv)}, MLP {min(mlp)}-{max(mlp)}"


def finish(ctx: Context, spec: RunSpec, result: RunResult, model, start: float) -> RunResult:
    """The final model's numbers: perplexity (and zero-shot where the budget asks for it), times."""
    from hfprune.sparsity import count_parameters

    result.params = count_parameters(model)
    result.widths = widths_summary(model)
    model.eval()
    result.after_recovery = ctx.perplexities(model)
    result.eval_seconds += result.after_recovery["seconds"]
    if wants_zero_shot(ctx.zero_shot, spec):
        result.zero_shot = zero_shot(model, ctx.tokenizer, ctx.evaluation)
        result.eval_seconds += result.zero_shot["seconds"]
    result.total_seconds = time.perf_counter() - start
    return result


def run_dense(ctx: Context, spec: RunSpec) -> RunResult:
    start = time.perf_counter()
    result = RunResult.start(spec, base="fp32", data="-")
    return finish(ctx, spec, result, common.load_causal_lm(ctx.path), start)


def training_args(budget: Budget, seed: int, output_dir: Path):
    """Every trained run of a budget alike; the data order is the stream's, read sequentially."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), max_steps=budget.steps, per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rate, warmup_steps=budget.warmup_steps, lr_scheduler_type="linear",
        train_sampling_strategy="sequential", logging_steps=10_000, report_to=[], save_strategy="no", use_cpu=True,
        seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )


def run_one_shot(ctx: Context, spec: RunSpec, method: dict, budget: Budget) -> RunResult:
    """`prune_model` from the run's calibration batches; no recovery."""
    from peft import get_peft_model
    from transformers import set_seed

    from hfprune import prune_model
    from hfprune.importance import make_criterion
    from hfprune.sparsity import count_parameters
    from hfprune.structure import discover_for_config

    config = pruning_config(spec, method, budget)
    _, options = split_method(spec.method, method)
    base = base_of(config, options)
    result = RunResult.start(spec, base=base, data=f"calibration {spec.calibration} (C4)", config=config.to_dict())
    start = time.perf_counter()
    model = common.load_causal_lm(ctx.path, eight_bit=base == "8bit")
    calibration = data.calibration_batches(ctx.tokenizer, ctx.texts, spec.calibration, spec.seed)
    if make_criterion(config).needs == "lora_gradients":
        set_seed(spec.seed)  # LoRAPrune scores through fresh adapters (B = 0: the model is unchanged)
        model = get_peft_model(model, common.lora_config(ctx.lora_r))
    prunable, total = discover_for_config(model, config).prunable_params(), count_parameters(model)
    clock = time.perf_counter()
    prune_model(model, config, calibration)
    result.pruning_seconds = time.perf_counter() - clock
    result.reached = (total - count_parameters(model)) / prunable
    result.evaluated = "in memory"
    finish(ctx, spec, result, model, start)
    result.after_pruning = result.after_recovery
    return result


def run_progressive(ctx: Context, spec: RunSpec, method: dict, budget: Budget, workdir: Path) -> RunResult:
    """`PruningTrainer` for the budget's steps: progressive pruning stage, then recovery, LoRA all along."""
    from transformers import AutoModelForCausalLM, set_seed

    from hfprune import PruningTrainer

    config = pruning_config(spec, method, budget)
    _, options = split_method(spec.method, method)
    base, order = base_of(config, options), data_order(options, budget)
    result = RunResult.start(spec, base=base, data=order, config=config.to_dict())
    start = time.perf_counter()
    stream = data.training_stream(ctx.tokenizer, ctx.texts, order, budget, spec.seed)
    model = common.load_causal_lm(ctx.path, eight_bit=base == "8bit")
    probe = Probe(ctx.perplexities, budget.eval_every)
    # The adapters are initialised before the Trainer seeds anything: every run starts from the same ones.
    set_seed(spec.seed)
    trainer = PruningTrainer(
        model=model, args=training_args(budget, spec.seed, workdir / "trainer"), pruning_config=config,
        peft_config=common.lora_config(ctx.lora_r), train_dataset=stream, processing_class=ctx.tokenizer,
        max_length=budget.seq_len, callbacks=[probe], distillation=distillation_config(options),
    )
    probe.pruning_callback = trainer.pruning_callback
    trainer.train()
    result.step_seconds = probe.step_seconds
    result.pruning_seconds = sum(probe.step_seconds[: config.pruning_steps])
    result.train_seconds = time.perf_counter() - start - probe.eval_seconds
    result.after_pruning, result.curve, result.eval_seconds = probe.after_pruning, probe.curve, probe.eval_seconds
    result.reached = trainer.pruning_callback.sparsity().sparsity
    final = trainer.model
    result.evaluated = f"in memory ({base} base + LoRA)"
    if base == "8bit":
        # What a user ships: LoRA merged into the full-precision weights of the original checkpoint.
        export = workdir / "export"
        try:
            trainer.save_model(str(export))
            del trainer, model, final
            gc.collect()
            final = AutoModelForCausalLM.from_pretrained(str(export), dtype="float32")
            result.evaluated = "exported checkpoint (LoRA merged, fp32)"
        except Exception as error:  # noqa: BLE001 - report the in-memory model rather than nothing
            result.note = f"export failed ({type(error).__name__}: {error}); evaluated in memory"
            final = trainer.model
    finish(ctx, spec, result, final, start)
    result.curve.append({"step": budget.steps, "sparsity": result.reached, **result.after_recovery})
    return result
