"""CRLs the sidecar can rely on. A CRL past its next update, as the handshake sees it
(proxy.tls.CrlFreshness on PeerCheck): refused as ``crl_stale`` past the grace, or let through and
marked with ``crl_stale: warn``; never before. A CRL that goes back (proxy.credentials.crl_rollbacks)."""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from pathlib import Path

from support.certs import HOUR, NOW, TD, WEB, Authority

from mtls.reasons import CRL_STALE, REVOKED
from mtls.spiffe import CLIENT, PatternSet, parse_pattern
from mtls.trust import TrustStore
from proxy.config import IdentityConfig
from proxy.credentials import crl_rollbacks
from proxy.policy import authorize_client
from proxy.tls import CrlFreshness, PeerCheck

CRL_FILE = Path("/run/identity/crl.pem")


def check_for(store: TrustStore, *, refuse: bool = True, grace: timedelta = HOUR) -> PeerCheck:
    allow = PatternSet([parse_pattern(WEB)])
    return PeerCheck(CLIENT, partial(authorize_client, "api", allow), store, False,
                     CrlFreshness(CRL_FILE, grace, refuse))


def setup(authority: Authority, next_update, revoked=()):
    leaf = authority.issue(WEB)
    crl = authority.crl(tuple(revoked), next_update=next_update)
    store = TrustStore({TD: [authority.root]}, crls=[crl], authorities=authority.chain)
    return store, (leaf.cert, *authority.chain, authority.root), leaf


def test_a_crl_past_next_update_within_the_grace_still_admits_peers(authority):
    store, path, _ = setup(authority, NOW - timedelta(minutes=30))
    check = check_for(store)
    assert check.check_path(path, NOW)
    assert check.stale_crl is None


def test_a_crl_past_next_update_and_the_grace_refuses_new_handshakes_naming_file_issuer_and_age(authority):
    store, path, _ = setup(authority, NOW - 2 * HOUR)
    check = check_for(store)
    assert not check.check_path(path, NOW)
    reason, detail = check.failure
    assert reason == CRL_STALE
    assert str(CRL_FILE) in detail
    assert authority.intermediate.subject.rfc4514_string() in detail
    assert "expired 2h" in detail and "crl_grace is 1h" in detail


def test_warn_mode_lets_the_peer_through_marked_stale(authority):
    store, path, _ = setup(authority, NOW - 2 * HOUR)
    check = check_for(store, refuse=False)
    assert check.check_path(path, NOW)
    assert check.failure is None
    assert "expired 2h" in check.stale_crl


def test_a_revoked_peer_is_refused_as_revoked_even_when_the_crl_is_stale(authority):
    leaf = authority.issue(WEB)
    crl = authority.crl((leaf.cert.serial_number,), next_update=NOW - 2 * HOUR)
    store = TrustStore({TD: [authority.root]}, crls=[crl], authorities=authority.chain)
    check = check_for(store)
    assert not check.check_path((leaf.cert, *authority.chain, authority.root), NOW)
    assert check.failure[0] == REVOKED


def test_a_stale_crl_of_another_ca_does_not_refuse_a_path_that_does_not_go_through_it(authority):
    other = Authority.create("Other")
    stale_other = other.crl(next_update=NOW - 2 * HOUR)
    fresh = authority.crl(next_update=NOW + HOUR)
    store = TrustStore({TD: [authority.root], "other.org": [other.root]}, crls=[fresh, stale_other],
                       authorities=(*authority.chain, *other.chain))
    check = check_for(store)
    assert check.check_path((authority.issue(WEB).cert, *authority.chain, authority.root), NOW)


def test_a_resumed_session_is_refused_while_any_crl_is_stale(authority):
    store, _, leaf = setup(authority, NOW - 2 * HOUR)
    check = check_for(store)
    assert not check.check_resumed(leaf.cert, NOW)
    assert check.failure[0] == CRL_STALE


def test_the_store_precomputes_the_earliest_next_update(authority):
    store, _, _ = setup(authority, NOW + HOUR)
    assert store.crls_fresh_until == NOW + HOUR
    assert TrustStore({TD: [authority.root]}).crls_fresh_until is None


# --- rollback: a CRL never goes back (proxy.credentials.crl_rollbacks, run by every reload and sync) ---


def store_with(authority: Authority, crl) -> TrustStore:
    return TrustStore({TD: [authority.root]}, crls=[crl], authorities=authority.chain)


IDENTITY = IdentityConfig(Path("cert.pem"), Path("key.pem"), Path("bundle.pem"), CRL_FILE, None)


def test_a_crl_with_a_lower_number_than_the_one_in_force_is_refused_naming_both_numbers(authority):
    problems = crl_rollbacks(IDENTITY, store_with(authority, authority.crl(number=7)),
                             store_with(authority, authority.crl(number=5)))
    assert len(problems) == 1
    assert "CRL number 5, lower than number 7 already in force" in problems[0]
    assert str(CRL_FILE) in problems[0]


def test_the_same_number_with_other_content_is_refused(authority):
    problems = crl_rollbacks(IDENTITY, store_with(authority, authority.crl(number=7)),
                             store_with(authority, authority.crl((1234,), number=7)))
    assert len(problems) == 1 and "the number already in force, but different content" in problems[0]


def test_the_same_crl_again_or_a_newer_one_is_accepted(authority):
    crl = authority.crl(number=7)
    assert crl_rollbacks(IDENTITY, store_with(authority, crl), store_with(authority, crl)) == []
    assert crl_rollbacks(IDENTITY, store_with(authority, crl), store_with(authority, authority.crl(number=8))) == []


def test_a_new_ca_of_the_same_name_starts_its_own_numbering(authority):
    same_name = Authority.create()  # same names, other keys
    problems = crl_rollbacks(IDENTITY, store_with(authority, authority.crl(number=7)),
                             store_with(same_name, same_name.crl(number=1)))
    assert problems == []
