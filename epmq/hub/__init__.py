"""Pretrained models and experts of the paper suites, from the hub or local folders.

- :mod:`epmq.hub.experts_table`: ``config/experts.tsv``, which model each suite fetches from where.
- :mod:`epmq.hub.store`: fetch one model into the store (``resources/models``), once, under a lock;
  link it into a suite.
- :mod:`epmq.hub.layout`: split a CLIPModel into the merged vision tower and the zero-shot side,
  align tensor names, find non-persistent buffers.
- :mod:`epmq.hub.cli`: ``python -m epmq.hub {fetch,fetch-suite,clip-split,align}``.
"""
