"""Evaluators, aggregation and rendering of tables and figures."""
