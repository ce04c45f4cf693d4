"""Payments: gateway port and adapters, notifies, active queries, late payments, reconciliation."""
