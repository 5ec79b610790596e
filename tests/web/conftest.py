"""Fixtures of the ``framecap web`` tests: a real PostgreSQL and both caption index backends.

- ``postgres_server`` (session): a :class:`common.stack.postgres.PostgresServer` on a free port
  in a temporary directory (about 2 s), stopped at the end. Skipped when PostgreSQL is not
  installed, unless ``FRAMECAP_REQUIRE_STACK=1``, which turns the skip into a failure.
- ``pg_url`` (function): the URL of a fresh, empty database of that server.
- ``caption_index`` (function, parametrised ``sqlite`` / ``postgresql``): a fresh
  :class:`~cloud.web.index.CaptionIndex` of each backend, so every index test runs on both.

Tests that reach PostgreSQL (through ``postgres_server``, ``pg_url`` or the ``postgresql``
``caption_index``) are marked ``integration``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.web.index import CaptionIndex
from common.stack import StackError
from common.stack.postgres import PostgresServer, find_postgres


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs the real PostgreSQL ``integration``."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("caption_index") if callspec is not None else None
        if "postgres_server" in names or "pg_url" in names or backend == "postgresql":
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """The session's PostgreSQL on 127.0.0.1 (trust authentication, a temporary cluster)."""
    try:
        find_postgres()
    except StackError as err:
        if os.environ.get("FRAMECAP_REQUIRE_STACK") == "1":
            pytest.fail(f"PostgreSQL required (FRAMECAP_REQUIRE_STACK=1) but {err}")
        pytest.skip(f"PostgreSQL unavailable: {err}")
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    try:
        server.start()
    except StackError as err:
        server.stop()
        pytest.fail(f"PostgreSQL did not start: {err}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """A fresh empty database of the session's PostgreSQL: ``postgresql://...``."""
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:16]}")


@pytest.fixture(params=["sqlite", "postgresql"])
def caption_index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CaptionIndex]:
    """A fresh, empty caption index of each backend."""
    index: CaptionIndex
    if request.param == "sqlite":
        from cloud.web.index_sqlite import SqliteIndex

        index = SqliteIndex(tmp_path / "index.sqlite")
    else:
        from cloud.web.index_pg import PostgresIndex

        index = PostgresIndex(request.getfixturevalue("pg_url"))
    try:
        yield index
    finally:
        index.close()
