"""An unexpected failure answers 500 with a request id, and never leaks the exception's text."""

from __future__ import annotations

import logging

import pytest

from kameng.container import Container
from tests.support import factories


def test_unexpected_error_is_a_clean_500(
    sqlite_container: Container, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from kameng.api import reseller_v1

    detail = "-".join(["CANARY", "internal", "detail", "sk_live_secret"])

    def explode(*_: object, **__: object) -> object:
        # The stack trace logs source lines (code, not values), so the text is built at runtime.
        raise RuntimeError(detail)

    monkeypatch.setattr(reseller_v1.ledger, "balances", explode)
    creds = factories.add_reseller(sqlite_container, balance_cents=100)
    with caplog.at_level(logging.DEBUG), factories.live_server(sqlite_container) as url:
        client = factories.client_for(url, creds, language="en")
        response = client.balance()
        healthy = client.http.get("/healthz")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error"
    assert "request" in error["message"]
    assert "CANARY" not in response.text and "sk_live" not in response.text
    assert "CANARY" not in caplog.text and "sk_live" not in caplog.text
    assert "RuntimeError" in caplog.text  # the type and the stack are logged, the text is not
    assert healthy.status_code == 200  # the server keeps serving on the same connection
