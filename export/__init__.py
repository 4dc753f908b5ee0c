"""Exporters, FLOP/param reports and model cards."""
