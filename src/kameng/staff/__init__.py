"""Staff accounts for the JSON staff API: bearer tokens with a role (admin, reviewer)."""
