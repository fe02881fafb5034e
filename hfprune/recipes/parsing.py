"""One path from a recipe mapping to a config dataclass, for every section.

`read_section(cls, values, ...)` turns one section (or one data source) into a `cls`
instance: `model`, `data`, `export`, `eval`, `hub` (hfprune.recipes.sections), `pruning`
(PruningConfig), `lora` (peft.LoraConfig), `training` (transformers.TrainingArguments) and
`distillation` (DistillationConfig) all go through it:

  1. every key must be a field of `cls` (else the closest valid key is named);
  2. every scalar value is read the way `transformers.HfArgumentParser` reads the same value
     typed on the command line, with the field's own argparse `type` and `choices`
     (`learning_rate: 3e-4` is a number, `max_steps: 1.5` is not an integer, `bf16: maybe`
     is not true/false); a value the command line has no text for (a mapping, a list for a
     field that is not a list) goes to the class as it is;
  3. a field holding dataclasses (`data.train: list[DataSource]`) reads each item by the same
     path, a bare value filling the item's first field (`train: a.json` -> `path: a.json`);
  4. `cls(**values)`: the class's own `__post_init__` checks the values.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import typing
import warnings
from typing import Any, Optional

from .errors import RecipeError, one_line, unknown_key

# The classes behind the sections that are not hfprune's, for "valid keys are the fields of ...".
OWNERS = {"lora": "peft.LoraConfig", "training": "transformers.TrainingArguments"}


def read_section(cls, values: Any, where: str, key: str):
    """`values` (the mapping under `key` in the recipe) as a `cls` instance; RecipeError naming the key."""
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: {key} must be a mapping of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in values:
        if name not in fields:
            raise unknown_key(where, f"{key}.{name}", fields, f"{key}.", OWNERS.get(key, cls.__name__))
    for name, f in fields.items():
        if _required(f) and values.get(name) is None:
            raise RecipeError(f"{where}: {key}.{name} is required: {f.metadata.get('help', '')}".rstrip(": "))
    hints = typing.get_type_hints(cls)
    actions = field_actions(cls)
    kwargs = {}
    for name, value in values.items():
        item_class = _dataclass_items(hints[name])
        if item_class is not None and value is not None:
            items = value if isinstance(value, list) else [value]
            kwargs[name] = [
                read_section(item_class, _as_mapping(item_class, item, where, f"{key}.{name}[{i}]"), where,
                             f"{key}.{name}[{i}]")
                for i, item in enumerate(items)
            ]
        else:
            kwargs[name] = read_value(actions.get(name), value, where, f"{key}.{name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated aliases (gradient_checkpointing) still work
            return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{where}: {key}: {one_line(error)}") from None


def read_value(action: Optional[argparse.Action], value: Any, where: str, key: str) -> Any:
    """`value` as HfArgumentParser would read its command-line text for this field (None stays None)."""
    if action is None or value is None:
        return value
    takes_list = action.nargs in ("+", "*")
    if isinstance(value, (list, tuple)) and takes_list:
        return [_read_text(action, item, where, f"{key}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (str, int, float, bool)) and not takes_list:
        return _read_text(action, value, where, key)
    return value  # a list where one value goes, one value where a list goes, a mapping: the class decides


def _read_text(action: argparse.Action, value: Any, where: str, key: str) -> Any:
    convert = action.type
    if convert in (None, str) or (convert not in (int, float, _string_to_bool()) and action.choices is None):
        return value  # strings (their choices too), and types the command line cannot spell: the class decides
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    try:
        result = convert(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise RecipeError(f"{where}: {key}={value!r}: expected {_expected(action)}") from None
    if action.choices is not None and result not in action.choices:
        raise RecipeError(f"{where}: {key}={value!r}: expected {_expected(action)}")
    return result


def _expected(action: argparse.Action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(str(c) for c in action.choices)
    return {int: "an integer", float: "a number"}.get(action.type, "true/false")


@functools.cache
def _string_to_bool():
    from transformers.hf_argparser import string_to_bool

    return string_to_bool


@functools.cache
def field_actions(cls) -> dict[str, argparse.Action]:
    """HfArgumentParser's argparse action (type, choices, nargs) for each field of `cls` it can build one for.

    Built field by field: a field whose annotation the command line cannot spell (peft's
    `Optional[Union[list[int], int]]`, a bool-or-mapping) gets none and is left to its class.
    """
    from transformers import HfArgumentParser

    parser = argparse.ArgumentParser(add_help=False)
    hints = typing.get_type_hints(cls)
    actions: dict[str, argparse.Action] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        f = copy.copy(f)  # HfArgumentParser narrows `field.type` in place
        f.type = hints[f.name]
        try:
            HfArgumentParser._parse_dataclass_field(parser, f)
        except (TypeError, ValueError, RuntimeError, argparse.ArgumentError):
            continue
        for action in parser._actions:
            actions.setdefault(action.dest, action)  # the first: `--no_x` complements come after
    return actions


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _dataclass_items(hint) -> Optional[type]:
    """`DataSource` for `list[DataSource]`, else None."""
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (None,)
        if dataclasses.is_dataclass(item):
            return item
    return None


def _as_mapping(cls, item: Any, where: str, key: str) -> dict:
    if isinstance(item, dict):
        return item
    first = next(f.name for f in dataclasses.fields(cls) if f.init)
    if isinstance(item, (str, int, float)) and not isinstance(item, bool):
        return {first: item}
    raise RecipeError(f"{where}: {key}={item!r}: expected a {first} or a mapping with '{first}'")
