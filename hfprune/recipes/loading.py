"""Reading a recipe: the file (or a shipped recipe by name), `${VAR}`, overrides, relative paths.

    load_recipe(path_or_name, overrides)   file -> YAML -> overrides -> ${VAR} -> build_recipe
    build_recipe(raw, ...)                 every section through parsing.read_section, paths
                                           resolved, then consistency.check_consistency
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Optional, Union

import yaml

from ..adapters import DEFAULT_LORA_TARGETS
from ..config import PruningConfig
from .consistency import check_consistency, check_phases
from .errors import RecipeError, unknown_key
from .parsing import OWNERS, read_section
from .recipe import Recipe
from .sections import SECTIONS as PLAIN_SECTIONS
from .sections import DataSection, EvalSection, ExportSection, HubSection, ModelSection

SECTIONS = ("model", "lora", "pruning", "distillation", "data", "training", "export", "eval", "hub")
TOP_LEVEL = ("name", "description") + SECTIONS
ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Source checkouts link this to the repository's recipes/; wheels carry a copy (package data).
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


class _RecipeYAML(yaml.SafeLoader):
    """YAML with 1.2 booleans (true/false only): `save_strategy: no` is the string "no" that
    TrainingArguments expects, and a true/false field reads `yes`/`no` text as HfArgumentParser does."""


_RecipeYAML.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeYAML.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_RecipeYAML)  # noqa: S506 - a SafeLoader subclass


# ---- reading ----------------------------------------------------------------------------------------------


def shipped_recipes() -> dict[str, Path]:
    """The recipes that come with hfprune, by name (`llama-7b-20`, `smollm2-135m-demo`, ...)."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {path.stem: path for path in sorted(SHIPPED_DIR.glob("*.yaml"))}


def find_recipe(target: Union[str, os.PathLike]) -> Path:
    """A recipe file, or a shipped recipe named without a directory (`llama-7b-20`, `llama-7b-20.yaml`)."""
    path = Path(target)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if path.parent == Path(".") and path.name.removesuffix(".yaml").removesuffix(".yml") in shipped:
        return shipped[path.name.removesuffix(".yaml").removesuffix(".yml")]
    names = f"; shipped recipes, by name: {', '.join(shipped)}" if shipped else ""
    raise FileNotFoundError(f"recipe {str(target)!r}: no such file{names}")


def load_recipe(
    path: Union[str, os.PathLike, dict],
    overrides: Optional[list[str]] = None,
    *,
    check_device: bool = True,
) -> Recipe:
    """Read, override, validate. `path` is a recipe file, a shipped recipe's name, or a dict (relative
    paths then resolve against the cwd).

    check_device=False builds the TrainingArguments as if on the CPU when the requested precision
    needs a GPU this machine lacks (for dry runs and recipe checks); the training itself always checks.
    """
    if isinstance(path, dict):
        raw, where, base, recipe_path = copy.deepcopy(path), "recipe", Path.cwd(), None
    else:
        recipe_path = find_recipe(path)
        where = str(recipe_path)
        raw = _read_yaml(recipe_path, where)
        base = recipe_path.resolve().parent
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{where}: a recipe is a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}"
        )
    for override in overrides or ():
        apply_override(raw, override, where)
    env_defaults: dict[str, tuple[str, str]] = {}
    raw = _expand_env(raw, where, "", env_defaults)
    name = raw.get("name") or (recipe_path.stem if recipe_path is not None else "recipe")
    return build_recipe(raw, where=where, base=base, name=name, path=recipe_path, check_device=check_device,
                        env_defaults=env_defaults)


def _read_yaml(path: Path, where: str):
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise RecipeError(
            f"{where}: not a UTF-8 text file (byte 0x{data[error.start]:02x} on line {line}, offset {error.start}); "
            "a recipe is YAML text"
        ) from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{where}: not valid YAML{at}: {problem}") from None
    return {} if raw is None else raw


def build_recipe(raw: dict, *, where: str = "recipe", base: Optional[Path] = None, name: str = "recipe",
                 path: Optional[Path] = None, check_device: bool = True,
                 env_defaults: Optional[dict[str, tuple[str, str]]] = None) -> Recipe:
    """Validate an already-read recipe mapping and build its config objects.

    env_defaults: expanded strings that took a `${VAR:-default}` default, as {text: (VAR, default)};
    an input path among them that does not exist is refused with a hint to set VAR.
    """
    base = base or Path.cwd()
    for key in raw:
        if key not in TOP_LEVEL:
            raise unknown_key(where, str(key), TOP_LEVEL, "")
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
    if not raw.get("model"):
        raise RecipeError(f"{where}: the 'model' section is required (model.name_or_path: a hub id or a directory)")

    model = read_section(ModelSection, sections["model"], where, "model")
    pruning = read_section(PruningConfig, sections["pruning"], where, "pruning")
    lora = _build_lora(sections["lora"], pruning, where, raw.get("lora") is not None)
    distillation = None
    if raw.get("distillation") is not None:
        from ..distill import DistillationConfig

        distillation = read_section(DistillationConfig, sections["distillation"], where, "distillation")
    data = read_section(DataSection, sections["data"], where, "data")
    training_raw = dict(sections["training"])
    training_raw.setdefault("output_dir", os.path.join("outputs", name, "trainer"))
    if data.mixing == "phases":
        check_phases(data, training_raw, where)
        training_raw["train_sampling_strategy"] = "sequential"  # the phases' order is the training order
    training = _build_training(training_raw, where, check_device)
    export = read_section(ExportSection, sections["export"], where, "export")
    export.output_dir = export.output_dir or os.path.join("outputs", name, "model")
    evaluation = read_section(EvalSection, sections["eval"], where, "eval") if raw.get("eval") is not None else None
    hub = read_section(HubSection, sections["hub"], where, "hub") if raw.get("hub") is not None else None

    _InputPaths(base, where, env_defaults or {}).resolve(model, data, evaluation)
    recipe = Recipe(
        model=model, pruning=pruning, training=training, lora=lora, distillation=distillation, data=data,
        export=export, eval=evaluation, hub=hub, name=name, description=raw.get("description") or "", path=path,
        raw=raw,
    )
    check_consistency(recipe)
    return recipe


def section_class(section: str):
    """The dataclass a section maps onto."""
    if section in PLAIN_SECTIONS:
        return PLAIN_SECTIONS[section]
    if section == "pruning":
        return PruningConfig
    if section == "distillation":
        from ..distill import DistillationConfig

        return DistillationConfig
    if section == "lora":
        from peft import LoraConfig

        return LoraConfig
    if section == "training":
        from transformers import TrainingArguments

        return TrainingArguments
    raise KeyError(section)


def _build_lora(values: dict, pruning: PruningConfig, where: str, given: bool):
    from peft import LoraConfig

    if not given:
        if pruning.importance != "lora":
            return None
        from ..adapters import default_lora_config

        return default_lora_config()
    values = dict(values)
    values.setdefault("task_type", "CAUSAL_LM")
    # peft's own default (q and v only, for Llama) cannot feed the lora criterion; LoRAPrune adapts all seven.
    values.setdefault("target_modules", list(DEFAULT_LORA_TARGETS))
    return read_section(LoraConfig, values, where, "lora")


def _build_training(values: dict, where: str, check_device: bool):
    from transformers import TrainingArguments

    resume = values.get("resume_from_checkpoint")
    if resume is True:
        values["resume_from_checkpoint"] = "last"
    elif resume is False:
        values["resume_from_checkpoint"] = None
    try:
        return read_section(TrainingArguments, values, where, "training")
    except RecipeError as error:
        if "bf16/gpu" not in str(error):
            raise
        if check_device:
            raise RecipeError(
                f"{where}: training.bf16=true needs a GPU with bf16, which this machine lacks; run it on one, "
                "or pass training.bf16=false (training.use_cpu=true trains on the CPU)"
            ) from None
    # A dry run on a machine without the GPU the recipe is meant for: plan as if on the CPU.
    return read_section(TrainingArguments, {**values, "use_cpu": True}, where, "training")


# ---- paths ------------------------------------------------------------------------------------------------


class _InputPaths:
    """Relative input paths (model, data, evaluation files) resolve against the recipe's directory;
    output directories stay relative to the current directory."""

    def __init__(self, base: Path, where: str, env_defaults: dict[str, tuple[str, str]]):
        self.base, self.where, self.env_defaults = base, where, env_defaults

    def resolve(self, model: ModelSection, data: DataSection, evaluation: Optional[EvalSection]) -> None:
        from ..evaluation.perplexity import HUB_SOURCES

        text = model.name_or_path
        if text.startswith(("./", "../", "/", "~")) or not Path(text).is_absolute() and (self.base / text).exists():
            model.name_or_path = self.path(text, "model.name_or_path")
        if model.model_config is not None and _looks_like_path(model.model_config):
            model.model_config = self.path(model.model_config, "model.model_config")
        for split in ("train", "eval"):
            for i, source in enumerate(getattr(data, split)):
                if source.local or (self.base / source.path).exists():
                    source.path = self.path(source.path, f"data.{split}[{i}].path")
                    source.local = True
        if evaluation is not None:
            evaluation.perplexity = [
                item if item in HUB_SOURCES else self.path(item, f"eval.perplexity[{i}]")
                for i, item in enumerate(evaluation.perplexity)
            ]
            if evaluation.task_dir is not None:
                evaluation.task_dir = self.path(evaluation.task_dir, "eval.task_dir")

    def path(self, text: str, key: str) -> str:
        path = Path(os.path.expanduser(text))
        path = path if path.is_absolute() else (self.base / path).resolve()
        variable, default = self.env_defaults.get(text, (None, ""))
        # A relative default points next to the recipe file: right in the repository, nowhere from an installed
        # copy (a shipped recipe run by name), where only the variable can say where the data is.
        if variable and not Path(os.path.expanduser(default)).is_absolute() and not path.exists():
            raise RecipeError(
                f"{self.where}: {key}={str(path)!r}: no such file or directory; {variable} is not set, so its default "
                f"{default!r} was used (relative to {self.base}): set {variable} to the folder that holds it"
            )
        return str(path)


def _looks_like_path(text: str) -> bool:
    return text.startswith(("./", "../", "/", "~")) or text.endswith(".json") or os.sep in text and text.count("/") > 1


# ---- environment and overrides ----------------------------------------------------------------------------


def _expand_env(value, where: str, key: str, defaults: dict[str, tuple[str, str]]):
    """`${VAR}` / `${VAR:-default}` in every string; `defaults` collects the strings that took a default."""
    if isinstance(value, dict):
        return {k: _expand_env(v, where, f"{key}.{k}" if key else str(k), defaults) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, where, f"{key}[{i}]", defaults) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    used = []

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ and os.environ[name] != "":
            return os.environ[name]
        if default is not None:
            used.append((name, default))
            return default
        raise RecipeError(
            f"{where}: {key}={value!r}: environment variable {name} is not set; set it or give a default "
            f"as ${{{name}:-default}}"
        )

    expanded = ENV_PATTERN.sub(substitute, value)
    if used:
        defaults[expanded] = used[0]
    return expanded


def apply_override(raw: dict, override: str, where: str = "recipe") -> None:
    """Apply `section.key=value` (value parsed as YAML) to `raw`, in place."""
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
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if parts[0] not in TOP_LEVEL:
        raise unknown_key(f"override {override!r}", parts[0], TOP_LEVEL, "")
    if len(parts) == 1:
        raw[parts[0]] = value
        return
    if parts[0] in ("name", "description"):
        raise RecipeError(f"override {override!r}: '{parts[0]}' is a plain string, not a section")
    valid = [f.name for f in _init_fields(section_class(parts[0]))]
    if parts[1] not in valid:
        raise unknown_key(
            f"override {override!r}", ".".join(parts[:2]), valid, parts[0] + ".", owner=OWNERS.get(parts[0], "")
        )
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = _child(node, part)
        if parts[0] == "data" and depth >= 1:
            # Data sources have shorthands: `train: a.json` is `train: [{path: a.json}]`.
            if depth == 1 and parts[depth + 1].isdigit() and isinstance(child, (str, dict)):
                child = [child]
                _set_child(node, part, child, override)
            elif depth == 2 and isinstance(child, str):
                child = {"path": child}
                _set_child(node, part, child, override)
        if child is None:
            child = {}
            _set_child(node, part, child, override)
        if not isinstance(child, (dict, list)):
            raise RecipeError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is {child!r}, not a mapping")
        node = child
    _set_child(node, parts[-1], value, override)


def _init_fields(cls):
    import dataclasses

    return [f for f in dataclasses.fields(cls) if f.init]


def _child(node, part):
    if isinstance(node, list):
        return node[int(part)] if part.isdigit() and int(part) < len(node) else None
    return node.get(part)


def _set_child(node, part, value, override: str) -> None:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            valid = f"0 to {len(node) - 1}" if node else "none: the list is empty"
            raise RecipeError(f"override {override!r}: {part!r} is not an index of a list of {len(node)} ({valid})")
        node[int(part)] = value
    else:
        node[part] = value
