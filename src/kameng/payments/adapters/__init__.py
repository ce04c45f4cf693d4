"""Gateway adapters (EPay)."""
