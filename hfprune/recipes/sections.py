"""The recipe's own sections: `model`, `data` (and each of its sources), `export`, `eval`, `hub`.

Each is a dataclass documented field by field (`metadata={"help": ..., "choices": ...}`, as
`PruningConfig` and transformers' `TrainingArguments` are) and validated in `__post_init__`,
so a recipe, a Python script and `HfArgumentParser` get the same checks. Paths are kept as
written here; the loader resolves them against the recipe file (`loading.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

from .. import validation as check
from ..quant_formats import COMPUTE_DTYPES, QUANT_TYPES

DTYPES = ("auto", "bfloat16", "float16", "float32")
EXPORT_DTYPES = DTYPES[1:]
MIXING = ("first_exhausted", "all_exhausted", "phases")
TAILS = ("drop", "include")
DATA_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".parquet", ".arrow")


def is_local_source(path: str) -> bool:
    """A data path that names a file (by its form; the loader also takes any path that exists)."""
    return path.startswith(("./", "../", "/", "~")) or path.lower().endswith(DATA_SUFFIXES)


@dataclass
class ModelSection:
    """`model:` which model to prune and how to load it."""

    name_or_path: str = field(metadata={"help": "Hub id or local directory of the model to prune."})
    model_config: Optional[str] = field(
        default=None,
        metadata={"help": "Config for dry runs without downloads: a short name from hfprune/model_configs, "
                          "a config.json path or a hub id."},
    )
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    load_in_8bit: Optional[bool] = field(
        default=None, metadata={"help": "Load a frozen int8 base (bitsandbytes); None: 8-bit for importance='lora'."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Load a frozen 4-bit base (bitsandbytes Linear4bit, QLoRA-style)."}
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type (with load_in_4bit).", "choices": QUANT_TYPES}
    )
    bnb_4bit_compute_dtype: str = field(
        default="bfloat16", metadata={"help": "dtype 4-bit weights are de-quantized to for each matmul.",
                                      "choices": COMPUTE_DTYPES}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Quantize the 4-bit block scales too (about 0.4 bit per weight less)."}
    )
    dtype: str = field(default="auto", metadata={"help": "dtype of the loaded weights.", "choices": DTYPES})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow modeling code from the hub."})
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "Attention kernel: sdpa, eager, flash_attention_2, ..."}
    )
    device_map: Optional[Union[dict, str]] = field(
        default=None, metadata={"help": "from_pretrained device_map, e.g. auto (one model over the GPUs)."}
    )

    def __post_init__(self) -> None:
        check.text("name_or_path", self.name_or_path)
        for name in ("model_config", "revision", "attn_implementation"):
            check.text(name, getattr(self, name), optional=True)
        check.boolean("load_in_8bit", self.load_in_8bit, optional=True)
        check.boolean("load_in_4bit", self.load_in_4bit)
        check.choice("bnb_4bit_quant_type", self.bnb_4bit_quant_type, QUANT_TYPES)
        check.choice("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, COMPUTE_DTYPES)
        check.boolean("bnb_4bit_use_double_quant", self.bnb_4bit_use_double_quant)
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit=true with load_in_8bit=true: a base is quantized one way; choose one")
        if not self.load_in_4bit:
            changed = [f.name for f in dataclasses.fields(self) if f.name.startswith("bnb_4bit_")
                       and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(f"{changed[0]}={getattr(self, changed[0])!r} without load_in_4bit=true: it only "
                                 "applies to a 4-bit base; set load_in_4bit: true or remove it")
        check.choice("dtype", self.dtype, DTYPES)
        check.boolean("trust_remote_code", self.trust_remote_code)
        if self.device_map is not None and not isinstance(self.device_map, (str, dict)):
            raise TypeError(f"device_map={self.device_map!r}: must be a string (auto, cpu, ...), a mapping or None")

    def quantization_config(self):
        """The `BitsAndBytesConfig` of a 4-bit base, None otherwise (the 8-bit one is `load_in_8bit`'s)."""
        if not self.load_in_4bit:
            return None
        from ..quantization import bnb_config

        return bnb_config(load_in_4bit=True, quant_type=self.bnb_4bit_quant_type,
                          compute_dtype=self.bnb_4bit_compute_dtype, double_quant=self.bnb_4bit_use_double_quant)


@dataclass
class DataSource:
    """One entry of `data.train` / `data.eval`: a path or hub id, or this mapping."""

    path: str = field(metadata={"help": "Local data file (" + "/".join(DATA_SUFFIXES) + ") or hub data set id."})
    name: Optional[str] = field(default=None, metadata={"help": "Hub data set config name."})
    split: str = field(default="train", metadata={"help": "Split to read."})
    weight: Optional[float] = field(
        default=None, metadata={"help": "Relative mixing probability (every source or none; none: concatenated)."}
    )
    skip_samples: int = field(
        default=0, metadata={"help": "Drop the first N records (e.g. the ones an evaluation reads)."}
    )
    max_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep the first N records (after skip_samples)."}
    )
    text_field: str = field(default="text", metadata={"help": "Column holding plain text (renamed to text)."})
    num_examples: Optional[int] = field(
        default=None, metadata={"help": "Record count for dry runs without the data (the run counts the real ones)."}
    )
    # Not a recipe key: whether `path` is a local file, decided from its form (and, by the loader, from disk).
    local: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        check.text("path", self.path)
        check.text("name", self.name, optional=True)
        check.text("split", self.split)
        check.text("text_field", self.text_field)
        check.number("weight", self.weight, above=0, optional=True)
        check.integer("skip_samples", self.skip_samples, minimum=0)
        check.integer("max_samples", self.max_samples, minimum=1, optional=True)
        check.integer("num_examples", self.num_examples, minimum=0, optional=True)
        self.local = is_local_source(self.path)


def _sources(name: str, value) -> list[DataSource]:
    """`a.json`, `{path: a.json}` or a list of either, as a list of `DataSource`."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    sources = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = DataSource(item)
        elif isinstance(item, dict):
            item = DataSource(**item)
        elif not isinstance(item, DataSource):
            raise TypeError(f"{name}[{i}]={item!r}: must be a path, a hub id or a mapping with 'path'")
        sources.append(item)
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError(f"{name}: give every source a weight, or none (then they are concatenated)")
    return sources


@dataclass
class DataSection:
    """`data:` what to train (and compute the evaluation loss) on, and how it is tokenised."""

    train: list[DataSource] = field(
        default_factory=list, metadata={"help": "Training data: a path, a hub id, or a list of sources."}
    )
    eval: list[DataSource] = field(
        default_factory=list, metadata={"help": "Data for the Trainer's evaluation loss (same forms)."}
    )
    val_set_size: int = field(default=0, metadata={"help": "Hold out this many training records as evaluation data."})
    mixing: str = field(
        default="first_exhausted",
        metadata={"help": "Weighted mixing stops when the first / all sources run out; phases: one source after the "
                          "other, each shuffled within itself.", "choices": MIXING},
    )
    max_length: int = field(default=512, metadata={"help": "Truncation length in tokens."})
    train_on_prompt: bool = field(default=False, metadata={"help": "Also train on the prompt tokens."})
    num_proc: Optional[int] = field(default=None, metadata={"help": "Processes for tokenisation."})

    def __post_init__(self) -> None:
        self.train = _sources("train", self.train)
        self.eval = _sources("eval", self.eval)
        check.integer("val_set_size", self.val_set_size, minimum=0)
        check.choice("mixing", self.mixing, MIXING)
        check.integer("max_length", self.max_length, minimum=2)
        check.boolean("train_on_prompt", self.train_on_prompt)
        check.integer("num_proc", self.num_proc, minimum=1, optional=True)


@dataclass
class ExportSection:
    """`export:` the pruned checkpoint."""

    output_dir: Optional[str] = field(
        default=None, metadata={"help": "Checkpoint directory (default: outputs/<name>/model)."}
    )
    dtype: Optional[str] = field(
        default=None,
        metadata={"help": "dtype of the saved weights (default: the original checkpoint's).", "choices": EXPORT_DTYPES},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output directory."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Shard size of the safetensors files (or bytes)."})
    uniform: Optional[bool] = field(
        default=None, metadata={"help": "None: stock config when possible; true: insist; false: heterogeneous."}
    )

    def __post_init__(self) -> None:
        check.text("output_dir", self.output_dir, optional=True)
        check.choice("dtype", self.dtype, EXPORT_DTYPES, optional=True)
        check.boolean("overwrite", self.overwrite)
        check.boolean("uniform", self.uniform, optional=True)
        if isinstance(self.max_shard_size, bool) or not isinstance(self.max_shard_size, (int, str)):
            raise TypeError(f"max_shard_size={self.max_shard_size!r}: must be a size such as '5GB' or a byte count")
        if isinstance(self.max_shard_size, str) and self.max_shard_size.strip().isdigit():
            self.max_shard_size = int(self.max_shard_size)
        from ..export.shards import parse_size

        parse_size(self.max_shard_size)  # its error names the value and the accepted forms


@dataclass
class EvalSection:
    """`eval:` dense vs pruned after training, one model in memory at a time (omit the section to skip)."""

    perplexity: list[str] = field(
        default_factory=list,
        metadata={"help": "Perplexity sources: wikitext2, ptb, c4 or local .txt/.jsonl/.json files."},
    )
    seq_len: int = field(default=2048, metadata={"help": "Perplexity window length in tokens."})
    max_windows: Optional[int] = field(
        default=None, metadata={"help": "Evaluate at most this many windows per source."}
    )
    batch_size: int = field(default=1, metadata={"help": "Perplexity windows per forward pass."})
    zero_shot_batch_size: int = field(
        default=16, metadata={"help": "lm-eval zero-shot requests per forward pass (short: a few hundred tokens)."}
    )
    tail: str = field(default="drop", metadata={"help": "Drop or include the last partial window.", "choices": TAILS})
    speed: Union[bool, dict] = field(
        default=False, metadata={"help": "Measure prefill/decode speed (a mapping: measure_speed arguments)."}
    )
    tasks: list[str] = field(default_factory=list, metadata={"help": "lm-eval zero-shot tasks."})
    task_dir: Optional[str] = field(default=None, metadata={"help": "Folder of extra lm-eval task definitions."})
    zero_shot_limit: Optional[float] = field(
        default=None, metadata={"help": "lm-eval limit per task: a count, or a fraction if < 1."}
    )
    dense: bool = field(default=True, metadata={"help": "Also evaluate the unpruned model for the comparison."})
    device: Optional[str] = field(
        default=None, metadata={"help": "Device for evaluation (default: cuda if available)."}
    )

    def __post_init__(self) -> None:
        self.perplexity = list(check.strings("perplexity", self.perplexity))
        self.tasks = list(check.strings("tasks", self.tasks))
        check.integer("seq_len", self.seq_len, minimum=1)
        check.integer("max_windows", self.max_windows, minimum=1, optional=True)
        check.integer("batch_size", self.batch_size, minimum=1)
        check.integer("zero_shot_batch_size", self.zero_shot_batch_size, minimum=1)
        check.choice("tail", self.tail, TAILS)
        if not isinstance(self.speed, (bool, dict)):
            raise TypeError(f"speed={self.speed!r}: must be true/false or a mapping of measure_speed arguments")
        if isinstance(self.speed, dict):
            import inspect

            from ..evaluation.speed import measure_speed

            valid = [name for name in inspect.signature(measure_speed).parameters if name != "model"]
            unknown = [key for key in self.speed if key not in valid]
            if unknown:
                raise ValueError(f"speed={self.speed!r}: {unknown[0]!r} is not an argument of measure_speed; "
                                 f"valid: {', '.join(valid)}")
        check.text("task_dir", self.task_dir, optional=True)
        check.number("zero_shot_limit", self.zero_shot_limit, above=0, optional=True)
        if self.zero_shot_limit is not None and self.zero_shot_limit >= 1:
            if self.zero_shot_limit != int(self.zero_shot_limit):
                raise ValueError(f"zero_shot_limit={self.zero_shot_limit!r}: must be a whole count, or a fraction < 1")
            self.zero_shot_limit = int(self.zero_shot_limit)
        check.boolean("dense", self.dense)
        check.text("device", self.device, optional=True)
        if not self.perplexity and not self.tasks and not self.speed:
            raise ValueError("the eval section measures nothing: give eval.perplexity, eval.tasks or eval.speed")


@dataclass
class HubSection:
    """`hub:` where the checkpoint is pushed (omit the section to keep it local)."""

    repo_id: str = field(metadata={"help": "Hub repository to push the checkpoint to."})
    private: Optional[bool] = field(default=None, metadata={"help": "Create the repository private."})
    token_env: Optional[str] = field(
        default=None, metadata={"help": "Environment variable holding the token (default: the hub login)."}
    )

    def __post_init__(self) -> None:
        check.text("repo_id", self.repo_id)
        check.boolean("private", self.private, optional=True)
        check.text("token_env", self.token_env, optional=True)


SECTIONS = {"model": ModelSection, "data": DataSection, "export": ExportSection, "eval": EvalSection,
            "hub": HubSection}


def schema_text() -> str:
    """These sections and their keys, from the fields' metadata: for `hfprune prune --help`."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"  {section}:")
        lines += _field_lines(cls, indent=4)
        if cls is DataSection:
            lines.append("    a source is a path/hub id string or a mapping:")
            lines += _field_lines(DataSource, indent=6)
    lines.append("  pruning / lora / training / distillation: the fields of hfprune.PruningConfig, peft.LoraConfig,")
    lines.append("    transformers.TrainingArguments, hfprune.DistillationConfig (one-to-one)")
    return "\n".join(lines)


def _field_lines(cls, indent: int) -> list[str]:
    lines = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f"default {f.default!r}" if f.default is not None else ""
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {f.default_factory()!r}"
        else:
            default = "required"
        if "choices" in f.metadata:
            default = "; ".join(filter(None, [default, "one of " + ", ".join(f.metadata["choices"])]))
        width = 24 - indent
        note = f" ({default})" if default else ""
        lines.append(f"{' ' * indent}{f.name:<{width}} {f.metadata.get('help', '')}{note}")
    return lines
