"""`RecipeError` and the message for a key the recipe does not know."""

from __future__ import annotations

import difflib
from typing import Iterable


class RecipeError(ValueError):
    """A recipe (or an override) is invalid. The message names the key and what would be valid."""


def unknown_key(where: str, key: str, valid: Iterable[str], prefix: str, owner: str = "") -> RecipeError:
    """`key` is not one of `valid` (the keys under `prefix`): suggest the closest one, or list them."""
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


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
