"""kameng — a card-key trading platform where no order is ever silently stuck."""

__version__ = "0.1.0"
