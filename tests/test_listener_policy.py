"""ListenerPolicy.refusal: the check a reload applies again to every open connection."""

from __future__ import annotations

from functools import partial

from support.certs import TD, WEB, Authority

from mtls.spiffe import CLIENT, SERVER, PatternSet, parse_pattern, parse_spiffe_id
from mtls.trust import TrustStore
from proxy import policy
from proxy.snapshot import ListenerPolicy

WEB_ID = parse_spiffe_id(WEB)
API_ID = parse_spiffe_id(f"spiffe://{TD}/ns/prod/sa/api")


def trust_store(authority: Authority, *revoked: int) -> TrustStore:
    crls = [authority.crl(revoked)] if revoked else []
    return TrustStore({TD: [authority.root]}, crls=crls, authorities=[authority.intermediate])


def inbound(allow: str, trust: TrustStore, *, audit=False) -> ListenerPolicy:
    rules = PatternSet([parse_pattern(allow)])
    return ListenerPolicy(CLIENT, partial(policy.authorize_client, "api", rules), trust, audit)


def test_keeps_a_peer_the_rules_still_allow(authority):
    leaf = authority.issue(WEB).cert
    path = (leaf, authority.intermediate, authority.root)
    assert inbound(WEB, trust_store(authority)).refusal(WEB_ID, leaf.serial_number, path) is None


def test_refuses_a_peer_the_new_allowlist_no_longer_names(authority):
    detail = inbound(f"spiffe://{TD}/ns/ops/*", trust_store(authority)).refusal(WEB_ID, 0x10, None)
    assert detail == f"policy changed: port api allows spiffe://{TD}/ns/ops/*; peer is {WEB}"


def test_audit_mode_keeps_a_peer_the_policy_refuses(authority):
    assert inbound(f"spiffe://{TD}/ns/ops/*", trust_store(authority), audit=True).refusal(WEB_ID, 0x10, None) is None


def test_a_leaf_its_issuer_now_revokes_is_refused_first_even_in_audit_mode(authority):
    leaf = authority.issue(WEB).cert
    path = (leaf, authority.intermediate, authority.root)
    rules = inbound(f"spiffe://{TD}/ns/ops/*", trust_store(authority, leaf.serial_number), audit=True)
    assert rules.refusal(WEB_ID, leaf.serial_number, path) == (
        f"peer {WEB} certificate serial {leaf.serial_number:x} is now on the CRL"
    )


def test_a_revoked_ca_above_the_leaf_is_named(authority):
    sub = authority.sub_authority()
    leaf = sub.issue(WEB).cert
    path = (leaf, sub.intermediate, authority.intermediate, authority.root)
    trust = TrustStore({TD: [authority.root]}, crls=[authority.crl((sub.intermediate.serial_number,))],
                       authorities=[authority.intermediate])
    detail = inbound(WEB, trust).refusal(WEB_ID, leaf.serial_number, path)
    assert detail.startswith(f"peer {WEB}: ") and "Sub-intermediate CA" in detail and "revoked" in detail, detail


def test_a_resumed_session_without_a_path_is_checked_by_its_leaf_serial(authority):
    rules = inbound(WEB, trust_store(authority, 0x10))
    assert rules.refusal(WEB_ID, 0x10, None) == f"peer {WEB} certificate serial 10 is now on the CRL"
    assert rules.refusal(WEB_ID, 0x11, None) is None


def test_refuses_an_upstream_the_listener_no_longer_expects(authority):
    rules = PatternSet([parse_pattern(WEB)])
    expecting_web = ListenerPolicy(SERVER, partial(policy.authorize_server, "api", rules), trust_store(authority), False)
    assert expecting_web.refusal(API_ID, 0x20, None) == (
        f"policy changed: upstream api expects {WEB}; server is {API_ID}"
    )
