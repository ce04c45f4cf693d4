"""Adapters of the supplier port, one module per protocol."""
