"""The manual review queue: claims, decisions (two reviewers above an amount), SLA actions."""
