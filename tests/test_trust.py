"""mtls.trust: the one chain verifier. A root vouches only for its own trust domain; a CRL counts only
for the CA that signed it. In-memory certificates, an explicit ``now``, no sockets."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from support.certs import DAY, HOUR, NOW, TD, WEB, Authority

from ca.authority import Issuer, generate_key, make_intermediate
from mtls.reasons import EXPIRED, NOT_SVID, NOT_YET_VALID, REVOKED, UNTRUSTED_CA
from mtls.spiffe import CLIENT
from mtls.trust import MAX_INTERMEDIATES, TrustStore, VerifyError

PARTNER = "partner.org"
PARTNER_WEB = f"spiffe://{PARTNER}/ns/shop/sa/web"


@pytest.fixture(scope="module")
def ours() -> Authority:
    return Authority.create("Ours")


@pytest.fixture(scope="module")
def partner() -> Authority:
    return Authority.create("Partner", trust_domain=PARTNER)


def store_of(ours: Authority, partner: Authority | None = None, **kwargs) -> TrustStore:
    bundles = {TD: [ours.root]}
    if partner is not None:
        bundles[PARTNER] = [partner.root]
    return TrustStore(bundles, **kwargs)


def refused(store: TrustStore, leaf: x509.Certificate, chain, role=None, now=NOW) -> VerifyError:
    with pytest.raises(VerifyError) as caught:
        store.verify(leaf, chain, role=role, now=now)
    return caught.value


def root_crl(authority: Authority, *serials: int) -> x509.CertificateRevocationList:
    """A CRL signed by the root itself, revoking CA certificates it issued."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(authority.root.subject)
        .last_update(NOW - DAY)
        .next_update(NOW + DAY)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - HOUR).build()
        )
    return builder.sign(authority.root_key, hashes.SHA256())


# --- the path and the identity -------------------------------------------------------------------


def test_accepts_a_chain_to_a_root_of_the_leafs_trust_domain(ours):
    leaf = ours.issue(WEB).cert

    verified = store_of(ours).verify(leaf, ours.chain, role=CLIENT, now=NOW)

    assert str(verified.spiffe_id) == WEB
    assert verified.path == (leaf, ours.intermediate, ours.root)


def test_check_path_accepts_the_path_a_handshake_built(ours):
    leaf = ours.issue(WEB).cert

    verified = store_of(ours).check_path((leaf, ours.intermediate, ours.root), role=CLIENT, now=NOW)

    assert str(verified.spiffe_id) == WEB


def test_accepts_a_partners_own_ids_against_the_partners_bundle(ours, partner):
    leaf = partner.issue(PARTNER_WEB).cert

    verified = store_of(ours, partner).verify(leaf, partner.chain, role=CLIENT, now=NOW)

    assert verified.spiffe_id.trust_domain == PARTNER


def test_refuses_a_partner_root_vouching_for_our_trust_domain_naming_both(ours, partner):
    forged = partner.issue(WEB).cert  # the partner's CA mints one of our IDs

    error = refused(store_of(ours, partner), forged, partner.chain)

    assert error.reason == UNTRUSTED_CA
    assert f"{WEB} is in trust domain {TD}" in error.detail
    assert f"a root of trust domain {PARTNER}" in error.detail


def test_refuses_a_trust_domain_without_a_bundle_naming_it_and_the_trusted_ones(ours, partner):
    stranger = Authority.create("Stranger", trust_domain="other.org")
    leaf = stranger.issue("spiffe://other.org/web").cert

    error = refused(store_of(ours, partner), leaf, stranger.chain)

    assert error.reason == UNTRUSTED_CA
    assert error.detail == f"no bundle for trust domain other.org; this verifier trusts {TD}, {PARTNER}"


def test_refuses_a_trust_domain_without_a_bundle_even_when_our_root_signed_it(ours):
    leaf = ours.issue("spiffe://other.org/web").cert  # no name constraints on this test CA

    error = refused(store_of(ours), leaf, ours.chain)

    assert (error.reason, error.detail) == (UNTRUSTED_CA, f"no bundle for trust domain other.org; this verifier trusts {TD}")


def test_refuses_a_chain_to_no_trusted_root_naming_the_issuer(ours):
    stranger = Authority.create("Stranger")
    leaf = stranger.issue(WEB).cert

    error = refused(store_of(ours), leaf, stranger.chain)

    assert error.reason == UNTRUSTED_CA
    assert error.detail == (
        "CA certificate 'CN=Stranger Intermediate CA' was issued by 'CN=Stranger Root CA', which does not chain "
        "to a trusted root (bundle holds 'CN=Ours Root CA')"
    )
    assert error.x509 is not None and error.x509.depth == 1


def test_refuses_a_path_with_too_many_intermediates(ours):
    leaf = ours.issue(WEB).cert
    path = (leaf, *[ours.intermediate] * (MAX_INTERMEDIATES + 1), ours.root)

    with pytest.raises(VerifyError) as caught:
        store_of(ours).check_path(path, role=None, now=NOW)

    assert caught.value.reason == UNTRUSTED_CA


def test_refuses_a_leaf_that_is_not_an_svid(ours):
    leaf = ours.issue(WEB, uris=()).cert

    error = refused(store_of(ours), leaf, ours.chain)

    assert (error.reason, error.detail) == (NOT_SVID, "leaf has no subjectAltName, so no SPIFFE ID")


def test_refuses_a_ca_certificate_presented_as_a_leaf(ours):
    error = refused(store_of(ours), ours.intermediate, ())

    assert error.reason == NOT_SVID
    assert "CA certificate" in error.detail


def test_refuses_a_leaf_whose_extended_key_usage_does_not_allow_the_role(ours):
    server_only = ours.issue(WEB, eku=(x509.ExtendedKeyUsageOID.SERVER_AUTH,)).cert

    error = refused(store_of(ours), server_only, ours.chain, role=CLIENT)

    assert error.reason == NOT_SVID
    assert "does not allow client authentication" in error.detail


# --- validity ------------------------------------------------------------------------------------


def test_refuses_an_expired_leaf(ours):
    leaf = ours.issue(WEB, not_before=NOW - 2 * DAY, not_after=NOW - HOUR).cert

    error = refused(store_of(ours), leaf, ours.chain)

    assert error.reason == EXPIRED
    assert error.detail.endswith(f"expired at {NOW - HOUR:%Y-%m-%dT%H:%M:%SZ}")


def test_refuses_a_leaf_that_is_not_yet_valid(ours):
    leaf = ours.issue(WEB, not_before=NOW + HOUR, not_after=NOW + DAY).cert

    error = refused(store_of(ours), leaf, ours.chain)

    assert error.reason == NOT_YET_VALID
    assert "is not valid before" in error.detail


def test_names_the_expired_ca_certificate_on_the_path(ours):
    leaf = ours.issue(WEB).cert
    long_after = ours.intermediate.not_valid_after_utc + HOUR

    error = refused(store_of(ours), leaf, ours.chain, now=long_after)

    assert error.reason == EXPIRED  # the leaf went first: it expired long before
    later_leaf = ours.issue(WEB, not_before=NOW, not_after=long_after + DAY).cert
    error = refused(store_of(ours), later_leaf, ours.chain, now=long_after)
    assert error.detail.startswith("CA certificate 'CN=Ours Intermediate CA' expired at ")


# --- revocation ----------------------------------------------------------------------------------


def test_refuses_a_leaf_its_issuers_crl_lists(ours):
    leaf = ours.issue(WEB).cert
    store = store_of(ours, crls=[ours.crl((leaf.serial_number,))], authorities=ours.chain)

    error = refused(store, leaf, ours.chain)

    assert error.reason == REVOKED
    assert error.detail.startswith(f"certificate serial {leaf.serial_number:x} ({WEB}) was revoked at ")


def test_refuses_a_revoked_intermediate(ours):
    leaf = ours.issue(WEB).cert
    store = store_of(ours, crls=[root_crl(ours, ours.intermediate.serial_number)])

    error = refused(store, leaf, ours.chain)

    assert error.reason == REVOKED
    assert error.detail.startswith("CA certificate 'CN=Ours Intermediate CA' was revoked at ")


def test_a_crl_of_another_trust_domains_ca_revokes_nothing_of_ours(ours, partner):
    leaf = ours.issue(WEB).cert
    partner_crl = partner.crl((leaf.serial_number,))
    store = store_of(ours, partner, crls=[partner_crl], authorities=partner.chain)

    assert store.crls == (partner_crl,)  # a good CRL, bound to the partner's CA
    assert store.verify(leaf, ours.chain, role=None, now=NOW).spiffe_id.trust_domain == TD


def test_a_crl_in_our_issuers_name_but_signed_by_another_key_is_rejected(ours):
    leaf = ours.issue(WEB).cert
    impostor = Authority.create("Ours")  # the very same names, other keys
    forged = ours.crl((leaf.serial_number,), signed_by=impostor)

    store = store_of(ours, crls=[forged], authorities=impostor.chain)

    assert store.rejected_crls == (forged,)
    assert store.verify(leaf, ours.chain, role=None, now=NOW).path[0] == leaf


def test_a_crl_of_a_ca_that_chains_to_no_bundle_is_rejected(ours):
    stranger = Authority.create("Stranger")
    crl = stranger.crl((1234,))

    store = store_of(ours, crls=[crl], authorities=stranger.chain)

    assert (store.crls, store.rejected_crls) == ((), (crl,))


def test_binds_the_crl_of_an_intermediate_known_only_from_the_crl_file():
    """A CA rotation: the peer's intermediate is not on our own path, but it came in crl.pem and
    chains to a root of our bundle, so its CRL counts for the peers it issued."""
    ours = Authority.from_library()
    key = generate_key()
    second = make_intermediate(TD, key, root=ours.root, root_key=ours.root_key, ttl=DAY, now=NOW, generation=2)
    sibling = Authority(ours.root, ours.root_key, Issuer(second, key, TD))
    peer = sibling.leaf(WEB).cert
    store = store_of(ours, crls=[sibling.crl((peer.serial_number,))], authorities=[ours.intermediate, second])

    assert refused(store, peer, sibling.chain).reason == REVOKED
    assert store.verify(ours.leaf(WEB).cert, ours.chain, role=None, now=NOW).path[-1] == ours.root
    assert store.revoked_serials == frozenset({peer.serial_number})


# --- resumption and tools with one bundle --------------------------------------------------------


def test_check_leaf_refuses_a_resumed_peer_whose_certificate_expired_since(ours):
    leaf = ours.issue(WEB, not_after=NOW + HOUR).cert

    with pytest.raises(VerifyError) as caught:
        store_of(ours).check_leaf(leaf, role=CLIENT, now=NOW + 2 * HOUR)

    assert caught.value.reason == EXPIRED


def test_a_bundle_without_a_trust_domain_serves_the_one_the_leaf_names(ours):
    leaf = ours.issue(WEB).cert

    store = TrustStore.for_leaf(leaf, [ours.root])

    assert dict(store.bundles) == {TD: (ours.root,)}


def test_a_bundle_without_a_trust_domain_refuses_a_leaf_naming_none(ours):
    with pytest.raises(VerifyError) as caught:
        TrustStore.for_leaf(ours.issue(WEB, uris=()).cert, [ours.root])

    assert caught.value.reason == NOT_SVID


def test_a_root_cannot_serve_two_trust_domains(ours):
    with pytest.raises(ValueError, match="in the bundles of both"):
        TrustStore({TD: [ours.root], PARTNER: [ours.root]})
