"""Fixtures that several test modules share, and what the ``e2e`` marker means.

A test marked ``e2e`` starts real processes (`proxy run`, `ca ...`, openssl, the lint tools, a TLS scanner)
or builds network namespaces; ``pytest -m "not e2e"`` leaves them out and is the fast unit loop. A module
whose tests are all end-to-end says so once, ``pytestmark = pytest.mark.e2e``; a mixed module marks each
such test. Helpers live in the ``support`` package beside this file.
"""

from __future__ import annotations

import pytest
from support.ca_cli import issue, run_ca
from support.certs import TD, Authority
from support.postgres import PostgresServer


@pytest.fixture(scope="session")
def authority() -> Authority:
    """An in-memory CA, 'CN=Test Root CA' over 'CN=Test Intermediate CA', for tests that only read it."""
    return Authority.create()


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict:
    """A CA made by `ca init`, and identity directories made by `ca issue` for api, frontend and intruder
    (spiffe://example.org/ns/prod/sa/NAME): ``{"root", "ca_dir", "ids": {name: directory}}``.

    One per session, shared by the end-to-end modules: a module may issue more from it and revoke what it
    issued itself, never change what is here.
    """
    root = tmp_path_factory.mktemp("pki")
    ca_dir = root / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    ids = {
        name: issue(ca_dir, root / name, f"spiffe://{TD}/ns/prod/sa/{name}") for name in ("api", "frontend", "intruder")
    }
    return {"root": root, "ca_dir": ca_dir, "ids": ids}


@pytest.fixture(scope="session")
def ids(pki) -> dict:
    """The identity directories of ``pki``, by name."""
    return pki["ids"]


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (started on first use); ``new_database()`` per test."""
    server = PostgresServer()
    yield server
    server.close()


ENGINES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)]  # PostgreSQL: a real server, so e2e


def _index_url(request) -> str | None:
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture(params=ENGINES)
def ca_db(request) -> str | None:
    """The index URL of a test's CA, once per engine: None (the default, DIR/ca.db) or a fresh PostgreSQL
    database (``ca --db``)."""
    return _index_url(request)


@pytest.fixture(scope="module", params=ENGINES)
def module_ca_db(request) -> str | None:
    """``ca_db`` for a CA that a module's tests share (a module-scoped fixture cannot use ``ca_db``)."""
    return _index_url(request)
