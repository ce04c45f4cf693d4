"""The 易支付 (EPay) signature, shared by the gateway adapter and the bundled gateway simulator.

EPay signs a request or a notify as `md5(k1=v1&k2=v2...KEY)` over the parameters sorted by
name, leaving out `sign`, `sign_type` and empty values, with the merchant key appended without
a separator. It is weak (MD5, a shared key) but it is what these shops speak; we compare in
constant time and check every field the signature covers, never just the signature.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

UNSIGNED = frozenset({"sign", "sign_type"})


def string_to_sign(params: Mapping[str, object]) -> str:
    items = sorted(
        (k, str(v))
        for k, v in params.items()
        if k not in UNSIGNED and v is not None and str(v) != ""
    )
    return "&".join(f"{k}={v}" for k, v in items)


def sign(params: Mapping[str, object], key: str) -> str:
    payload = string_to_sign(params) + key
    return hashlib.md5(payload.encode("utf-8"), usedforsecurity=False).hexdigest()


def signed(params: Mapping[str, object], key: str) -> dict[str, str]:
    """The parameters with `sign` and `sign_type=MD5` added (values as strings)."""
    out = {k: str(v) for k, v in params.items() if v is not None and str(v) != ""}
    out["sign"] = sign(out, key)
    out["sign_type"] = "MD5"
    return out


def verify(params: Mapping[str, object], key: str) -> bool:
    given = str(params.get("sign", "")).lower()
    if len(given) != 32:
        return False
    return hmac.compare_digest(given, sign(params, key))


def format_money(cents: int) -> str:
    """EPay carries yuan with two decimals: 1234 -> "12.34"."""
    sign_ = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign_}{cents // 100}.{cents % 100:02d}"


_MONEY = re.compile(r"^(0|[1-9][0-9]{0,15})(?:\.([0-9]{1,2}))?$", re.ASCII)


def parse_money(text: str) -> int | None:
    """ "12.34" -> 1234; None for anything that is not a plain non-negative amount in ASCII
    digits with at most two decimals (an amount we cannot read exactly is never a payment)."""
    match = _MONEY.match(text.strip()) if len(text) <= 24 else None
    if match is None:
        return None
    whole, frac = match.group(1), match.group(2) or ""
    return int(whole) * 100 + int((frac + "00")[:2])
