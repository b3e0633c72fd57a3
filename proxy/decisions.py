"""The decision log: one line and the matching metrics for each thing that happens to a connection.

Every connection ends in exactly one ``conn_denied`` (refused before any byte was relayed) or
``conn_closed`` (after ``conn_allowed``, when the relay ends). All of them name the connection the
same way, from its ``Conn``: ``peer_addr`` is always the remote end (the TLS client inbound, the
upstream the sidecar connected to outbound), ``app_addr`` the local app's end (outbound only).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from mtls import reasons
from mtls.events import EventLog
from mtls.reasons import Decision
from mtls.spiffe import SpiffeId
from mtls.trust import claimed_uri
from proxy.metrics import Metrics
from proxy.relay import Link

# Refusals of a certificate whose claim we log, unverified: who it said it was, its serial, its issuer.
_CLAIM_REASONS = {reasons.REVOKED, reasons.UNTRUSTED_CA, reasons.EXPIRED, reasons.NOT_YET_VALID, reasons.CRL_STALE}
# Results for sidecar_connections_total: refusals by identity or policy are "denied", the rest "error".
_ERROR_REASONS = {reasons.HANDSHAKE_TIMEOUT, reasons.HANDSHAKE_FAILED, reasons.UPSTREAM_UNREACHABLE}
RESET = "reset"  # a closing reason of our own: either side broke the connection (logged with reason null)


@dataclass(frozen=True, slots=True)
class Conn:
    """One connection as its decision lines name it.

    ``peer_addr`` is None while an outbound connection has no upstream yet; ``app_addr`` is None
    inbound (the app is the listener's ``forward``). ``extra`` are more fields every line of this
    connection carries (egress: the destination's DNS name, the SNI, the admitting rule).
    """

    listener: str
    direction: str
    peer_addr: str | None
    app_addr: str | None = None
    extra: tuple[tuple[str, str | None], ...] = ()


def _names(conn: Conn, peer_id: SpiffeId | None) -> dict:
    """The fields that say which connection a line is about, in the order every line has them
    (``app_addr`` only where there is one: inbound lines leave it out)."""
    names = {
        "listener": conn.listener, "direction": conn.direction, "peer_id": str(peer_id) if peer_id else None,
        "peer_addr": conn.peer_addr,
    }
    if conn.app_addr is not None:
        names["app_addr"] = conn.app_addr
    names.update(conn.extra)
    return names


def _claim(leaf: x509.Certificate) -> dict:
    """What a refused certificate says about itself, none of it verified."""
    return {
        "claimed_id": claimed_uri(leaf), "claimed_serial": f"{leaf.serial_number:x}",
        "claimed_issuer": leaf.issuer.rfc4514_string(),
    }


class DecisionLog:
    """Writes decision lines to ``log`` and counts them in ``metrics``."""

    def __init__(self, log: EventLog, metrics: Metrics):
        self.log = log
        self.metrics = metrics

    def denied(
        self, conn: Conn, reason: str, detail: str, *, peer_id: SpiffeId | None = None, duration: float | None = None,
        leaf: x509.Certificate | None = None,
    ) -> None:
        """Refused before relaying: by identity or policy (``denied``) or by a failure (``error``).

        ``leaf`` is the peer's certificate as presented: for a refusal of the certificate itself
        (revoked, untrusted_ca, expired, not_yet_valid, crl_stale) with no verified ``peer_id``, the
        line carries what it claims, as ``claimed_id`` (unverified), ``claimed_serial`` and
        ``claimed_issuer``, so that an incident can be traced to whoever holds that certificate."""
        result = "error" if reason in _ERROR_REASONS else "denied"
        self.metrics.connections.labels(conn.listener, conn.direction, result).inc()
        self.metrics.denials.labels(conn.listener, conn.direction, reason).inc()
        claim = _claim(leaf) if leaf is not None and peer_id is None and reason in _CLAIM_REASONS else {}
        self.log.emit(
            "warning", "conn_denied", **_names(conn, peer_id), **claim, reason=reason, detail=detail,
            bytes_in=0, bytes_out=0, duration_s=None if duration is None else round(duration, 6),
        )

    def would_deny(self, conn: Conn, peer_id: SpiffeId, decision: Decision) -> None:
        """An audit-mode listener lets through a peer its policy refuses."""
        self.metrics.would_deny.labels(conn.listener, conn.direction, decision.reason).inc()
        self.log.emit(
            "warning", "would_deny", **_names(conn, peer_id), reason=decision.reason,
            detail=f"audit mode lets this through: {decision.detail}",
        )

    def allowed(self, conn: Conn, peer_id: SpiffeId, decision: Decision | None, *, resumed: bool) -> None:
        """Authorized; relaying starts. An audit-mode refusal is logged as ``would_deny`` first."""
        self.metrics.connections.labels(conn.listener, conn.direction, "allowed").inc()
        if decision is not None and not decision.allowed:
            self.would_deny(conn, peer_id, decision)
        if self.log.enabled("info"):
            self.log.emit(
                "info", "conn_allowed", **_names(conn, peer_id), reason=None,
                detail=(decision.detail if decision is not None else "") + (" (resumed TLS session)" if resumed else ""),
            )

    def closed(
        self, conn: Conn, peer_id: SpiffeId | None, link: Link, duration: float, reason: str | None, detail: str | None
    ) -> None:
        """The relay ended: normally (``reason`` None), by a ``RESET``, or for a reason code."""
        m = self.metrics
        m.bytes.labels(conn.listener, conn.direction, "in").inc(link.bytes_in)
        m.bytes.labels(conn.listener, conn.direction, "out").inc(link.bytes_out)
        if reason is not None and reason != RESET:
            m.denials.labels(conn.listener, conn.direction, reason).inc()
        level = "info" if reason in (None, RESET) else "warning"
        self.log.emit(
            level, "conn_closed", **_names(conn, peer_id), reason=reason if reason != RESET else None,
            detail=detail, bytes_in=link.bytes_in, bytes_out=link.bytes_out, duration_s=round(duration, 6),
        )
