"""Risk screening: rules as data, evaluated without outbound calls (issue: risk and review)."""
