"""Argument checks shared by the layers and the model builders.

Each raises a `ValueError` that names the argument, what it received and what
it accepts, before any TensorFlow op can fail with a message about something
else. Numpy scalars count as numbers, as in stock Keras layers; `bool` never
does.
"""

from __future__ import annotations

import math
import numbers


def is_positive_int(value) -> bool:
    """An integer (numpy included, bool excluded) greater than 0."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def positive_int(name: str, value, *, allow_none: bool = False) -> int | None:
    """`value` as a Python int > 0 (numpy integers accepted)."""
    if value is None and allow_none:
        return None
    if is_positive_int(value):
        return int(value)
    accepted = "None or a positive integer" if allow_none else "a positive integer"
    raise ValueError(f"`{name}` must be {accepted}; received {name}={value!r}.")


def positive_int_pair(name: str, value) -> tuple[int, int]:
    """An int or a pair of ints > 0 (numpy integers accepted) as a 2-tuple."""
    if is_positive_int(value):
        return (int(value), int(value))
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(is_positive_int(v) for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise ValueError(
        f"`{name}` must be a positive integer or a pair of positive integers; "
        f"received {name}={value!r}."
    )


def real(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """`value` as a finite Python float in `[low, high]` (`(low, high]` with
    `low_open`)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    number = float(value) if ok else math.nan
    ok = ok and math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number <= high
    if ok:
        return number
    lower = "" if low is None else ("(" if low_open else "[") + f"{low:g}, "
    upper = "" if high is None else f"{high:g}]"
    if low is not None and high is None:
        bounds = f" {'>' if low_open else '>='} {low:g}"
    elif low is not None:
        bounds = f" in {lower}{upper}"
    else:
        bounds = ""
    raise ValueError(
        f"`{name}` must be a finite number{bounds}; received {name}={value!r}."
    )


def boolean(name: str, value) -> bool:
    """`value` as a bool: bools, numpy bools and the integers 0 and 1.

    Anything else (a string such as "False" is truthy) is an error.
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise ValueError(f"`{name}` must be True or False; received {name}={value!r}.")
