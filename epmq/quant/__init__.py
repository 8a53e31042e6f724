"""Quantization methods: the interface and registry (:mod:`.base`), E-PMQ (:mod:`.epmq`) and the
lookup of every registered method, baselines included (:mod:`.catalog`)."""
