"""Self-check for the throwaway PostgreSQL helper.

Every PostgreSQL-backed test and benchmark depends on ``tests.support.pgcluster``; if it breaks,
those suites fail in confusing ways (or silently skip). This file proves the helper end to end:
start as the current user (or as ``postgres`` when root), SQL over TCP and the unix socket,
pgbench, database create/drop, failure reporting and cleanup.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.pgcluster import (
    NO_PG_REASON,
    SUPERUSER,
    PgCluster,
    PgClusterError,
    find_pg_bindir,
    pgbench_tps,
    session_cluster,
)

BINDIR = find_pg_bindir()

pytestmark = [
    pytest.mark.pg,
    pytest.mark.skipif(BINDIR is None, reason=NO_PG_REASON),
]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with PgCluster() as started:
        yield started


def test_bindir_has_server_binaries() -> None:
    assert BINDIR is not None
    for name in ("initdb", "pg_ctl", "postgres", "pgbench"):
        assert (BINDIR / name).is_file(), name


def test_pgbench_tps_parser() -> None:
    pg15 = "number of failed transactions: 0 (0.000%)\ntps = 812.345678 (without initial ...)\n"
    assert pgbench_tps(pg15) == pytest.approx(812.345678)
    pg13 = "tps = 10.5 (including connections establishing)\ntps = 11.25 (excluding ...)\n"
    assert pgbench_tps(pg13) == pytest.approx(11.25)
    with pytest.raises(PgClusterError):
        pgbench_tps("nothing here")


def test_connection_strings(cluster: PgCluster) -> None:
    port = cluster.port
    assert cluster.dsn("abc") == f"postgresql+psycopg://kameng@127.0.0.1:{port}/abc"
    assert cluster.libpq_dsn("abc") == f"host=127.0.0.1 port={port} user=kameng dbname=abc"
    assert cluster.user == SUPERUSER == "kameng"
    assert Path(cluster.host).is_dir()
    assert (cluster.datadir / "PG_VERSION").is_file()


def test_server_settings_and_identity(cluster: PgCluster) -> None:
    with psycopg.connect(cluster.libpq_dsn("postgres")) as conn:
        row = conn.execute(
            "select current_user, current_setting('is_superuser'), current_setting('fsync'),"
            " current_setting('max_connections'), current_setting('shared_buffers'),"
            " current_setting('server_encoding'), current_setting('lc_collate')"
        ).fetchone()
    assert row == ("kameng", "on", "on", "300", "256MB", "UTF8", "C")


def test_unix_socket_connection(cluster: PgCluster) -> None:
    with psycopg.connect(
        host=cluster.host, port=cluster.port, user="kameng", dbname="postgres"
    ) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_database_roundtrip_with_pgbench(cluster: PgCluster) -> None:
    db = "selfcheck_bench"
    cluster.create_database(db)
    try:
        with psycopg.connect(cluster.libpq_dsn(db)) as conn:
            assert conn.execute("select 1").fetchone() == (1,)

        cluster.run_pgbench(db, "-i", "-s", "1", "-q", timeout=120)
        began = time.monotonic()
        out = cluster.run_pgbench(db, "-T", "2", "-c", "2", "-j", "2", timeout=60)
        elapsed = time.monotonic() - began
        tps = pgbench_tps(out)
        print(f"pgbench -T 2 -c 2 -j 2: tps={tps:.1f} (wall {elapsed:.1f}s)")
        assert tps > 0

        # A leaked connection must not block the drop.
        leaked = psycopg.connect(cluster.libpq_dsn(db))
        try:
            cluster.drop_database(db)
        finally:
            leaked.close()
        with psycopg.connect(cluster.libpq_dsn("postgres")) as conn:
            gone = conn.execute("select count(*) from pg_database where datname = %s", (db,))
            assert gone.fetchone() == (0,)
    finally:
        cluster.drop_database(db)  # idempotent


def test_create_from_template(cluster: PgCluster) -> None:
    cluster.create_database("selfcheck_tpl")
    try:
        with psycopg.connect(cluster.libpq_dsn("selfcheck_tpl")) as conn:
            conn.execute("create table marker (id int primary key)")
            conn.execute("insert into marker values (42)")
        cluster.create_database("selfcheck_clone", template="selfcheck_tpl")
        with psycopg.connect(cluster.libpq_dsn("selfcheck_clone")) as conn:
            assert conn.execute("select id from marker").fetchone() == (42,)
    finally:
        cluster.drop_database("selfcheck_clone")
        cluster.drop_database("selfcheck_tpl")


def test_stop_removes_everything() -> None:
    began = time.monotonic()
    with PgCluster() as pg:
        started = time.monotonic()
        base, port = pg.base, pg.port
        assert _port_open(port)
        if os.geteuid() == 0:
            assert (pg.datadir).stat().st_uid != 0, "server files must not be owned by root"
    stopped = time.monotonic()
    print(f"start {started - began:.2f}s, stop {stopped - started:.2f}s")
    assert not base.exists()
    assert not _port_open(port)
    assert not pg.running
    pg.stop()  # idempotent


class _RecordingCluster(PgCluster):
    """Remembers the folder each start made, so a test can check that this very folder is
    gone (a glob of the temp directory would also see clusters of parallel test workers)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bases: list[Path] = []

    def _teardown(self, server_user: Any) -> None:
        if self._base is not None:
            self.bases.append(self._base)
        super()._teardown(server_user)


def test_start_failure_reports_log_and_cleans_up() -> None:
    pg = _RecordingCluster(settings={"shared_buffers": "not-a-size"}, watchdog=False)
    with pytest.raises(PgClusterError) as info:
        pg.start()
    message = str(info.value)
    assert "server log tail" in message
    assert "shared_buffers" in message  # the server's own complaint, from the log
    assert not pg.running
    (base,) = pg.bases  # the failed start made exactly one folder ...
    assert base.name.startswith("kameng-pg-")
    assert not base.exists()  # ... and removed it


def test_managed_settings_are_protected() -> None:
    with pytest.raises(ValueError, match="fsync"):
        PgCluster(settings={"fsync": "off"})


def test_session_cluster_is_shared() -> None:
    first = session_cluster()
    assert first is not None
    assert session_cluster() is first
    with psycopg.connect(first.libpq_dsn("postgres")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
