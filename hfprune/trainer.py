"""`PruningTrainer`: a `transformers.Trainer` that prunes while it trains.

It feels like trl's `SFTTrainer`: give it a model or a hub id, a `peft_config`,
an instruction data set and a `PruningConfig`; `train()` then runs

    pruning stage (masks, scored every step)  ->  physical removal (optimizer
    state transplanted)  ->  recovery fine-tuning of the smaller model

entirely through the stock training loop, driven by a `PruningCallback`.
`save_model()` writes the physically pruned, LoRA-merged checkpoint (in the
original checkpoint's dtype unless `dtype=` says otherwise) with its tokenizer,
pruning_report.json and model card; `push_to_hub()` uploads it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .adapters import default_lora_config
from .callback import EXPORT_SUBDIR, PruningCallback
from .checkpoints import checkpoint_to_resume
from .compensator import CompensationRecord, replay_on_base
from .config import PruningConfig
from .data import check_records, longest_sequence, prepare_dataset
from .importance import make_training_criterion
from .model_source import check_model_source
from .quantization import bnb_config, check_criterion_fits_base, check_quantization_config, quantized_kind
from .structure import discover_for_config, unwrap_model
from .surgery import remove_pruned_groups

logger = logging.getLogger(__name__)


def _is_quantized(model: nn.Module) -> bool:
    return quantized_kind(model) is not None


def _requested_kind(quantization_config) -> Optional[str]:
    """What a bitsandbytes config will load: "8-bit", "4-bit" or None (another quantization method)."""
    if quantization_config is None:
        return None
    get = quantization_config.get if isinstance(quantization_config, dict) else (
        lambda name, default=None: getattr(quantization_config, name, default))
    if get("load_in_4bit", False):
        return "4-bit"
    return "8-bit" if get("load_in_8bit", False) else None


def _kbit_device_map():
    """A quantized model sits whole on one device: this process's GPU (each DDP rank its own), or the CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "cpu"


def load_model(
    model_id: str,
    load_in_8bit: bool,
    quantization_config=None,
    model_init_kwargs: Optional[dict] = None,
) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(model_id)`, with the 8-bit base when asked.

    Nothing else: a hub id goes through the ordinary hub code path (`HF_HUB_OFFLINE=1` serves it from the cache).
    """
    kwargs = dict(model_init_kwargs or {})
    if quantization_config is None and load_in_8bit:
        quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs.setdefault("device_map", _kbit_device_map())
    kwargs.setdefault("dtype", "auto")
    return AutoModelForCausalLM.from_pretrained(model_id, **kwargs)


def _warn_beyond_positions(dataset, config, what: str) -> None:
    """Sequences longer than the model's max_position_embeddings train (rotary embeddings extrapolate) but at
    positions the model never saw: warn, naming the length to use."""
    positions = getattr(config, "max_position_embeddings", None)
    longest = longest_sequence(dataset) if positions else 0
    if positions and longest > positions:
        logger.warning(
            "%s: its longest sequence has %d tokens, more than the model's max_position_embeddings=%d; positions "
            "beyond it were never trained: pass max_length=%d (data.max_length in a recipe)",
            what, longest, positions, positions,
        )


#: Arguments of trl's SFTTrainer / older trl releases that mean something PruningTrainer calls otherwise.
_RENAMED_ARGUMENTS = {
    "max_seq_length": "max_length",  # trl's SFTConfig renamed it max_length too
    "tokenizer": "processing_class",  # transformers' Trainer renamed it
}


def _check_trainer_kwargs(kwargs: dict) -> None:
    """Keyword arguments Trainer.__init__ would refuse, refused before anything is loaded, with the right name."""
    import difflib
    import inspect

    valid = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    valid |= set(inspect.signature(PruningTrainer.__init__).parameters) - {"self", "kwargs"}
    for name in kwargs:
        if name in valid:
            continue
        if name in _RENAMED_ARGUMENTS:
            raise TypeError(f"PruningTrainer got {name}=: it is called {_RENAMED_ARGUMENTS[name]}= here "
                            f"(PruningTrainer(..., {_RENAMED_ARGUMENTS[name]}={kwargs[name]!r}))")
        close = difflib.get_close_matches(name, sorted(valid), n=1)
        hint = f"; did you mean {close[0]}=?" if close else f"; valid: {', '.join(sorted(valid))}"
        raise TypeError(f"PruningTrainer got an unexpected keyword argument {name!r}{hint}")


def _tokenizer_kwargs(model_init_kwargs: Optional[dict]) -> dict:
    """The loading arguments the tokenizer shares with the model (the same revision of the same repository)."""
    shared = ("revision", "trust_remote_code", "token", "cache_dir", "subfolder")
    return {k: v for k, v in (model_init_kwargs or {}).items() if k in shared}


class PruningTrainer(Trainer):
    """Trainer for LoRA-guided structured pruning (see the module docstring).

    Args:
        model: a `PreTrainedModel` (optionally already a `PeftModel`), or a hub id / local path.
        args: `TrainingArguments`.
        pruning_config: `PruningConfig`; defaults to `PruningConfig()` (20%, "lora", cubic).
        peft_config: `peft.LoraConfig` applied when the model is not a `PeftModel` yet. With the
            "lora" criterion and no config, LoRAPrune's rank-8 LoRA on all projections is used.
        quantization_config / load_in_8bit / load_in_4bit: how a hub id is loaded. The 8-bit base is the
            default for criteria that need no weight gradient; `load_in_4bit=True` loads QLoRA's 4-bit base
            (NF4, double quantization, bfloat16 compute; pass a `BitsAndBytesConfig(load_in_4bit=True, ...)`
            as `quantization_config` for other settings). Full-gradient criteria need a full-precision base.
        train_dataset / eval_dataset: alpaca, chat, plain-text or tokenised records (see `hfprune.data`).
        processing_class: the tokenizer (loaded from the model id when omitted, before the model).
        max_length: truncation length when tokenising (trl's `max_seq_length` is called this here too);
            train_on_prompt: also train on prompt tokens. The data sets are tokenised before a hub id's model
            is loaded, so a data set with nothing to train on fails in seconds.

    `args.ddp_find_unused_parameters` defaults to False (when left None), as the recipes set it: every
    trainable parameter gets a gradient at every step, masked groups included.
    """

    _tag_names = ["hfprune", "pruned", "structured-pruning"]

    def __init__(
        self,
        model: Union[str, PreTrainedModel, nn.Module],
        args: Optional[TrainingArguments] = None,
        pruning_config: Optional[PruningConfig] = None,
        peft_config=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        callbacks: Optional[list] = None,
        quantization_config=None,
        load_in_8bit: Optional[bool] = None,
        load_in_4bit: bool = False,
        model_init_kwargs: Optional[dict] = None,
        max_length: int = 512,
        train_on_prompt: bool = False,
        distillation=None,
        **kwargs: Any,
    ):
        _check_trainer_kwargs(kwargs)  # a misspelt or trl-only argument: a TypeError now, not after the model load
        self.pruning_config = pruning_config or PruningConfig()
        self.distillation = distillation
        self._warned_no_teacher = False
        self._distill_sums: dict[str, float] = {}  # loss parts since the last log, as `distill/<part>` means
        self._distill_count = 0
        criterion = make_training_criterion(self.pruning_config)  # bonsai is refused here, before any load
        importance = self.pruning_config.importance
        # Empty or unusable data sets are refused before the model is loaded.
        for what, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is not None:
                check_records(dataset, what)
        model_id = None
        if isinstance(model, str):
            check_quantization_config(quantization_config)
            if load_in_4bit and (load_in_8bit or quantization_config is not None):
                raise ValueError(
                    "load_in_4bit=True with " + ("load_in_8bit=True" if load_in_8bit else "a quantization_config")
                    + ": a base is quantized one way; pass one of them"
                )
            if load_in_8bit is None:
                load_in_8bit = quantization_config is None and not load_in_4bit and not criterion.needs_weight_gradients
            if load_in_4bit:
                quantization_config = bnb_config(load_in_4bit=True)
            kind = "8-bit" if load_in_8bit else _requested_kind(quantization_config)
            try:
                check_criterion_fits_base(criterion, importance, kind)
            except ValueError as error:
                flag = "load_in_8bit=False" if load_in_8bit else "no quantization_config / load_in_4bit"
                raise ValueError(f"{error}; here: pass {flag}") from None
            model_id = check_model_source(model, "model")  # a missing path or pickle weights: before loading
            if processing_class is None:  # the tokenizer first: the data is checked before the model loads
                processing_class = AutoTokenizer.from_pretrained(model_id, **_tokenizer_kwargs(model_init_kwargs))
        if processing_class is not None and getattr(processing_class, "pad_token", "x") is None:
            processing_class.pad_token = processing_class.eos_token
        # Tokenised (and refused when nothing is left to train on) before the model load, which can take minutes.
        if train_dataset is not None:
            train_dataset = prepare_dataset(train_dataset, processing_class, max_length, train_on_prompt,
                                            what="train_dataset")
        if eval_dataset is not None:
            eval_dataset = prepare_dataset(eval_dataset, processing_class, max_length, train_on_prompt,
                                           what="eval_dataset")
        if model_id is not None:
            model = load_model(model_id, load_in_8bit, quantization_config, model_init_kwargs)
        check_criterion_fits_base(criterion, importance, quantized_kind(model))
        if train_dataset is not None:
            _warn_beyond_positions(train_dataset, unwrap_model(model).config, "train_dataset")
        args = args or TrainingArguments(output_dir="hfprune-output")
        if args.ddp_find_unused_parameters is None:
            # As the recipes do: masked groups still run, so every trainable parameter gets a gradient, and DDP's
            # search for unused ones (its default for a PeftModel) would cost a graph walk every step.
            args.ddp_find_unused_parameters = False
        set_seed(args.seed)  # as Trainer.__init__ does, but before the LoRA weights are drawn: same seed, same run
        self.pruning_callback = PruningCallback(self.pruning_config)
        self.pruning_callback.original_checkpoint = getattr(unwrap_model(model).config, "_name_or_path", None) or None
        model = self._prepare_peft_model(model, peft_config, args)
        if data_collator is None and processing_class is not None:
            data_collator = DataCollatorForSeq2Seq(processing_class, padding=True, label_pad_token_id=-100)
        callbacks = list(callbacks or []) + [self.pruning_callback]
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )

    @property
    def original_checkpoint(self) -> Optional[str]:
        """The unpruned checkpoint (hub id or path) the export re-reads the full-precision weights from."""
        return self.pruning_callback.original_checkpoint

    @property
    def report_metadata(self) -> dict:
        """Fields for pruning_report.json and the card that only the caller knows, e.g. {"datasets": [...]}."""
        return self.pruning_callback.report_metadata

    @report_metadata.setter
    def report_metadata(self, value: dict) -> None:
        self.pruning_callback.report_metadata = dict(value)

    def _prepare_peft_model(self, model, peft_config, args):
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

        if isinstance(model, PeftModel):
            return model
        if peft_config is None and (self.pruning_config.importance == "lora" or _is_quantized(model)):
            # The lora criterion reads the adapters; a quantized base can only be trained through them.
            peft_config = default_lora_config()
        if peft_config is None:
            return model
        if _is_quantized(model):
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=args.gradient_checkpointing,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs or {"use_reentrant": False},
            )
        return get_peft_model(model, peft_config)

    # ---- hooks into the stock Trainer ------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # The newest *complete* checkpoint (hfprune.checkpoints): a kill inside a checkpoint write leaves one
        # with half of its files, which transformers' get_last_checkpoint would pick.
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            resume_from_checkpoint = checkpoint_to_resume(
                self.args.output_dir, resume_from_checkpoint, discard=self.is_world_process_zero()
            )
            self.pruning_callback.resume_dir = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # A checkpoint written after the physical removal holds sliced weights: slice the
        # fresh model the same way before the Trainer loads them into it.
        removal = PruningCallback.removal_masks_in(resume_from_checkpoint)
        if removal is not None and not self.pruning_callback.physically_pruned:
            structure = discover_for_config(self.model, self.pruning_config)
            if all(len(removal[i].heads) == layer.num_heads for i, layer in enumerate(structure.layers)):
                # The kept columns absorbed the removed ones before the slicing: replay that on the fresh base.
                state = PruningCallback.read_state(resume_from_checkpoint)
                replay_on_base(structure, CompensationRecord.from_state_dict(state[0]))
                remove_pruned_groups(structure, removal)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model, trial):
        # The pruning state goes in first: the Trainer writes trainer_state.json last, so that file marks a
        # checkpoint with both halves (hfprune.checkpoints), and older checkpoints are rotated away only then.
        if self.is_world_process_zero() and self.pruning_callback.structure is not None:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            run_dir = self._get_output_dir(trial=trial)
            directory = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            self.pruning_callback.save_state(directory)
        super()._save_checkpoint(model, trial)

    def log(self, logs: dict, *args, **kwargs) -> None:
        # Pruning metrics join the Trainer's own, so every reporter (TensorBoard, W&B, the bar) sees them.
        if self.pruning_callback.pending_logs:
            logs = {**logs, **self.pruning_callback.pending_logs}
            self.pruning_callback.pending_logs = {}
        if self._distill_count and "loss" in logs:
            logs = {**logs, **{f"distill/{k}": round(v / self._distill_count, 6) for k, v in self._distill_sums.items()}}
            self._distill_sums, self._distill_count = {}, 0
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        callback = self.pruning_callback
        if self.distillation is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if callback.physically_pruned:
            if not self._warned_no_teacher:
                logger.warning("weights are sliced: the dense teacher is gone, recovery continues on the label loss")
                self._warned_no_teacher = True
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from .distill import distillation_step

        # Hook-based criteria must not record the teacher's forward either.
        switches = [callback.hooks, callback.criterion, callback.compensator]
        # As Trainer.compute_loss does: the token count over all accumulated micro-batches normalises the loss
        # only when the Trainer expects it to (otherwise it divides by the accumulation steps itself).
        scaled_for_accumulation = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss, outputs, parts = distillation_step(
            model, inputs, self.distillation, switches, num_items_in_batch if scaled_for_accumulation else None
        )
        if scaled_for_accumulation and self.args.average_tokens_across_devices:
            # num_items_in_batch counts the tokens of every process; DDP averages the gradients again.
            get_tp_size = getattr(self, "get_tp_size", lambda: 1)
            loss = loss * (self.accelerator.num_processes // get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu)
        for name in ("ce", "kl", "hidden"):
            if name in parts:
                self._distill_sums[name] = self._distill_sums.get(name, 0.0) + float(parts[name])
        self._distill_count += 1
        return (loss, outputs) if return_outputs else loss

    def _export_dir(self) -> str:
        # Not args.output_dir itself: replacing it atomically would delete the run's checkpoints and logs.
        return os.path.join(self.args.output_dir, EXPORT_SUBDIR)

    def save_model(
        self,
        output_dir: Optional[str] = None,
        _internal_call: bool = False,
        *,
        dtype: Any = None,
        max_shard_size: Union[int, str] = "5GB",
        uniform: Optional[bool] = None,
        overwrite: Optional[bool] = None,
        allow_non_finite: bool = False,
    ):
        """The export: the physically pruned, LoRA-merged checkpoint with its tokenizer, pruning_report.json
        and model card, in `output_dir` (default `<args.output_dir>/pruned`); returns its path.

        Arguments as in `PruningCallback.save_pruned` (which writes it, for any Trainer): `dtype` of the
        weights (default: the original checkpoint's, e.g. bfloat16 -- not necessarily float32),
        `max_shard_size`, `uniform` (None: a stock config when possible), `overwrite` (None: an earlier
        hfprune export is replaced atomically, any other non-empty directory refused), `allow_non_finite`
        (write NaN / Inf weights of a diverged run instead of refusing them). `hfprune prune`
        calls this, so the CLI and the Python API write the same checkpoint.

        Checkpoints the Trainer saves during training (`_internal_call`) keep its format: adapters and
        pruning_state.safetensors, resumable."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        return self.pruning_callback.save_pruned(
            self, output_dir, dtype=dtype, max_shard_size=max_shard_size, uniform=uniform, overwrite=overwrite,
            allow_non_finite=allow_non_finite,
        )

    def create_model_card(
        self,
        language: Optional[str] = None,
        license: Optional[str] = None,
        tags: Union[str, list[str], None] = None,
        model_name: Optional[str] = None,
        finetuned_from: Optional[str] = None,
        tasks: Union[str, list[str], None] = None,
        dataset_tags: Union[str, list[str], None] = None,
        dataset: Union[str, list[str], None] = None,
        dataset_args: Union[str, list[str], None] = None,
        output_dir: Optional[str] = None,
    ) -> None:
        """README.md (+ pruned_widths.png) for the pruned checkpoint in `output_dir`, from its
        pruning_report.json. Arguments as in `Trainer.create_model_card`; `finetuned_from` replaces
        the base model id."""
        if not self.is_world_process_zero():
            return
        from .model_card import write_model_card

        def as_list(value):
            return [value] if isinstance(value, str) else list(value or [])

        metadata = {
            "language": language,
            "license": license,
            "base_model": finetuned_from,
            "tags": list(self._tag_names) + as_list(tags),
            "datasets": as_list(dataset_tags) + as_list(dataset) or None,
        }
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
        write_model_card(output_dir or self._export_dir(), repo_id=repo_id, metadata=metadata)

    def push_to_hub(
        self,
        commit_message: Optional[str] = "End of training",
        blocking: bool = True,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        private: Optional[bool] = None,
        **kwargs,
    ):
        """Save the pruned checkpoint, write its model card and push it to `args.hub_model_id`
        (default: the output_dir's name) in one commit with `hfprune.hub.push_pruned`.

        Returns the commit's `CommitInfo`, a `Future` of it when `blocking=False`, None off the
        main process. Errors: `hfprune.hub.HubPushError`, naming the repo and the cause."""
        from huggingface_hub import HfApi

        from .hub import push_pruned

        token = token if token is not None else self.args.hub_token
        private = private if private is not None else self.args.hub_private_repo
        revision = revision if revision is not None else self.args.hub_revision
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.save_model()
        if not self.is_world_process_zero():
            return None
        kwargs.pop("model_name", None)
        self.create_model_card(output_dir=str(output_dir), **kwargs)
        self._finish_current_push()
        push = dict(token=token, private=private, revision=revision, commit_message=commit_message)
        if blocking:
            return push_pruned(output_dir, repo_id, **push)
        return HfApi(token=token).run_as_future(push_pruned, output_dir, repo_id, **push)
