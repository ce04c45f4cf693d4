"""Throwaway PostgreSQL clusters for tests and benchmarks.

Why this exists: the money paths of kameng rely on real PostgreSQL semantics (row locks,
``SERIALIZABLE`` retries, constraint timing) that SQLite or mocks cannot reproduce, and the
benchmarks must measure a server that really flushes to disk. So tests start a private cluster
from the installed server binaries instead of depending on a shared, long-lived database.

Design notes:

* Everything lives in one base folder (``/tmp/kameng-pg-XXXX``): the data directory, the unix
  socket and the server log. Removing that folder removes every trace of the cluster. ``/tmp``
  is used rather than ``$TMPDIR`` because unix socket paths are limited to ~107 bytes and
  because, when running as root, the folder must be reachable by the ``postgres`` user.
* PostgreSQL refuses to run as root. When the test process is root, ``initdb`` and ``pg_ctl``
  are executed as the ``postgres`` system user (via ``subprocess``'s ``user=``/``group=``,
  which is ``setgid``+``setuid`` in the child: no PAM, no login shell, no quoting issues).
* ``fsync=on`` is kept deliberately: money tests and benchmarks must be honest about
  durability costs. It cannot be overridden through ``settings``.
* Three layers make sure no server outlives the test process: ``stop()``/context manager,
  an ``atexit`` hook for every running cluster, and a tiny detached watchdog shell that
  stops the server and removes the folder if the owning process dies without running
  ``atexit`` (``SIGKILL``, CI timeout).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "NO_PG_REASON",
    "SUPERUSER",
    "PgCluster",
    "PgClusterError",
    "find_pg_bindir",
    "pgbench_tps",
    "session_cluster",
]

#: Superuser role created by ``initdb``; trust auth, so no password anywhere.
SUPERUSER = "kameng"

#: Environment variable that, when set, names the bin directory to use (overrides discovery).
BINDIR_ENV = "KAMENG_PG_BINDIR"

#: Human-readable reason callers should give to ``pytest.skip`` when no binaries are found.
NO_PG_REASON = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in "
    f"/usr/lib/postgresql/*/bin, next to pg_ctl on PATH, or in ${BINDIR_ENV}"
)

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_PGLIB_ROOT = Path("/usr/lib/postgresql")
_BASE_PREFIX = "kameng-pg-"
_LOG_TAIL_LINES = 40

#: Server settings always applied; ``settings=`` in the constructor may add or override
#: everything except the keys in ``_MANAGED_SETTINGS``.
_DEFAULT_SETTINGS: dict[str, str] = {
    "fsync": "on",
    "max_connections": "300",
    "shared_buffers": "256MB",
}
#: Settings the class controls itself: changing them would break ``host``/``port``/``dsn`` or
#: make durability measurements dishonest.
_MANAGED_SETTINGS = frozenset({"port", "listen_addresses", "unix_socket_directories", "fsync"})

# Watchdog: polls once a second while the owner process and the base folder both exist. If the
# owner vanished without cleaning up, it sends SIGQUIT (= immediate shutdown) to the postmaster,
# escalates to SIGKILL after ~10 s, then removes the base folder.
_WATCHDOG_SCRIPT = r"""
owner=$1; base=$2; data=$3
alive() { kill -0 "$1" 2>/dev/null && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
while alive "$owner" && [ -d "$base" ]; do sleep 1; done
[ -d "$base" ] || exit 0
if [ -f "$data/postmaster.pid" ]; then
  pm=$(head -n 1 "$data/postmaster.pid")
  if [ -n "$pm" ]; then
    kill -QUIT "$pm" 2>/dev/null
    i=0
    while alive "$pm" && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    alive "$pm" && kill -KILL "$pm" 2>/dev/null
  fi
fi
rm -rf "$base"
"""


class PgClusterError(RuntimeError):
    """Raised when a cluster cannot be created, started, used or stopped."""


# --------------------------------------------------------------------------- discovery


def _has_binaries(directory: Path) -> bool:
    return all(
        (directory / name).is_file() and os.access(directory / name, os.X_OK)
        for name in _REQUIRED_BINARIES
    )


def _version_key(name: str) -> tuple[int, ...] | None:
    """``"15"`` -> ``(15,)``, ``"9.6"`` -> ``(9, 6)``; anything else is not a version dir."""
    if not re.fullmatch(r"\d+(\.\d+)*", name):
        return None
    return tuple(int(part) for part in name.split("."))


def find_pg_bindir() -> Path | None:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres`` (and ``pgbench``).

    Order: ``$KAMENG_PG_BINDIR`` (an explicit but wrong value raises, so a typo is not silently
    turned into skipped tests), the highest ``/usr/lib/postgresql/<version>/bin`` (Debian/Ubuntu
    layout, where the server binaries are not on PATH), then the directory of ``pg_ctl`` on PATH
    or the directory its symlink resolves to. ``None`` means "not installed": callers skip.
    """
    override = os.environ.get(BINDIR_ENV)
    if override:
        path = Path(override)
        if not _has_binaries(path):
            raise PgClusterError(
                f"${BINDIR_ENV}={override!r} lacks {', '.join(_REQUIRED_BINARIES)}"
            )
        return path

    candidates: list[tuple[tuple[int, ...], Path]] = []
    if _PGLIB_ROOT.is_dir():
        for child in _PGLIB_ROOT.iterdir():
            key = _version_key(child.name)
            if key is not None and _has_binaries(child / "bin"):
                candidates.append((key, child / "bin"))
    if candidates:
        return max(candidates)[1]

    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        for directory in (Path(pg_ctl).parent, Path(pg_ctl).resolve().parent):
            if _has_binaries(directory):
                return directory
    return None


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    """Ask the kernel for a currently free TCP port on 127.0.0.1.

    There is an unavoidable race between closing this socket and the postmaster binding the
    port; ``PgCluster.start`` retries with a fresh port when the bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """Environment for child processes without ``PG*`` variables.

    A developer's ``PGHOST``/``PGPORT``/``PGDATA``/``PGOPTIONS`` must never redirect test
    traffic to a real database. ``LC_ALL=C`` keeps server messages in English so start
    failures can be recognised in the log.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie.

    A stopped postmaster is re-parented to PID 1; in containers whose init reaps lazily it
    lingers as a zombie for seconds, which ``kill(pid, 0)`` alone would report as alive.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def pgbench_tps(output: str) -> float:
    """Extract transactions per second from ``pgbench`` run output.

    PostgreSQL >= 14 prints one ``tps = N (without initial connection time)`` line; older
    versions print an "including" then an "excluding connections" line, so the last one wins.
    """
    matches = re.findall(r"^tps = ([0-9]+(?:\.[0-9]+)?)", output, flags=re.MULTILINE)
    if not matches:
        raise PgClusterError(f"no 'tps = ...' line in pgbench output:\n{output}")
    return float(matches[-1])


# --------------------------------------------------------------------------- cluster


@dataclass
class _ServerUser:
    """Identity used for ``initdb``/``pg_ctl`` when the test process runs as root."""

    name: str
    uid: int
    gid: int
    home: str
    groups: list[int] = field(default_factory=list)


class PgCluster:
    """A private PostgreSQL cluster: ``initdb`` on ``start()``, deleted on ``stop()``.

    Usage::

        with PgCluster() as cluster:
            cluster.create_database("t1")
            engine = create_engine(cluster.dsn("t1"))

    ``host`` is the unix socket directory; the server also listens on ``127.0.0.1:port``,
    which is what ``dsn()``/``libpq_dsn()`` use (TCP works the same for every client library).
    """

    user: str = SUPERUSER

    def __init__(
        self,
        bindir: Path | str | None = None,
        *,
        settings: Mapping[str, str | int] | None = None,
        server_user: str = "postgres",
        start_timeout: float = 60.0,
        watchdog: bool = True,
    ) -> None:
        """Prepare (but do not start) a cluster.

        ``settings`` become extra ``-c name=value`` server options (e.g.
        ``{"log_min_duration_statement": 0}``). ``server_user`` is only used when running as
        root. ``watchdog=False`` disables the detached cleanup shell (atexit still applies).
        """
        resolved = Path(bindir) if bindir is not None else find_pg_bindir()
        if resolved is None:
            raise PgClusterError(NO_PG_REASON)
        self.bindir: Path = resolved
        forbidden = _MANAGED_SETTINGS.intersection(settings or {})
        if forbidden:
            raise ValueError(f"settings {sorted(forbidden)} are managed by PgCluster")
        self._settings: dict[str, str] = {
            **_DEFAULT_SETTINGS,
            **{key: str(value) for key, value in (settings or {}).items()},
        }
        self._server_user_name = server_user
        self._start_timeout = start_timeout
        self._use_watchdog = watchdog
        self._base: Path | None = None
        self._port: int | None = None
        self._running = False
        self._owner_pid = os.getpid()
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        #: Wall-clock seconds spent in the last ``start()`` / ``stop()`` (for diagnostics).
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    # ------------------------------------------------------------------ attributes

    @property
    def running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        return self._running

    @property
    def base(self) -> Path:
        """Folder holding data dir, socket and log; deleted by ``stop()``."""
        if self._base is None:
            raise PgClusterError("cluster not started")
        return self._base

    @property
    def datadir(self) -> Path:
        """The cluster's data directory (``PGDATA``)."""
        return self.base / "data"

    @property
    def host(self) -> str:
        """Unix socket directory (usable as libpq ``host=``)."""
        return str(self.base)

    @property
    def port(self) -> int:
        """TCP port on 127.0.0.1 (also the socket's port number)."""
        if self._port is None:
            raise PgClusterError("cluster not started")
        return self._port

    @property
    def logfile(self) -> Path:
        """Server log file; its tail is included in start failures."""
        return self.base / "server.log"

    def dsn(self, dbname: str) -> str:
        """SQLAlchemy URL for ``dbname`` (psycopg 3 driver, TCP, trust auth)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def libpq_dsn(self, dbname: str) -> str:
        """libpq key/value connection string for ``dbname`` (for ``psycopg.connect``)."""
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self._port} base={self._base}" if self._running else "stopped"
        return f"<PgCluster {state} bindir={self.bindir}>"

    def start(self) -> PgCluster:
        """initdb + start the server; idempotent. Raises ``PgClusterError`` with the log tail.

        On any failure the base folder is removed again, so a failed start leaks nothing.
        """
        with self._lock:
            if self._running:
                return self
            began = time.monotonic()
            server_user = self._resolve_server_user()
            base = Path(tempfile.mkdtemp(prefix=_BASE_PREFIX, dir=self._tmp_root()))
            self._base = base
            try:
                if server_user is not None:
                    # mkdtemp creates 0700 root-owned; postgres must create data/, the socket
                    # and the log here, and other local users may need to reach the socket.
                    os.chown(base, server_user.uid, server_user.gid)
                    base.chmod(0o755)
                self._initdb(server_user)
                self._start_server(server_user)
                self._running = True
                _register(self)
                if self._use_watchdog:
                    self._spawn_watchdog()
            except BaseException:
                self._teardown(server_user)
                raise
            self.start_seconds = time.monotonic() - began
            return self

    def stop(self) -> None:
        """Stop the server (immediate mode: the data is thrown away anyway) and delete it all.

        Idempotent and safe to call from ``atexit``; it never raises for an already-dead server.
        """
        with self._lock:
            if self._base is None:
                return
            began = time.monotonic()
            try:
                self._teardown(self._resolve_server_user())
            finally:
                self._running = False
                _unregister(self)
            self.stop_seconds = time.monotonic() - began

    # ------------------------------------------------------------------ database helpers

    def _admin_connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        """Autocommit connection to the ``postgres`` database (CREATE/DROP DATABASE need it).

        psycopg is imported here, not at module level, so discovery and the pytest skip logic
        keep working in environments that only have the server binaries.
        """
        import psycopg

        return psycopg.connect(self.libpq_dsn("postgres"), autocommit=True, connect_timeout=10)

    def create_database(self, name: str, template: str | None = None) -> None:
        """``CREATE DATABASE name [TEMPLATE template]``.

        Cloning from a template (e.g. a migrated schema) is much faster than re-running
        migrations per test; PostgreSQL requires that nobody is connected to the template.
        """
        statement = f"CREATE DATABASE {_quote_ident(name)}"
        if template is not None:
            statement += f" TEMPLATE {_quote_ident(template)}"
        with self._admin_connect() as conn:
            conn.execute(statement)

    def drop_database(self, name: str) -> None:
        """Terminate every session on ``name`` and drop it (no error if it does not exist).

        Leaked connection pools from a failed test would otherwise make ``DROP DATABASE`` fail
        and hide the real error.
        """
        with self._admin_connect() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    def run_pgbench(self, dbname: str, *args: str, timeout: float | None = None) -> str:
        """Run this cluster's ``pgbench`` against ``dbname`` over TCP and return its stdout.

        The binary from ``bindir`` is used (not ``/usr/bin/pgbench``, which on Debian is a
        wrapper that may pick another version). Raises ``PgClusterError`` with stderr on failure.
        """
        pgbench = self.bindir / "pgbench"
        if not pgbench.is_file():
            raise PgClusterError(f"pgbench not found in {self.bindir}")
        argv = [
            str(pgbench),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            self.user,
            *args,
            dbname,
        ]
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=_clean_env(),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PgClusterError(f"pgbench timed out after {timeout}s: {shlex.join(argv)}") from exc
        if proc.returncode != 0:
            raise PgClusterError(
                f"pgbench failed (exit {proc.returncode}): {shlex.join(argv)}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc.stdout

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _tmp_root() -> str:
        # Short, world-traversable path: see module docstring.
        return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()

    def _resolve_server_user(self) -> _ServerUser | None:
        """``None`` when not root (run as ourselves), else the unprivileged server account."""
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(self._server_user_name)
        except KeyError:
            raise PgClusterError(
                f"running as root, but there is no {self._server_user_name!r} system user to run "
                "PostgreSQL as (the server refuses to run as root); create one or run tests as "
                "an ordinary user"
            ) from None
        return _ServerUser(
            name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir
        )

    def _run_server_cmd(
        self, argv: list[str], server_user: _ServerUser | None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run a server-side tool, dropping privileges to the server user when we are root.

        ``cwd`` is the base folder because the server user may not be able to read the
        caller's working directory (initdb and postgres complain about that).
        """
        env = _clean_env()
        if server_user is not None:
            env.update(HOME=server_user.home, USER=server_user.name, LOGNAME=server_user.name)
        try:
            return subprocess.run(
                argv,
                cwd=self.base,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                user=server_user.uid if server_user else None,
                group=server_user.gid if server_user else None,
                extra_groups=server_user.groups if server_user else None,
            )
        except subprocess.TimeoutExpired as exc:
            raise PgClusterError(
                f"timed out after {timeout}s: {shlex.join(argv)}\n"
                f"--- server log tail ({self.logfile}) ---\n{_tail(self.logfile)}"
            ) from exc

    def _initdb(self, server_user: _ServerUser | None) -> None:
        argv = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            self.user,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            # Skips only initdb's own final sync of template files: the cluster is throwaway.
            # Runtime durability (fsync=on) is untouched.
            "--no-sync",
        ]
        proc = self._run_server_cmd(argv, server_user, timeout=120)
        if proc.returncode != 0:
            raise PgClusterError(
                f"initdb failed (exit {proc.returncode}): {shlex.join(argv)}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )

    def _server_options(self, port: int) -> str:
        options = ["-p", str(port), "-k", self.host, "-c", "listen_addresses=127.0.0.1"]
        for key, value in self._settings.items():
            options += ["-c", f"{key}={value}"]
        # pg_ctl pastes -o into a /bin/sh command line, so shell quoting is what is needed.
        return shlex.join(options)

    def _start_server(self, server_user: _ServerUser | None) -> None:
        """``pg_ctl -w start``, retrying with another port if the chosen one was taken."""
        attempts = 3
        for attempt in range(1, attempts + 1):
            port = _free_port()
            self._port = port
            argv = [
                str(self.bindir / "pg_ctl"),
                "-w",
                "-t",
                str(int(self._start_timeout)),
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-o",
                self._server_options(port),
                "start",
            ]
            proc = self._run_server_cmd(argv, server_user, timeout=self._start_timeout + 30)
            if proc.returncode == 0:
                return
            log_tail = _tail(self.logfile)
            port_clash = "could not bind" in log_tail or "Address already in use" in log_tail
            if port_clash and attempt < attempts:
                self._stop_server(server_user)
                continue
            raise PgClusterError(
                f"PostgreSQL failed to start (pg_ctl exit {proc.returncode}, port {port}, "
                f"attempt {attempt}/{attempts}): {shlex.join(argv)}\n"
                f"pg_ctl stdout:\n{proc.stdout}\npg_ctl stderr:\n{proc.stderr}\n"
                f"--- server log tail ({self.logfile}) ---\n{log_tail}"
            )

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().splitlines()[0]
            return int(first)
        except (OSError, IndexError, ValueError):
            return None

    def _stop_server(self, server_user: _ServerUser | None) -> None:
        """Stop the postmaster if one is running; falls back to signals if pg_ctl fails."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        argv = [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w"]
        argv += ["-t", "30", "stop"]
        with contextlib.suppress(PgClusterError):
            proc = self._run_server_cmd(argv, server_user, timeout=45)
            if proc.returncode == 0:
                return
        # pg_ctl failed (stale pid file, hung server...): signal the postmaster directly.
        for sig, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            except PermissionError:
                return  # pid was recycled by an unrelated process we may not touch
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not _alive(pid):
                    return
                time.sleep(0.05)

    def _spawn_watchdog(self) -> None:
        self._watchdog = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                _WATCHDOG_SCRIPT,
                "kameng-pg-watchdog",  # $0
                str(os.getpid()),
                str(self.base),
                str(self.datadir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # survive a kill of our process group (e.g. CI timeout)
            cwd="/",
        )

    def _teardown(self, server_user: _ServerUser | None) -> None:
        """Kill the watchdog, stop the server, delete the base folder. Never raises."""
        if self._watchdog is not None:
            # Its own session/process group: kill the shell *and* its pending `sleep`.
            with contextlib.suppress(OSError):
                os.killpg(self._watchdog.pid, signal.SIGKILL)
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=5)
            self._watchdog = None
        if self._base is not None:
            with contextlib.suppress(OSError):
                self._stop_server(server_user)
            shutil.rmtree(self._base, ignore_errors=True)
        self._base = None
        self._port = None


# --------------------------------------------------------------------------- process-wide state

_live_lock = threading.Lock()
_live: set[PgCluster] = set()  # strong refs: a forgotten cluster is still stopped at exit


def _register(cluster: PgCluster) -> None:
    with _live_lock:
        _live.add(cluster)


def _unregister(cluster: PgCluster) -> None:
    with _live_lock:
        _live.discard(cluster)


@atexit.register
def _stop_all_at_exit() -> None:
    """Stop clusters still running when the interpreter exits (crashed or aborted runs).

    Only clusters started by *this* pid are stopped: a forked child that exits normally must
    not tear down its parent's server.
    """
    with _live_lock:
        clusters = [c for c in _live if c._owner_pid == os.getpid()]
    for cluster in clusters:
        with contextlib.suppress(Exception):
            cluster.stop()


class _SessionState:
    """Holder for the shared cluster (avoids ``global`` statements)."""

    lock = threading.Lock()
    cluster: PgCluster | None = None
    error: PgClusterError | None = None
    pid: int | None = None


def session_cluster() -> PgCluster | None:
    """Return the process-wide shared cluster, starting it on first use.

    ``None`` means the PostgreSQL binaries are not installed: callers should
    ``pytest.skip(NO_PG_REASON)`` so the reason is visible in the report. A start failure is
    raised (and re-raised on later calls without retrying) because a broken installation must
    not masquerade as a skip. The cluster is stopped by the ``atexit`` hook.
    """
    state = _SessionState
    with state.lock:
        if state.pid != os.getpid():  # fresh process after fork: do not reuse parent's server
            state.cluster, state.error, state.pid = None, None, os.getpid()
        if state.cluster is not None and state.cluster.running:
            return state.cluster
        if state.error is not None:
            raise PgClusterError(f"shared cluster failed to start earlier: {state.error}")
        bindir = find_pg_bindir()
        if bindir is None:
            return None
        cluster = PgCluster(bindir)
        try:
            cluster.start()
        except PgClusterError as exc:
            state.error = exc
            raise
        state.cluster = cluster
        return cluster
