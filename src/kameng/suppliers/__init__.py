"""Upstream suppliers: the port, its adapters, routing and health."""
