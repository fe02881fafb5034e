"""The built-in criteria by name, and the module of this package that registers each.

Torch-free, so that config-only commands (`hfprune estimate --help`) can list the criteria without
importing the criteria themselves. The registry (`base.py`) imports these modules on its first use.
"""

from __future__ import annotations

import sys

#: name -> module (in hfprune/importance/) whose `@register_importance(name)` defines it.
BUILTIN_CRITERIA: dict[str, str] = {
    "activation": "activation",
    "activation_taylor": "activation_taylor",
    "activation_taylor_sq": "activation_taylor",
    "bonsai": "bonsai",
    "flap": "activation",
    "lora": "lora",
    "magnitude": "magnitude",
    "param_second": "taylor",
    "random": "random_",
    "taylor": "taylor",
    "taylor2": "taylor",
    "vector": "taylor",
}


def criterion_names() -> tuple[str, ...]:
    """The built-in names and any registered at run time, sorted.

    A criterion registered at run time went through `register_importance`, so the registry is loaded
    then; when it is not, only the built-in names exist and torch stays unimported."""
    registry = sys.modules.get(f"{__package__}.base")
    registered = registry.available_importances() if registry is not None else ()
    return tuple(sorted(set(BUILTIN_CRITERIA) | set(registered)))
