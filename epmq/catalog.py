"""Every quantization method, by name.

Methods register themselves where they are defined (``@register_method`` in
:mod:`epmq.quant.base`); this module imports the modules that define them (the ``baselines``
package registers RTN, GPTQ and AWQ when imported, :mod:`epmq.quant.epmq` E-PMQ and its
continuous relaxation), so the names it lists are complete. Adding a method is one module with a
registered class, imported below or from the ``baselines`` package.
"""

from __future__ import annotations

import baselines  # noqa: F401  registers rtn, gptq, awq
from epmq.quant import epmq  # noqa: F401  registers epmq, epmq_fp
from epmq.quant.base import METHODS, QuantMethod


def method_classes() -> dict[str, type[QuantMethod]]:
    """Name -> class of every registered method, in registration order."""
    return dict(METHODS)


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str, params: dict) -> QuantMethod:
    """Instantiate the method registered as ``name`` with validated quantize ``params``."""
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](params)
