"""A real, throwaway PostgreSQL server for the tests: Debian's binaries, a temporary data directory, a loopback port.

As root the server runs as the ``postgres`` user (PostgreSQL refuses to run as root). Each test that
needs a CA on PostgreSQL gets a database of its own (``new_database``); ``restart`` stops the server
and starts it again on the same port and data, for the outage tests.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from itertools import count
from pathlib import Path

import psycopg

BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    def __init__(self) -> None:
        if not (BIN / "initdb").exists():
            raise RuntimeError(
                f"no PostgreSQL server binaries in {BIN}: install Debian's 'postgresql' package "
                "(.ci/run does when it runs as root), or set $PG_BIN"
            )
        self.root = Path(tempfile.mkdtemp(prefix="ca-test-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam(SUPERUSER)
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as_user = ["runuser", "-u", SUPERUSER, "--"]
        self._names = count(1)
        self._run("initdb", "-D", self.data, "-U", SUPERUSER, "--auth=trust", "--no-sync", "-E", "UTF8")
        self.start()

    def _run(self, tool: str, *args) -> None:
        result = subprocess.run(
            [*self._as_user, BIN / tool, *map(str, args)], capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr or result.stdout}")

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off -c max_connections=200"
        self._run("pg_ctl", "start", "-w", "-D", self.data, "-l", self.log, "-o", options)

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-w", "-D", self.data, "-m", "fast")

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"ca_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
