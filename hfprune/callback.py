"""`PruningCallback`: the pruning engine inside any `transformers.Trainer`.

One optimizer step, as the stock training loop runs it:

    forward/backward (xN accumulation)  ->  clip  ->  on_pre_optimizer_step
        score every prunable layer from the gradients the optimizer is about to
        use, fold into the EMA                                (importance/)
    optimizer.step()  ->  on_step_end
        on a schedule step: progress -> allocate -> new masks (schedule, allocation, masking)
        at the end of the pruning stage: slice the weights, transplant the
        optimizer state, carry on training the smaller model   (surgery)

Everything it owns (EMA scores, masks, the schedule position, whether and how
the weights were sliced) is written beside every Trainer checkpoint as
`pruning_state.safetensors` and read back on `resume_from_checkpoint`.

After training, `save_pruned(trainer, output_dir)` writes the pruned checkpoint (the
same one `PruningTrainer.save_model` writes). A plain `trainer.save_model()` /
`model.save_pretrained()` of the sliced model would write weights that no config
describes (and a PeftModel's adapter for the unpruned base): once the weights are
sliced and training has ended, the model's `save_pretrained` refuses, naming
`save_pruned`. The refusal is an attribute on the model instance, removed when
training starts again (checkpoints during training keep the Trainer's format).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from . import distributed
from .allocation import allocate, check_feasible, shortfall
from .atomic import check_export_dir, save_safetensors_atomic
from .bnb_logging import quiet_int8_cast_warning
from .checkpoints import STATE_FILE, last_complete_checkpoint
from .config import PruningConfig
from .compensator import make_compensator, prepare_or_drop
from .importance import make_accumulator, make_training_criterion, score_model
from .masking import MaskHooks, PruningMasks
from .quantization import check_quantized_base
from .removal import record_removal
from .report import REPORT_FILE, PruningReport
from .schedule import PruningSchedule
from .sparsity import SparsityReport, count_parameters, removed_params
from .structure import ModelStructure, discover_for_config, unwrap_model
from .summary import log_run_summary
from .surgery import remove_pruned_groups, slice_optimizer_state

logger = logging.getLogger(__name__)

EXPORT_SUBDIR = "pruned"  # the pruned checkpoint goes to <args.output_dir>/pruned by default


class PlainSaveRefused:
    """Stands in for `save_pretrained` on a model whose weights PruningCallback sliced (see the module docstring)."""

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            "this model was pruned by PruningCallback: its weights are sliced, but its config (and a PeftModel's "
            "adapter_config) still describe the unpruned base, so save_pretrained / Trainer.save_model() would "
            "write a checkpoint that nothing can load. Write the pruned checkpoint (LoRA merged, tokenizer, "
            "pruning_report.json, model card) with `callback.save_pruned(trainer, output_dir)`; PruningTrainer "
            "users call `trainer.save_model(output_dir)`"
        )


class PruningCallback(TrainerCallback):
    """Progressive structured pruning driven by the stock Trainer loop.

    Usable with any Trainer (trl's `SFTTrainer` included):
    `SFTTrainer(..., callbacks=[PruningCallback(PruningConfig(...))])`.
    The model must already carry LoRA adapters for `importance="lora"`.
    """

    def __init__(self, config: PruningConfig):
        self.config = config
        # Unknown names, and criteria a training step cannot feed (bonsai), fail here, before training.
        self.criterion = make_training_criterion(config)
        self.criterion.loss_shares = True  # a step's micro-batches backpropagate loss / gradient_accumulation_steps
        self.accumulator = make_accumulator(config, self.criterion)
        self.compensator = make_compensator(config)  # None unless config.compensation asks for it
        self.compensation_note: Optional[str] = None  # why compensation="auto" runs without it, when it does
        self.structure: Optional[ModelStructure] = None
        self.masks: Optional[PruningMasks] = None
        self.removal_masks: Optional[PruningMasks] = None  # masks applied physically, in original index space
        self.schedule: Optional[PruningSchedule] = None
        self.hooks: Optional[MaskHooks] = None
        self.history: list[dict] = []
        self.warnings: list[str] = []  # what fell short of what was asked, for the report and the card
        self.pending_logs: dict[str, float] = {}
        self.resume_dir: Optional[str] = None  # set by PruningTrainer when resuming from an explicit path
        # The unpruned checkpoint the export re-reads frozen weights from (default: the model config's name_or_path).
        self.original_checkpoint: Optional[str] = None
        # Fields for pruning_report.json that only the caller knows, e.g. {"datasets": ["tatsu-lab/alpaca"]}.
        self.report_metadata: dict = {}
        self.allow_physical_removal = True
        self._skipped_step: Optional[int] = None
        self.sharding: Optional[str] = None  # "fsdp" when the model's parameters are shards (never sliced)
        self._original_prunable = 0
        self._original_total = 0
        self._model = None

    # ---- state ------------------------------------------------------------------------------------------------

    @property
    def physically_pruned(self) -> bool:
        return self.removal_masks is not None

    def sparsity(self) -> SparsityReport:
        """Removed fraction of the original prunable parameters (soft and physical removal together)."""
        removed = self._original_total - count_parameters(self._model)
        if self.masks is not None and self.structure is not None:
            removed += removed_params(self.structure, self.masks)
        return SparsityReport(self._original_prunable, removed, self._original_total)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = dict(self.accumulator.state_dict())
        if self.masks is not None:
            tensors.update(self.masks.state_dict())
        if self.removal_masks is not None:
            tensors.update({f"removal.{k}": v for k, v in self.removal_masks.state_dict().items()})
        if self.compensator is not None:
            tensors.update(self.compensator.state_dict())
        metadata = {
            "config": json.dumps(self.config.to_dict()),
            "physically_pruned": json.dumps(self.physically_pruned),
            "history": json.dumps(self.history),
            "warnings": json.dumps(self.warnings),
            "original_prunable": str(self._original_prunable),
            "original_total": str(self._original_total),
        }
        return tensors, metadata

    def save_state(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        tensors, metadata = self.state_dict()
        path = os.path.join(directory, STATE_FILE)
        save_safetensors_atomic(tensors, path, metadata)
        return path

    @staticmethod
    def read_state(directory: str) -> Optional[tuple[dict, dict]]:
        from safetensors import safe_open

        path = os.path.join(directory, STATE_FILE)
        if not os.path.exists(path):
            return None
        with safe_open(path, framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()

    @staticmethod
    def removal_masks_in(directory: str) -> Optional[PruningMasks]:
        """The physical-removal masks recorded in a checkpoint, if its weights were sliced."""
        state = PruningCallback.read_state(directory)
        if state is None or not json.loads(state[1].get("physically_pruned", "false")):
            return None
        return PruningMasks.from_state_dict({k[len("removal."):]: v for k, v in state[0].items() if k.startswith("removal.")})

    def _restore(self, directory: str) -> None:
        state = self.read_state(directory)
        if state is None and not os.path.isdir(directory):
            raise ValueError(
                f"resuming a pruning run: its state is looked for in {directory!r}, which does not exist; set "
                "callback.resume_dir to the checkpoint the Trainer resumes from"
            )
        if state is None:
            # Starting afresh would prune a model whose training had moved on: other masks than the run's.
            last = last_complete_checkpoint(os.path.dirname(os.path.abspath(directory)))
            instead = f"resume from {str(last)!r}, the newest complete one" if last else "start afresh"
            raise ValueError(
                f"resuming from {directory!r}, which has no {STATE_FILE}: it is not a complete checkpoint of "
                f"this pruning run (killed while it was written?); {instead}, or delete it"
            )
        tensors, metadata = state
        self.accumulator.load_state_dict(tensors)
        self.masks = PruningMasks.from_state_dict({k: v for k, v in tensors.items() if k.startswith("masks.")})
        if json.loads(metadata.get("physically_pruned", "false")):
            self.removal_masks = PruningMasks.from_state_dict(
                {k[len("removal."):]: v for k, v in tensors.items() if k.startswith("removal.")}
            )
        if self.compensator is not None:
            self.compensator.load_state_dict(tensors)
        self.history = json.loads(metadata.get("history", "[]"))
        self.warnings = json.loads(metadata.get("warnings", "[]"))
        self._original_prunable = int(metadata.get("original_prunable", self._original_prunable))
        self._original_total = int(metadata.get("original_total", self._original_total))

    # ---- Trainer events ---------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        quiet_int8_cast_warning()
        self._allow_plain_saves(model)  # training again: the Trainer's checkpoints need save_pretrained
        self._model = model
        if self.original_checkpoint is None:
            self.original_checkpoint = getattr(unwrap_model(model).config, "_name_or_path", None) or None
        self.structure = discover_for_config(model, self.config)
        self.sharding = distributed.sharding(model)
        distributed.check_sharded_criterion(self.sharding, self.criterion, self.config.importance)
        if self.sharding and self.compensator is not None and self.config.compensation == "auto":
            self.compensation_note = f"compensation='auto': none under {self.sharding} (it would update sharded weights)"
            logger.info(self.compensation_note)
            self.compensator = None
        if self.sharding and self.compensator is not None:
            raise ValueError(f"compensation={self.config.compensation!r} updates weights, which {self.sharding} keeps "
                             "as shards: use compensation='none' under sharded training")
        check_quantized_base(model, self.structure, self.config, self.criterion)
        distributed.check_resident(model, self.structure)
        self._original_prunable = self.structure.prunable_params()
        self._original_total = count_parameters(model)
        if state.global_step == 0:  # a resumed model may already be sliced: checked when the run began
            check_feasible(self.structure, self.config)
        steps = self.config.pruning_steps or max(1, round(self.config.pruning_fraction * state.max_steps))
        if steps > state.max_steps:
            raise ValueError(
                f"pruning_steps={steps} exceeds the run's max_steps={state.max_steps}: lower pruning_steps or train longer"
            )
        self.schedule = PruningSchedule(
            total_steps=steps,
            schedule=self.config.schedule,
            warmup_ratio=self.config.warmup_ratio,
            cooldown_ratio=self.config.cooldown_ratio,
            prune_every=self.config.prune_every,
        )
        if self.sharding:
            # Shards cannot be sliced: masks until the end, then the export slices the original checkpoint.
            self.allow_physical_removal = False
            logger.warning("%s: weights are never sliced in memory; masks are used, and the export slices the "
                           "original checkpoint (save_pruned_from_adapters)", self.sharding)
        elif args.world_size > 1 and self.config.physical_removal == "after_pruning":
            # DDP's gradient buckets are sized at wrap time: keep masks until training ends.
            self.allow_physical_removal = False
            logger.warning("distributed training: weights are sliced at the end of training, masks are used until then")
        if state.global_step > 0:
            directory = self.resume_dir or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self._restore(directory)
            self._original_total = self._original_total or count_parameters(model)
        if self.physically_pruned:
            # The trainer already sliced the model to the checkpoint's shapes before loading it.
            self.structure = discover_for_config(model, self.config)
        if self.masks is None or set(self.masks.layers) != {l.index for l in self.structure}:
            self.masks = PruningMasks.full(self.structure)
        if self._scoring(state.global_step):
            self.criterion.prepare(model, self.structure.prunable_layers)
            self.compensator, self.compensation_note = prepare_or_drop(
                self.compensator, self.config.compensation, model, self.structure.prunable_layers)
        self.hooks = MaskHooks(self.structure, self.masks)
        self.hooks.update(self.masks, self._reconstructions())  # a resumed run's masks, compensation included
        log_run_summary(self, args, state, model)
        self._log_event("pruning_started" if state.global_step == 0 else "pruning_resumed", state)

    def _scoring(self, step: int) -> bool:
        return not self.physically_pruned and step < self.schedule.last_step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # global_step counts completed steps; this is step global_step + 1.
        if self.structure is None or not self._scoring(state.global_step):
            return
        skipped = self.accumulator.num_skipped
        # Hook criteria saw this rank's batches only: every rank folds in the ranks' average.
        reduce = distributed.average_scores if distributed.needs_score_averaging(self.criterion) else None
        if not score_model(self.structure, self.criterion, self.accumulator, reduce) and \
                self.accumulator.num_skipped > skipped:
            logger.warning("step %d: non-finite importance scores, step skipped", state.global_step + 1)
            self._skipped_step = state.global_step + 1

    def _stop_if_diverged(self, model, step: int) -> None:
        """After a step whose scores were not finite: if the optimizer step made the weights NaN / Inf (a NaN
        loss gives NaN gradients; only a loss scaler skips such a step), every later score is NaN and the masks
        would be chosen from stale scores. Stop, naming the step, instead of pruning on."""
        if self._skipped_step != step:
            return
        self._skipped_step = None
        bad = [name for name, p in model.named_parameters()
               if p.requires_grad and p.is_floating_point() and not bool(torch.isfinite(p).all())]
        if bad:
            raise RuntimeError(
                f"step {step}: the loss or the gradients were not finite, and the optimizer step made {len(bad)} "
                f"trainable tensors NaN / Inf (e.g. {bad[0]}): the training diverged, so pruning stops here rather "
                "than choose groups from stale scores. Resume from the last checkpoint with a lower learning_rate, "
                "max_grad_norm, or bf16 instead of fp16"
            )

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.structure is None or self.physically_pruned:
            return
        step = state.global_step
        self._stop_if_diverged(model if model is not None else self._model, step)
        if step <= self.schedule.total_steps and self.schedule.is_update_step(step):
            self._update_masks(step)
            control.should_log = True
        if step == self.schedule.last_step:
            # Scoring is over: criteria stop recording, weight-gradient criteria freeze the base again.
            self._release_criterion()
        if step == self.schedule.total_steps:
            if self.config.physical_removal == "after_pruning" and self.allow_physical_removal:
                self._remove_physically(optimizer, state)
            control.should_log = True
        if self.pending_logs:
            control.should_log = True

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.structure is not None and not self.physically_pruned and self.masks is not None:
            if state.global_step >= self.schedule.last_step and not self.masks.is_full():
                if self.sharding:
                    record_removal(self._model, self.masks)  # for the export, which slices the original
                    self._log_event("removal_recorded", state)
                else:
                    self._remove_physically(optimizer, state)
        self._release_criterion()
        if self.hooks is not None:
            self.hooks.remove()
        if self.physically_pruned:
            self._refuse_plain_saves(model)

    def on_save(self, args, state, control, **kwargs):
        if self.structure is None or not state.is_world_process_zero:
            return
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(directory) and not os.path.exists(os.path.join(directory, STATE_FILE)):
            self.save_state(directory)  # PruningTrainer already wrote it inside the checkpoint save

    def on_log(self, args, state, control, logs=None, **kwargs):
        # With a plain Trainer the metrics reach the progress bar and log_history here;
        # PruningTrainer merges them before every reporter sees the logs.
        if logs is not None and self.pending_logs:
            logs.update(self.pending_logs)
            if state.log_history:
                state.log_history[-1].update(self.pending_logs)
            self.pending_logs = {}

    # ---- the pruned checkpoint ---------------------------------------------------------------------------------

    def training_report(self, trainer=None) -> PruningReport:
        """What this run did, for pruning_report.json: criterion, config, schedule, reached sparsity, history,
        steps and examples (from `trainer`), and `report_metadata`. Reached sparsity counts what the weights
        lost, which is what an export writes: masks not yet applied physically are not counted."""
        state = getattr(trainer, "state", None)
        dataset = getattr(trainer, "train_dataset", None)
        reached = None
        if self._model is not None:
            removed = self._original_total - count_parameters(self._model)
            reached = SparsityReport(self._original_prunable, removed, self._original_total).as_dict()
        report = PruningReport(
            criterion=self.config.importance,
            target_sparsity=self.config.target_sparsity,
            reached=reached,
            pruning_config=self.config.to_dict(),
            pruning_steps=self.schedule.total_steps if self.schedule else None,
            optimizer_steps=state.global_step if state is not None else None,
            train_examples=len(dataset) if hasattr(dataset, "__len__") else None,
            history=list(self.history),
            warnings=list(self.warnings) or None,
        )
        return report.update(self.report_metadata)

    def save_pruned(
        self,
        trainer,
        output_dir: Optional[str] = None,
        *,
        dtype: Any = None,
        max_shard_size: Any = "5GB",
        uniform: Optional[bool] = None,
        overwrite: Optional[bool] = None,
        allow_non_finite: bool = False,
    ) -> Optional[Path]:
        """Write the pruned checkpoint of `trainer` (any Trainer this callback ran in, e.g. trl's SFTTrainer):
        weights physically pruned with LoRA merged (`hfprune.save_pruned`), tokenizer, the full
        pruning_report.json and the model card -- exactly what `PruningTrainer.save_model` writes.

        Args:
            output_dir: default `<args.output_dir>/pruned`.
            dtype: of the saved weights (default: the original checkpoint's, e.g. bfloat16; see the report).
            max_shard_size: e.g. "5GB"; larger checkpoints are sharded with an index.
            uniform: None: a stock config when every layer has the same widths (always with
                `PruningConfig(uniform=True)`); True: insist; False: the heterogeneous format.
            overwrite: None replaces an earlier hfprune export there and refuses any other non-empty
                directory; True replaces whatever is there (atomically); False refuses a non-empty one.
                A directory that is or holds the run's own non-empty `args.output_dir` (its checkpoints) is
                refused.
            allow_non_finite: write weights holding NaN / Inf (a diverged run) instead of refusing them.

        Returns the checkpoint path (None on processes other than the main one).

        A sharded (FSDP) model was never sliced: every process must call this, to gather the LoRA factors;
        the main one then slices the original checkpoint by the removal masks and merges them
        (`hfprune.export.save_pruned_from_adapters`).
        """
        lora_state = distributed.gather_lora_state(trainer.model) if self.sharding else None  # a collective
        if not trainer.is_world_process_zero():
            return None
        output_dir = Path(output_dir) if output_dir is not None else Path(trainer.args.output_dir) / EXPORT_SUBDIR
        training_dir = Path(trainer.args.output_dir)
        if training_dir.is_dir() and any(training_dir.iterdir()):  # its checkpoints and logs would be replaced
            check_export_dir(output_dir, training_dir)
        if overwrite is None:
            overwrite = (output_dir / REPORT_FILE).is_file()
        if uniform is None and self.config.uniform:
            uniform = True
        if not self.physically_pruned and not self.sharding and self.masks is not None and not self.masks.is_full():
            logger.warning("the weights were not sliced yet (training stopped before the pruning stage ended): "
                           "%s gets the unpruned model", output_dir)
        from .export import save_pruned, save_pruned_from_adapters  # the export sits above the callback

        if self.sharding:
            peft_config = getattr(trainer.model, "peft_config", None) or {}
            return save_pruned_from_adapters(
                output_dir, original_checkpoint=self.original_checkpoint, masks=self.masks,
                lora_config=peft_config.get("default"), lora_state=lora_state, tokenizer=trainer.processing_class,
                report=self.training_report(trainer), dtype=dtype, overwrite=overwrite,
                max_shard_size=max_shard_size, uniform=uniform,
            )
        return save_pruned(
            trainer.model,
            output_dir,
            masks=self.removal_masks,
            compensation=self.compensator.record if self.compensator is not None else None,
            original_checkpoint=self.original_checkpoint,
            tokenizer=trainer.processing_class,
            report=self.training_report(trainer),
            dtype=dtype,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            uniform=uniform,
            allow_non_finite=allow_non_finite,
        )

    @staticmethod
    def _models(model) -> list:
        """The model the Trainer holds and the transformers model inside it (`merge_and_unload()` returns that one)."""
        if model is None:
            return []
        inner = unwrap_model(model)
        return [model] if inner is model else [model, inner]

    def _refuse_plain_saves(self, model) -> None:
        for module in self._models(model):
            module.save_pretrained = PlainSaveRefused()

    def _allow_plain_saves(self, model) -> None:
        for module in self._models(model):
            if isinstance(vars(module).get("save_pretrained"), PlainSaveRefused):
                del module.save_pretrained

    # ---- actions ----------------------------------------------------------------------------------------------

    def _synchronise(self, masks: PruningMasks) -> PruningMasks:
        """Every rank takes rank 0's masks (they should already agree: gradients are all-reduced)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return masks
        flat = torch.cat([torch.cat([m.heads, m.channels]).to(torch.uint8) for _, m in sorted(masks.layers.items())])
        if torch.distributed.get_backend() == "nccl":
            flat = flat.cuda()
        torch.distributed.broadcast(flat, src=0)
        flat = flat.cpu().bool()
        offset = 0
        for _, mask in sorted(masks.layers.items()):
            n_heads, n_channels = mask.heads.numel(), mask.channels.numel()
            mask.heads = flat[offset : offset + n_heads].clone()
            mask.channels = flat[offset + n_heads : offset + n_heads + n_channels].clone()
            offset += n_heads + n_channels
        return masks

    def _update_masks(self, step: int) -> None:
        progress = self.schedule.progress(step)
        try:
            scores = self.accumulator.layer_scores(self.structure.prunable_layers)
        except RuntimeError as error:
            raise RuntimeError(f"step {step}, mask update: {error}; or start masking later "
                               f"(warmup_ratio={self.config.warmup_ratio})") from None
        masks = self._synchronise(allocate(self.structure, scores, self.config, progress, previous=self.masks))
        if progress >= 1.0:
            short = shortfall(self.structure, masks, self.config)
            if short is not None and short not in self.warnings:
                logger.warning("step %d: %s", step, short)
                self.warnings.append(short)
        if self.compensator is not None:
            self.compensator.apply(self.structure, self.masks, masks)
        self.masks = masks
        self.hooks.update(self.masks, self._reconstructions())
        report = self.sparsity()
        self.pending_logs.update(
            {
                "pruning/sparsity": round(report.sparsity, 6),
                "pruning/total_sparsity": round(report.total_sparsity, 6),
                "pruning/remaining_params": report.remaining_params,
                "pruning/progress": round(progress, 6),
            }
        )
        self.history.append({"step": step, "event": "masks_updated", **report.as_dict()})

    def _release_criterion(self) -> None:
        # Hook-based criteria stop recording and weight-gradient criteria re-freeze the base once scoring is over;
        # the compensator's statistics go too (its record stays, for the export).
        self.criterion.release()
        if self.compensator is not None:
            self.compensator.release()

    def _reconstructions(self) -> dict:
        """The compensation maps the mask hooks apply (none once the weights are sliced)."""
        if self.compensator is None or self.physically_pruned:
            return {}
        return self.compensator.record.maps

    def _remove_physically(self, optimizer, state) -> None:
        self._release_criterion()
        self.hooks.remove()
        if self.compensator is not None:
            self.compensator.fold(self.structure)  # what the hooks reconstructed goes into the kept columns
        records = remove_pruned_groups(self.structure, self.masks)
        sliced = slice_optimizer_state(optimizer, records) if optimizer is not None else 0
        self.removal_masks = self.masks
        record_removal(self._model, self.masks, self.compensator.record if self.compensator is not None else None)
        self.structure = discover_for_config(self._model, self.config)
        self.masks = PruningMasks.full(self.structure)
        self.hooks = MaskHooks(self.structure, self.masks)
        report = self.sparsity()
        logger.info(
            "step %d: weights sliced (%d parameters left, %d optimizer state tensors transplanted); recovery follows",
            state.global_step, report.remaining_params, sliced,
        )
        self._log_event("physical_removal", state, optimizer_state_tensors=sliced)

    def _log_event(self, event: str, state, **extra) -> None:
        report = self.sparsity() if self._model is not None else None
        entry = {"step": state.global_step, "event": event, **extra}
        if report is not None:
            entry.update(report.as_dict())
            self.pending_logs.update(
                {
                    "pruning/sparsity": round(report.sparsity, 6),
                    "pruning/remaining_params": report.remaining_params,
                }
            )
        self.pending_logs[f"pruning/stage_{event}"] = state.global_step
        self.history.append(entry)
        logger.info("hfprune: %s at step %d", event, state.global_step)
