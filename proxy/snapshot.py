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
from mtls.trust import TrustStore, VerifyError
from proxy import policy
from proxy.config import Config, ConfigError, InboundConfig, OutboundConfig, load_config
from proxy.credentials import CredentialError, Credentials, load_credentials
from proxy.tls import (
    CrlFreshness,
    PeerCheck,
    TlsContexts,
    build_contexts,
    session_lifetime,
)

INBOUND = "inbound"
OUTBOUND = "outbound"
EGRESS = "egress"  # the egress listener's direction; its policies are keyed by rule (``egress.allow[2]``)


class StartupError(Exception):
    """The sidecar cannot start (or a reload cannot apply); ``problems`` lists every reason."""

    def __init__(self, problems: list[str], failed_bundles: Sequence[str] = ()):
        super().__init__("\n".join(problems))
        self.problems = problems
        self.failed_bundles = list(failed_bundles)  # the problems about trust bundle files, for /readyz


@dataclass(frozen=True)
class Changed:
    """What differs between a listener's rules before and after a reload, as far as ``refusal`` can tell:
    the policy (``rules``: allowlist and mode) and the bundles and CRLs (``trust``)."""

    rules: bool
    trust: bool


EVERYTHING_CHANGED = Changed(rules=True, trust=True)


def _same_function(first: Callable, second: Callable) -> bool:
    """The same function of the same arguments (an ``authorize`` is a partial of the listener's rules)."""
    if first is second:
        return True
    return (
        isinstance(first, partial) and isinstance(second, partial) and first.func is second.func
        and first.args == second.args and first.keywords == second.keywords
    )


def _same_verdicts(first: TrustStore, second: TrustStore) -> bool:
    """Whether ``revocations`` and ``check_vouched`` answer alike for every path: the same roots per
    trust domain and the same CRLs bound to the same issuers."""

    def bound(trust: TrustStore) -> dict:
        return {(found.trust_domain, found.signer_key): found.crls for found in trust.issuer_crls}

    return dict(first.bundles) == dict(second.bundles) and bound(first) == bound(second)


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
    crl_freshness: CrlFreshness = CrlFreshness()

    def peer_check(self) -> PeerCheck:
        """A fresh check for one handshake under these rules."""
        return PeerCheck(self.role, self.authorize, self.trust, audit=self.audit, crl_freshness=self.crl_freshness)

    def changed_since(self, earlier: ListenerPolicy | None) -> Changed:
        """Which of ``refusal``'s inputs differ from ``earlier`` (the rules that last allowed a
        connection; None: unknown). Unchanged parts need no second look on a reload."""
        if earlier is None or earlier.role != self.role:
            return EVERYTHING_CHANGED
        rules = not (earlier.audit == self.audit and _same_function(earlier.authorize, self.authorize))
        trust = not (earlier.trust is self.trust or _same_verdicts(earlier.trust, self.trust))
        return Changed(rules=rules, trust=trust)

    def refusal(
        self, peer_id: SpiffeId, serial: int, path: Sequence[x509.Certificate] | None,
        changed: Changed | None = None, decide: Callable[[SpiffeId], Decision] | None = None,
    ) -> str | None:
        """Why a peer authorized earlier is refused under these rules, or None if it still may talk.

        The handshake's checks that a reload can change, in the handshake's order: the CRLs of the
        issuers on the peer's verified ``path`` (``TrustStore.revocations``), then the policy, whose
        refusal audit mode only logs, then whether the bundle of the peer's trust domain still holds
        the root its path ends at (``TrustStore.check_vouched``). A resumed session has no path (the
        handshake skipped the certificate exchange): its leaf's ``serial`` is looked up in every CRL
        instead, and its trust domain must still have a bundle.

        ``changed`` (from ``changed_since``) skips the checks whose inputs are as they were when the
        peer was last allowed; ``decide`` stands for ``authorize`` (a reload passes one that
        remembers its answers). A check added here must have its inputs compared in ``changed_since``.
        """
        changed = changed or EVERYTHING_CHANGED
        if changed.trust:
            if path is not None:
                revoked = self.trust.revocations(path)
                if revoked and revoked[0].position > 0:  # a CA above the leaf
                    return f"peer {peer_id}: {revoked[0].detail}"
                leaf_revoked = bool(revoked)
            else:
                leaf_revoked = any(serial in found.serials for found in self.trust.issuer_crls)
            if leaf_revoked:
                return f"peer {peer_id} certificate serial {serial:x} is now on the CRL"
        if changed.rules:
            decision = (decide or self.authorize)(peer_id)
            if not (decision.allowed or self.audit):
                return "policy changed: " + decision.detail
        if not changed.trust:
            return None
        try:
            if path is not None:
                self.trust.check_vouched(peer_id, path)
            elif peer_id.trust_domain not in self.trust.bundles:
                self.trust.check_vouched(peer_id, ())  # raises "no bundle for trust domain ..." before using the path
        except VerifyError as exc:
            return f"peer {peer_id}: {exc.detail}"
        return None


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


def load_snapshot(config_path: Path, previous: Snapshot | None = None) -> Snapshot:
    """Load config, credentials and TLS contexts; raise StartupError listing every problem.

    ``previous`` (on a reload) is the snapshot in force: a bundle older than its own is refused."""
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
        creds = load_credentials(
            config.identity, config.trust_domains, previous=previous.creds if previous is not None else None
        )
    except CredentialError as exc:
        raise StartupError(list(exc.problems), exc.failed_bundles) from None
    lifetime = 0
    if config.tls.session_resumption:
        lifetime = session_lifetime(creds, config.tls.session_lifetime, datetime.now(timezone.utc))
    try:
        contexts = build_contexts(creds, lifetime)
    except Exception as exc:  # OpenSSL refusing a key or certificate we already validated
        raise StartupError([f"{config.identity.cert}: TLS setup failed: {exc}"]) from None
    freshness = CrlFreshness.of(config.identity)
    policies = {
        (INBOUND, lst.name): ListenerPolicy(
            CLIENT, partial(policy.authorize_client, lst.name, lst.allow), creds.trust, audit=lst.mode == "audit",
            crl_freshness=freshness,
        )
        for lst in config.inbound
    } | {
        (OUTBOUND, lst.name): ListenerPolicy(
            SERVER, partial(policy.authorize_server, lst.name, lst.expect), creds.trust, audit=False,
            crl_freshness=freshness,
        )
        for lst in config.outbound
    } | {
        (EGRESS, rule.label): ListenerPolicy(
            SERVER, partial(policy.authorize_server, rule.label, rule.expect), creds.trust, audit=False,
            crl_freshness=freshness,
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
