"""Prometheus metrics with the names of the contract, in a registry of our own."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter(
            "sidecar_connections", "Connections by final result (allowed|denied|error).",
            ["listener", "direction", "result"], registry=r,
        )
        self.denials = Counter(
            "sidecar_denials", "Refused or failed connections by reason code.",
            ["listener", "direction", "reason"], registry=r,
        )
        self.would_deny = Counter(
            "sidecar_audit_would_deny", "Connections an audit-mode listener let through but would have denied.",
            ["listener", "direction", "reason"], registry=r,
        )
        self.active = Gauge(
            "sidecar_active_connections", "Connections open now.", ["listener", "direction"], registry=r,
        )
        self.bytes = Counter(
            "sidecar_bytes", "Bytes relayed (in: from the TLS peer, out: to it), counted when a connection ends.",
            ["listener", "direction", "flow"], registry=r,
        )
        self.handshake_seconds = Histogram(
            "sidecar_handshake_seconds", "TLS handshake duration.", buckets=HANDSHAKE_BUCKETS, registry=r,
        )
        self.identity_expiry = Gauge(
            "sidecar_identity_expiry_timestamp_seconds", "Expiry (unix time) of the loaded identity certificate.", registry=r,
        )
        self.egress_denied = Counter(
            "sidecar_egress_denied", "App connections to destinations egress.allow does not admit, by cause "
            "(no_rule|sni_not_allowed|no_client_hello) and mode (enforce: reset; audit: let through).",
            ["cause", "mode"], registry=r,
        )
        self.crl_next_update = Gauge(
            "sidecar_crl_next_update_timestamp_seconds", "Next update (unix time) of the loaded CRL of each issuer.",
            ["issuer"], registry=r,
        )
        self.crl_stale_accepted = Counter(
            "sidecar_crl_stale_accepted", "Handshakes let through although a CRL of the peer's chain was past its "
            "next update plus identity.crl_grace (identity.crl_stale: warn).",
            ["listener", "direction"], registry=r,
        )
        self.trust_bundle_roots = Gauge(
            "sidecar_trust_bundle_roots", "Roots in the loaded bundle of each trusted trust domain.",
            ["trust_domain"], registry=r,
        )
        self.sync = Counter(
            "sidecar_sync", "Fetches of bundles and CRLs from their endpoints (identity.sync, trust_domains.*.endpoint) "
            "by result (updated|unchanged|failed|refused).", ["result"], registry=r,
        )
        self.handshakes_pending = Gauge(
            "sidecar_handshakes_pending", "Unauthenticated inbound connections now, by stage (waiting: no complete "
            "first TLS record yet; handshaking: an OpenSSL handshake in progress).", ["listener", "stage"], registry=r,
        )
        self.handshake_evictions = Counter(
            "sidecar_handshake_evictions", "Unauthenticated connections closed to make room for a newer one, by the "
            "budget that was full (per_source|waiting|per_listener, under limits.handshakes).",
            ["listener", "budget"], registry=r,
        )
        self.reloads = Counter("sidecar_reloads", "Reloads by result (ok|failed).", ["result"], registry=r)
        self.renewals = Counter("sidecar_renewals", "Certificate renewals by result (ok|failed).", ["result"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
