"""A throwaway PostgreSQL server on 127.0.0.1 for tests and the demo (Debian ``postgresql``).

:class:`PostgresServer` runs ``initdb`` (trust authentication for one superuser, loopback only)
and ``pg_ctl start`` on a free port, creates databases, and stops and removes it again.
PostgreSQL refuses to run as root: when this process is root, the data directory lives in a
temporary directory owned by the ``postgres`` user and both tools run as that user
(``runuser -u postgres``). About 1 s to start.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from common.stack.process import HOST, StackError, pick_port, tail

logger = logging.getLogger(__name__)

SUPERUSER = "framecap"
_DBNAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def find_postgres() -> Path:
    """The directory of PostgreSQL's server binaries (``initdb``, ``pg_ctl``), newest version
    first under ``/usr/lib/postgresql/*/bin``, else beside ``pg_ctl`` on the PATH.

    Raises:
        StackError: not installed (names the Debian package).
    """
    def version(path: str) -> int:
        parts = Path(path).parts
        return int(parts[-2]) if parts[-2].isdigit() else 0

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for directory in candidates:
        if all(os.access(Path(directory) / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "createdb")):
            return Path(directory)
    raise StackError("PostgreSQL not found: install it (apt-get install postgresql) or run make setup")


class PostgresServer:
    """One PostgreSQL server: ``start()``, ``url(dbname)``, ``create_database(name)``, ``stop()``.

    Args:
        directory: where its data and log go (when running as root, a temporary directory
            owned by ``postgres`` is used instead and removed at :meth:`stop`).
        port: TCP port on 127.0.0.1; a free one when None.
    """

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.port = port
        self.bindir: Path | None = None
        self._root = os.geteuid() == 0
        self._home: Path | None = None  # where data, socket and log are
        self._owned_tmp = False
        self.running = False

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (valid after :meth:`start`)."""
        if self._home is None:
            raise StackError("PostgreSQL is not started")
        return self._home / "data"

    @property
    def log_file(self) -> Path:
        """The server's log (valid after :meth:`start`)."""
        if self._home is None:
            raise StackError("PostgreSQL is not started")
        return self._home / "postgres.log"

    def _run(self, args: list[str], what: str, timeout_s: float) -> None:
        cmd = ["runuser", "-u", "postgres", "--", *args] if self._root else args
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise StackError(f"PostgreSQL {what} failed: {err}") from err
        if done.returncode != 0:
            log = tail(self.log_file) if self._home and self.log_file.exists() else ""
            raise StackError(f"PostgreSQL {what} failed (exit {done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[-800:]}\n{log}")

    def start(self, timeout_s: float = 60.0) -> None:
        """initdb and start the server; returns when it accepts connections.

        Raises:
            StackError: PostgreSQL is missing, or initdb or the start failed (with its log).
        """
        self.bindir = find_postgres()
        if self._root:
            self._home = Path(tempfile.mkdtemp(prefix="framecap-pg-"))
            self._owned_tmp = True
            shutil.chown(self._home, "postgres", "postgres")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._home = self.directory
        if self.port is None:
            self.port = pick_port()
        try:
            self._run([str(self.bindir / "initdb"), "-D", str(self.data_dir), "-A", "trust",
                       "-U", SUPERUSER, "-E", "UTF8", "--locale=C", "--no-sync"], "initdb", timeout_s)
            options = (f"-p {self.port} -k {self._home} -c listen_addresses={HOST} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                       "-o", options, "-w", "-t", str(int(timeout_s)), "start"], "start", timeout_s + 5)
        except StackError:
            self._cleanup()
            raise
        self.running = True
        logger.info("PostgreSQL up on %s:%s (data %s)", HOST, self.port, self.data_dir)

    def url(self, dbname: str = "postgres") -> str:
        """A ``postgresql://`` URL of database ``dbname`` for the superuser (no password:
        trust on loopback)."""
        if self.port is None:
            raise StackError("PostgreSQL is not started")
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (letters, digits, ``_``) and return its URL.

        Raises:
            StackError: a bad name, or ``createdb`` failed (it exists already, say).
        """
        if not _DBNAME_RE.match(name):
            raise StackError(f"bad database name {name!r}: letters, digits and _ (at most 63)")
        if not self.running or self.bindir is None:
            raise StackError("PostgreSQL is not started")
        args = [str(self.bindir / "createdb"), "-h", HOST, "-p", str(self.port), "-U", SUPERUSER, name]
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise StackError(f"createdb {name} failed: {err}") from err
        if done.returncode != 0:
            raise StackError(f"createdb {name} failed: {done.stderr.strip()}")
        return self.url(name)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server (fast shutdown) and remove a temporary data directory. Idempotent."""
        if self.running and self.bindir is not None:
            try:
                self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
                           "-t", str(int(timeout_s)), "stop"], "stop", timeout_s + 5)
            except StackError as err:
                logger.warning("%s", err)
            self.running = False
        self._cleanup()

    def _cleanup(self) -> None:
        if self._owned_tmp and self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None
            self._owned_tmp = False

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
