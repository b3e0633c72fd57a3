"""proxy.tls.PeerCheck: what the handshake's verify callback decides about one peer, without a handshake.

Each test hands PeerCheck the path OpenSSL would have verified (leaf, intermediate, root), built in
memory, with an explicit ``now``; the decision and its reason code are read back from the check.
"""

from __future__ import annotations

from functools import partial

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from support.certs import DAY, HOUR, NOW, TD, WEB, Authority

from mtls.reasons import (
    EXPIRED,
    IDENTITY_NOT_ALLOWED,
    NOT_SVID,
    NOT_YET_VALID,
    REVOKED,
    SERVER_IDENTITY_MISMATCH,
    UNTRUSTED_CA,
)
from mtls.spiffe import CLIENT, SERVER, PatternSet, parse_pattern
from mtls.trust import TrustStore
from proxy.policy import authorize_client, authorize_server
from proxy.tls import PeerCheck

# OpenSSL's X509_V_ERR_* codes for the refusals it makes before our rules run.
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20


def peer_check(store: TrustStore, allow: str = WEB, *, role: str = CLIENT, audit: bool = False) -> PeerCheck:
    """A PeerCheck for listener 'api' allowing ``allow``: inbound (CLIENT) or outbound (SERVER)."""
    policy = authorize_client if role == CLIENT else authorize_server
    return PeerCheck(role, partial(policy, "api", PatternSet([parse_pattern(allow)])), store, audit)


def store_of(authority: Authority, **kwargs) -> TrustStore:
    return TrustStore({TD: [authority.root]}, **kwargs)


def path_of(authority: Authority, leaf) -> tuple:
    return (leaf.cert, *authority.chain, authority.root)


def test_an_allowed_client_is_identified_and_its_verified_path_kept(authority):
    leaf = authority.issue(WEB)
    check = peer_check(store_of(authority))
    assert check.check_path(path_of(authority, leaf), NOW)
    assert str(check.peer_id) == WEB
    assert check.decision.allowed and check.failure is None
    assert check.path == path_of(authority, leaf)
    assert (check.serial, check.not_after) == (leaf.cert.serial_number, leaf.cert.not_valid_after_utc)


def test_connections_keep_their_own_leaf_and_share_the_issuers_above_it(authority):
    """What an idle connection keeps for reloads to check again: its leaf, parsed anew (without what the
    checks parsed and cached on it), and the CA certificates above it as one copy every connection shares."""
    leaf = authority.issue(WEB)
    first, second = peer_check(store_of(authority)), peer_check(store_of(authority))
    assert first.check_path(path_of(authority, leaf), NOW)
    # OpenSSL hands each handshake its own parsed copies of the chain
    copies = [x509.load_der_x509_certificate(cert.public_bytes(Encoding.DER)) for cert in path_of(authority, leaf)]
    assert second.check_path(copies, NOW)
    assert first.path == second.path == path_of(authority, leaf)
    assert all(mine is theirs for mine, theirs in zip(first.path[1:], second.path[1:]))
    assert first.leaf is first.path[0] and first.leaf is not leaf.cert


def test_a_path_seen_again_by_the_same_store_is_checked_again_for_time_role_and_policy(authority):
    """What the store's rules said about a path is remembered per store, path and role; the time, the
    role and the listener's policy are asked of every handshake all the same."""
    store = store_of(authority)
    leaf = authority.issue(WEB, not_after=NOW + DAY, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    first = peer_check(store)
    assert first.check_path(path_of(authority, leaf), NOW)
    copies = [x509.load_der_x509_certificate(cert.public_bytes(Encoding.DER)) for cert in path_of(authority, leaf)]
    again = peer_check(store)
    assert again.check_path(copies, NOW)
    assert str(again.peer_id) == WEB and again.path is first.path  # one kept copy for both connections
    later = peer_check(store)
    assert not later.check_path(copies, NOW + 2 * DAY)
    assert later.failure[0] == EXPIRED and later.peer_id is None
    not_allowed = peer_check(store, "spiffe://example.org/ns/dev/*")
    assert not not_allowed.check_path(copies, NOW)
    assert not_allowed.failure[0] == IDENTITY_NOT_ALLOWED
    as_server = peer_check(store, role=SERVER)
    assert not as_server.check_path(copies, NOW)
    assert as_server.failure[0] == NOT_SVID


def test_a_client_the_port_does_not_allow_is_refused_with_the_policy_sentence(authority):
    check = peer_check(store_of(authority), "spiffe://example.org/ns/dev/*")
    assert not check.check_path(path_of(authority, authority.issue(WEB)), NOW)
    assert check.failure == (IDENTITY_NOT_ALLOWED, check.decision.detail)
    assert "port api allows spiffe://example.org/ns/dev/*" in check.decision.detail
    assert str(check.peer_id) == WEB  # verified, so the log can name who was refused


def test_audit_mode_lets_a_refused_client_through_and_keeps_the_decision(authority):
    check = peer_check(store_of(authority), "spiffe://example.org/ns/dev/*", audit=True)
    assert check.check_path(path_of(authority, authority.issue(WEB)), NOW)
    assert not check.decision.allowed and check.failure is None


def test_a_server_that_is_not_the_expected_upstream_is_refused(authority):
    check = peer_check(store_of(authority), "spiffe://example.org/ns/prod/sa/orders", role=SERVER)
    assert not check.check_path(path_of(authority, authority.issue(WEB)), NOW)
    assert check.failure[0] == SERVER_IDENTITY_MISMATCH


def test_an_expired_or_not_yet_valid_leaf_is_refused_and_not_identified(authority):
    for leaf, reason in (
        (authority.issue(WEB, not_before=NOW - 2 * DAY, not_after=NOW - HOUR), EXPIRED),
        (authority.issue(WEB, not_before=NOW + HOUR, not_after=NOW + DAY), NOT_YET_VALID),
    ):
        check = peer_check(store_of(authority))
        assert not check.check_path(path_of(authority, leaf), NOW)
        assert check.failure[0] == reason and check.peer_id is None


def test_a_leaf_that_is_not_an_svid_is_refused(authority):
    for leaf in (
        authority.issue(WEB, uris=(WEB, "spiffe://example.org/ns/prod/sa/api")),
        authority.issue(WEB, is_ca=True),
    ):
        check = peer_check(store_of(authority))
        assert not check.check_path(path_of(authority, leaf), NOW)
        assert check.failure[0] == NOT_SVID


def test_the_leaf_must_be_allowed_to_authenticate_in_its_role(authority):
    client_only = authority.issue(WEB, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    assert peer_check(store_of(authority)).check_path(path_of(authority, client_only), NOW)
    as_server = peer_check(store_of(authority), role=SERVER)
    assert not as_server.check_path(path_of(authority, client_only), NOW)
    assert as_server.failure[0] == NOT_SVID


def test_a_leaf_its_issuers_crl_lists_is_refused_as_revoked(authority):
    leaf = authority.issue(WEB)
    store = store_of(authority, crls=[authority.crl((leaf.cert.serial_number,))], authorities=[authority.intermediate])
    check = peer_check(store)
    assert not check.check_path(path_of(authority, leaf), NOW)
    assert check.failure[0] == REVOKED


def test_a_root_of_another_trust_domain_does_not_vouch_for_an_allowed_id(authority):
    partner = Authority.create("Partner", trust_domain="partner.org")
    store = TrustStore({TD: [authority.root], "partner.org": [partner.root]})
    check = peer_check(store)
    assert not check.check_path(path_of(partner, partner.issue(WEB)), NOW)
    assert check.failure[0] == UNTRUSTED_CA


def test_an_id_the_port_does_not_allow_is_refused_for_that_whatever_its_chain(authority):
    partner = Authority.create("Partner", trust_domain="partner.org")
    store = TrustStore({TD: [authority.root], "partner.org": [partner.root]})
    check = peer_check(store, "spiffe://example.org/ns/dev/*")
    assert not check.check_path(path_of(partner, partner.issue(WEB)), NOW)
    assert check.failure[0] == IDENTITY_NOT_ALLOWED


def test_an_openssl_refusal_is_recorded_in_our_reason_codes(authority):
    leaf = authority.issue(WEB)
    expired = peer_check(store_of(authority))
    expired.refused_by_openssl(X509_V_ERR_CERT_HAS_EXPIRED, 0, path_of(authority, leaf))
    assert expired.failure[0] == EXPIRED
    foreign = Authority.create("Foreign")
    unknown = peer_check(store_of(authority))
    unknown.refused_by_openssl(X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY, 1, (foreign.issue(WEB).cert, *foreign.chain))
    assert unknown.failure[0] == UNTRUSTED_CA


def test_the_first_failure_is_the_one_kept(authority):
    check = peer_check(store_of(authority))
    check.fail(EXPIRED, "first")
    check.fail(NOT_SVID, "second")
    assert check.failure == (EXPIRED, "first")


def test_a_resumed_session_is_checked_again_for_time_and_policy(authority):
    leaf = authority.issue(WEB, not_after=NOW + DAY)
    resumed = peer_check(store_of(authority))
    assert resumed.check_resumed(leaf.cert, NOW)
    assert resumed.resumed and str(resumed.peer_id) == WEB
    later = peer_check(store_of(authority))
    assert not later.check_resumed(leaf.cert, NOW + 2 * DAY)
    assert later.failure[0] == EXPIRED
    no_longer_allowed = peer_check(store_of(authority), "spiffe://example.org/ns/dev/*")
    assert not no_longer_allowed.check_resumed(leaf.cert, NOW)
    assert no_longer_allowed.failure[0] == IDENTITY_NOT_ALLOWED


def test_a_leaf_resumed_again_and_again_is_checked_for_its_role_and_time_each_time(authority):
    """The X.509-SVID verdict on a resumed leaf is remembered per certificate and role; its time is not."""
    client_only = authority.issue(WEB, not_after=NOW + DAY, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    assert peer_check(store_of(authority)).check_resumed(client_only.cert, NOW)
    as_server = peer_check(store_of(authority), role=SERVER)
    assert not as_server.check_resumed(client_only.cert, NOW)
    assert as_server.failure[0] == NOT_SVID
    too_early = peer_check(store_of(authority))
    assert not too_early.check_resumed(client_only.cert, NOW - 2 * DAY)
    assert too_early.failure[0] == NOT_YET_VALID
    again = peer_check(store_of(authority))
    assert again.check_resumed(client_only.cert, NOW)
    assert str(again.peer_id) == WEB and again.leaf == client_only.cert
