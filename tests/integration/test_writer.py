"""The SQLite group-commit writer survives callers that give up while their job is queued."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection
from tests.support import factories


def test_a_cancelled_caller_neither_kills_the_writer_nor_strands_its_batch(
    tmp_path: Path,
) -> None:
    container = factories.make_container(tmp_path)
    writer = container.writer
    gate = threading.Event()

    def slow(conn: Connection) -> int:
        gate.wait(5)  # holds the writer so the next jobs queue up as one batch
        return 1

    def quick(conn: Connection) -> int:
        return int(conn.execute(text("SELECT 2")).scalar_one())

    async def scenario() -> tuple[int, int]:
        first = asyncio.ensure_future(writer.run_async(slow))
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(writer.run_async(quick))
        bystander = asyncio.ensure_future(writer.run_async(quick))
        await asyncio.sleep(0.05)
        doomed.cancel()  # e.g. a worker shutting down mid-flight
        gate.set()
        return await first, await asyncio.wait_for(bystander, 5)

    assert asyncio.run(scenario()) == (1, 2)
    assert writer._thread is not None and writer._thread.is_alive()
    assert writer.run(quick) == 2
    container.close()
