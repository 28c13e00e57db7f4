"""Type and range checks of user options: each rule returns what is wrong with a value (or None), so that a bad
``Train`` option or scheduler key is refused before any work, in one line naming the option and the value.

    check_options({"batch_size": integer(1)}, {"batch_size": "8"})  # ValueError: option batch_size='8': expected an int
"""

import numbers
import os

import numpy as np


def _range_error(value, low, high, low_open=False):
    if low is not None and (value <= low if low_open else value < low):
        return f"must be {'>' if low_open else '>='} {low}"
    if high is not None and value > high:
        return f"must be <= {high}"
    return None


def integer(low=None, high=None):
    """An int (numpy ints too, not bool) in ``[low, high]``."""

    def rule(value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return f"expected an int, got {type(value).__name__}"
        return _range_error(value, low, high)

    return rule


def number(low=None, high=None, low_open=False):
    """An int or float (not bool), finite, in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def rule(value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"expected a number, got {type(value).__name__}"
        if value != value or value in (float("inf"), float("-inf")):
            return "must be finite"
        return _range_error(value, low, high, low_open)

    return rule


def boolean(value):
    return None if isinstance(value, bool | np.bool_) else f"expected True or False, got {type(value).__name__}"


def path(value):
    return None if isinstance(value, str | os.PathLike) else f"expected a path, got {type(value).__name__}"


def one_of(*choices):
    def rule(value):
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}"

    return rule


def optional(inner):
    """``None`` or what ``inner`` accepts."""
    return lambda value: None if value is None else inner(value)


def sequence_of(inner, lengths):
    """A list or tuple of ``lengths`` (a tuple of allowed lengths, or None for any) items ``inner`` accepts."""

    def rule(value):
        if not isinstance(value, list | tuple):
            return f"expected a list or tuple, got {type(value).__name__}"
        if lengths is not None and len(value) not in lengths:
            return f"expected {' or '.join(map(str, lengths))} items, got {len(value)}"
        errors = [inner(item) for item in value]
        return next((f"item {index}: {error}" for index, error in enumerate(errors) if error), None)

    return rule


def either(*rules):
    """What any of ``rules`` accepts; the message of the first rule otherwise."""

    def rule(value):
        errors = [check(value) for check in rules]
        return None if any(error is None for error in errors) else errors[0]

    return rule


def check_options(rules, values, what="option"):
    """Raise ValueError ``"<name>=<value>: <what is wrong>"`` for the first value its rule refuses."""
    for name, value in values.items():
        rule = rules.get(name)
        error = rule(value) if rule is not None else None
        if error:
            raise ValueError(f"{what} {name}={value!r}: {error}")
