"""YAML recipes: one file that says which model to prune, how, on what data, and where it goes.

    recipe = load_recipe("recipes/llama-7b-20.yaml", overrides=["pruning.target_sparsity=0.5"])
    recipe.pruning      # hfprune.PruningConfig
    recipe.lora         # peft.LoraConfig (or None)
    recipe.training     # transformers.TrainingArguments
    recipe.model, recipe.data, recipe.export, recipe.eval, recipe.hub   # plain dicts

A recipe has these sections (every one optional but `model`; `pruning`, `lora` and
`training` map one-to-one onto the fields of their config classes, so their own
documentation applies):

    name: llama-7b-20                   # optional; default: the file name
    description: ...                    # optional free text

    model:
      name_or_path: huggyllama/llama-7b # hub id or local directory (required)
      model_config: llama-7b            # config for dry runs without downloads: a short name
                                        # from hfprune/model_configs, a json/dir path or hub id
      revision: main
      load_in_8bit: false               # frozen int8 base (bitsandbytes); default: PruningTrainer's rule
      dtype: bfloat16                   # auto | bfloat16 | float16 | float32
      trust_remote_code: false
      attn_implementation: null         # sdpa | eager | ...
      device_map: null                  # e.g. auto: one model over several GPUs (naive model parallelism)

    lora: {r: 8, lora_alpha: 16, ...}   # peft.LoraConfig fields; target_modules defaults to all seven
                                        # projections, task_type to CAUSAL_LM
    pruning: {target_sparsity: 0.2, ...}# hfprune.PruningConfig fields
    distillation: {alpha: 0.5, temperature: 2.0}  # hfprune.DistillationConfig fields (omit: plain loss)
    training: {output_dir: ..., ...}    # transformers.TrainingArguments fields

    data:
      train: yahma/alpaca-cleaned       # a path, a hub id, or a list of sources:
      #  - path: ../data/alpaca.json    #   local .json/.jsonl/.txt/.csv/.parquet file or hub id
      #    name: null                   #   hub config name
      #    split: train
      #    weight: 1.0                  #   mixing probability (relative); no weights: concatenation
      #    skip_samples: 0              #   drop the first N records (held out for evaluation)
      #    max_samples: null            #   keep the first N records (after skip_samples)
      #    text_field: text             #   column holding plain text (renamed to `text`)
      #    num_examples: 51760          #   planning hint for dry runs (the real count is read)
      eval: null                        # sources for the Trainer's eval loss (same forms)
      val_set_size: 0                   # or hold out this many training records instead
      mixing: first_exhausted           # weighted mixing stops at the first (or all_exhausted) source;
                                        # phases: each source in turn, shuffled within (C4, then instructions)
      max_length: 512                   # truncation, in tokens
      train_on_prompt: false            # also train on the prompt tokens of instruction records

    export: {output_dir: ..., dtype: null, overwrite: false, max_shard_size: 5GB, uniform: null}
    eval:                               # dense vs pruned, after training (omit to skip)
      perplexity: [wikitext2, ../data/wiki.txt]
      seq_len: 2048
      max_windows: null
      batch_size: 1
      speed: false                      # or a mapping of measure_speed() arguments
      tasks: []                         # lm-eval zero-shot tasks
      task_dir: null
      zero_shot_limit: null
      dense: true                       # also evaluate the unpruned model, for the comparison
    hub: {repo_id: you/llama-7b-pruned, private: null, token_env: HF_TOKEN}

Strings may use `${VAR}` or `${VAR:-default}` (environment variables). Relative data and
model paths resolve against the recipe file's directory; output directories against the
current directory. Unknown keys are errors that name the closest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .adapters import DEFAULT_LORA_TARGETS
from .config import PruningConfig

SECTIONS = ("model", "lora", "pruning", "distillation", "data", "training", "export", "eval", "hub")
TOP_LEVEL = ("name", "description") + SECTIONS
DATA_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".parquet", ".arrow")
DTYPES = ("auto", "bfloat16", "float16", "float32")
MIXING = ("first_exhausted", "all_exhausted", "phases")
ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class RecipeError(ValueError):
    """A recipe (or an override) is invalid. The message names the key and what would be valid."""


@dataclass(frozen=True)
class Key:
    """One key of a plain section: the types it accepts, its default, what it means."""

    types: tuple
    default: Any = None
    help: str = ""
    required: bool = False


_SOURCE = "a path, a hub id, or a list of sources"
MODEL_KEYS = {
    "name_or_path": Key((str,), None, "hub id or local directory of the model to prune", required=True),
    "model_config": Key((str, type(None)), None, "config for dry runs: short name, path or hub id"),
    "revision": Key((str, type(None)), None, "hub revision (branch, tag or commit)"),
    "load_in_8bit": Key((bool, type(None)), None, "load a frozen int8 base (None: 8-bit for importance='lora')"),
    "dtype": Key((str,), "auto", f"dtype of the loaded weights: {', '.join(DTYPES)}"),
    "trust_remote_code": Key((bool,), False, "allow modeling code from the hub"),
    "attn_implementation": Key((str, type(None)), None, "attention kernel: sdpa, eager, flash_attention_2, ..."),
    "device_map": Key((str, dict, type(None)), None, "from_pretrained device_map, e.g. auto (spread over the GPUs)"),
}
SOURCE_KEYS = {
    "path": Key((str,), None, "local data file or hub data set id", required=True),
    "name": Key((str, type(None)), None, "hub data set config name"),
    "split": Key((str,), "train", "split to read"),
    "weight": Key((int, float, type(None)), None, "relative mixing probability"),
    "skip_samples": Key((int,), 0, "drop the first N records (e.g. the ones an evaluation reads)"),
    "max_samples": Key((int, type(None)), None, "keep the first N records (after skip_samples)"),
    "text_field": Key((str,), "text", "column holding plain text"),
    "num_examples": Key((int, type(None)), None, "record count, used by dry runs without the data"),
}
DATA_KEYS = {
    "train": Key((str, list, dict, type(None)), None, f"training data: {_SOURCE}"),
    "eval": Key((str, list, dict, type(None)), None, f"evaluation-loss data: {_SOURCE}"),
    "val_set_size": Key((int,), 0, "hold out this many training records as evaluation data"),
    "mixing": Key((str,), "first_exhausted",
                  "weighted mixing stops when the first / all sources run out; phases: one source after the other"),
    "max_length": Key((int,), 512, "truncation length in tokens"),
    "train_on_prompt": Key((bool,), False, "also train on prompt tokens"),
    "num_proc": Key((int, type(None)), None, "processes for tokenisation"),
}
EXPORT_KEYS = {
    "output_dir": Key((str, type(None)), None, "checkpoint directory (default: outputs/<name>/model)"),
    "dtype": Key((str, type(None)), None, "dtype of the saved weights (default: the original checkpoint's)"),
    "overwrite": Key((bool,), False, "replace an existing output directory"),
    "max_shard_size": Key((str, int), "5GB", "shard size of the safetensors files"),
    "uniform": Key((bool, type(None)), None, "None: stock config when possible; True: insist; False: heterogeneous"),
}
EVAL_KEYS = {
    "perplexity": Key((list, str), [], "perplexity sources: wikitext2, ptb, c4 or local .txt/.jsonl/.json files"),
    "seq_len": Key((int,), 2048, "perplexity window length in tokens"),
    "max_windows": Key((int, type(None)), None, "evaluate at most this many windows per source"),
    "batch_size": Key((int,), 1, "evaluation batch size"),
    "tail": Key((str,), "drop", "drop or include the last partial window"),
    "speed": Key((bool, dict), False, "measure prefill/decode speed (a mapping: measure_speed arguments)"),
    "tasks": Key((list,), [], "lm-eval zero-shot tasks"),
    "task_dir": Key((str, type(None)), None, "folder of extra lm-eval task definitions"),
    "zero_shot_limit": Key((int, float, type(None)), None, "lm-eval limit per task"),
    "dense": Key((bool,), True, "also evaluate the unpruned model for the comparison"),
    "device": Key((str, type(None)), None, "device for evaluation (default: cuda if available)"),
}
HUB_KEYS = {
    "repo_id": Key((str,), None, "hub repository to push the checkpoint to", required=True),
    "private": Key((bool, type(None)), None, "create the repository private"),
    "token_env": Key((str, type(None)), None, "environment variable holding the token (default: the hub login)"),
}
OWNERS = {"pruning": "PruningConfig", "lora": "peft.LoraConfig", "training": "transformers.TrainingArguments",
          "distillation": "DistillationConfig"}
PLAIN_SECTIONS = {"model": MODEL_KEYS, "data": DATA_KEYS, "export": EXPORT_KEYS, "eval": EVAL_KEYS, "hub": HUB_KEYS}


@dataclass
class Recipe:
    """A validated recipe. `raw` is the recipe as read (overrides and `${VAR}` applied)."""

    model: dict
    pruning: PruningConfig
    training: Any  # transformers.TrainingArguments
    lora: Any = None  # peft.LoraConfig or None
    distillation: Any = None  # hfprune.distill.DistillationConfig or None
    data: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)
    eval: Optional[dict] = None
    hub: Optional[dict] = None
    name: str = "recipe"
    description: str = ""
    path: Optional[Path] = None
    raw: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else "recipe"

    def to_dict(self) -> dict:
        """The resolved recipe (defaults filled in), JSON-friendly: for reports and logs."""
        training = self.training.to_dict()
        for key in ("hub_token", "push_to_hub_token"):
            training.pop(key, None)
        return {
            "name": self.name,
            "model": dict(self.model),
            "pruning": self.pruning.to_dict(),
            "lora": _lora_dict(self.lora),
            "distillation": dataclasses.asdict(self.distillation) if self.distillation is not None else None,
            "training": training,
            "data": copy.deepcopy(self.data),
            "export": dict(self.export),
            "eval": copy.deepcopy(self.eval),
            "hub": dict(self.hub) if self.hub else None,
        }


def _lora_dict(lora) -> Optional[dict]:
    if lora is None:
        return None
    out = {}
    for f in dataclasses.fields(lora):
        value = getattr(lora, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, set):
            value = sorted(value)
        if value is None or isinstance(value, (bool, int, float, str, list, dict)):
            out[f.name] = value
    return out


# ---- reading ----------------------------------------------------------------------------------------------


def load_recipe(
    path: Union[str, os.PathLike, dict],
    overrides: Optional[list[str]] = None,
    *,
    check_device: bool = True,
) -> Recipe:
    """Read, override, validate. `path` may also be a dict (relative paths then resolve against the cwd).

    check_device=False builds the TrainingArguments as if on the CPU when the requested precision
    needs a GPU this machine lacks (for dry runs and recipe checks); the training itself always checks.
    """
    import yaml

    if isinstance(path, dict):
        raw, where, base = copy.deepcopy(path), "recipe", Path.cwd()
        recipe_path = None
    else:
        recipe_path = Path(path)
        where = str(recipe_path)
        if not recipe_path.is_file():
            raise FileNotFoundError(f"recipe {where!r}: no such file")
        try:
            raw = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise RecipeError(f"{where}: not valid YAML{at}: {problem}") from None
        base = recipe_path.resolve().parent
        raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{where}: a recipe is a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}"
        )
    for override in overrides or ():
        apply_override(raw, override, where)
    raw = _expand_env(raw, where, "")
    name = raw.get("name") or (recipe_path.stem if recipe_path is not None else "recipe")
    return build_recipe(raw, where=where, base=base, name=name, path=recipe_path, check_device=check_device)


def build_recipe(raw: dict, *, where: str = "recipe", base: Optional[Path] = None, name: str = "recipe",
                 path: Optional[Path] = None, check_device: bool = True) -> Recipe:
    """Validate an already-read recipe mapping and build its config objects."""
    base = base or Path.cwd()
    for key in raw:
        if key not in TOP_LEVEL:
            raise _unknown(where, str(key), TOP_LEVEL, "")
    for key in ("name", "description"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise RecipeError(f"{where}: {key}={raw[key]!r}: expected a string")
    sections = {}
    for section in SECTIONS:
        value = raw.get(section)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: section '{section}' must be a mapping of keys, got {value!r}")
        sections[section] = value
    if "model" not in raw or not raw["model"]:
        raise RecipeError(f"{where}: the 'model' section is required (model.name_or_path: a hub id or a directory)")

    model = _plain_section(sections["model"], MODEL_KEYS, where, "model")
    if model["dtype"] not in DTYPES:
        raise RecipeError(f"{where}: model.dtype={model['dtype']!r}: must be one of {', '.join(DTYPES)}")
    model["name_or_path"] = _resolve_model_path(model["name_or_path"], base)
    if model["model_config"] is not None and _looks_like_path(model["model_config"]):
        model["model_config"] = str(_resolve(model["model_config"], base))

    pruning = _dataclass_section(PruningConfig, sections["pruning"], where, "pruning")
    lora = _build_lora(sections["lora"], pruning, where, "lora" in raw and raw["lora"] is not None)
    distillation = None
    if raw.get("distillation") is not None:
        from .distill import DistillationConfig

        distillation = _dataclass_section(DistillationConfig, sections["distillation"], where, "distillation")

    data = _plain_section(sections["data"], DATA_KEYS, where, "data")
    for split in ("train", "eval"):
        data[split] = _sources(data[split], where, f"data.{split}", base)
    if data["mixing"] not in MIXING:
        raise RecipeError(f"{where}: data.mixing={data['mixing']!r}: must be one of {', '.join(MIXING)}")
    training_raw = dict(sections["training"])
    training_raw.setdefault("output_dir", os.path.join("outputs", name, "trainer"))
    if data["mixing"] == "phases":
        _check_phases(data, training_raw, where)
        training_raw["train_sampling_strategy"] = "sequential"  # the phases' order is the training order
    training = _build_training(training_raw, where, check_device)
    if data["max_length"] < 2:
        raise RecipeError(f"{where}: data.max_length={data['max_length']}: must be at least 2 tokens")
    if data["val_set_size"] < 0:
        raise RecipeError(f"{where}: data.val_set_size={data['val_set_size']}: must be >= 0")

    export = _plain_section(sections["export"], EXPORT_KEYS, where, "export")
    export["output_dir"] = export["output_dir"] or os.path.join("outputs", name, "model")
    if export["dtype"] is not None and export["dtype"] not in DTYPES[1:]:
        raise RecipeError(f"{where}: export.dtype={export['dtype']!r}: must be one of {', '.join(DTYPES[1:])} or null")
    if pruning.uniform and export["uniform"] is False:
        raise RecipeError(
            f"{where}: pruning.uniform=true with export.uniform=false: a uniform model exports a stock config"
        )

    evaluation = None
    if raw.get("eval") is not None:
        evaluation = _plain_section(sections["eval"], EVAL_KEYS, where, "eval")
        evaluation["perplexity"] = _eval_sources(evaluation["perplexity"], where, base)
        if evaluation["task_dir"] is not None:
            evaluation["task_dir"] = str(_resolve(evaluation["task_dir"], base))
        if evaluation["tail"] not in ("drop", "include"):
            raise RecipeError(f"{where}: eval.tail={evaluation['tail']!r}: must be 'drop' or 'include'")
        for key in ("seq_len", "batch_size"):
            if evaluation[key] < 1:
                raise RecipeError(f"{where}: eval.{key}={evaluation[key]}: must be >= 1")
        if not evaluation["perplexity"] and not evaluation["tasks"] and not evaluation["speed"]:
            raise RecipeError(
                f"{where}: the eval section measures nothing: give eval.perplexity, eval.tasks or eval.speed"
            )
    hub = _plain_section(sections["hub"], HUB_KEYS, where, "hub") if raw.get("hub") is not None else None

    recipe = Recipe(
        model=model, pruning=pruning, training=training, lora=lora, distillation=distillation, data=data, export=export, eval=evaluation,
        hub=hub, name=name, description=raw.get("description") or "", path=path, raw=raw,
    )
    check_consistency(recipe)
    return recipe


def check_consistency(recipe: Recipe) -> None:
    """Cross-section rules that no single config class can see."""
    from .importance import get_importance

    where, pruning, model = recipe.source, recipe.pruning, recipe.model
    try:
        criterion = get_importance(pruning.importance)
    except ValueError as error:
        raise RecipeError(f"{where}: pruning.importance: {_one_line(error)}") from None
    if criterion.needs_weight_gradients and model["load_in_8bit"]:
        raise RecipeError(
            f"{where}: model.load_in_8bit=true with pruning.importance={pruning.importance!r}: this criterion needs "
            "full weight gradients, which an 8-bit base cannot have; set model.load_in_8bit: false or "
            "pruning.importance: lora"
        )
    training = recipe.training
    if getattr(training, "fsdp", None) or getattr(training, "deepspeed", None):
        which = "training.fsdp" if getattr(training, "fsdp", None) else "training.deepspeed"
        raise RecipeError(
            f"{where}: {which}: sharded training is not supported: scoring reads whole LoRA factors and weight "
            "rows, and slicing needs whole parameters, which FSDP / DeepSpeed ZeRO keep as flat shards; use data "
            "parallelism (accelerate launch / torchrun without FSDP or DeepSpeed), see docs/distributed.md"
        )
    if pruning.importance == "lora":
        missing = _lora_missing_roles(recipe.lora)
        if missing:
            raise RecipeError(
                f"{where}: lora.target_modules={_target_modules(recipe.lora)!r}: importance='lora' reads the LoRA "
                f"factors of every projection it prunes, but {missing} carry no adapter; use target_modules: "
                f"[{', '.join(DEFAULT_LORA_TARGETS)}] (or all-linear), or another pruning.importance"
            )
        if getattr(recipe.lora, "use_dora", False):
            raise RecipeError(f"{where}: lora.use_dora=true: DoRA layers cannot be pruned; use plain LoRA")


def _target_modules(lora):
    modules = getattr(lora, "target_modules", None)
    return sorted(modules) if isinstance(modules, (set, frozenset)) else modules


def _lora_missing_roles(lora) -> list[str]:
    if lora is None:
        return list(DEFAULT_LORA_TARGETS)
    modules = lora.target_modules
    if modules is None:
        return list(DEFAULT_LORA_TARGETS)
    if isinstance(modules, str):
        if modules == "all-linear":
            return []
        # A regular expression over module names: check it the way peft will.
        return [role for role in DEFAULT_LORA_TARGETS if not re.fullmatch(modules, f"model.layers.0.self_attn.{role}")
                and not re.fullmatch(modules, f"model.layers.0.mlp.{role}")]
    names = set(modules)
    return [role for role in DEFAULT_LORA_TARGETS if not any(name == role or name.endswith("." + role) for name in names)]


# ---- overrides and environment ----------------------------------------------------------------------------


def apply_override(raw: dict, override: str, where: str = "recipe") -> None:
    """Apply `section.key=value` (value parsed as YAML) to `raw`, in place."""
    import yaml

    if "=" not in override:
        raise RecipeError(
            f"override {override!r}: expected KEY=VALUE with a dotted key, e.g. pruning.target_sparsity=0.5"
        )
    key, text = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise RecipeError(f"override {override!r}: the key must be dotted names, e.g. pruning.target_sparsity")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if parts[0] not in TOP_LEVEL:
        raise _unknown(f"override {override!r}", parts[0], TOP_LEVEL, "")
    if len(parts) == 1:
        raw[parts[0]] = value
        return
    if parts[0] in ("name", "description"):
        raise RecipeError(f"override {override!r}: '{parts[0]}' is a plain string, not a section")
    valid = _section_keys(parts[0])
    if valid is not None and parts[1] not in valid:
        raise _unknown(
            f"override {override!r}", ".".join(parts[:2]), valid, parts[0] + ".", owner=OWNERS.get(parts[0], "")
        )
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = _child(node, part)
        if parts[0] == "data" and depth >= 1:
            # Data sources have shorthands: `train: a.json` is `train: [{path: a.json}]`.
            if depth == 1 and parts[depth + 1].isdigit() and isinstance(child, (str, dict)):
                child = [child]
                _set_child(node, part, child)
            elif depth == 2 and isinstance(child, str):
                child = {"path": child}
                _set_child(node, part, child)
        if child is None:
            child = {}
            _set_child(node, part, child)
        if not isinstance(child, (dict, list)):
            raise RecipeError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is {child!r}, not a mapping")
        node = child
    _set_child(node, parts[-1], value, override)


def _child(node, part):
    if isinstance(node, list):
        return node[int(part)] if part.isdigit() and int(part) < len(node) else None
    return node.get(part)


def _set_child(node, part, value, override: str = "") -> None:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise RecipeError(f"override {override!r}: {part!r} is not an index of a list of {len(node)}")
        node[int(part)] = value
    else:
        node[part] = value


def _check_phases(data: dict, training_raw: dict, where: str) -> None:
    """`mixing: phases` trains on each source in turn (LoRAShear's two-phase recovery: text, then instructions)."""
    weighted = [i for i, source in enumerate(data["train"]) if source["weight"] is not None]
    if weighted:
        raise RecipeError(
            f"{where}: data.train[{weighted[0]}].weight with data.mixing=phases: phases run one source after the "
            "other, so weights mean nothing; size each phase with max_samples, or use mixing: first_exhausted"
        )
    strategy = training_raw.get("train_sampling_strategy", "random")
    if strategy not in ("random", "sequential"):
        raise RecipeError(
            f"{where}: training.train_sampling_strategy={strategy!r} with data.mixing=phases: phases need the "
            "sequential sampler (set automatically); remove the key or set it to sequential"
        )


def _section_keys(section: str) -> Optional[tuple[str, ...]]:
    if section in PLAIN_SECTIONS:
        return tuple(PLAIN_SECTIONS[section])
    if section == "pruning":
        return tuple(f.name for f in dataclasses.fields(PruningConfig))
    if section == "distillation":
        from .distill import DistillationConfig

        return tuple(f.name for f in dataclasses.fields(DistillationConfig))
    if section == "lora":
        from peft import LoraConfig

        return tuple(f.name for f in dataclasses.fields(LoraConfig))
    if section == "training":
        from transformers import TrainingArguments

        return tuple(f.name for f in dataclasses.fields(TrainingArguments))
    return None


def _expand_env(value, where: str, key: str):
    if isinstance(value, dict):
        return {k: _expand_env(v, where, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ and os.environ[name] != "":
            return os.environ[name]
        if default is not None:
            return default
        raise RecipeError(
            f"{where}: {key}={value!r}: environment variable {name} is not set; set it or give a default "
            f"as ${{{name}:-default}}"
        )

    return ENV_PATTERN.sub(substitute, value)


# ---- sections ---------------------------------------------------------------------------------------------


def _unknown(where: str, key: str, valid, prefix: str, owner: str = "") -> RecipeError:
    leaf = key.split(".")[-1]
    candidates = [str(v) for v in valid]
    close = difflib.get_close_matches(leaf, candidates, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean '{prefix}{close[0]}'?"
    elif len(candidates) <= 12:
        hint = f"valid keys: {', '.join(prefix + c for c in candidates)}"
    else:
        hint = f"valid keys are the fields of {owner or 'the config class'}"
    full = key if key.startswith(prefix) else prefix + key
    return RecipeError(f"{where}: unknown key '{full}'; {hint}")


def _type_names(types_: tuple) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types_))


def _plain_section(values: dict, keys: dict[str, Key], where: str, section: str) -> dict:
    out = {}
    for key in values:
        if key not in keys:
            raise _unknown(where, str(key), keys, f"{section}.")
    for key, spec in keys.items():
        value = values.get(key, copy.deepcopy(spec.default))
        if value is None and spec.required:
            raise RecipeError(f"{where}: {section}.{key} is required: {spec.help}")
        value = _check_plain(value, spec.types, where, f"{section}.{key}")
        out[key] = value
    return out


def _check_plain(value, accepted: tuple, where: str, key: str):
    if float in accepted and isinstance(value, str):
        number = _yaml_number(value)
        if number is not None:
            return number
    ok = any(
        isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) for t in accepted
    )
    if not ok:
        raise RecipeError(f"{where}: {key}={value!r}: expected {_type_names(accepted)}")
    return value


def _yaml_number(text: str) -> Optional[float]:
    """PyYAML reads `1e-4` (no dot) as a string; a number-typed field takes it as the number it is."""
    try:
        number = float(text)
    except ValueError:
        return None
    return number if re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", text) else None


def _dataclass_section(cls, values: dict, where: str, section: str):
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown(where, str(key), sorted(names), f"{section}.", owner=OWNERS.get(section, cls.__name__))
        kwargs[key] = coerce(value, hints.get(key, Any), where, f"{section}.{key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"{where}: {section}: {_one_line(error)}") from None


def _build_lora(values: dict, pruning: PruningConfig, where: str, given: bool):
    from peft import LoraConfig

    if not given:
        if pruning.importance != "lora":
            return None
        from .adapters import default_lora_config

        return default_lora_config()
    values = dict(values)
    values.setdefault("task_type", "CAUSAL_LM")
    # peft's own default (q and v only, for Llama) cannot feed the lora criterion; LoRAPrune adapts all seven.
    values.setdefault("target_modules", list(DEFAULT_LORA_TARGETS))
    return _dataclass_section(LoraConfig, values, where, "lora")


def _build_training(values: dict, where: str, check_device: bool):
    resume = values.get("resume_from_checkpoint")
    if resume is True:
        values["resume_from_checkpoint"] = "last"
    elif resume is False:
        values["resume_from_checkpoint"] = None
    try:
        return _training_arguments(values, where)
    except RecipeError as error:
        if "bf16/gpu" not in str(error):
            raise
        if check_device:
            raise RecipeError(
                f"{where}: training.bf16=true needs a GPU with bf16, which this machine lacks; run it on one, "
                "or pass training.bf16=false (training.use_cpu=true trains on the CPU)"
            ) from None
    # A dry run on a machine without the GPU the recipe is meant for: plan as if on the CPU.
    return _training_arguments({**values, "use_cpu": True}, where)


def _training_arguments(values: dict, where: str):
    import warnings

    from transformers import TrainingArguments

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated aliases (gradient_checkpointing) still work
        return _dataclass_section(TrainingArguments, values, where, "training")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ---- type checks for dataclass fields ---------------------------------------------------------------------


class _Mismatch(Exception):
    def __init__(self, expected: str):
        self.expected = expected


def coerce(value, hint, where: str, key: str):
    """`value` checked against the type annotation `hint` (tuples from lists, numbers from `1e-4` strings)."""
    try:
        return _coerce(value, hint)
    except _Mismatch as mismatch:
        raise RecipeError(f"{where}: {key}={value!r}: expected {mismatch.expected}") from None


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "null"
    if hint is bool:
        return "true/false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin in (list, tuple) or hint in (list, tuple):
        return "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))


def _coerce(value, hint):
    if hint is Any or hint is object or isinstance(hint, (str, typing.ForwardRef)):
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        # Exact type matches first, so `1` stays an int in `int | float` and "x" a str in `float | str`.
        for arg in args:
            if _exact(value, arg):
                return _coerce(value, arg)
        for arg in args:
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch(" or ".join(dict.fromkeys(_describe(a) for a in args)))
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch("null")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("true/false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _yaml_number(value) is not None:
            return _yaml_number(value)
        raise _Mismatch("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("a string")
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch(_describe(hint))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint) or value in {m.value for m in hint}:
            return value
        raise _Mismatch(_describe(hint))
    if origin in (list, tuple, set) or hint in (list, tuple, set):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch("a list")
        item = args[0] if args else Any
        items = [_coerce(v, item) for v in value]
        return tuple(items) if (origin or hint) is tuple else items
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch("a mapping")
    return value  # a type this checker does not know: the config class decides


def _exact(value, hint) -> bool:
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return type(value) is hint
    if hint in (bool, str):
        return isinstance(value, hint)
    origin = typing.get_origin(hint)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return False


# ---- paths and data sources -------------------------------------------------------------------------------


def _looks_like_path(text: str) -> bool:
    return text.startswith(("./", "../", "/", "~")) or text.endswith(".json") or os.sep in text and text.count("/") > 1


def _resolve(text: str, base: Path) -> Path:
    path = Path(os.path.expanduser(text))
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_model_path(text: str, base: Path) -> str:
    if text.startswith(("./", "../", "/", "~")) or (base / text).exists() and not Path(text).is_absolute():
        return str(_resolve(text, base))
    return text


def is_local_source(path: str) -> bool:
    return path.startswith(("./", "../", "/", "~")) or path.lower().endswith(DATA_SUFFIXES)


def _sources(value, where: str, key: str, base: Path) -> list[dict]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    sources = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise RecipeError(f"{where}: {key}[{i}]={item!r}: expected a path, a hub id or a mapping with 'path'")
        source = _plain_section(item, SOURCE_KEYS, where, f"{key}[{i}]")
        if source["weight"] is not None and source["weight"] <= 0:
            raise RecipeError(f"{where}: {key}[{i}].weight={source['weight']}: must be > 0")
        if source["max_samples"] is not None and source["max_samples"] < 1:
            raise RecipeError(f"{where}: {key}[{i}].max_samples={source['max_samples']}: must be >= 1")
        if source["skip_samples"] < 0:
            raise RecipeError(f"{where}: {key}[{i}].skip_samples={source['skip_samples']}: must be >= 0")
        path = source["path"]
        if is_local_source(path) or (base / path).exists():
            source["path"] = str(_resolve(path, base))
            source["local"] = True
        else:
            source["local"] = False
        sources.append(source)
    weighted = [s["weight"] is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise RecipeError(f"{where}: {key}: give every source a weight, or none (then they are concatenated)")
    return sources


def _eval_sources(value, where: str, base: Path) -> list[str]:
    from .evaluation.perplexity import HUB_SOURCES

    items = [value] if isinstance(value, str) else list(value)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise RecipeError(f"{where}: eval.perplexity[{i}]={item!r}: expected a source name or a file path")
        out.append(item if item in HUB_SOURCES else str(_resolve(item, base)))
    return out


# ---- documentation ----------------------------------------------------------------------------------------


def schema_text() -> str:
    """The plain sections and their keys, for `hfprune prune --help`."""
    lines = []
    for section, keys in PLAIN_SECTIONS.items():
        lines.append(f"  {section}:")
        for key, spec in keys.items():
            default = "required" if spec.required else f"default {spec.default!r}"
            lines.append(f"    {key:<20} {spec.help} ({default})")
        if section == "data":
            lines.append("    a source is a path/hub id string or a mapping:")
            for key, spec in SOURCE_KEYS.items():
                lines.append(f"      {key:<18} {spec.help}")
    lines.append("  pruning / lora / training: the fields of hfprune.PruningConfig, peft.LoraConfig,")
    lines.append("    transformers.TrainingArguments (one-to-one)")
    return "\n".join(lines)
