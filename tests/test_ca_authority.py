"""The certificates ``ca.authority`` builds follow the X.509-SVID profile, on cryptography objects."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support.certs import NOW, WEB, Authority

from ca.authority import CLOCK_SKEW, CRL_LIFETIME, Revocation, generate_key, new_serial
from ca.errors import InputError, Refused
from mtls.spiffe import InvalidSpiffeId, svid_id


@pytest.fixture(scope="module")
def ca():
    return Authority.from_library()


def _ext(cert, kind):
    return cert.extensions.get_extension_for_class(kind)


def test_leaf_follows_x509_svid_profile(ca):
    leaf, _ = ca.leaf(WEB)
    basic = _ext(leaf, x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = _ext(leaf, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not (usage.value.key_cert_sign or usage.value.crl_sign or usage.value.key_encipherment)
    assert list(_ext(leaf, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    san = _ext(leaf, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    assert not san.critical  # the subject is not empty (RFC 5280 4.2.1.6)
    ski = _ext(leaf, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    aki = _ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(ca.intermediate, x509.SubjectKeyIdentifier).value.digest
    assert str(svid_id(leaf)) == WEB


def test_leaf_subject_names_trust_domain_and_workload_for_access_logs(ca):
    leaf, _ = ca.leaf(WEB)
    assert leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "example.org"
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web"
    assert leaf.subject.rfc4514_string() == "CN=web,O=example.org"


def test_leaf_common_name_is_cut_to_64_characters(ca):
    segment = "payments-" + "x" * 100
    leaf, _ = ca.leaf(f"spiffe://example.org/ns/prod/sa/{segment}")
    (common_name,) = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert common_name.value == segment[:61] + "..."
    assert len(common_name.value) == 64
    assert str(svid_id(leaf)) == f"spiffe://example.org/ns/prod/sa/{segment}"  # the identity is whole


def test_leaf_is_signed_by_intermediate_which_is_signed_by_root(ca):
    leaf, _ = ca.leaf()
    leaf.verify_directly_issued_by(ca.intermediate)
    ca.intermediate.verify_directly_issued_by(ca.root)
    ca.root.verify_directly_issued_by(ca.root)


def test_intermediate_is_pathlen_zero_ca_constrained_to_trust_domain(ca):
    basic = _ext(ca.intermediate, x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = _ext(ca.intermediate, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    constraints = _ext(ca.intermediate, x509.NameConstraints)
    assert constraints.critical
    assert constraints.value.permitted_subtrees == [x509.UniformResourceIdentifier("example.org")]


def test_root_is_critical_ca(ca):
    basic = _ext(ca.root, x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 1
    assert ca.root.subject == ca.root.issuer


def test_not_before_is_backdated_for_clock_skew(ca):
    leaf, _ = ca.leaf(now=NOW + timedelta(hours=1), ttl=timedelta(hours=2))
    assert leaf.not_valid_before_utc == NOW + timedelta(hours=1) - CLOCK_SKEW
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=3)


def test_leaf_never_starts_before_its_intermediate(ca):
    leaf, _ = ca.leaf(now=NOW)
    assert leaf.not_valid_before_utc == ca.intermediate.not_valid_before_utc


def test_issue_refuses_ttl_longer_than_intermediate_instead_of_truncating(ca):
    key = generate_key()
    expiry = f"{NOW + timedelta(days=365):%Y-%m-%dT%H:%M:%SZ}"  # the fixture's intermediate: made at NOW for 365d
    with pytest.raises(Refused, match=f"would outlive the intermediate CA, which expires at {expiry}"):
        ca.issuer.issue(WEB, key.public_key(), ttl=timedelta(days=366), now=NOW)


def test_issue_accepts_ttl_ending_exactly_when_intermediate_does(ca):
    key = generate_key()
    leaf = ca.issuer.issue(WEB, key.public_key(), ttl=timedelta(days=365), now=NOW)
    assert leaf.not_valid_after_utc == ca.intermediate.not_valid_after_utc


def test_issue_refuses_when_intermediate_has_expired(ca):
    key = generate_key()
    with pytest.raises(Refused, match="intermediate CA expired"):
        ca.issuer.issue(WEB, key.public_key(), ttl=timedelta(hours=1), now=NOW + timedelta(days=400))


def test_issue_refuses_id_outside_trust_domain(ca):
    key = generate_key()
    with pytest.raises(InvalidSpiffeId, match="outside this CA's trust domain 'example.org'"):
        ca.issuer.issue("spiffe://other.org/web", key.public_key(), ttl=timedelta(hours=1), now=NOW)


def test_issue_refuses_trust_domain_id_without_path(ca):
    key = generate_key()
    with pytest.raises(InvalidSpiffeId, match="must have a path"):
        ca.issuer.issue("spiffe://example.org", key.public_key(), ttl=timedelta(hours=1), now=NOW)


def test_issue_refuses_key_too_weak_for_an_svid(ca):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(InputError, match="RSA key of 1024 bits"):
        ca.issuer.issue(WEB, weak.public_key(), ttl=timedelta(hours=1), now=NOW)


def test_dns_names_are_added_next_to_the_one_uri(ca):
    key = generate_key()
    leaf = ca.issuer.issue(
        WEB, key.public_key(), ttl=timedelta(hours=1), now=NOW, dns_names=["web.prod.svc", "*.web.prod.svc"]
    )
    san = _ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    assert san.get_values_for_type(x509.DNSName) == ["web.prod.svc", "*.web.prod.svc"]


@pytest.mark.parametrize(
    "name", ["web prod", "-web.svc", "web..svc", "10.0.0.1", "a" * 64 + ".svc", "web.*.svc"]
)
def test_issue_refuses_malformed_dns_name(ca, name):
    key = generate_key()
    with pytest.raises(InputError, match="DNS name"):
        ca.issuer.issue(WEB, key.public_key(), ttl=timedelta(hours=1), now=NOW, dns_names=[name])


@pytest.mark.parametrize("key_type", ["ec-p256", "ed25519", "rsa-3072"])
def test_every_key_type_yields_an_svid_chain(key_type):
    ca = Authority.from_library(key_type=key_type)
    key = generate_key(key_type)
    leaf = ca.issuer.issue(WEB, key.public_key(), ttl=timedelta(hours=1), now=NOW)
    leaf.verify_directly_issued_by(ca.intermediate)
    assert str(svid_id(leaf)) == WEB


def test_serials_are_random_159_bit_positive_integers():
    serials = {new_serial() for _ in range(1000)}
    assert len(serials) == 1000
    assert all(serial.bit_length() == 159 for serial in serials)


def test_crl_lists_revocations_with_reasons_signed_by_intermediate(ca):
    revocations = [
        Revocation(0x1A2B, NOW, "keyCompromise"),
        Revocation(0x3C4D, NOW, "unspecified"),
    ]
    crl = ca.issuer.crl(revocations, number=7, now=NOW)
    assert crl.is_signature_valid(ca.intermediate.public_key())
    assert crl.issuer == ca.intermediate.subject
    assert crl.next_update_utc == NOW + CRL_LIFETIME
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    compromised = crl.get_revoked_certificate_by_serial_number(0x1A2B)
    reason = compromised.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    unspecified = crl.get_revoked_certificate_by_serial_number(0x3C4D)
    assert len(unspecified.extensions) == 0  # RFC 5280: no reason code rather than 'unspecified'
