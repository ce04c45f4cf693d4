"""Shared helpers for benchmarks: a seeded platform, a server process, and wrk runs."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MASTER_KEY_B64 = "YmVuY2gtb25seS1tYXN0ZXIta2V5LTMyLWJ5dGVzISE="


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {cpu}"


def env_for(data_dir: Path, database_url: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["KAMENG_DATA_DIR"] = str(data_dir)
    env["KAMENG_MASTER_KEY"] = MASTER_KEY_B64
    env["KAMENG_APP_SECRET"] = "bench-app-secret"
    if database_url:
        env["KAMENG_DATABASE_URL"] = database_url
    else:
        env.pop("KAMENG_DATABASE_URL", None)
    return env


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_server(
    env: dict[str, str], port: int, workers: int, *, pipeline_worker: bool = False
) -> Server:
    """Web processes; with `pipeline_worker` each also runs an embedded pipeline worker."""
    kameng = Path(sys.executable).with_name("kameng")
    proc = subprocess.Popen(
        [
            str(kameng),
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--worker" if pipeline_worker else "--no-worker",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                time.sleep(0.5 * workers)  # let every worker process finish starting
                return Server(proc, url)
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "server died")
    proc.kill()
    raise RuntimeError("server did not start")


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    status: dict[str, int]
    client_cpu: float  # fraction of the machine's CPU used by wrk
    raw: str


def run_wrk(
    url: str,
    *,
    connections: int,
    seconds: int,
    threads: int = 2,
    script: Path | None = None,
    script_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> WrkResult:
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    if script:
        cmd += ["-s", str(script)]
    cmd.append(url)
    if script_args:
        cmd += ["--", *script_args]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out_bytes = proc.stdout.read() if proc.stdout else b""
    _, _, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    out = out_bytes.decode()
    cpu = (usage.ru_utime + usage.ru_stime) / wall / (os.cpu_count() or 1)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    secs_match = re.search(r"requests in ([\d.]+)(m?s)", out)
    secs = float(secs_match.group(1)) if secs_match else float(seconds)
    if secs_match and secs_match.group(2) == "ms":
        secs /= 1000
    status: dict[str, int] = {}
    for code, n in re.findall(r"status (\d{3}): (\d+)", out):
        status[code] = int(n)
    p50 = (
        float(re.search(r"p50_us=(\d+)", out).group(1)) / 1000
        if "p50_us" in out
        else _pct(out, "50")
    )
    p99 = (
        float(re.search(r"p99_us=(\d+)", out).group(1)) / 1000
        if "p99_us" in out
        else _pct(out, "99")
    )
    return WrkResult(requests, secs, requests / secs, p50, p99, status, cpu, out)


def _pct(out: str, pct: str) -> float:
    m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
