"""Signing, encryption and password hashing shared by the API, inventory and (later) suppliers."""
