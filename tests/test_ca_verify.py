"""``verify_svid_chain`` and ``ca verify``: every failure gets the contract's reason code and a sentence.

Certificates with past or future validity are built with an explicit ``now``; nothing sleeps.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from support.ca_cli import assert_one_line_error, run_ca
from support.certs import NOW, WEB, Authority, write_pem

from ca.authority import Issuer, Revocation, generate_key, new_serial
from ca.verify import CrlError, verify_svid_chain
from mtls.reasons import (
    CRL_STALE,
    EXPIRED,
    IDENTITY_NOT_ALLOWED,
    NOT_SVID,
    NOT_YET_VALID,
    REVOKED,
    UNTRUSTED_CA,
)
from mtls.spiffe import CLIENT, parse_pattern
from mtls.trust import VerifyError


@pytest.fixture(scope="module")
def ca():
    return Authority.from_library(now=NOW - timedelta(days=30))


@pytest.fixture(scope="module")
def web(ca):
    return ca.leaf(WEB, now=NOW)[0]


def _verify(ca, leaf, **kwargs):
    return verify_svid_chain(leaf, [ca.intermediate], [ca.root], now=NOW, **kwargs)


def _reason(ca, leaf, **kwargs) -> VerifyError:
    with pytest.raises(VerifyError) as caught:
        _verify(ca, leaf, **kwargs)
    return caught.value


def _rebuild(leaf, *, signer: Issuer, replace=(), extra=(), validity=None) -> x509.Certificate:
    """``leaf`` re-signed by ``signer`` with some extensions replaced or added, or another validity:
    for certificates our CA refuses to make."""
    replacements = {type(value): (value, critical) for value, critical in replace}
    not_before, not_after = validity or (leaf.not_valid_before_utc, leaf.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(signer.cert.subject)
        .public_key(leaf.public_key())
        .serial_number(new_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext in leaf.extensions:
        if not isinstance(ext.value, x509.AuthorityKeyIdentifier):
            value, critical = replacements.get(type(ext.value), (ext.value, ext.critical))
            builder = builder.add_extension(value, critical=critical)
    for value, critical in extra:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(signer.key, hashes.SHA256())


def test_accepts_valid_chain_and_returns_its_id(ca, web):
    result = _verify(ca, web, role=CLIENT)
    assert str(result.spiffe_id) == WEB
    assert result.chain == (web, ca.intermediate, ca.root)


def test_accepts_chain_with_root_included_in_the_file(ca, web):
    result = verify_svid_chain(web, [ca.intermediate, ca.root], [ca.root], now=NOW)
    assert result.chain[-1] == ca.root


def test_untrusted_ca_for_chain_of_another_ca(web):
    other = Authority.from_library()
    error = _reason(other, web)
    assert error.reason == UNTRUSTED_CA
    assert "does not chain to a trusted root" in error.detail


def test_untrusted_ca_when_the_intermediate_is_missing(ca, web):
    with pytest.raises(VerifyError) as caught:
        verify_svid_chain(web, [], [ca.root], now=NOW)
    assert caught.value.reason == UNTRUSTED_CA
    assert "intermediate CA" in caught.value.detail


def test_untrusted_ca_when_a_signature_is_forged(ca, web):
    impostor = Authority.from_library()  # same names, other keys
    forged = _rebuild(web, signer=impostor.issuer)
    assert _reason(ca, forged).reason == UNTRUSTED_CA


def test_expired_leaf(ca):
    old, _ = ca.leaf(now=NOW - timedelta(days=2), ttl=timedelta(days=1))
    error = _reason(ca, old)
    assert error.reason == EXPIRED
    assert error.detail.endswith(f"expired at {(NOW - timedelta(days=1)):%Y-%m-%dT%H:%M:%SZ}")


def test_not_yet_valid_leaf(ca):
    future, _ = ca.leaf(now=NOW + timedelta(days=2))
    error = _reason(ca, future)
    assert error.reason == NOT_YET_VALID
    assert "is not valid before" in error.detail


def test_expired_intermediate_is_named(web):
    old = Authority.from_library(now=NOW - timedelta(days=400), ttl=timedelta(days=365))
    leaf = _rebuild(web, signer=old.issuer, validity=(NOW - timedelta(hours=1), NOW + timedelta(hours=1)))
    error = _reason(old, leaf)
    assert error.reason == EXPIRED
    assert error.detail.startswith("CA certificate 'CN=mtls-sidecar intermediate CA,O=example.org' expired at ")


def test_not_svid_for_a_ca_certificate_presented_as_leaf(ca):
    with pytest.raises(VerifyError) as caught:
        verify_svid_chain(ca.intermediate, [], [ca.root], now=NOW)
    assert caught.value.reason == NOT_SVID
    assert "CA certificate" in caught.value.detail


def test_not_svid_for_two_uri_sans(ca, web):
    uris = [x509.UniformResourceIdentifier(WEB), x509.UniformResourceIdentifier("spiffe://example.org/admin")]
    two = _rebuild(web, signer=ca.issuer, replace=[(x509.SubjectAlternativeName(uris), True)])
    error = _reason(ca, two)
    assert error.reason == NOT_SVID
    assert "exactly one URI SAN, it has 2" in error.detail


def test_not_svid_for_unknown_critical_extension(ca, web):
    odd = _rebuild(
        web,
        signer=ca.issuer,
        extra=[(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"), True)],
    )
    error = _reason(ca, odd)
    assert error.reason == NOT_SVID
    assert "unsupported critical extension 1.3.6.1.4.1.99999.1" in error.detail


def test_not_svid_when_eku_does_not_allow_the_role(ca, web):
    server_only = x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH])
    leaf = _rebuild(web, signer=ca.issuer, replace=[(server_only, False)])
    error = _reason(ca, leaf, role=CLIENT)
    assert error.reason == NOT_SVID
    assert "does not allow client authentication" in error.detail


def test_identity_not_allowed_names_expectation_and_peer(ca, web):
    error = _reason(ca, web, allowed=[parse_pattern("spiffe://example.org/ns/dev/*")])
    assert error.reason == IDENTITY_NOT_ALLOWED
    assert error.detail == f"expected spiffe://example.org/ns/dev/*; certificate is {WEB}"


def test_pattern_allows_matching_identity(ca, web):
    allowed = [parse_pattern("spiffe://example.org/ns/dev/*"), parse_pattern("spiffe://example.org/ns/prod/*")]
    result = _verify(ca, web, allowed=allowed)
    assert str(result.spiffe_id) == WEB


def test_revoked_names_serial_time_and_reason(ca, web):
    crl = ca.issuer.crl([Revocation(web.serial_number, NOW, "keyCompromise")], number=2, now=NOW)
    error = _reason(ca, web, crls=[crl])
    assert error.reason == REVOKED
    assert error.detail == (
        f"certificate serial {web.serial_number:x} ({WEB}) was revoked at "
        f"{NOW:%Y-%m-%dT%H:%M:%SZ} (keyCompromise)"
    )


def test_crl_without_the_serial_is_used_and_passes(ca, web):
    crl = ca.issuer.crl([Revocation(12345, NOW, "superseded")], number=2, now=NOW)
    assert _verify(ca, web, crls=[crl]).crls_used == (crl,)


def test_crl_signed_by_another_key_is_not_trusted(ca, web):
    impostor = Authority.from_library()  # its intermediate has the very same name as ours
    crl = impostor.issuer.crl([], number=2, now=NOW)
    with pytest.raises(CrlError, match="signature does not verify"):
        _verify(ca, web, crls=[crl])


def test_a_crl_past_its_next_update_and_the_grace_refuses_the_chain_as_crl_stale(ca, web):
    crl = ca.issuer.crl([], number=2, now=NOW - timedelta(days=2))  # next update a day ago
    error = _reason(ca, web, crls=[crl], crl_file="crl.pem")
    assert error.reason == CRL_STALE
    assert error.detail.startswith(f"the CRL in crl.pem from '{ca.intermediate.subject.rfc4514_string()}' expired 1d")
    assert "--crl-grace is 1h" in error.detail


def test_a_crl_past_its_next_update_within_the_grace_is_still_relied_on(ca, web):
    crl = ca.issuer.crl([], number=2, now=NOW - timedelta(days=2))
    assert _verify(ca, web, crls=[crl], crl_grace=timedelta(days=2)).crls_used == (crl,)


def test_crl_of_an_unrelated_issuer_is_ignored(ca, web):
    other = Authority.from_library("other.org")
    crl = other.issuer.crl([Revocation(web.serial_number, NOW, "keyCompromise")], number=2, now=NOW)
    assert _verify(ca, web, crls=[crl]).crls_used == ()


def test_untrusted_ca_when_a_leaf_signs_a_leaf(ca, web):
    leaf_key = generate_key()
    signer_leaf = ca.issuer.issue(
        "spiffe://example.org/signer", leaf_key.public_key(), ttl=timedelta(hours=2), now=NOW
    )
    child = _rebuild(web, signer=Issuer(signer_leaf, leaf_key, "example.org"))
    with pytest.raises(VerifyError) as caught:
        verify_svid_chain(child, [signer_leaf, ca.intermediate], [ca.root], now=NOW)
    assert caught.value.reason == UNTRUSTED_CA
    assert "is not a CA" in caught.value.detail


def test_untrusted_ca_when_pathlen_is_exceeded(ca, web):
    sub_key = generate_key()
    sub_ca = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "rogue sub-CA")]))
        .issuer_name(ca.intermediate.subject)
        .public_key(sub_key.public_key())
        .serial_number(new_serial())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca.issuer.key, hashes.SHA256())
    )
    child = _rebuild(web, signer=Issuer(sub_ca, sub_key, "example.org"))
    with pytest.raises(VerifyError) as caught:
        verify_svid_chain(child, [sub_ca, ca.intermediate], [ca.root], now=NOW)
    assert caught.value.reason == UNTRUSTED_CA
    assert "pathlen" in caught.value.detail


def test_untrusted_ca_when_intermediate_issues_outside_its_trust_domain(ca):
    rogue = Issuer(ca.intermediate, ca.issuer.key, "other.org")  # bypasses the CA's own check
    key = generate_key()
    foreign = rogue.issue("spiffe://other.org/web", key.public_key(), ttl=timedelta(hours=1), now=NOW)
    error = _reason(ca, foreign)
    assert error.reason == UNTRUSTED_CA
    assert "may not issue for 'other.org'" in error.detail


# --- `ca verify` as an admin runs it ---------------------------------------------------------------


@pytest.fixture(scope="module")
def files(ca, web, tmp_path_factory):
    """PEM files of one CA, read by the `ca verify` subprocesses (whose clock is the real one)."""
    real_now = datetime.now(timezone.utc).replace(microsecond=0)
    live_ca = Authority.from_library(now=real_now)
    directory = tmp_path_factory.mktemp("verify")
    leaf, _ = live_ca.leaf(now=real_now)
    expired, _ = live_ca.leaf(now=real_now - timedelta(seconds=59), ttl=timedelta(seconds=1))
    future, _ = live_ca.leaf(now=real_now + timedelta(days=1))
    return {
        "dir": directory,
        "bundle": write_pem(directory / "bundle.pem", live_ca.root),
        "good": write_pem(directory / "good.pem", leaf, live_ca.intermediate),
        "expired": write_pem(directory / "expired.pem", expired, live_ca.intermediate),
        "future": write_pem(directory / "future.pem", future, live_ca.intermediate),
        "ca_as_leaf": write_pem(directory / "ca.pem", live_ca.intermediate),
        "foreign": write_pem(directory / "foreign.pem", web, ca.intermediate),
        "crl": write_pem(
            directory / "crl.pem",
            live_ca.issuer.crl(
                [Revocation(leaf.serial_number, real_now, "keyCompromise")], number=2, now=real_now
            ),
        ),
        "stale_crl": write_pem(
            directory / "stale.pem", live_ca.issuer.crl([], number=2, now=real_now - timedelta(days=2))
        ),
        "other_crl": write_pem(
            directory / "other.pem", Authority.from_library("other.org").issuer.crl([], number=2, now=real_now)
        ),
        "leaf": leaf,
    }


@pytest.mark.e2e
def test_cli_verify_prints_valid_with_id_serial_and_expiry(files):
    result = run_ca(
        "verify", files["good"], "--bundle", files["bundle"], "--expect", "spiffe://example.org/ns/prod/*",
        cwd=files["dir"],
    )
    leaf = files["leaf"]
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"valid: {WEB} (serial {leaf.serial_number:x}, "
        f"expires {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})\n"
    )


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("cert", "extra", "reason"),
    [
        ("foreign", [], "untrusted_ca"),
        ("expired", [], "expired"),
        ("future", [], "not_yet_valid"),
        ("ca_as_leaf", [], "not_svid"),
        ("good", ["--expect", "spiffe://example.org/ns/dev/sa/web"], "identity_not_allowed"),
        ("good", ["--crl", "crl"], "revoked"),
        ("good", ["--crl", "stale_crl"], "crl_stale"),
    ],
)
def test_cli_verify_exits_1_with_reason_code_first(files, cert, extra, reason):
    extra = [str(files[x]) if x in files else x for x in extra]
    result = run_ca("verify", files[cert], "--bundle", files["bundle"], *extra, cwd=files["dir"], check=False)
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith(f"{reason}: ")
    assert result.stdout.count("\n") == 1


@pytest.mark.e2e
def test_cli_verify_revoked_sentence(files):
    result = run_ca(
        "verify", files["good"], "--bundle", files["bundle"], "--crl", files["crl"], cwd=files["dir"], check=False
    )
    serial = files["leaf"].serial_number
    assert result.stdout.startswith(f"revoked: certificate serial {serial:x} ({WEB}) was revoked at ")
    assert result.stdout.rstrip().endswith("(keyCompromise)")


@pytest.mark.e2e
def test_cli_verify_refuses_a_crl_file_without_the_leafs_issuer_as_input_error(files):
    result = run_ca(
        "verify", files["good"], "--bundle", files["bundle"], "--crl", files["other_crl"], cwd=files["dir"],
        check=False,
    )
    assert "no CRL in it is from" in assert_one_line_error(result, 2)


@pytest.mark.e2e
def test_cli_verify_rejects_malformed_expectation(files):
    good, bundle = files["good"], files["bundle"]
    result = run_ca(
        "verify", good, "--bundle", bundle, "--expect", "spiffe://example.org/a*", cwd=files["dir"], check=False
    )
    assert "--expect" in assert_one_line_error(result, 2)


@pytest.mark.e2e
def test_cli_verify_reports_unreadable_bundle(files):
    result = run_ca("verify", files["good"], "--bundle", files["dir"] / "missing.pem", cwd=files["dir"], check=False)
    assert "cannot read bundle" in assert_one_line_error(result, 2)
