"""Notifications: the outbox rows a change writes in its own transaction, sent after commit."""
