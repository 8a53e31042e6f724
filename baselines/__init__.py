"""Naive post-merge quantization baselines (RTN, GPTQ, AWQ), on the same engine as E-PMQ.

Importing this package registers each of them (``epmq.quant.base.register_method``).
"""

from baselines import awq, gptq, rtn  # noqa: F401
