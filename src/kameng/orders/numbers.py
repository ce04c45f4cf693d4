"""Order numbers: human-friendly, unambiguous to read aloud, and not guessable.

K + YYYYMMDD + 10 Crockford base-32 characters (50 random bits), e.g. K20261126-7XQ3M9PD2A
without the dash. The date helps support staff; the random part makes enumeration useless.
"""

from __future__ import annotations

import secrets
from datetime import datetime

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_order_no(now: datetime) -> str:
    bits = secrets.randbits(50)
    chars = []
    for _ in range(10):
        chars.append(CROCKFORD[bits & 31])
        bits >>= 5
    return f"K{now:%Y%m%d}{''.join(chars)}"


def normalize_order_no(text: str) -> str:
    """Accept what a buyer types: lower case, dashes, spaces, O for 0, I/L for 1."""
    cleaned = text.strip().upper().replace("-", "").replace(" ", "")
    head, tail = cleaned[:9], cleaned[9:]
    return head + tail.replace("O", "0").replace("I", "1").replace("L", "1")


def new_lookup_secret() -> str:
    """Shown once to whoever placed the order; 80 bits, grouped for reading over the phone."""
    raw = "".join(secrets.choice(CROCKFORD) for _ in range(16))
    return "-".join(raw[i : i + 4] for i in range(0, 16, 4))
