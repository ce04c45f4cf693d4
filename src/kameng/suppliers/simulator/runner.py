"""Run the simulator (or any ASGI app, e.g. a test's callback receiver) on a loopback port in a
background thread, for tests, the demo and benchmarks.

The listening socket is bound here (port 0) and handed to uvicorn, so the port is known before
the server starts and there is no race with other processes picking "free" ports.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
import uvicorn

from kameng.suppliers.simulator.app import (
    DEFAULT_MERCHANT_KEY,
    DEFAULT_MERCHANT_SECRET,
    Simulator,
)
from kameng.suppliers.simulator.config import SimConfig, parse_config

START_TIMEOUT_S = 15.0


class ServerThread:
    """An ASGI app served by uvicorn in a daemon thread (with its own event loop)."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            host=host,
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            # Hung requests and pending callbacks must not hold `stop()` for long.
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RunningSimulator:
    """A started simulator: its URL, credentials, and shortcuts to the `/_sim` control API."""

    def __init__(self, simulator: Simulator, server: ServerThread, merchant_secret: str) -> None:
        self.simulator = simulator
        self.server = server
        self.url = server.url
        self.merchant_key = simulator.merchant_key
        self.merchant_secret = merchant_secret
        self._http = httpx.Client(base_url=self.url, timeout=30.0, trust_env=False)

    def _control(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        response = self._http.request(method, path, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text}")
        result: dict[str, Any] = response.json()
        return result

    def state(self) -> dict[str, Any]:
        return self._control("GET", "/_sim/state")

    def configure_sku(self, sku: str, **cfg: Any) -> dict[str, Any]:
        """Merge-update (or create) a SKU; returns its config plus `available`."""
        return self._control("PUT", f"/_sim/skus/{quote(sku, safe='')}", cfg)

    def set_balance(self, cents: int) -> None:
        self._control("POST", "/_sim/balance", {"balance_cents": cents})

    def add_stock(self, sku: str, add: int) -> int | None:
        available: int | None = self._control(
            "POST", f"/_sim/stock/{quote(sku, safe='')}", {"add": add}
        )["available"]
        return available

    def missing_accounts(self, *, add: Iterable[str] = (), remove: Iterable[str] = ()) -> list[str]:
        """Mark recharge accounts as non-existent (or existing again); returns the full set
        (besides the built-in rule: accounts ending in `0000` never exist)."""
        body = {"add": list(add), "remove": list(remove)}
        missing: list[str] = self._control("POST", "/_sim/missing-accounts", body)[
            "missing_accounts"
        ]
        return missing

    def resend_callback(self, out_trade_no: str) -> dict[str, Any]:
        return self._control("POST", f"/_sim/callbacks/{quote(out_trade_no, safe='')}/resend")

    def reset(self) -> None:
        self._control("POST", "/_sim/reset")

    def stop(self) -> None:
        self._http.close()
        self.server.stop()

    def __enter__(self) -> RunningSimulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_simulator(
    config: dict[str, Any] | SimConfig | None = None,
    *,
    merchant_key: str = DEFAULT_MERCHANT_KEY,
    merchant_secret: str = DEFAULT_MERCHANT_SECRET,
    seed: int = 0,
    host: str = "127.0.0.1",
    port: int = 0,
) -> RunningSimulator:
    """Start a simulator on `host` (an ephemeral port unless `port` is given) and wait until
    it accepts connections. `config` has the config-file shape; None = the default catalog."""
    parsed = parse_config(config) if isinstance(config, dict) else config
    simulator = Simulator(
        parsed, merchant_key=merchant_key, merchant_secret=merchant_secret, seed=seed
    )
    server = ServerThread(simulator.build_app(), host=host, port=port).start()
    return RunningSimulator(simulator, server, merchant_secret)
