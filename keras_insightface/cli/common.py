"""What every subcommand's parser shares: one-line errors and numeric flags checked for type and range.

Nothing here imports TensorFlow, so building a parser and answering ``--help`` is instant.
"""

import argparse

from keras_insightface.training import checks


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: message``) with exit status 2, like every other
    expected error of the command line; defaults are shown in ``--help``."""

    def __init__(self, prog=None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(prog=prog, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def checked(convert, rule, what):
    """An argparse ``type`` that converts the text with ``convert`` and refuses what ``rule`` (a ``checks`` rule)
    refuses, e.g. ``checked(float, checks.number(0, low_open=True), "a number")``."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        error = rule(value)
        if error:
            raise argparse.ArgumentTypeError(f"{text!r} {error}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def int_at_least(low):
    """An int flag ``>= low``."""
    return checked(int, checks.integer(low), "an int")


def int_in(low, high):
    """An int flag in ``[low, high]``."""
    return checked(int, checks.integer(low, high), "an int")


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
any_int = checked(int, checks.integer(), "an int")
positive_float = checked(float, checks.number(0, low_open=True), "a number")
