"""Trust bundle files (mtls.bundles): PEM and SPIFFE bundles read and written, and what `ca bundle
--format spiffe` and `ca verify --bundle [TD=]FILE` do with them."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from support.ca_cli import assert_one_line_error, issue, run_ca
from support.certs import Authority, pem

from mtls.bundles import (
    PEM,
    SPIFFE,
    Bundle,
    BundleError,
    check_sequence,
    check_serves,
    parse_bundle,
    spiffe_bundle_json,
)


@pytest.fixture(scope="module")
def ours() -> Authority:
    return Authority.from_library("example.org")


@pytest.fixture(scope="module")
def partner() -> Authority:
    return Authority.from_library("partner.org")


def spiffe_doc(*roots, sequence=1) -> dict:
    return json.loads(spiffe_bundle_json(roots, sequence=sequence))


def error_of(data: bytes) -> str:
    with pytest.raises(BundleError) as caught:
        parse_bundle(data)
    return str(caught.value)


def test_spiffe_bundle_round_trips_roots_sequence_and_hint(ours, partner):
    data = spiffe_bundle_json([ours.root, partner.root], sequence=7, refresh_hint=60)
    document = json.loads(data)
    assert [key["use"] for key in document["keys"]] == ["x509-svid", "x509-svid"]
    assert document["keys"][0]["kty"] == "EC" and document["keys"][0]["crv"] == "P-256"
    assert parse_bundle(data) == Bundle((ours.root, partner.root), SPIFFE, 7, 60)


def test_pem_bundle_reads_every_root(ours, partner):
    assert parse_bundle(pem(ours.root, partner.root)) == Bundle((ours.root, partner.root), PEM)


def test_jwt_svid_keys_are_skipped(ours):
    document = spiffe_doc(ours.root)
    document["keys"].insert(0, {"use": "jwt-svid", "kty": "EC", "kid": "k1"})
    assert parse_bundle(json.dumps(document).encode()).roots == (ours.root,)


def test_refuses_a_key_whose_use_is_not_x509_svid(ours):
    document = spiffe_doc(ours.root)
    document["keys"][0]["use"] = "sig"
    assert error_of(json.dumps(document).encode()) == (
        "keys[0] has use 'sig'; an X.509 authority in a SPIFFE bundle has use 'x509-svid'"
    )


def test_refuses_truncated_json(ours):
    data = spiffe_bundle_json([ours.root], sequence=1)
    assert "is not valid JSON" in error_of(data[: len(data) // 2])
    assert "is the file truncated?" in error_of(data[: len(data) // 2])


def test_refuses_a_bundle_without_x509_keys():
    assert "holds no X.509 root" in error_of(b'{"keys": []}')
    assert error_of(b'{"spiffe_sequence": 1}') == "the SPIFFE bundle has no 'keys' list"


def test_refuses_x5c_that_is_not_a_ca(ours):
    leaf = ours.leaf("spiffe://example.org/ns/prod/sa/web").cert
    der = base64.b64encode(leaf.public_bytes(Encoding.DER)).decode()
    document = {"keys": [*spiffe_doc(ours.root)["keys"], {"use": "x509-svid", "x5c": [der]}]}
    message = error_of(json.dumps(document).encode())
    assert message.startswith("keys[1]: x5c[0] (") and "is not a CA (basicConstraints CA:FALSE)" in message


def test_refuses_key_parameters_that_do_not_match_x5c(ours, partner):
    document = spiffe_doc(ours.root)
    document["keys"][0]["x"] = spiffe_doc(partner.root)["keys"][0]["x"]
    assert error_of(json.dumps(document).encode()) == (
        "keys[0]: the key parameters do not match the public key of the certificate in x5c"
    )


def test_refuses_a_sequence_that_goes_backwards(ours):
    old, new = parse_bundle(spiffe_bundle_json([ours.root], sequence=5)), parse_bundle(
        spiffe_bundle_json([ours.root], sequence=4)
    )
    with pytest.raises(BundleError, match="spiffe_sequence 4 is older than the 5 in force"):
        check_sequence(new, old)
    check_sequence(old, new)


def test_a_root_naming_another_trust_domain_does_not_serve_this_one(ours):
    bundle = parse_bundle(pem(ours.root))
    check_serves(bundle, "example.org")
    with pytest.raises(BundleError, match="is a root of trust domain example.org, not of partner.org"):
        check_serves(bundle, "partner.org")


# --- the ca commands ------------------------------------------------------------------------------


def test_ca_bundle_format_spiffe_grows_its_sequence_with_each_change_of_roots(tmp_path):
    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", "example.org", ca_dir=ca_dir)
    first = json.loads(run_ca("bundle", "--format", "spiffe", ca_dir=ca_dir).stdout)
    run_ca("rotate", ca_dir=ca_dir)
    rotated = json.loads(run_ca("bundle", "--format", "spiffe", ca_dir=ca_dir).stdout)
    run_ca("bundle", "--drop-old", "--force", ca_dir=ca_dir)
    dropped = parse_bundle(run_ca("bundle", "--format", "spiffe", ca_dir=ca_dir).stdout.encode())
    assert (first["spiffe_sequence"], rotated["spiffe_sequence"], dropped.sequence) == (1, 2, 3)
    assert (len(first["keys"]), len(rotated["keys"]), len(dropped.roots)) == (1, 2, 1)
    assert first["spiffe_refresh_hint"] == 300
    assert parse_bundle((ca_dir / "bundle.pem").read_bytes()).roots == dropped.roots


def test_ca_verify_takes_spiffe_bundles_per_trust_domain(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    run_ca("init", "--trust-domain", "example.org", ca_dir=ours)
    run_ca("init", "--trust-domain", "partner.org", ca_dir=theirs)
    run_ca("bundle", "--format", "spiffe", "--out", tmp_path / "partner.json", ca_dir=theirs)
    shop = issue(theirs, tmp_path / "shop", "spiffe://partner.org/ns/shop/sa/web")
    result = run_ca("verify", shop / "cert.pem", "--bundle", f"example.org={ours / 'bundle.pem'}",
                    "--bundle", f"partner.org={tmp_path / 'partner.json'}")
    assert result.stdout.startswith("valid: spiffe://partner.org/ns/shop/sa/web")
    refused = run_ca("verify", shop / "cert.pem", "--bundle", f"example.org={ours / 'bundle.pem'}", check=False)
    assert refused.returncode == 1
    assert refused.stdout.strip() == (
        "untrusted_ca: no bundle for trust domain partner.org; ca verify trusts example.org"
    )


def test_ca_verify_refuses_a_bundle_given_for_the_wrong_trust_domain(tmp_path):
    run_ca("init", "--trust-domain", "partner.org", ca_dir=tmp_path / "theirs")
    shop = issue(tmp_path / "theirs", tmp_path / "shop", "spiffe://partner.org/ns/shop/sa/web")
    result = run_ca("verify", shop / "cert.pem", "--bundle", f"example.org={tmp_path / 'theirs' / 'bundle.pem'}",
                    check=False)
    message = assert_one_line_error(result, 2)
    assert "is a root of trust domain partner.org, not of example.org" in message


def test_proxy_check_flags_rules_naming_a_trust_domain_without_bundle(tmp_path):
    from proxy.check import run_check

    run_ca("init", "--trust-domain", "example.org", ca_dir=tmp_path / "ours")
    run_ca("init", "--trust-domain", "partner.org", ca_dir=tmp_path / "theirs")
    run_ca("bundle", "--format", "spiffe", "--out", tmp_path / "partner.json", ca_dir=tmp_path / "theirs")
    me = issue(tmp_path / "ours", tmp_path / "me", "spiffe://example.org/ns/prod/sa/api")
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"identity: {{cert: {me}/cert.pem, key: {me}/key.pem, bundle: {me}/bundle.pem}}\n"
        "inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:9\n"
        "    allow: [spiffe://partner.org/ns/shop/*, spiffe://other.org/ns/x/sa/y]\n"
        f"trust_domains:\n  partner.org: {{bundle: {tmp_path / 'partner.json'}}}\n"
    )
    ok, lines = run_check(config)
    assert not ok
    assert lines == [
        f"{config}: inbound api allow spiffe://other.org/ns/x/sa/y: no bundle for trust domain other.org "
        "(this sidecar trusts example.org, partner.org); add it under trust_domains or remove the entry"
    ]
    config.write_text(config.read_text().replace(", spiffe://other.org/ns/x/sa/y", ""))
    ok, lines = run_check(config)
    assert ok, lines
    assert f"  trust domain partner.org: {tmp_path / 'partner.json'} (spiffe, 1 root)" in lines


def test_identity_bundle_may_be_a_spiffe_bundle_and_must_be_our_trust_domains(tmp_path):
    from proxy.check import run_check

    run_ca("init", "--trust-domain", "example.org", ca_dir=tmp_path / "ours")
    run_ca("init", "--trust-domain", "partner.org", ca_dir=tmp_path / "theirs")
    me = issue(tmp_path / "ours", tmp_path / "me", "spiffe://example.org/ns/prod/sa/api")
    run_ca("bundle", "--format", "spiffe", "--out", me / "bundle.json", ca_dir=tmp_path / "ours")
    config = tmp_path / "proxy.yaml"
    config.write_text(f"identity: {{cert: {me}/cert.pem, key: {me}/key.pem, bundle: {me}/bundle.json}}\n")
    ok, lines = run_check(config)
    assert ok, lines
    # The attack's first step: a partner's root added to our own bundle, to be trusted for our IDs.
    combined = me / "combined.pem"
    combined.write_bytes((me / "bundle.pem").read_bytes() + (tmp_path / "theirs" / "bundle.pem").read_bytes())
    config.write_text(f"identity: {{cert: {me}/cert.pem, key: {me}/key.pem, bundle: {combined}}}\n")
    ok, lines = run_check(config)
    assert not ok
    assert lines[0].startswith(f"{combined}: root #2 (")
    assert "is a root of trust domain partner.org, not of example.org" in lines[0]
    assert "another trust domain's roots go under trust_domains" in lines[0]
