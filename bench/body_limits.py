"""Server memory under an oversized request body: 256 MiB, chunked, with a made-up API key.

Starts the app as a real server process on loopback (uvicorn, one process, `create_app()` as
`kameng serve` builds it) on a fresh migrated SQLite database, and reads that process's resident
memory (VmRSS in /proc) before and after, sampling it every 10 ms while the request runs:

1. baseline: 50 small `POST /api/v1/orders` with the same made-up key (each answered 401), the
   ordinary traffic the same server sees;
2. the huge request: 256 MiB of JSON-ish bytes sent chunked to `POST /api/v1/orders` by a client
   that keeps writing until the server answers (tests/support/rawhttp.py); reported are the
   answer's status and how much went out before it came.

`--unprotected` repeats both against a second server whose app has the body limit taken out:
what the same request costs without it.

Prints one `key=value` line at the end:
  rss_before_mib=… rss_after_mib=… rss_peak_mib=… growth_mib=… baseline_growth_mib=… ratio=…
  status=… sent_mib=… [unprotected_rss_after_mib=… unprotected_rss_peak_mib=…
  unprotected_growth_mib=… unprotected_status=…]
where growth is the peak during the request minus the RSS before it, and `ratio` is the RSS
after the huge request over the RSS after the baseline's small ones (1.00: no lasting growth).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from _common import ROOT, env_for, machine

sys.path.insert(0, str(ROOT / "src"))

from tests.support import rawhttp
from tests.support.factories import free_port

from kameng.config import Settings
from kameng.container import Container
from kameng.migrate import upgrade

MIB = 1024 * 1024
HUGE = 256 * MIB

# The server: the real app on loopback; argv: port, "1" with the body limit or "0" without.
SERVER = """
import sys
import uvicorn
from kameng.app import create_app
from kameng.security.bodylimit import BodyLimit

app = create_app()
if sys.argv[2] == "0":
    app.user_middleware = [m for m in app.user_middleware if m.cls is not BodyLimit]
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off")
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class PeakSampler:
    """The highest RSS seen while a request runs (a freed buffer leaves no trace afterwards)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib(self.pid))


@dataclass
class Figures:
    rss_before: float
    rss_after: float
    rss_peak: float
    baseline_growth: float
    baseline_after: float
    status: int
    sent: int


def signature_headers() -> dict[str, str]:
    return {
        "X-Api-Key": "made-up-key",
        "X-Timestamp": str(int(time.time())),
        "X-Nonce": f"n{time.monotonic_ns()}",
        "X-Signature": "0" * 64,
        "Content-Type": "application/json",
    }


def measure(data_dir: Path, protected: bool) -> Figures:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), "1" if protected else "0"],
        env=env_for(data_dir, None),
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"server did not start: {err}")
            time.sleep(0.1)
        small = json.dumps({"sku": "BENCH", "quantity": 1, "fields": {}}).encode()
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(10):  # warm-up: imports, caches, the first connection
                client.post("/api/v1/orders", content=small, headers=signature_headers())
            time.sleep(0.5)
            baseline_before = rss_mib(proc.pid)
            for _ in range(50):
                resp = client.post("/api/v1/orders", content=small, headers=signature_headers())
                assert resp.status_code == 401, resp.text
        time.sleep(0.5)
        before = rss_mib(proc.pid)
        with PeakSampler(proc.pid) as sampler:
            answer = rawhttp.post(
                url,
                "/api/v1/orders",
                rawhttp.repeated(b"{" * (64 * 1024), HUGE),
                headers=signature_headers(),
                timeout=300,
            )
        time.sleep(0.5)
        return Figures(
            rss_before=before,
            rss_after=rss_mib(proc.pid),
            rss_peak=sampler.peak,
            baseline_growth=before - baseline_before,
            baseline_after=before,
            status=answer.status,
            sent=answer.sent,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--unprotected",
        action="store_true",
        help="also measure a server without the body limit (it will hold the whole body)",
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kameng-bench-body-"))
    try:
        env = env_for(tmp, None)
        settings = Settings(
            data_dir=tmp, master_key=env["KAMENG_MASTER_KEY"], app_secret="bench-app-secret"
        )
        upgrade(settings.resolved_database_url)
        container = Container.build(settings)
        container.bootstrap()
        container.close()

        protected = measure(tmp, protected=True)
        out = {
            "rss_before_mib": f"{protected.rss_before:.1f}",
            "rss_after_mib": f"{protected.rss_after:.1f}",
            "rss_peak_mib": f"{protected.rss_peak:.1f}",
            "growth_mib": f"{protected.rss_peak - protected.rss_before:.1f}",
            "baseline_growth_mib": f"{protected.baseline_growth:.1f}",
            "ratio": f"{protected.rss_after / protected.baseline_after:.2f}",
            "status": str(protected.status),
            "sent_mib": f"{protected.sent / MIB:.1f}",
        }
        if args.unprotected:
            bare = measure(tmp, protected=False)
            out |= {
                "unprotected_rss_before_mib": f"{bare.rss_before:.1f}",
                "unprotected_rss_after_mib": f"{bare.rss_after:.1f}",
                "unprotected_rss_peak_mib": f"{bare.rss_peak:.1f}",
                "unprotected_growth_mib": f"{bare.rss_peak - bare.rss_before:.1f}",
                "unprotected_status": str(bare.status),
                "unprotected_sent_mib": f"{bare.sent / MIB:.1f}",
            }
        print(f"machine: {machine()}", file=sys.stderr)
        print(" ".join(f"{k}={v}" for k, v in out.items()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
