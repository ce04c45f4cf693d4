"""The platform does not start behind a public address while a simulator can take its payments
or fill its orders: `kameng serve`, `kameng web`, `kameng worker` and `kameng.asgi` alike."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import update
from tests.integration._helpers import cli_env
from tests.support import factories

from kameng.container import Container
from kameng.payments import service as payments
from kameng.suppliers import service as suppliers
from kameng.suppliers.models import Supplier

KAMENG = str(Path(sys.executable).with_name("kameng"))
PUBLIC = "https://shop.example.com"
CODE = "simulator_on_public_url"


def run(container: Container, public_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**cli_env(container), "KAMENG_PUBLIC_URL": public_url}
    return subprocess.run(
        list(args), env=env, capture_output=True, text=True, timeout=60, check=False
    )


def starts(container: Container, public_url: str, *args: str) -> bool:
    """Start a server process; True once it answers /healthz (then it is stopped)."""
    port = factories.free_port()
    env = {**cli_env(container), "KAMENG_PUBLIC_URL": public_url}
    proc = subprocess.Popen(
        [KAMENG, *args, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                time.sleep(0.2)
        return False
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def assert_refused(done: subprocess.CompletedProcess[str], *named: str) -> None:
    assert done.returncode == 2, (done.args, done.stdout, done.stderr)
    assert CODE in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert PUBLIC in done.stderr  # names the cause: the address ...
    assert "不是本机回环地址" in done.stderr  # ... in both languages
    for name in named:
        assert name in done.stderr, (name, done.stderr)


def add_simulator_supplier(c: Container) -> None:
    with c.db.connect() as conn:
        suppliers.create_supplier(
            conn,
            c.vault,
            code="up-sim",
            name="simulator",
            adapter="simulator",
            base_url="http://127.0.0.1:8701",
            api_key="k",
            secret="a-generated-secret",
            now=c.clock(),
        )


def test_every_entry_point_refuses_a_simulator_supplier_behind_a_public_url(
    sqlite_container: Container,
) -> None:
    c = sqlite_container
    add_simulator_supplier(c)
    port = str(factories.free_port())
    assert_refused(run(c, PUBLIC, KAMENG, "worker"), "up-sim")
    assert_refused(run(c, PUBLIC, KAMENG, "web", "--port", port), "up-sim")
    assert_refused(run(c, PUBLIC, KAMENG, "serve", "--port", port, "--no-worker"), "up-sim")
    assert_refused(run(c, PUBLIC, sys.executable, "-c", "import kameng.asgi"), "up-sim")
    # On loopback the same database is a demo, and starts.
    assert starts(c, f"http://127.0.0.1:{port}", "web")
    assert starts(c, "http://localhost:8000", "serve", "--no-worker")
    # With the simulator disabled, and a real gateway, the shop starts behind its public URL.
    with c.db.connect() as conn:
        conn.execute(update(Supplier).where(Supplier.code == "up-sim").values(enabled=False))
        payments.add_gateway(
            conn,
            vault=c.vault,
            code="epay-live",
            name="live",
            base_url="https://pay.example.com",
            merchant_id="2001",
            key="a-live-merchant-key",
            now=c.clock(),
        )
    assert starts(c, PUBLIC, "web")
    assert run(c, PUBLIC, sys.executable, "-c", "import kameng.asgi").returncode == 0


def test_a_gateway_simulator_is_refused_whether_configured_or_started_by_flag(
    sqlite_container: Container,
) -> None:
    c = sqlite_container
    port = str(factories.free_port())
    # Asked for on the command line: refused before the simulator binds its port.
    done = run(c, PUBLIC, KAMENG, "serve", "--demo-gateway", "--port", port)
    assert_refused(done, "--demo-gateway")
    # A gateway on a loopback address is the bundled simulator: no buyer could reach it.
    with c.db.connect() as conn:
        payments.add_gateway(
            conn,
            vault=c.vault,
            code="sim-epay",
            name="simulator",
            base_url="http://127.0.0.1:8702",
            merchant_id="1001",
            key="a-generated-key",
            now=c.clock(),
        )
    assert_refused(run(c, PUBLIC, KAMENG, "worker"), "sim-epay")
