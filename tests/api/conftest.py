"""Module-scoped containers and live servers for the HTTP API tests.

Building a migrated database and starting uvicorn costs ~0.6 s; doing it per test would
dominate the run. Tests here share one server per module and backend, and stay independent by
creating their own resellers and SKUs (random names), never asserting on global counts.
Tests that need a private app (a rate limiter, a canary data dir) build their own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kameng.container import Container
from tests.conftest import backend_container
from tests.support import factories


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def any_db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    """One container per module and backend (SQLite, then a throwaway PostgreSQL)."""
    with backend_container(request.param, tmp_path_factory.mktemp(f"api-{request.param}")) as c:
        yield c


@pytest.fixture(scope="module")
def any_url(any_db: Container) -> Iterator[str]:
    with factories.live_server(any_db) as url:
        yield url


@pytest.fixture(scope="module")
def lite_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    container = factories.make_container(tmp_path_factory.mktemp("api-lite"))
    yield container
    container.close()


@pytest.fixture(scope="module")
def lite_url(lite_db: Container) -> Iterator[str]:
    with factories.live_server(lite_db) as url:
        yield url
