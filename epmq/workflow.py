"""What the Snakemake workflow (``rules/common.smk``) learns from the registries of quantization
methods and merge operators: its wildcard constraints and its lists of methods, built from what
each registered class declares, so a new method or merge operator needs no edit of the rules."""

from __future__ import annotations

import re

from epmq.merge.registry import MERGERS
from epmq.catalog import method_classes

#: the path component of a method that takes alpha: ``{name}-a{alpha}`` (``epmq-a0.01``)
ALPHA_SUFFIX = r"-a[0-9.e+-]+"


def one_of(names) -> str:
    """A wildcard regex matching exactly these names (none: matches nothing)."""
    names = list(names)
    return "(" + "|".join(map(re.escape, names)) + ")" if names else "(?!)"


def merge_wildcard() -> str:
    """The ``{merge}`` wildcard: a registered merge operator."""
    return one_of(MERGERS)


def method_wildcard() -> str:
    """The ``{method}`` wildcard: a registered method, with ``-a{alpha}`` where it takes alpha."""
    plain = [re.escape(name) for name in method_classes() if name not in alpha_methods()]
    return "(" + "|".join([*plain, one_of(alpha_methods()) + ALPHA_SUFFIX]) + ")"


def alpha_methods() -> list[str]:
    """Methods whose path component and table row carry the anchor strength alpha."""
    return [name for name, cls in method_classes().items() if cls.takes_alpha]


def calibration_free_methods() -> list[str]:
    """Methods that read no calibration file."""
    return [name for name, cls in method_classes().items() if not cls.needs_calibration]


def expert_methods() -> list[str]:
    """Methods that read the experts' weights."""
    return [name for name, cls in method_classes().items() if cls.needs_experts]
