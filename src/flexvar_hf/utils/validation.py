"""Argument checks shared by the pipelines, the scheduler, the converters and the scripts: one rule per concept.

- Integers (`is_int`, `check_int`): Python or numpy integers; a bool is not an int (`True` is refused where a count
  is expected) and neither is an integral float (`16.0`).
- Numbers (`check_number`): Python or numpy reals, not bools, finite, within the stated bounds.
- Flags (`check_flag`): `True` / `False` (Python or numpy bools); other truthy values are refused.
- Choices, callables (`check_choice`, `check_callable`).
- Arguments another argument determines (`check_agreement`): left out, or equal to what it implies.

Every failure is a ValueError whose message names the argument, says what was given and what is accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from numbers import Integral, Real

import numpy as np

__all__ = ["check_agreement", "check_callable", "check_choice", "check_flag", "check_int", "check_number", "is_int"]


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def shown(value, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, with its type where the repr does not show it (`16.0 (float)`)."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text if isinstance(value, str) or value is None else f"{text} ({type(value).__name__})"


def _bounds(minimum, maximum, open_minimum: bool = False, open_maximum: bool = False) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if open_minimum else '['}{minimum:g}, {maximum:g}{')' if open_maximum else ']'}"
    if minimum is not None:
        return f" {'>' if open_minimum else '>='} {minimum:g}"
    if maximum is not None:
        return f" {'<' if open_maximum else '<='} {maximum:g}"
    return ""


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None, hint: str = "") -> int:
    """`value` as an int; ValueError unless it is an integer (`is_int`) in `[minimum, maximum]` (either optional).
    `hint` (e.g. " (0 disables it)") follows the accepted range in the message."""
    in_range = is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not in_range:
        what = "a positive int" if (minimum, maximum) == (1, None) else f"an int{_bounds(minimum, maximum)}"
        raise ValueError(f"`{name}` must be {what}{hint}, got {shown(value)}.")
    return int(value)


def check_number(
    name: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    open_minimum: bool = False,
    open_maximum: bool = False,
    hint: str = "",
) -> float:
    """`value` as a float; ValueError unless it is a finite real number (not a bool) within the bounds, each
    inclusive unless `open_minimum` / `open_maximum`."""
    number = float(value) if isinstance(value, Real) and not isinstance(value, (bool, np.bool_)) else float("nan")
    in_range = (
        np.isfinite(number)
        and (minimum is None or number > minimum or (number == minimum and not open_minimum))
        and (maximum is None or number < maximum or (number == maximum and not open_maximum))
    )
    if not in_range:
        bounds = _bounds(minimum, maximum, open_minimum, open_maximum)
        raise ValueError(f"`{name}` must be a finite number{bounds}{hint}, got {shown(value)}.")
    return number


def check_flag(name: str, value) -> bool:
    """`value` as a bool; ValueError unless it is `True` or `False` (a Python or numpy bool)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False, got {shown(value)}.")
    return bool(value)


def check_choice(name: str, value, choices: Iterable, hint: str = ""):
    """ValueError unless `value` is one of `choices` (compared with `==`, strings only with strings)."""
    choices = tuple(choices)
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise ValueError(f"`{name}` must be one of {choices}{hint}, got {shown(value)}.")
    return value


def check_callable(name: str, value: Callable | None) -> None:
    """ValueError unless `value` is None or callable."""
    if value is not None and not callable(value):
        raise ValueError(f"`{name}` must be a function (or None), got {shown(value)}.")


def check_agreement(source: str, implied: Mapping[str, object], given: Mapping[str, object]) -> None:
    """
    Arguments that `source` determines must be left out (None) or agree with it: `implied[name]` is what `source`
    sets `name` to, `given[name]` what the caller passed. ValueError naming every disagreeing argument.
    """
    conflicts = [
        f"`{name}`={given[name]!r} (`{source}` gives {value!r})"
        for name, value in implied.items()
        if given.get(name) is not None and given[name] != value
    ]
    if conflicts:
        raise ValueError(
            f"{', '.join(conflicts)}: `{source}` already sets {', '.join(f'`{name}`' for name in implied)}; leave "
            "them out or pass values that agree with it."
        )
