"""Shared fixtures: a migrated SQLite container, a PostgreSQL one, and a live HTTP server.

PostgreSQL runs as a throwaway cluster (tests/support/pgcluster.py); each test gets its own
database cloned from a migrated template, so tests never see each other's rows.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kameng.container import Container
from kameng.migrate import upgrade
from tests.support import factories
from tests.support.pgcluster import NO_PG_REASON, PgCluster, session_cluster

_TEMPLATE = "kameng_template"
_template_ready = False


def pg_cluster_or_skip() -> PgCluster:
    cluster = session_cluster()
    if cluster is None:
        pytest.skip(NO_PG_REASON)
    return cluster


def new_pg_database(cluster: PgCluster) -> str:
    """A fresh, migrated database (cloned from a template migrated once per run)."""
    global _template_ready
    if not _template_ready:
        cluster.create_database(_TEMPLATE)
        upgrade(cluster.dsn(_TEMPLATE))
        _template_ready = True
    name = f"t_{secrets.token_hex(6)}"
    cluster.create_database(name, template=_TEMPLATE)
    return name


@contextmanager
def backend_container(backend: str, data_dir: Path, **overrides: Any) -> Iterator[Container]:
    """A migrated container on `backend`: a SQLite file in `data_dir`, or a fresh database on
    the throwaway PostgreSQL cluster (dropped afterwards). `overrides` are Settings fields."""
    if backend == "sqlite":
        container = factories.make_container(data_dir, **overrides)
        yield container
        container.close()
        return
    cluster = pg_cluster_or_skip()
    name = new_pg_database(cluster)
    container = factories.make_container(
        data_dir, cluster.dsn(name), **{"db_pool_size": 8, **overrides}
    )
    try:
        yield container
    finally:
        container.close()
        cluster.drop_database(name)


@pytest.fixture
def sqlite_container(tmp_path: Path) -> Iterator[Container]:
    with backend_container("sqlite", tmp_path) as container:
        yield container


@pytest.fixture
def pg_container(tmp_path: Path) -> Iterator[Container]:
    with backend_container("postgresql", tmp_path) as container:
        yield container


@pytest.fixture(params=["sqlite", "postgresql"])
def container(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Container]:
    """The same test on both backends."""
    with backend_container(request.param, tmp_path) as c:
        yield c


@pytest.fixture
def server(container: Container) -> Iterator[str]:
    with factories.live_server(container) as url:
        yield url


@pytest.fixture
def sqlite_server(sqlite_container: Container) -> Iterator[str]:
    with factories.live_server(sqlite_container) as url:
        yield url
