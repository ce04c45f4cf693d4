"""Helpers shared by the integration tests: running the `kameng` CLI against a test container."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import factories

from kameng.container import Container


def cli_env(container: Container) -> dict[str, str]:
    """The environment that points the CLI at the same database and keys as `container`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAMENG_")}
    env.update(
        KAMENG_DATABASE_URL=container.settings.resolved_database_url,
        KAMENG_DATA_DIR=str(container.settings.data_dir),
        KAMENG_MASTER_KEY=factories.MASTER_KEY_B64,
        KAMENG_APP_SECRET="test-app-secret",
        KAMENG_ACTOR="integration-test",
    )
    return env


def run_cli(container: Container, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("kameng")
    return subprocess.run(
        [str(exe), *args],
        env=cli_env(container),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
