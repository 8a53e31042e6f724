"""Suites: the offline miniatures (``mini-clip8``, ``mini-text4``, ``mini-llm3``), built on a laptop,
and the paper-scale hub suites. ``registry.py`` says which module builds and evaluates a suite YAML.
"""
