"""Two `ca serve` replicas on one real PostgreSQL, each with a state directory of its own (a second machine
starts from an empty one), plus admins running `ca` at the same time: no duplicate serial, one token buys
one certificate, no revocation lost, the same CRL everywhere, CRL numbers only increase, a rotation reaches
every replica without a restart, a database restart is a clear 503 followed by recovery, and a replica
killed mid-request leaves no partial record."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from support.ca_cli import ca_env, run_ca
from support.certs import TD
from support.polling import DEADLINE, wait_until
from support.processes import CaService
from test_ca_serve import csr_for, enroll_body, error_of, post, uri_of

from ca import enrollment, inspection, issuance
from ca.authority import format_serial, format_time
from ca.enrollment import hash_token
from ca.store import StateDir

pytestmark = pytest.mark.e2e

TD_ENROLL = f"spiffe://{TD}/ns/enroll/sa/"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _crl_number(path: Path) -> int:
    crl = inspection.read_crls(path)[0]
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


class Fleet:
    """A CA on PostgreSQL made by `ca init` on an admin's machine, served by two replicas on their own DIRs."""

    def __init__(self, root: Path, url: str):
        self.root, self.url = root, url
        self.admin_dir = root / "admin"
        self.ca("init", "--trust-domain", TD)
        self.replicas = [
            CaService(root / name, root, db=url) for name in ("replica-a", "replica-b")
        ]  # replica-b starts from an empty directory: the database is all it has
        self.state = StateDir.open(self.admin_dir, url)

    def ca(self, *args, check: bool = True):
        return run_ca(*args, ca_dir=self.admin_dir, env=ca_env(CA_DB=self.url), check=check)

    def identities(self, count: int, name: str) -> list[Path]:
        return [
            issuance.issue(self.state, f"spiffe://{TD}/ns/load/sa/{name}{i}", ttl=timedelta(hours=1), now=_now(),
                           out_dir=self.root / f"{name}{i}").cert_path.parent
            for i in range(count)
        ]

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()
        self.state.index.close()


@pytest.fixture
def fleet(tmp_path, postgres):
    fleet = Fleet(tmp_path, postgres.new_database())
    yield fleet
    fleet.stop()


def test_renewals_on_both_replicas_and_admins_issuing_and_revoking_never_share_a_serial(fleet):
    idents = fleet.identities(12, "w")
    victims = fleet.identities(3, "victim")
    jobs = [("renew", i) for i in range(len(idents))] + [("issue", i) for i in range(4)] + [
        ("revoke", i) for i in range(len(victims))
    ]

    def run(job):
        kind, i = job
        if kind == "renew":
            status, body, _ = post(fleet.replicas[i % 2], "/v1/renew", csr_for()[1], ident=idents[i])
            assert status == 200, body
            return x509.load_pem_x509_certificates(body)[0].serial_number
        if kind == "issue":
            out = fleet.ca("issue", f"spiffe://{TD}/ns/admin/sa/a{i}", "--out", fleet.root / f"a{i}", "--json")
            return int(json.loads(out.stdout)["serial"].replace(":", ""), 16)
        fleet.ca("revoke", f"spiffe://{TD}/ns/load/sa/victim{i}")
        return None

    with ThreadPoolExecutor(len(jobs)) as pool:
        serials = [serial for serial in pool.map(run, jobs) if serial is not None]

    assert len(serials) == len(set(serials)) == 16
    records = {record.serial: record for record in fleet.state.records()}
    assert set(serials) <= set(records)
    revoked = {record.spiffe_id for record in records.values() if record.revoked_at is not None}
    assert {f"spiffe://{TD}/ns/load/sa/victim{i}" for i in range(3)} <= revoked
    # No revocation lost: the newest CRL, on both replicas, lists all three.
    victim_serials = [x509.load_pem_x509_certificate((v / "cert.pem").read_bytes()).serial_number for v in victims]

    def both_replicas_list_them():
        crls = [inspection.read_crls(replica.ca_dir / "crl.pem")[0] for replica in fleet.replicas]
        return all(crl.get_revoked_certificate_by_serial_number(s) is not None for crl in crls for s in victim_serials)

    wait_until(both_replicas_list_them, DEADLINE, "the three revocations in both replicas' CRLs")


def test_sixteen_racing_enrollments_with_one_token_across_replicas_issue_exactly_one_certificate(fleet):
    token = fleet.ca("token", f"spiffe://{TD}/ns/prod/sa/race").stdout.strip()
    barrier = threading.Barrier(16)

    def attempt(i: int):
        body = enroll_body(token, csr_for()[1])
        barrier.wait()
        status, answer, _ = post(fleet.replicas[i % 2], "/v1/enroll", body, content_type="application/json")
        return status, (error_of(answer) if status != 200 else "issued")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(attempt, range(16)))
    assert sorted(results) == [(200, "issued")] + [(403, "token_used")] * 15
    issued = [r for r in fleet.state.records() if r.spiffe_id == f"spiffe://{TD}/ns/prod/sa/race"]
    assert len(issued) == 1


def test_a_revocation_on_either_side_reaches_both_replicas_with_the_same_crl_number(fleet):
    (victim,) = fleet.identities(1, "gone")
    serial = format(x509.load_pem_x509_certificate((victim / "cert.pem").read_bytes()).serial_number, "x")
    numbers = [_crl_number(replica.ca_dir / "crl.pem") for replica in fleet.replicas]
    fleet.ca("revoke", serial, "--reason", "keyCompromise")

    def same_newer_crl():
        files = [(replica.ca_dir / "crl.pem").read_bytes() for replica in fleet.replicas]
        return files[0] == files[1] == (fleet.admin_dir / "crl.pem").read_bytes()

    wait_until(same_newer_crl, 5.0, "the same CRL on both replicas within 5 s")
    after = _crl_number(fleet.replicas[0].ca_dir / "crl.pem")
    assert after > max(numbers)
    crl = inspection.read_crls(fleet.replicas[1].ca_dir / "crl.pem")[0]
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None

    # More CRLs from several writers at once: the numbers only go up, and every replica ends on the last one.
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: fleet.ca("crl", "--out", fleet.root / f"crl-{os.urandom(3).hex()}.pem"), range(4)))
    with fleet.state.index.reading() as db:
        last = int(db.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone()["value"])
    assert last >= after + 4
    wait_until(
        lambda: all(_crl_number(replica.ca_dir / "crl.pem") == last for replica in fleet.replicas),
        5.0, f"CRL number {last} on both replicas",
    )


def test_a_rotation_reaches_every_replica_without_a_restart(fleet):
    (old_ident,) = fleet.identities(1, "before")
    fleet.ca("rotate")
    new_intermediate = x509.load_pem_x509_certificate((fleet.admin_dir / "intermediate.pem").read_bytes())
    for replica in fleet.replicas:  # a new CA makes each replica replace its own certificate
        wait_until(
            lambda: replica.count(lambda e: e["event"] == "service_certificate") >= 2, DEADLINE,
            "the replica replacing its certificate after the rotation",
        )
        assert (replica.ca_dir / "intermediate.pem").read_bytes() == (fleet.admin_dir / "intermediate.pem").read_bytes()
    for replica in fleet.replicas:  # old leaves still renew, into the new generation
        status, body, _ = post(replica, "/v1/renew", csr_for()[1], ident=old_ident)
        assert status == 200, body
        assert x509.load_pem_x509_certificates(body)[0].issuer == new_intermediate.subject


def test_concurrent_rotations_are_one_at_a_time(fleet):
    results = []
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: fleet.ca("rotate", check=False), range(2)))
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    generations = sorted(int(r.stdout.split("generation ")[1].split()[0]) for r in results)
    assert generations == [2, 3]


def test_a_database_restart_is_a_503_with_a_reason_then_replicas_recover(fleet, postgres):
    idents = fleet.identities(4, "steady")
    stop = threading.Event()
    outcomes: list[tuple[int, str, int | None]] = []

    answered_at: list[tuple[float, int]] = []  # (monotonic time, status) of every answer, for the printed figures

    def load(i: int) -> None:
        while not stop.is_set():
            status, body, _ = post(fleet.replicas[i % 2], "/v1/renew", csr_for()[1], ident=idents[i])
            answered_at.append((time.monotonic(), status))
            if status == 200:
                outcomes.append((200, "issued", x509.load_pem_x509_certificates(body)[0].serial_number))
            else:
                outcomes.append((status, error_of(body), None))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(idents))]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: sum(1 for o in outcomes if o[0] == 200) >= 8, DEADLINE, "renewals before the outage")
        stopped_at = time.monotonic()
        postgres.stop()
        wait_until(lambda: any(o[0] == 503 for o in outcomes), DEADLINE, "a 503 during the outage")
        started_at = time.monotonic()
        postgres.start()
        up_at = time.monotonic()
        during = len(outcomes)
        wait_until(lambda: sum(1 for o in outcomes[during:] if o[0] == 200) >= 8, DEADLINE, "renewals after it")
    finally:
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)
    assert {(status, reason) for status, reason, _ in outcomes} <= {(200, "issued"), (503, "database_unavailable")}
    issued = {serial for status, _, serial in outcomes if status == 200}
    recorded = {record.serial for record in fleet.state.records()}
    assert issued <= recorded
    for replica in fleet.replicas:
        refused = [e for e in replica.requests() if e["status"] == 503]
        assert all(e["reason"] == "database_unavailable" and "unavailable" in e["detail"] for e in refused)
    # Figures for the record (pytest -s), not assertions: how the outage looked to the clients.
    first_ok_after = min(t for t, status in answered_at if status == 200 and t > up_at)
    print(f"\noutage: database down {started_at - stopped_at:.2f} s, restart took {up_at - started_at:.2f} s, "
          f"first renewal {first_ok_after - up_at:.3f} s after it; "
          f"{sum(1 for _, s in answered_at if s == 503)} answers 503, {sum(1 for _, s in answered_at if s == 200)} 200")
    print("a 503 line:", json.dumps(next(e for r in fleet.replicas for e in r.requests() if e["status"] == 503)))


def test_a_replica_killed_mid_request_leaves_no_partial_record(fleet, postgres):
    """SIGKILL a replica while a dozen renewals and enrollments are in flight against it, at a moment
    PostgreSQL shows its transactions open: what it committed is complete, what it did not left no trace
    (no token used without its certificate, no enrolled certificate without its token consumed), and the
    other replicas go on serving, including the tokens the dead one never redeemed."""
    victim = CaService(fleet.root / "victim", fleet.root, db=f"{fleet.url}?application_name=victim")
    fleet.replicas.append(victim)
    idents = fleet.identities(6, "busy")
    tokens = {
        enrollment.create_token(fleet.state, f"{TD_ENROLL}e{i}", ttl=timedelta(hours=1), now=_now()).token: i
        for i in range(48)
    }
    unspent = list(tokens)
    spending = threading.Lock()
    stop = threading.Event()
    killed_at = [float("inf")]
    outcomes: list[tuple[str, str, int | None]] = []  # (kind, "issued" | "cut" | error code, serial)

    def load(worker: int) -> None:
        while not stop.is_set():
            with spending:
                token = unspent.pop() if unspent and worker % 2 else None
            started = time.monotonic()
            try:
                if token is None:
                    status, body, _ = post(victim, "/v1/renew", csr_for()[1], ident=idents[worker % len(idents)])
                else:
                    status, body, _ = post(victim, "/v1/enroll", enroll_body(token, csr_for()[1]),
                                           content_type="application/json")
            except (OSError, http.client.HTTPException):  # the replica died under this request
                if started < killed_at[0]:
                    outcomes.append(("enroll" if token else "renew", "cut", None))
                return
            serial = x509.load_pem_x509_certificates(body)[0].serial_number if status == 200 else None
            outcomes.append(("enroll" if token else "renew", "issued" if status == 200 else error_of(body), serial))

    def open_transactions(admin: psycopg.Connection) -> int:
        return admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'victim' AND xact_start IS NOT NULL"
        ).fetchone()[0]

    threads = [threading.Thread(target=load, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: sum(1 for o in outcomes if o[1] == "issued") >= 12, DEADLINE, "renewals and enrollments")
        with psycopg.connect(postgres.url(), autocommit=True) as admin:
            wait_until(lambda: open_transactions(admin), DEADLINE, "the replica inside a transaction")
            killed_at[0] = time.monotonic()
            victim.signal(signal.SIGKILL)
        victim.proc.wait(DEADLINE)
    finally:
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)
    assert {reason for _, reason, _ in outcomes} <= {"issued", "cut"}, outcomes
    assert any(reason == "cut" for _, reason, _ in outcomes), "no request was in flight when the replica died"
    # PostgreSQL ends the dead replica's sessions, rolling back what they left open; only then is the index final.
    with psycopg.connect(postgres.url(), autocommit=True) as admin:
        wait_until(lambda: admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'victim'").fetchone()[0] == 0,
            DEADLINE, "the dead replica's sessions ended by PostgreSQL")

    # Every record is whole: its PEM parses, and says what the row says.
    with fleet.state.index.reading() as db:
        rows = db.execute("SELECT * FROM certs").fetchall()
        used = {row["token_hash"]: row for row in db.execute("SELECT * FROM tokens WHERE used_at IS NOT NULL")}
    by_serial = {}
    for row in rows:
        cert = x509.load_pem_x509_certificate(row["cert_pem"].encode("ascii"))
        assert format_serial(cert.serial_number) == row["serial"]
        assert uri_of(cert) == row["spiffe_id"]
        assert format_time(cert.not_valid_after_utc) == row["not_after"]
        by_serial[row["serial"]] = row
    issued = {serial for _, reason, serial in outcomes if reason == "issued"}
    assert {format_serial(serial) for serial in issued} <= set(by_serial)
    # Renewals point at the certificate they renewed; enrolled certificates and used tokens pair up one to one.
    assert all(row["parent_serial"] in by_serial for row in rows if row["parent_serial"])
    enrolled = {row["serial"]: row["spiffe_id"] for row in rows if row["spiffe_id"].startswith(TD_ENROLL)}
    assert {token["used_serial"]: token["spiffe_id"] for token in used.values()} == enrolled
    assert len(enrolled) >= sum(1 for kind, reason, _ in outcomes if (kind, reason) == ("enroll", "issued"))

    # The others go on: every workload renews there, every token the dead replica did not redeem still works.
    survivor = fleet.replicas[0]
    for ident in idents:
        status, body, _ = post(survivor, "/v1/renew", csr_for()[1], ident=ident)
        assert status == 200, body
    for token in tokens:
        if hash_token(token) not in used:
            status, body, _ = post(survivor, "/v1/enroll", enroll_body(token, csr_for()[1]),
                                   content_type="application/json")
            assert status == 200, body
