"""Start the simulated gateway on a loopback port in a background thread, for tests and the
demo: `with start_gateway_sim() as gw: ... gw.url, gw.pid, gw.key, gw.state`.

It is served by the supplier simulator's `ServerThread` (socket bound before uvicorn starts, so
the port is known up front and never raced for).
"""

from __future__ import annotations

from types import TracebackType

from kameng.payments.gateway_sim.app import DEFAULT_CURRENCY, GatewaySim
from kameng.payments.gateway_sim.state import GatewayState
from kameng.suppliers.simulator.runner import ServerThread


class GatewaySimHandle:
    """A started gateway: its URL, the first merchant's credentials, and the live state."""

    def __init__(self, gateway: GatewaySim, server: ServerThread) -> None:
        self.gateway = gateway
        self.server = server
        self.url = server.url
        merchant = gateway.state.merchants[gateway.state.first_pid]
        self.pid = merchant.pid
        self.key = merchant.key

    @property
    def state(self) -> GatewayState:
        """The in-process state (read it for assertions; change it through `/_sim`)."""
        return self.gateway.state

    @property
    def submit_url(self) -> str:
        return f"{self.url}/submit.php"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api.php"

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> GatewaySimHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_gateway_sim(
    *,
    merchants: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    notify_retry_s: list[float] | None = None,
    currency: str = DEFAULT_CURRENCY,
) -> GatewaySimHandle:
    """Start a gateway (`merchants`: pid -> key, default 1001 / demo-epay-key) and wait until
    it accepts connections. `notify_retry_s` replaces the notify retry schedule (tests pass
    tiny delays); `port=0` picks a free one."""
    gateway = GatewaySim(merchants, currency=currency, notify_retry_s=notify_retry_s)
    server = ServerThread(gateway.build_app(), host=host, port=port).start()
    return GatewaySimHandle(gateway, server)
