"""The `POST /v1/orders` and `POST /v1/precheck` bodies and the callback event type, shared by
state and HTTP layers.

The body is validated strictly (no coercion of "1" to 1, every documented key present) because
the simulator exists to catch adapter bugs, not to paper over them.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_QUANTITY = 10_000

Event = dict[str, Any]


class OrderRequest(BaseModel):
    """`POST /v1/orders` body; all five keys are required (`callback_url` may be null)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    out_trade_no: Annotated[str, Field(min_length=1, max_length=128)]
    sku: Annotated[str, Field(min_length=1, max_length=64)]
    quantity: Annotated[int, Field(ge=1, le=MAX_QUANTITY)]
    fields: dict[str, str]
    callback_url: str | None

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in {"http", "https"} or not parts.netloc:
                raise ValueError("callback_url must be an http(s) URL")
        return value


def parse_order_request(raw: bytes) -> OrderRequest | None:
    """The parsed body, or None for anything malformed (answered 400, nothing recorded)."""
    try:
        return OrderRequest.model_validate_json(raw)
    except ValidationError:
        return None


class PrecheckRequest(BaseModel):
    """`POST /v1/precheck` body. The buyer's fields travel in a body rather than a query string
    so that phone numbers and game accounts stay out of URLs and access logs."""

    model_config = ConfigDict(extra="ignore", strict=True)

    sku: Annotated[str, Field(min_length=1, max_length=64)]
    fields: dict[str, str]


def parse_precheck_request(raw: bytes) -> PrecheckRequest | None:
    """The parsed body, or None for anything malformed (answered 400)."""
    try:
        return PrecheckRequest.model_validate_json(raw)
    except ValidationError:
        return None
