"""Buyer accounts (members): registration, password login, sessions and CSRF tokens."""
