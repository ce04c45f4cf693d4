"""The real `kameng worker` in a subprocess, for tests that SIGKILL it (a kill then is a real
kill of a process holding database connections, open transactions and supplier requests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import factories
from tests.support.pipeline import FAST, Rig

KAMENG = str(Path(sys.executable).parent / "kameng")


class WorkerProcess:
    """`kameng worker` in a subprocess; each start logs to its own files in `log_dir`."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.startup_s: list[float] = []
        self._spawned = 0.0

    @property
    def log(self) -> Path:
        return self.logs[-1]

    def start(self) -> None:
        n = len(self.logs) + 1
        self.logs.append(self.log_dir / f"worker-{n:02d}.stderr")
        self._spawned = time.monotonic()
        with (
            self.log.open("wb") as err,
            (self.log_dir / f"worker-{n:02d}.stdout").open("wb") as out,
        ):
            self.proc = subprocess.Popen(
                [KAMENG, "worker"], env=self.env, stdout=out, stderr=err, stdin=subprocess.DEVNULL
            )

    def wait_started(self, timeout: float = 20.0) -> None:
        """Until the worker logged that its loop runs (imports and set-up take a second or
        two), so that the random delay before the next kill is spent in real work."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while b" started" not in self.log.read_bytes():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}\n{tail(self.log)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker did not start\n{tail(self.log)}")
            time.sleep(0.01)
        self.startup_s.append(time.monotonic() - self._spawned)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        code = self.proc.returncode
        assert code == -signal.SIGKILL, (
            f"worker had exited ({code}) before the kill\n{tail(self.log)}"
        )

    def stop(self, timeout: float = 40.0) -> int | None:
        """Graceful stop (SIGTERM); returns the exit code (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"worker ignored SIGTERM\n{tail(self.log)}") from None
        return self.proc.returncode


def tail(path: Path, lines: int = 40) -> str:
    try:
        body = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    kept = [ln for ln in body.splitlines() if "httpx HTTP Request" not in ln][-lines:]
    return f"--- {path} (last {lines} lines, httpx lines left out) ---\n" + "\n".join(kept)


def worker_env(
    rig: Rig, *, lease_s: int = 2, concurrency: int = 64, **settings: object
) -> dict[str, str]:
    """The worker subprocess's settings: the test container's database and secrets, the app's
    URL for supplier callbacks, and the test's fast timings with a short lease; `settings`
    are more Settings fields."""
    s = rig.container.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAMENG_")}
    env.update(
        {
            "KAMENG_DATABASE_URL": str(s.resolved_database_url),
            "KAMENG_DATA_DIR": str(s.data_dir),
            "KAMENG_MASTER_KEY": factories.MASTER_KEY_B64,
            "KAMENG_APP_SECRET": "test-app-secret",
            "KAMENG_PUBLIC_URL": rig.url,
            "KAMENG_DB_POOL_SIZE": "8",
            "KAMENG_WORKER_CONCURRENCY": str(concurrency),
            "PYTHONUNBUFFERED": "1",
        }
    )
    for name, value in {**FAST, "worker_lease_s": lease_s, **settings}.items():
        env[f"KAMENG_{name.upper()}"] = str(value)
    return env
