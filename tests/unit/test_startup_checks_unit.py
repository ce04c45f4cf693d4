"""Which public URLs count as this machine only (where a simulator may run)."""

from __future__ import annotations

import pytest

from kameng.config import Settings
from kameng.startup_checks import is_loopback_url, public_url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "http://127.8.9.10",
        "https://localhost/shop",
        "http://LOCALHOST:8000",
        "http://[::1]:8000",
        "http://[::ffff:127.0.0.1]:8000",
    ],
)
def test_loopback(url: str) -> None:
    assert is_loopback_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://shop.example.com",
        "http://0.0.0.0:8000",
        "http://10.0.0.5:8000",
        "http://[::]:8000",
        "http://localhost.example.com",
        "http://127.0.0.1.nip.io",
        "http://user@shop.example.com",
        "",
        "not a url",
        "http://[::1",
    ],
)
def test_not_loopback(url: str) -> None:
    assert not is_loopback_url(url)


def test_public_url_is_the_setting_or_the_bound_address() -> None:
    unset = Settings(public_url=None, host="127.0.0.1", port=8000)
    given = Settings(public_url="https://shop.example.com", host="127.0.0.1", port=8000)
    assert public_url(given, host="0.0.0.0") == "https://shop.example.com"
    assert public_url(unset) == "http://127.0.0.1:8000"
    assert public_url(unset, host="0.0.0.0", port=9000) == "http://0.0.0.0:9000"
    assert public_url(unset, host="::", port=9000) == "http://[::]:9000"
