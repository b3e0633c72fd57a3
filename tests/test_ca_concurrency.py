"""Two admins issuing at the same moment never lose a record: real processes, one shared index."""

from __future__ import annotations

import json
import sqlite3

import pytest
from support.ca_cli import run_ca, start_ca

pytestmark = pytest.mark.e2e

ROUNDS = 50


def test_two_simultaneous_issuers_fifty_times_over_keep_every_record(tmp_path):
    assert run_ca("init", "--trust-domain", "example.org", cwd=tmp_path).returncode == 0
    issued = []
    for round_ in range(ROUNDS):
        pair = [
            start_ca(
                "issue", f"spiffe://example.org/round/{round_}/{side}", "--out", f"out/{round_}-{side}", "--json",
                cwd=tmp_path,
            )
            for side in ("a", "b")
        ]
        for process in pair:
            stdout, stderr = process.communicate(timeout=60)
            assert process.returncode == 0, stderr
            issued.append(json.loads(stdout))

    with sqlite3.connect(tmp_path / "ca-data" / "ca.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = db.execute("SELECT serial, spiffe_id FROM certs").fetchall()
    assert len(rows) == 2 * ROUNDS
    assert len({serial for serial, _ in rows}) == 2 * ROUNDS
    assert sorted(rows) == sorted((entry["serial"], entry["spiffe_id"]) for entry in issued)
