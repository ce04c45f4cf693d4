"""Refuse to start a shop that others can reach while a simulator stands in for a gateway or a
supplier.

The bundled EPay gateway simulator confirms a payment at the click of a button and the supplier
simulator hands out made-up keys: on a loopback address they are a demo, behind a public address
they give card keys away. So `kameng serve`, `kameng web`, `kameng worker` and the ASGI app
(`kameng.asgi`) refuse to start when one is enabled and the shop's public URL (what buyers,
gateways and suppliers reach it at) is not a loopback address.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable
from urllib.parse import urlsplit

from sqlalchemy.exc import DBAPIError

from kameng.config import Settings
from kameng.container import Container
from kameng.errors import ErrorCode, KamengError
from kameng.payments import service as payments
from kameng.suppliers import service as suppliers
from kameng.suppliers.models import AdapterKind


def is_loopback_url(url: str) -> bool:
    """Whether `url` names this machine only: 127.0.0.0/8, ::1 or `localhost`."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def public_url(settings: Settings, *, host: str | None = None, port: int | None = None) -> str:
    """KAMENG_PUBLIC_URL, or else the address the server listens on (a shop bound to 0.0.0.0
    is reachable from elsewhere whatever its callback URL says)."""
    if settings.public_url:
        return settings.public_url
    bound = host or settings.host
    shown = f"[{bound}]" if ":" in bound else bound
    return f"http://{shown}:{port or settings.port}"


def _shown(url: str) -> str:
    """The URL without any user:password part, for the error message."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "(unreadable URL)"
    return parts._replace(netloc=netloc).geturl()


def enabled_simulators(container: Container) -> list[str]:
    """Enabled gateways and suppliers that are simulators: a supplier on the simulator adapter;
    the demo's gateway, or any gateway on a loopback address (where the bundled simulator runs:
    a buyer's browser could never reach a real gateway there)."""
    from kameng.demo import DEMO_GATEWAY

    found: list[str] = []
    with container.db.connect(write=False) as conn:
        for gateway in payments.list_gateways(conn, enabled_only=True):
            if gateway.code == DEMO_GATEWAY or is_loopback_url(gateway.base_url):
                found.append(f"gateway {gateway.code} at {gateway.base_url}")
        for supplier in suppliers.all_suppliers(conn):
            if supplier.enabled and supplier.adapter == AdapterKind.simulator.value:
                found.append(f"supplier {supplier.code} on the simulator adapter")
    return found


def check(container: Container, *, public_url: str, started: Iterable[str] = ()) -> None:
    """Raise `simulator_on_public_url` when a simulator is enabled in the database, or about to
    be `started` alongside (`--demo-gateway`), and `public_url` is not a loopback address."""
    if is_loopback_url(public_url):
        return
    try:
        found = [*started, *enabled_simulators(container)]
    except DBAPIError as exc:  # fail closed: what cannot be read cannot be ruled out
        raise RuntimeError(
            f"database not ready ({type(exc).__name__}); run `kameng migrate` first"
        ) from exc
    if found:
        raise KamengError(
            ErrorCode.simulator_on_public_url, what="; ".join(found), public_url=_shown(public_url)
        )


def check_or_exit(container: Container, *, public_url: str, started: Iterable[str] = ()) -> None:
    """`check`, for entry points: a refusal is printed in both languages and the process exits
    with status 2 before it serves anything (an ASGI server gets no app to run)."""
    try:
        check(container, public_url=public_url, started=started)
    except KamengError as exc:
        print(f"error {exc.code}: {exc.message('en')}", file=sys.stderr)
        print(f"错误 {exc.code}：{exc.message('zh-CN')}", file=sys.stderr)
        sys.exit(2)
