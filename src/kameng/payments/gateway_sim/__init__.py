"""A bundled 易支付 (EPay) payment gateway served over real HTTP (`kameng gateway-sim`).

It speaks the protocol in docs/gateway-sim.md (submit and cashier, signed return and notify,
the `api.php` order query, list and refund) and can lose, forge, duplicate or replay notifies
and alter its own records, so the platform's payment handling and reconciliation are exercised
over the real network path instead of a mock.
"""

from kameng.payments.gateway_sim.app import (
    DEFAULT_CURRENCY,
    DEFAULT_KEY,
    DEFAULT_PID,
    GatewaySim,
    create_app,
)
from kameng.payments.gateway_sim.runner import GatewaySimHandle, start_gateway_sim
from kameng.payments.gateway_sim.state import GatewayState, NotifyAttempt, Trade

__all__ = [
    "DEFAULT_CURRENCY",
    "DEFAULT_KEY",
    "DEFAULT_PID",
    "GatewaySim",
    "GatewaySimHandle",
    "GatewayState",
    "NotifyAttempt",
    "Trade",
    "create_app",
    "start_gateway_sim",
]
