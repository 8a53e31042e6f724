"""Naive post-merge quantization baselines (RTN, GPTQ, AWQ), on the same engine as E-PMQ."""
