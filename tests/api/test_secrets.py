"""Secrets stay secret (DESIGN §5.2, §7, §8): plaintext card keys, API secrets and lookup secrets
never reach the database, its files, the logs or an error body. SQLite only: the point is what
kameng writes, and a SQLite file can be read byte for byte.
"""

from __future__ import annotations

import base64
import logging
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kameng.container import Container
from kameng.resellers.service import rotate_credentials
from tests.api.helpers import error_of, new_key, order_json, signed_send
from tests.support import factories


def _db_path(container: Container) -> Path:
    url = container.settings.resolved_database_url
    assert url.startswith("sqlite:///"), url
    return Path(url.removeprefix("sqlite:///"))


def _rows_containing(db_file: Path, needles: list[str]) -> list[str]:
    """Every (table, row) of the SQLite file in which some needle occurs, as str or bytes."""
    hits: list[str] = []
    con = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    try:
        tables = [
            name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        assert {"orders", "api_credentials", "idempotency_keys"} <= set(tables), tables
        for table in tables:
            for row in con.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    for needle in needles:
                        if isinstance(value, bytes):
                            found = needle.encode() in value
                        else:
                            found = needle in str(value)
                        if found:
                            hits.append(f"{table}: {row!r}")
        dump = "\n".join(con.iterdump())
        hits.extend(f"iterdump: {needle}" for needle in needles if needle in dump)
    finally:
        con.close()
    return hits


def _files_containing(root: Path, needles: list[str]) -> list[str]:
    """Files under the data dir (database, WAL, shared memory, anything else) holding a needle."""
    hits = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for needle in needles:
            for encoded in (needle.encode(), needle.encode("utf-16-le")):
                if encoded in data:
                    hits.append(f"{path.name}: {needle}")
    return hits


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[Container, Path]]:
    container = factories.make_container(tmp_path)
    yield container, tmp_path
    container.close()


def test_canary_key_is_never_stored_logged_or_echoed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)  # root logger: every library's debug output is captured
    canary = f"CANARY-{secrets.token_hex(8)}"
    canary_pin = f"CANARYPIN-{secrets.token_hex(8)}"
    needles = [canary, canary_pin]
    marker = f"MARKER-{secrets.token_hex(8)}"  # stored in clear on purpose: proves the scans see
    container = factories.make_container(tmp_path)
    try:
        sku = factories.add_product(container, price_cents=1000)
        imported = factories.add_stock(container, sku, [f"{canary},{canary_pin}"])
        assert imported.imported == 1
        dup = factories.add_stock(container, sku, [f"{canary},{canary_pin}"])  # refused dup
        assert dup.imported == 0 and dup.duplicates == 1
        creds = factories.add_reseller(container, balance_cents=5000)
        other = factories.add_reseller(container, balance_cents=5000)
        error_bodies: list[str] = []

        with factories.live_server(container) as url:
            client = factories.client_for(url, creds)
            key = new_key()
            created = client.create_order(sku, 1, idempotency_key=key, customer_ref=marker)
            assert created.status_code == 201, created.text
            body = created.json()
            assert body["keys"] == [{"code": canary, "secret": canary_pin}]  # the buyer sees it
            order_no, lookup_secret = body["order_no"], body["lookup_secret"]
            replay = client.create_order(sku, 1, idempotency_key=key, customer_ref=marker)
            assert replay.json()["keys"] == body["keys"]
            assert client.order(order_no).json()["keys"] == body["keys"]
            looked = httpx.post(
                url + "/api/v1/lookup", json={"order_no": order_no, "secret": lookup_secret}
            )
            assert looked.json()["keys"] == body["keys"]
            listed = client.orders()
            assert canary not in listed.text

            # Refusals around the delivered order: none may echo the key.
            ts, nonce = int(time.time()), secrets.token_hex(8)
            first = signed_send(
                url, creds, "GET", f"/api/v1/orders/{order_no}", timestamp=ts, nonce=nonce
            )
            assert first.status_code == 200
            refusals = [
                signed_send(
                    url, creds, "GET", f"/api/v1/orders/{order_no}", timestamp=ts, nonce=nonce
                ),
                signed_send(url, creds, "GET", f"/api/v1/orders/{order_no}", secret="sk_wrong"),
                client.create_order(sku, 2, idempotency_key=key, customer_ref=marker),
                client.create_order(sku, 1, customer_ref=marker),
                client.create_order(sku, 1, customer_ref="d"),  # backordered: no key to show
                client.cancel(order_no),
                client.create_order(sku, 1, {"unknown": "x"}),
                factories.client_for(url, other).order(order_no),
                factories.client_for(url, other).cancel(order_no),
                httpx.post(url + "/api/v1/lookup", json={"order_no": order_no, "secret": "X"}),
                httpx.post(url + "/api/v1/lookup", json={"order_no": order_no}),
                client.request("POST", "/api/v1/orders", raw_body=b"{bad", idempotency_key=key),
                client.orders(cursor=base64.urlsafe_b64encode(b"o:" + b"9" * 30).decode()),
                signed_send(
                    url,
                    creds,
                    "POST",
                    "/api/v1/orders",
                    body=order_json(sku, 1),
                    sign_body=order_json(sku, 2),
                    headers={"Idempotency-Key": new_key()},
                ),
            ]
            for resp in refusals:
                if resp.status_code >= 400:
                    error_bodies.append(resp.text)
            assert len(error_bodies) >= 10, [r.status_code for r in refusals]

            db_file = _db_path(container)
            assert db_file.exists()
            live_rows = _rows_containing(db_file, [*needles, creds.api_secret])
            live_files = _files_containing(tmp_path, [*needles, creds.api_secret])
            assert _rows_containing(db_file, [marker]), "control: the row scan sees plain text"
            assert _files_containing(tmp_path, [marker]), "control: the file scan sees it too"
    finally:
        container.close()

    for text in error_bodies:
        for needle in needles:
            assert needle not in text, text
    assert live_rows == []
    assert live_files == []
    assert _rows_containing(db_file, needles) == []
    assert _files_containing(tmp_path, needles) == []

    captured = capfd.readouterr()
    log_text = caplog.text + "\n".join(
        f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records
    )
    assert caplog.records, "the capture should have seen some logging"
    for needle in [*needles, creds.api_secret, other.api_secret]:
        assert needle not in log_text
        assert needle not in captured.out
        assert needle not in captured.err


def test_api_secret_is_never_stored(app: tuple[Container, Path]) -> None:
    container, data_dir = app
    creds = factories.add_reseller(container, balance_cents=5000)
    sku = factories.add_product(container, stock=1)
    with factories.live_server(container) as url:
        client = factories.client_for(url, creds)
        assert client.create_order(sku, 1).status_code == 201
        error_of(
            signed_send(url, creds, "GET", "/api/v1/balance", secret="sk_wrong"),
            401,
            "auth_bad_signature",
        )
        # Rotation: the old and new secrets are both kept out of the database.
        with container.db.unit_of_work() as session:
            rotated = rotate_credentials(session, container.vault, name=creds.name, actor="staff:t")
        needles = [creds.api_secret, rotated.api_secret]
        assert _rows_containing(_db_path(container), needles) == []
        assert _files_containing(data_dir, needles) == []


def test_lookup_secret_is_never_stored(app: tuple[Container, Path]) -> None:
    container, data_dir = app
    creds = factories.add_reseller(container, balance_cents=5000)
    sku = factories.add_product(container, stock=1)
    with factories.live_server(container) as url:
        created = factories.client_for(url, creds).create_order(sku, 1)
        assert created.status_code == 201, created.text
        lookup_secret = created.json()["lookup_secret"]
        needles = [lookup_secret, lookup_secret.replace("-", "")]
        assert _rows_containing(_db_path(container), needles) == []
        assert _files_containing(data_dir, needles) == []
