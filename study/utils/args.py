"""Command-line values checked when they are parsed, and a parser whose mistakes are one ``error:`` line.

Every numeric flag of every command takes one of the types below, so that
``--knn-k 0`` or ``--parallel 0`` stops before any work with the valid range
in the message, not as a traceback after the features are computed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, NoReturn

import yaml

__all__ = ["OneLineParser", "config_value", "int_at_least", "positive_float", "positive_int", "nonnegative_int",
           "seed_list"]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser that reports a mistake as one line ``error: ...`` (exit 2), as every other user error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # what argparse names in its own messages
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def seed_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 0, e.g. ``3,4``."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds such as 3,4, got {text!r}") from None
    if any(seed < 0 for seed in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text}")
    return seeds


def config_value(text: str) -> tuple[str, Any]:
    """An argparse type: ``key.sub=value`` (the value parsed as YAML, as in ``--set``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as objective=cimle, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"the value of {text!r} is not valid YAML") from None
