"""YAML recipes: one file that says which model to prune, how, on what data, and where it goes.

    recipe = load_recipe("recipes/llama-7b-20.yaml", overrides=["pruning.target_sparsity=0.5"])
    recipe = load_recipe("llama-7b-20")     # a shipped recipe, by name, from any directory
    recipe.pruning      # hfprune.PruningConfig
    recipe.lora         # peft.LoraConfig (or None)
    recipe.training     # transformers.TrainingArguments
    recipe.distillation # hfprune.DistillationConfig (or None)
    recipe.model, recipe.data, recipe.export, recipe.eval, recipe.hub
                        # ModelSection, DataSection (of DataSource), ExportSection, EvalSection, HubSection

Every section maps one-to-one onto the fields of its dataclass, so their documentation
applies (`hfprune prune --help` lists the keys of hfprune's own sections, from sections.py):

    name: llama-7b-20                   # optional; default: the file name
    description: ...                    # optional free text
    model: {name_or_path: huggyllama/llama-7b, model_config: llama-7b, load_in_8bit: false, dtype: bfloat16}
    lora: {r: 8, lora_alpha: 16, ...}   # peft.LoraConfig; target_modules defaults to all seven projections,
                                        # task_type to CAUSAL_LM
    pruning: {target_sparsity: 0.2, ...}# hfprune.PruningConfig
    distillation: {alpha: 0.5, temperature: 2.0}  # hfprune.DistillationConfig (omit: plain loss)
    training: {output_dir: ..., ...}    # transformers.TrainingArguments
    data:
      train: yahma/alpaca-cleaned       # a path, a hub id, or a list of sources (DataSource):
      #  - {path: ../data/alpaca.json, weight: 1.0, skip_samples: 0, max_samples: null, ...}
      mixing: first_exhausted           # or all_exhausted; phases: each source in turn (C4, then instructions)
      max_length: 512
    export: {output_dir: ..., dtype: null, overwrite: false, max_shard_size: 5GB, uniform: null}
    eval: {perplexity: [wikitext2, ../data/wiki.txt], seq_len: 2048, tasks: [], speed: false}
    hub: {repo_id: you/llama-7b-pruned, private: null, token_env: HF_TOKEN}

A value is read as `HfArgumentParser` reads the same text on the command line (`3e-4` is a
number, `no` for a true/false key is false; YAML 1.2 booleans, so `save_strategy: no` stays
"no"). Strings may use `${VAR}` or `${VAR:-default}` (environment variables). Relative data
and model paths resolve against the recipe file's directory; output directories against the
current directory. Overrides are `section.key=value` (value parsed as YAML), with list items
by index (`data.train.0.weight=2`). Unknown keys are errors that name the closest valid key.
"""

from .consistency import check_consistency
from .errors import RecipeError
from .loading import apply_override, build_recipe, find_recipe, load_recipe, shipped_recipes
from .recipe import Recipe
from .sections import (
    DataSection,
    DataSource,
    EvalSection,
    ExportSection,
    HubSection,
    ModelSection,
    is_local_source,
    schema_text,
)

__all__ = [
    "DataSection",
    "DataSource",
    "EvalSection",
    "ExportSection",
    "HubSection",
    "ModelSection",
    "Recipe",
    "RecipeError",
    "apply_override",
    "build_recipe",
    "check_consistency",
    "find_recipe",
    "is_local_source",
    "load_recipe",
    "schema_text",
    "shipped_recipes",
]
