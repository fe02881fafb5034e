"""Type and value checks for the config dataclasses (`PruningConfig`, the recipe sections).

Each raises with the field's name, the bad value and what would be valid
(`target_sparsity=1.2: must be in [0, 1)`): `TypeError` for a value of the wrong
type, `ValueError` for one of the right type out of range. `None` passes where
`optional=True`. Booleans are never taken for numbers (`True` is not 1 here); numpy
scalars are (`numbers.Integral`, `numbers.Real`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional


def _or_none(optional: bool) -> str:
    return " or None" if optional else ""


def boolean(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: must be True or False{_or_none(optional)}")


def text(name: str, value: Any, *, optional: bool = False) -> None:
    """A non-empty string."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name}={value!r}: must be a non-empty string{_or_none(optional)}")


def integer(name: str, value: Any, *, minimum: Optional[int] = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    bound = f" >= {minimum}" if minimum is not None else ""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: must be an integer{bound}{_or_none(optional)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer{bound}{_or_none(optional)}")


def number(name: str, value: Any, *, minimum: Optional[float] = None, above: Optional[float] = None,
           optional: bool = False) -> None:
    """A finite real number, `>= minimum` / `> above` when given."""
    if value is None and optional:
        return
    bound = f" >= {minimum}" if minimum is not None else f" > {above}" if above is not None else ""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: must be a number{bound}{_or_none(optional)}")
    if (not math.isfinite(value) or (minimum is not None and value < minimum)
            or (above is not None and not value > above)):
        raise ValueError(f"{name}={value!r}: must be a finite number{bound}{_or_none(optional)}")


def fraction(name: str, value: Any, *, closed: bool = False, optional: bool = False) -> None:
    """A number in [0, 1) (or [0, 1] with `closed=True`); NaN is refused."""
    if value is None and optional:
        return
    interval = "[0, 1]" if closed else "[0, 1)"
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: must be a number in {interval}{_or_none(optional)}")
    if not (0 <= value <= 1 if closed else 0 <= value < 1):  # False for NaN too
        raise ValueError(f"{name}={value!r}: must be in {interval}")


def choice(name: str, value: Any, valid: Iterable[str], *, optional: bool = False) -> None:
    if value is None and optional:
        return
    valid = tuple(valid)
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(valid)}{_or_none(optional)}")


def integers(name: str, value: Any, *, optional: bool = False, example: str = "[0, 1]") -> tuple[int, ...]:
    """A list or tuple of integers, returned as a tuple (a bare string or number is refused, not split)."""
    if value is None and optional:
        return value
    items = value.tolist() if hasattr(value, "tolist") else value  # numpy arrays and tensors too
    if not isinstance(items, (list, tuple, range)):
        raise TypeError(f"{name}={value!r}: must be a list of integers, e.g. {example}{_or_none(optional)}")
    bad = [item for item in items if not isinstance(item, numbers.Integral) or isinstance(item, bool)]
    if bad:
        raise TypeError(f"{name}={value!r}: {bad[0]!r} is not an integer; must be a list of integers, e.g. {example}")
    return tuple(int(item) for item in items)


def strings(name: str, value: Any, *, valid: Optional[Iterable[str]] = None) -> tuple[str, ...]:
    """A string or a list of strings (each one of `valid` when given), returned as a tuple."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise TypeError(f"{name}={value!r}: must be a list of strings")
    if valid is not None:
        valid = tuple(valid)
        bad = [item for item in items if item not in valid]
        if bad:
            raise ValueError(f"{name}={value!r}: {bad[0]!r} is not one of {', '.join(valid)}")
    return tuple(items)
