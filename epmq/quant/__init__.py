"""Quantization methods: the interface and registry (:mod:`.base`) and E-PMQ (:mod:`.epmq`); the
baselines live in the top-level ``baselines`` package and :mod:`epmq.catalog` looks up all of them."""
