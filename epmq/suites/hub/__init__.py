"""The paper-scale suites: experts and data from the hub (or local copies), the paper's protocols.

One Suite class per family (``epmq.suites.base``), on a common base (:mod:`.base`) that fetches the
pretrained model and the experts (``epmq.hub``), links them from the store and writes calibration:

* :mod:`.clip` (``hub-clip``): CLIP ViT-B/32 and ViT-L/14 on 8/14/20 tasks (paper §5.1, Tables 1/2,
  Appendix D), zero-shot top-1.
* :mod:`.t5` (``hub-t5``): FLAN-T5-base on eight GLUE tasks (paper §5.1, Table 3).
* :mod:`.llama` (``hub-llama``): Llama-3.x experts merged by task arithmetic, evaluated with lm-eval
  (paper Table 4, Appendix E).

Every setting is in the suite YAMLs (``epmq/suites/paper/*.yaml``); a missing one is an error
naming the file and the key.
"""
