"""Engine, declarative base and the unit of work — the only place a transaction commits.

SQLite (embedded default) is configured for money: WAL, synchronous=FULL, a busy timeout, and
write transactions begun with BEGIN IMMEDIATE so two writers never deadlock on a lock upgrade.
SQLite has one writer at a time; waiting on its busy handler starves some callers (p99 in
seconds), so writes are also serialised by a process-wide lock plus an `flock` on a file beside
the database, which queues fairly across threads and across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, DateTime, Engine, Integer, MetaData, Table, create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def table(model: type[Base]) -> Table:
    """The Core table of a mapped class, typed as a Table for prebuilt Core statements."""
    result = model.__table__
    assert isinstance(result, Table)
    return result


# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL wants BIGINT ids for large tables.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        if dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class WriteLock:
    """Serialises SQLite writers within the process (threading) and across processes (flock)."""

    def __init__(self, path: Path | None) -> None:
        self._thread_lock = threading.Lock()
        self._owner: int | None = None
        self._path = path
        self._fd: int | None = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self._owner == threading.get_ident():
            # A second write transaction opened inside the first would wait for itself forever.
            raise RuntimeError("nested write transaction on SQLite")
        with self._thread_lock:
            self._owner = threading.get_ident()
            try:
                if self._path is None:
                    yield
                    return
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                self._owner = None


class Database:
    """An engine plus the write discipline its backend needs."""

    def __init__(self, url: str, *, pool_size: int = 4, busy_timeout_ms: int = 5000) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine = _sqlite_engine(url, busy_timeout_ms)
            db_path = self.engine.url.database
            lock_path = Path(f"{db_path}.writelock") if db_path and db_path != ":memory:" else None
            self.write_lock = WriteLock(lock_path)
        else:
            self.engine = create_engine(
                url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=False,
                pool_recycle=3600,
            )
            self.write_lock = WriteLock(None)
        self._sessions = sessionmaker(bind=self.engine, expire_on_commit=False, autoflush=True)
        self._read_engine = self.engine.execution_options(kameng_begin="DEFERRED")

    @contextlib.contextmanager
    def unit_of_work(self, *, write: bool = True) -> Iterator[Session]:
        """One transaction. Commits when the block ends, rolls back on any exception.

        Services receive the session and never commit; this is the single commit point.
        """
        if self.is_sqlite and write:
            with self.write_lock.hold(), self._session(write=True) as session:
                yield session
        else:
            with self._session(write=write) as session:
                yield session

    @contextlib.contextmanager
    def _session(self, *, write: bool) -> Iterator[Session]:
        session = self._sessions(bind=self.engine if write else self._read_engine)
        try:
            yield session
            if write:
                session.commit()
            else:
                session.rollback()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextlib.contextmanager
    def connect(self, *, write: bool = True) -> Iterator[Connection]:
        """A Core connection in one transaction — the order hot path uses this."""
        if self.is_sqlite and write:
            with self.write_lock.hold(), self.engine.begin() as conn:
                yield conn
        else:
            with (self.engine if write else self._read_engine).begin() as conn:
                yield conn

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_engine(url: str, busy_timeout_ms: int) -> Engine:
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "isolation_level": None},
        pool_size=8,
        max_overflow=8,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA cache_size=-65536")
        cur.execute("PRAGMA temp_store=MEMORY")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("kameng_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def is_unique_violation(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    return "unique" in text or "duplicate key" in text


def db_time(conn: Connection, value: datetime | None) -> Any:
    """A datetime as the driver needs it when SQL bypasses SQLAlchemy's types (see RawSQL)."""
    if value is None or conn.dialect.name != "sqlite":
        return value
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


class RawSQL:
    """A statement run straight on the DB-API cursor, for the order hot path only.

    SQLAlchemy's per-statement overhead (context setup, type processing, result wrapping) costs
    more than SQLite takes to run the statement; on a path with ~15 statements per order that
    is most of the CPU. Written once with `:name` parameters, translated for psycopg. Callers
    pass values already in driver form: `db_time()` for datetimes, JSON as text.
    """

    _PARAM = re.compile(r"(?<![:\w]):(\w+)")

    def __init__(self, sql: str) -> None:
        self.sqlite = sql
        self.pg = self._PARAM.sub(r"%(\1)s", sql)

    def _cursor(self, conn: Connection) -> tuple[Any, str]:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        return raw.cursor(), self.sqlite if conn.dialect.name == "sqlite" else self.pg

    def run(self, conn: Connection, params: dict[str, Any]) -> Any:
        cursor, sql = self._cursor(conn)
        cursor.execute(sql, params)
        return cursor

    def one(self, conn: Connection, params: dict[str, Any]) -> Any:
        cursor = self.run(conn, params)
        try:
            return cursor.fetchone()
        finally:
            cursor.close()

    def all(self, conn: Connection, params: dict[str, Any]) -> list[Any]:
        cursor = self.run(conn, params)
        try:
            return list(cursor.fetchall())
        finally:
            cursor.close()


@contextlib.contextmanager
def savepoint(conn: Connection) -> Iterator[None]:
    """A SAVEPOINT issued on the driver directly (SQLAlchemy's begin_nested compiles SQL every
    time, which costs more on the hot path than the savepoint itself). Rolled back to on any
    exception, which then propagates."""
    depth = conn.info.get("kameng_sp_depth", 0) + 1
    conn.info["kameng_sp_depth"] = depth
    name = f"kameng_sp{depth}"
    raw = conn.connection.dbapi_connection
    assert raw is not None
    cursor = raw.cursor()
    try:
        cursor.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            cursor.execute(f"ROLLBACK TO SAVEPOINT {name}")
            cursor.execute(f"RELEASE SAVEPOINT {name}")
            raise
        cursor.execute(f"RELEASE SAVEPOINT {name}")
    finally:
        cursor.close()
        conn.info["kameng_sp_depth"] = depth - 1


class MultiInsert:
    """One INSERT ... VALUES (...), (...) for a few rows: one round trip, where executemany
    costs one per row (or a pipeline sync) on PostgreSQL."""

    def __init__(self, table_name: str, columns: tuple[str, ...]) -> None:
        self.table_name = table_name
        self.columns = columns
        self._by_count: dict[int, RawSQL] = {}

    def _statement(self, count: int) -> RawSQL:
        stmt = self._by_count.get(count)
        if stmt is None:
            rows = ", ".join(
                "(" + ", ".join(f":{c}_{i}" for c in self.columns) + ")" for i in range(count)
            )
            stmt = RawSQL(
                f"INSERT INTO {self.table_name} ({', '.join(self.columns)}) VALUES {rows}"
            )
            self._by_count[count] = stmt
        return stmt

    def run(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        params = {f"{c}_{i}": row[c] for i, row in enumerate(rows) for c in self.columns}
        self._statement(len(rows)).run(conn, params).close()


@contextlib.contextmanager
def pipelined(conn: Connection) -> Iterator[None]:
    """PostgreSQL: statements whose results nobody waits for (inserts of events, deliveries,
    audit rows, the final order update) travel together with the next statement that is
    awaited, instead of costing a round trip each. Errors still surface before commit.
    A no-op on SQLite, which has no round trips."""
    if conn.dialect.name != "postgresql":
        yield
        return
    raw = conn.connection.dbapi_connection
    assert raw is not None
    with raw.pipeline():
        yield


# Wakes pipeline workers on PostgreSQL the moment an order becomes due (LISTEN/NOTIFY), so a
# freshly paid order is picked up in milliseconds instead of at the next poll. Delivered only
# when the transaction commits, which is exactly when the order is really due.
DUE_CHANNEL = "kameng_due"
_NOTIFY_DUE = RawSQL(f"NOTIFY {DUE_CHANNEL}")


def notify_due(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        _NOTIFY_DUE.run(conn, {}).close()
