"""A bundled upstream supplier served over real HTTP (`kameng supplier-sim`).

It speaks the protocol in docs/supplier-sim.md and can inject, per SKU, every misbehaviour our
supplier adapter must survive, so the demo, the tests and the benchmarks exercise the real
network path instead of a mock.
"""

from kameng.suppliers.simulator.app import (
    DEFAULT_MERCHANT_KEY,
    DEFAULT_MERCHANT_SECRET,
    Simulator,
    create_app,
)
from kameng.suppliers.simulator.config import (
    ConfigError,
    SimConfig,
    SkuConfig,
    default_config,
    load_config,
    parse_config,
)
from kameng.suppliers.simulator.runner import RunningSimulator, ServerThread, start_simulator

__all__ = [
    "DEFAULT_MERCHANT_KEY",
    "DEFAULT_MERCHANT_SECRET",
    "ConfigError",
    "RunningSimulator",
    "ServerThread",
    "SimConfig",
    "Simulator",
    "SkuConfig",
    "create_app",
    "default_config",
    "load_config",
    "parse_config",
    "start_simulator",
]
