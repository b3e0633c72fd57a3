"""The snapshot: everything a new connection needs, loaded as one immutable value.

A ``Snapshot`` holds the config, the credentials, the TLS contexts built from them and each
listener's policy. ``load_snapshot`` reads all of it or raises ``StartupError`` listing every
problem, so a reload either has a complete new snapshot to swap in or keeps the old one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from cryptography import x509

from mtls.reasons import Decision
from mtls.spiffe import CLIENT, SERVER, SpiffeId
from mtls.trust import TrustStore
from proxy import policy
from proxy.config import Config, ConfigError, InboundConfig, OutboundConfig, load_config
from proxy.credentials import CredentialError, Credentials, load_credentials
from proxy.tls import PeerCheck, TlsContexts, build_contexts, session_lifetime

INBOUND = "inbound"
OUTBOUND = "outbound"
EGRESS = "egress"  # the egress listener's direction; its policies are keyed by rule (``egress.allow[2]``)


class StartupError(Exception):
    """The sidecar cannot start (or a reload cannot apply); ``problems`` lists every reason."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ListenerPolicy:
    """Who may use one listener: the rules the handshake applies and every reload applies again.

    ``role`` is what the peer is to us (CLIENT inbound, SERVER outbound); ``trust`` holds the
    bundles and CRLs; ``audit`` lets a peer the policy refuses through, logged as ``would_deny``
    (inbound ``mode: audit``).
    """

    role: str
    authorize: Callable[[SpiffeId], Decision]
    trust: TrustStore
    audit: bool

    def peer_check(self) -> PeerCheck:
        """A fresh check for one handshake under these rules."""
        return PeerCheck(self.role, self.authorize, self.trust, audit=self.audit)

    def refusal(
        self, peer_id: SpiffeId, serial: int, path: Sequence[x509.Certificate] | None
    ) -> str | None:
        """Why a peer authorized earlier is refused under these rules, or None if it still may talk.

        The handshake's checks that a reload can change, in the handshake's order: the CRLs of the
        issuers on the peer's verified ``path`` (``TrustStore.revocations``), then the policy, whose
        refusal audit mode only logs. A resumed session has no path (the handshake skipped the
        certificate exchange): its leaf's ``serial`` is looked up in every CRL instead.
        """
        if path is not None:
            revoked = self.trust.revocations(path)
            if revoked and revoked[0].position > 0:  # a CA above the leaf
                return f"peer {peer_id}: {revoked[0].detail}"
            leaf_revoked = bool(revoked)
        else:
            leaf_revoked = serial in self.trust.revoked_serials
        if leaf_revoked:
            return f"peer {peer_id} certificate serial {serial:x} is now on the CRL"
        decision = self.authorize(peer_id)
        if decision.allowed or self.audit:
            return None
        return "policy changed: " + decision.detail


@dataclass(frozen=True)
class Snapshot:
    """One consistent state of config, identity and policy. Never changed: a reload loads a new one
    and the sidecar swaps its reference; open connections keep the one they were accepted with."""

    config: Config
    creds: Credentials
    contexts: TlsContexts
    inbound: dict[str, InboundConfig]
    outbound: dict[str, OutboundConfig]
    policies: dict[tuple[str, str], ListenerPolicy]  # (direction, listener name) -> its policy

    def policy(self, direction: str, listener: str) -> ListenerPolicy:
        return self.policies[direction, listener]


def load_snapshot(config_path: Path) -> Snapshot:
    """Load config, credentials and TLS contexts; raise StartupError listing every problem."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        problems = list(exc.problems)
        if exc.identity is not None:  # that section is valid: list its files' problems too, as `proxy check` does
            try:
                load_credentials(exc.identity)
            except CredentialError as cred_exc:
                problems.extend(cred_exc.problems)
        raise StartupError(problems) from None
    try:
        creds = load_credentials(config.identity)
    except CredentialError as exc:
        raise StartupError(list(exc.problems)) from None
    lifetime = 0
    if config.tls.session_resumption:
        lifetime = session_lifetime(creds, config.tls.session_lifetime, datetime.now(timezone.utc))
    try:
        contexts = build_contexts(creds, lifetime)
    except Exception as exc:  # OpenSSL refusing a key or certificate we already validated
        raise StartupError([f"{config.identity.cert}: TLS setup failed: {exc}"]) from None
    policies = {
        (INBOUND, lst.name): ListenerPolicy(
            CLIENT, partial(policy.authorize_client, lst.name, lst.allow), creds.trust, audit=lst.mode == "audit"
        )
        for lst in config.inbound
    } | {
        (OUTBOUND, lst.name): ListenerPolicy(
            SERVER, partial(policy.authorize_server, lst.name, lst.expect), creds.trust, audit=False
        )
        for lst in config.outbound
    } | {
        (EGRESS, rule.label): ListenerPolicy(
            SERVER, partial(policy.authorize_server, rule.label, rule.expect), creds.trust, audit=False
        )
        for rule in (config.egress.allow if config.egress else ()) if rule.expect
    }
    return Snapshot(
        config=config,
        creds=creds,
        contexts=contexts,
        inbound={lst.name: lst for lst in config.inbound},
        outbound={lst.name: lst for lst in config.outbound},
        policies=policies,
    )
