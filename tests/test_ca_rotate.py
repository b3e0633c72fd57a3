"""CA rotation: `ca rotate`, `ca bundle --drop-old [--force]`, CRLs of both generations, and a full
rotation under running sidecars that never refuses a good connection."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from support.ca_cli import assert_one_line_error, issue, run_ca
from support.certs import API, FRONTEND, TD
from support.network import App, Stream, echo_through
from support.polling import wait_until
from support.processes import Sidecar, identity_yaml

from ca import issuance
from ca.inspection import read_certificates, read_crls
from ca.store import StateDir
from proxy.config import IdentityConfig
from proxy.credentials import load_credentials

pytestmark = pytest.mark.e2e


@pytest.fixture
def ca_dir(tmp_path):
    directory = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=directory)
    return directory


def serial_of(ident: Path) -> str:
    return format(read_certificates(ident / "cert.pem")[0].serial_number, "x")


def verify(ca_dir: Path, ident: Path, *extra: str):
    return run_ca("verify", str(ident / "cert.pem"), "--bundle", str(ca_dir / "bundle.pem"), *extra,
                  ca_dir=ca_dir, check=False)


# --- ca rotate -------------------------------------------------------------------------------------


def test_rotate_puts_old_and_new_root_in_the_bundle_and_new_leaves_come_from_the_new_intermediate(ca_dir, tmp_path):
    (old_root,) = read_certificates(ca_dir / "bundle.pem")
    old_intermediate = read_certificates(ca_dir / "intermediate.pem")[0]
    result = run_ca("rotate", ca_dir=ca_dir)
    assert "generation 2 is current" in result.stdout
    bundle = read_certificates(ca_dir / "bundle.pem")
    new_root = read_certificates(ca_dir / "root.pem")[0]
    assert bundle == [old_root, new_root] and new_root != old_root
    assert new_root.subject.rfc4514_string() == f"CN=mtls-sidecar root CA 2,O={TD}"
    web = issue(ca_dir, tmp_path / "web", f"spiffe://{TD}/ns/prod/sa/web")
    leaf, intermediate = read_certificates(web / "cert.pem")
    assert leaf.issuer == intermediate.subject != old_intermediate.subject
    intermediate.verify_directly_issued_by(new_root)
    archived = ca_dir / "generations" / "1"
    assert read_certificates(archived / "intermediate.pem") == [old_intermediate]
    assert (archived / "intermediate.key").stat().st_mode & 0o777 == 0o600


def test_leaves_of_the_old_root_still_verify_against_the_rotated_bundle(ca_dir, tmp_path):
    old = issue(ca_dir, tmp_path / "old", API)
    run_ca("rotate", ca_dir=ca_dir)
    new = issue(ca_dir, tmp_path / "new", API)
    assert verify(ca_dir, old, "--crl", str(ca_dir / "crl.pem")).returncode == 0
    assert verify(ca_dir, new, "--crl", str(ca_dir / "crl.pem")).returncode == 0


def test_revoking_an_old_root_leaf_after_rotation_lands_in_the_old_intermediates_crl(ca_dir, tmp_path):
    old = issue(ca_dir, tmp_path / "old", API)
    run_ca("rotate", ca_dir=ca_dir)
    new = issue(ca_dir, tmp_path / "new", FRONTEND)
    run_ca("revoke", serial_of(old), "--reason", "keyCompromise", ca_dir=ca_dir)
    crl_file = tmp_path / "crl.pem"
    run_ca("crl", "--out", str(crl_file), ca_dir=ca_dir)
    crls = read_crls(crl_file)
    assert [crl.issuer.rfc4514_string() for crl in crls] == [
        f"CN=mtls-sidecar intermediate CA 2,O={TD}", f"CN=mtls-sidecar intermediate CA,O={TD}",
        f"CN=mtls-sidecar root CA 2,O={TD}", f"CN=mtls-sidecar root CA,O={TD}",
    ]
    assert [len(crl) for crl in crls] == [0, 1, 0, 0]  # each CRL speaks for its own issuer's leaves
    revoked = verify(ca_dir, old, "--crl", str(crl_file))
    assert revoked.returncode == 1 and revoked.stdout.startswith("revoked:")
    assert verify(ca_dir, new, "--crl", str(crl_file)).returncode == 0
    # The file also carries each intermediate, so a sidecar on the other generation can check the CRL.
    assert len(read_certificates(crl_file, "CRL file")) == 2


def test_rotate_keeps_an_encrypted_ca_encrypted(tmp_path):
    ca_dir = tmp_path / "ca"
    secret = tmp_path / "pass"
    secret.write_text("correct horse\n")
    run_ca("--passphrase-file", str(secret), "init", "--trust-domain", TD, ca_dir=ca_dir)
    wrong = tmp_path / "wrong"
    wrong.write_text("battery staple\n")
    refused = run_ca("--passphrase-file", str(wrong), "rotate", ca_dir=ca_dir, check=False)
    assert_one_line_error(refused, 2)
    assert not (ca_dir / "generations").exists()
    run_ca("--passphrase-file", str(secret), "rotate", ca_dir=ca_dir)
    assert b"ENCRYPTED PRIVATE KEY" in (ca_dir / "intermediate.key").read_bytes()
    run_ca("--passphrase-file", str(secret), "issue", API, "--out", str(tmp_path / "api"), ca_dir=ca_dir)


def test_second_rotation_keeps_every_root_until_dropped(ca_dir):
    run_ca("rotate", ca_dir=ca_dir)
    run_ca("rotate", ca_dir=ca_dir)
    names = [cert.subject.rfc4514_string() for cert in read_certificates(ca_dir / "bundle.pem")]
    assert names == [f"CN=mtls-sidecar root CA{suffix},O={TD}" for suffix in ("", " 2", " 3")]
    assert len(read_crls(ca_dir / "crl.pem")) == 6  # each generation's intermediate and root


# --- ca bundle --drop-old -----------------------------------------------------------------------------


def test_drop_old_refuses_while_valid_certificates_chain_to_the_old_root_and_lists_them(ca_dir, tmp_path):
    old_api = issue(ca_dir, tmp_path / "api", API)
    old_front = issue(ca_dir, tmp_path / "front", FRONTEND)
    run_ca("rotate", ca_dir=ca_dir)
    before = (ca_dir / "bundle.pem").read_bytes()
    result = run_ca("bundle", "--drop-old", ca_dir=ca_dir, check=False)
    message = assert_one_line_error(result, 1)
    assert "2 unexpired, unrevoked certificate(s) still chain to it" in message and "--force" in message
    listed = result.stdout.splitlines()
    assert len(listed) == 2
    for ident, spiffe_id in ((old_api, API), (old_front, FRONTEND)):
        (line,) = [line for line in listed if serial_of(ident) in line]
        expiry = read_certificates(ident / "cert.pem")[0].not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert spiffe_id in line and f"expires {expiry}" in line
    assert (ca_dir / "bundle.pem").read_bytes() == before


def test_drop_old_succeeds_once_old_leaves_are_revoked_or_expired(ca_dir, tmp_path):
    old = issue(ca_dir, tmp_path / "api", API)
    state = StateDir.open(ca_dir)  # a certificate that expired half a minute ago (the CA was backdated a minute)
    start = read_certificates(ca_dir / "intermediate.pem")[0].not_valid_before_utc + timedelta(seconds=1)
    issuance.issue(state, FRONTEND, ttl=timedelta(seconds=10), now=start, out_dir=tmp_path / "expired")
    run_ca("rotate", ca_dir=ca_dir)
    run_ca("revoke", serial_of(old), "--reason", "superseded", ca_dir=ca_dir)
    result = run_ca("bundle", "--drop-old", ca_dir=ca_dir)
    assert "dropped root 'CN=mtls-sidecar root CA,O=example.org'" in result.stdout
    assert read_certificates(ca_dir / "bundle.pem") == read_certificates(ca_dir / "root.pem")
    crls = read_crls(ca_dir / "crl.pem")  # the dropped generation no longer signs a CRL
    assert [crl.issuer.rfc4514_string() for crl in crls] == [
        f"CN=mtls-sidecar intermediate CA 2,O={TD}", f"CN=mtls-sidecar root CA 2,O={TD}",
    ]
    assert verify(ca_dir, old).stdout.startswith("untrusted_ca:")


def test_drop_old_with_force_drops_anyway_and_names_what_it_strands(ca_dir, tmp_path):
    old = issue(ca_dir, tmp_path / "api", API)
    run_ca("rotate", ca_dir=ca_dir)
    result = run_ca("bundle", "--drop-old", "--force", ca_dir=ca_dir)
    assert f"forced past: {serial_of(old)}  {API}" in result.stdout
    assert len(read_certificates(ca_dir / "bundle.pem")) == 1


def test_drop_old_without_a_rotation_has_nothing_to_drop(ca_dir):
    before = (ca_dir / "bundle.pem").read_bytes()
    result = run_ca("bundle", "--drop-old", ca_dir=ca_dir)
    assert "nothing to drop" in result.stdout
    assert (ca_dir / "bundle.pem").read_bytes() == before


def test_force_without_drop_old_is_a_usage_error(ca_dir):
    assert_one_line_error(run_ca("bundle", "--force", ca_dir=ca_dir, check=False), 2)


# --- the sidecar's side of the CRL file ------------------------------------------------------------


def test_sidecars_of_both_generations_accept_the_crl_file_of_a_rotated_ca(ca_dir, tmp_path):
    old = issue(ca_dir, tmp_path / "old", API)
    run_ca("rotate", ca_dir=ca_dir)
    new = issue(ca_dir, tmp_path / "new", FRONTEND)
    run_ca("revoke", serial_of(old), "--reason", "keyCompromise", ca_dir=ca_dir)
    crl = tmp_path / "crl.pem"
    run_ca("crl", "--out", str(crl), ca_dir=ca_dir)
    shutil.copy(ca_dir / "bundle.pem", old / "bundle.pem")
    loaded = load_credentials(IdentityConfig(new / "cert.pem", new / "key.pem", new / "bundle.pem", crl, None))
    assert read_certificates(old / "cert.pem")[0].serial_number in loaded.revoked_serials


# --- a full rotation under running sidecars --------------------------------------------------------


class Pod:
    """A workload's identity directory, swapped like a Kubernetes Secret volume: the config names
    ``DIR/current/{cert,key,bundle}.pem`` and ``current`` is a symlink replaced in one rename, so the
    sidecar never sees a key from one version next to a certificate from another."""

    def __init__(self, root: Path, name: str, source: Path):
        self.dir = root / name
        self.dir.mkdir()
        self.versions = 0
        self.install(source)

    @property
    def ident(self) -> Path:
        return self.dir / "current"

    def install(self, source: Path, bundle: Path | None = None) -> None:
        self.versions += 1
        target = self.dir / f"v{self.versions}"
        shutil.copytree(source, target)
        if bundle is not None:
            shutil.copy(bundle, target / "bundle.pem")
        link = self.dir / "current.tmp"
        link.symlink_to(target.name)
        os.replace(link, self.ident)

    def with_bundle(self, bundle: Path) -> None:
        self.install(self.ident.resolve(), bundle)


def test_full_rotation_under_running_sidecars_never_refuses_a_good_connection(tmp_path):
    """Only the connection opened with the old certificates ends, when the old root leaves the bundle."""
    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    issued = tmp_path / "issued"
    api = Pod(tmp_path, "api-pod", issue(ca_dir, issued / "api-1", API))
    front = Pod(tmp_path, "front-pod", issue(ca_dir, issued / "front-1", FRONTEND))
    old_serials = [serial_of(api.ident), serial_of(front.ident)]
    app = App()
    api_side = Sidecar(tmp_path, "api", identity_yaml(api.ident) + (
        f"inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app.port}\n"
        f"    allow: [{FRONTEND}]\n")).wait_ready()
    front_side = Sidecar(tmp_path, "front", identity_yaml(front.ident) + (
        f"outbound:\n  - name: api\n    listen: 127.0.0.1:0\n    connect: 127.0.0.1:{api_side.ports['api']}\n"
        f"    expect: [{API}]\n")).wait_ready()
    sides = (api_side, front_side)
    try:
        streams = [Stream(front_side.ports["api"])]  # the open connection each step pushes through: the last
        steps: list[str] = []

        def reloads(side: Sidecar) -> int:
            return side.count(lambda e: e["event"] == "reloaded")

        def step(name: str, expected_reloads: dict | None = None) -> None:
            """Wait for the reloads the step causes, then a new connection and the open one must work."""
            for side, count in (expected_reloads or {}).items():
                wait_until(lambda: reloads(side) >= count, what=f"reload after {name}")
            payload = f"after {name}".encode()
            assert echo_through(front_side.ports["api"], payload) == payload, name
            streams[-1].push(len(steps))
            steps.append(name)

        step("start")
        run_ca("rotate", ca_dir=ca_dir)
        step("ca rotate")
        two_roots = ca_dir / "bundle.pem"
        assert len(read_certificates(two_roots)) == 2
        api.with_bundle(two_roots)
        step("api gets the two-root bundle", {api_side: 1})
        front.with_bundle(two_roots)
        step("frontend gets the two-root bundle", {front_side: 1})
        api.install(issue(ca_dir, issued / "api-2", API), two_roots)
        step("api re-issued from the new intermediate", {api_side: 2})
        front.install(issue(ca_dir, issued / "front-2", FRONTEND), two_roots)
        step("frontend re-issued from the new intermediate", {front_side: 2})
        # The connection opened with the old certificates chains to the old root: dropping that root from
        # the api's bundle closes it (policy_revoked). One opened now chains to the new root and stays.
        streams.append(Stream(front_side.ports["api"]))

        refused = run_ca("bundle", "--drop-old", ca_dir=ca_dir, check=False)
        assert refused.returncode == 1 and all(serial in refused.stdout for serial in old_serials)
        for serial in old_serials:
            run_ca("revoke", serial, "--reason", "superseded", ca_dir=ca_dir)
        run_ca("bundle", "--drop-old", ca_dir=ca_dir)
        one_root = ca_dir / "bundle.pem"
        assert len(read_certificates(one_root)) == 1
        step("ca bundle --drop-old")
        api.with_bundle(one_root)
        step("api drops the old root", {api_side: 3})
        cut = api_side.wait_event(lambda e: e["event"] == "conn_closed" and e.get("reason") == "policy_revoked")
        assert cut["peer_id"] == FRONTEND and "which is in no trusted bundle" in cut["detail"]
        front.with_bundle(one_root)
        step("frontend drops the old root", {front_side: 3})

        for side in sides:
            assert side.count(lambda e: e["event"] in ("conn_denied", "reload_failed")) == 0, side.log_path.read_text()
            assert reloads(side) == 3
        streams[0].sock.close()  # cut by the api sidecar above
        streams[1].close()
        assert len(steps) == 9
    finally:
        for side in sides:
            side.stop()
        app.close()
