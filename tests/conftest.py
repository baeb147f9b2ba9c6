"""Shared fixtures: ``db_url`` runs a test against SQLite and against a real, throwaway PostgreSQL.

PostgreSQL comes from ``FIGS_TEST_POSTGRES_URL`` when set (a server you run), else from Debian's ``postgresql``
binaries: ``initdb`` in a temp dir, started on a free loopback port for the test session and stopped at the end.
Each test gets a fresh database on it.  Without either, the postgres parameter skips and says what is missing.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

POSTGRES_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postgres_bin() -> Path | None:
    for directory in POSTGRES_BIN_DIRS:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    return None


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str | None = None
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def url(self, database: str) -> str:
        auth = f"{self.user}:{self.password}" if self.password else self.user
        return f"postgresql+psycopg://{auth}@{self.host}:{self.port}/{database}"

    def fresh_database(self) -> str:
        import psycopg

        name = f"figs_test_{os.getpid()}_{next(self.counter)}"
        conninfo = f"host={self.host} port={self.port} user={self.user} dbname=postgres"
        if self.password:
            conninfo += f" password={self.password}"
        with psycopg.connect(conninfo, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_postgres_user(command: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; CI containers run tests as root.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    external = os.environ.get("FIGS_TEST_POSTGRES_URL")
    if external:
        from sqlalchemy.engine import make_url

        parsed = make_url(external)
        yield PostgresServer(
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 5432,
            user=parsed.username or "postgres",
            password=parsed.password,
        )
        return
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL tests need initdb and pg_ctl (apt-get install postgresql) or FIGS_TEST_POSTGRES_URL")
    if os.geteuid() == 0 and (shutil.which("runuser") is None or not _user_exists("postgres")):
        pytest.skip("running as root needs runuser and a 'postgres' user to start a throwaway PostgreSQL")
    root = Path(tempfile.mkdtemp(prefix="figs-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    run = _as_postgres_user
    subprocess.run(
        run([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    started = subprocess.run(
        run([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]),
        capture_output=True,
        text=True,
    )
    if started.returncode != 0:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {started.stderr}\n{log}")
    try:
        yield PostgresServer(host="127.0.0.1", port=port, user="postgres")
    finally:
        subprocess.run(run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: an SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'latency.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.fresh_database()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'latency.db'}"
