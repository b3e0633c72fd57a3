"""``proxy check -c FILE``: validate the config and the identity files it names, list every problem.

For ``check``, anything ``expiry_warnings`` reports (a certificate expiring within 24 h, or in the last
third of a shorter life) is a problem too: the point of running it is to catch what would break soon.
A CRL past its next update is judged as the sidecar's handshake judges it (``crl_verdicts``): a
problem when new handshakes would be refused ``crl_stale``, else a warning saying why they still pass.
"""

from __future__ import annotations

import resource
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from mtls.durations import format_duration, roughly
from proxy.capacity import (
    capacity_warnings,
    cgroup_memory_limit,
    descriptors_needed,
    memory_needed_kib,
)
from proxy.config import Config, ConfigError, IdentityConfig, load_config
from proxy.credentials import (
    CredentialError,
    Credentials,
    expiry_warnings,
    load_credentials,
)
from proxy.tls import CrlFreshness


def run_check(config_path: str | Path, *, now: datetime | None = None) -> tuple[bool, list[str]]:
    """(True, summary lines) when everything is valid, else (False, one line per problem).

    Identity files are checked even when other parts of the config are broken, as long as the
    ``identity`` section itself is valid, so one run reports config and file problems together.
    """
    now = now or datetime.now(timezone.utc)
    problems: list[str] = []
    config = None
    try:
        config = load_config(config_path)
        identity = config.identity
    except ConfigError as exc:
        problems.extend(exc.problems)
        identity = exc.identity
    creds = None
    crl_warnings: list[str] = []
    if identity is not None:
        try:
            creds = load_credentials(identity, config.trust_domains if config else (), now=now)
        except CredentialError as exc:
            problems.extend(exc.problems)
    if creds is not None:
        problems.extend(expiry_warnings(creds, now))
        crl_problems, crl_warnings = crl_verdicts(identity, creds, now)
        problems.extend(crl_problems)
        if config is not None:
            problems.extend(_rules_without_bundle(config, creds))
    if problems:
        return False, problems
    hard_open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # `proxy run` raises its soft limit to it
    warnings = capacity_warnings(config, hard_open_files, cgroup_memory_limit()) + crl_warnings
    warnings = [f"warning: {warning}" for warning in warnings]
    return True, _summary(config, creds, now, warnings)


def check_main(config_path: str | Path, out: TextIO, err: TextIO) -> int:
    """Run the check and print it: the summary on ``out`` (exit 0), or the problems on ``err`` (exit 1)."""
    ok, lines = run_check(config_path)
    if ok:
        for line in lines:
            print(line, file=out)
        return 0
    for line in lines:
        print(line, file=err)
    count = f"{len(lines)} problem" + ("s" if len(lines) != 1 else "")
    print(f"check failed: {count} with {config_path}", file=err)
    return 1


def crl_verdicts(identity: IdentityConfig, creds: Credentials, now: datetime) -> tuple[list[str], list[str]]:
    """(problems, warnings): what new handshakes through the issuer of each loaded CRL past its next
    update would get at ``now``, decided and worded as the sidecar's handshake does (``CrlFreshness``)."""
    freshness = CrlFreshness.of(identity)
    problems, warnings = [], []
    for issuer in creds.trust.issuer_crls:
        if not issuer.due_before(now):
            continue
        if not issuer.due_before(now - freshness.grace):
            due = issuer.next_update
            warnings.append(
                f"{identity.crl}: the CRL from '{issuer.issuer_name}' is past its next update (due at "
                f"{due:%Y-%m-%dT%H:%M:%SZ}, {roughly(now - due)} ago); within identity.crl_grace "
                f"({format_duration(identity.crl_grace)}) handshakes still pass until "
                f"{due + freshness.grace:%Y-%m-%dT%H:%M:%SZ}; deliver a fresh CRL (ca crl)"
            )
        elif freshness.refuse:
            problems.append(f"new handshakes would be refused crl_stale: {freshness.detail(issuer, now)}")
        else:
            warnings.append(
                "new handshakes would pass and be counted in sidecar_crl_stale_accepted_total (identity.crl_stale: "
                f"warn): {freshness.detail(issuer, now)}"
            )
    return problems, warnings


def _rules_without_bundle(config: Config, creds: Credentials) -> list[str]:
    """An allow/expect entry naming a trust domain with no bundle can never match: no peer of it verifies."""
    rule_sets = [(f"inbound {lst.name} allow", lst.allow) for lst in config.inbound]
    rule_sets += [(f"outbound {lst.name} expect", lst.expect) for lst in config.outbound]
    if config.egress:
        rule_sets += [(f"egress.allow[{rule.index}] expect", rule.expect) for rule in config.egress.allow if rule.expect]
    trusted = ", ".join(sorted(creds.bundles))
    return [
        f"{config.source}: {where} {pattern}: no bundle for trust domain {pattern.base.trust_domain} "
        f"(this sidecar trusts {trusted}); add it under trust_domains or remove the entry"
        for where, patterns in rule_sets
        for pattern in patterns
        if pattern.base.trust_domain not in creds.bundles
    ]


def _limits(config: Config) -> str:
    limits, hs = config.limits, config.limits.handshakes
    per_listener = f", at most {limits.per_listener} per listener" if limits.per_listener is not None else ""
    return (
        f"limits: {limits.max_connections} established connections{per_listener}; per inbound port "
        f"{hs.per_listener} handshakes, {hs.waiting} waiting, {hs.per_source} per source; with all of them "
        f"about {memory_needed_kib(config) // 1024} MiB and {descriptors_needed(config)} open files"
    )


def _summary(config: Config, creds: Credentials, now: datetime, warnings: list[str]) -> list[str]:
    identity = config.identity
    roots = len(creds.bundle)
    lines = [
        f"ok: {config.source}",
        f"identity: {creds.spiffe_id}",
        f"  certificate: {identity.cert} (serial {creds.leaf.serial_number:x}), valid until "
        f"{creds.not_after:%Y-%m-%dT%H:%M:%SZ} ({roughly(creds.not_after - now)} left)",
        f"  trust bundle: {identity.bundle} ({roots} root{'s' if roots != 1 else ''})",
    ]
    for domain in config.trust_domains:
        bundle = creds.bundles[domain.name]
        count = len(bundle.roots)
        source = f", kept current from {domain.endpoint}" if domain.endpoint else ""
        lines.append(
            f"  trust domain {domain.name}: {domain.bundle} ({bundle.format}, {count} root{'s' if count != 1 else ''}"
            f"{source})"
        )
    if identity.crl:
        revoked = len(creds.revoked_serials)
        lines.append(f"  crl: {identity.crl} ({revoked} revoked serial{'s' if revoked != 1 else ''})")
    if identity.renew:
        lines.append(f"  renew: from {identity.renew.url} at {identity.renew.at:.0%} of the lifetime")
    lines.append(_limits(config))
    lines += warnings
    for inbound in config.inbound:
        extras = " (audit: denials are logged, not enforced)" if inbound.mode == "audit" else ""
        extras += " (PROXY v2 header to the app)" if inbound.proxy_protocol else ""
        lines.append(
            f"inbound {inbound.name}: {inbound.listen} -> {inbound.forward}{extras}, allows "
            + ", ".join(str(pattern) for pattern in inbound.allow)
        )
    for outbound in config.outbound:
        sni = f" (SNI {outbound.server_name})" if outbound.server_name else ""
        lines.append(
            f"outbound {outbound.name}: {outbound.listen} -> {outbound.connect}{sni}, expects "
            + ", ".join(str(pattern) for pattern in outbound.expect)
        )
    if not config.inbound and not config.outbound:
        lines.append("no inbound or outbound listeners: all traffic is denied")
    if config.egress:
        egress = config.egress
        what = "logged as would_deny, let through (audit)" if egress.mode == "audit" else "reset"
        lines.append(f"egress: {egress.listen}, {len(egress.allow)} rule{'s' if len(egress.allow) != 1 else ''}; "
                     f"any other destination is {what}")
        lines += [f"  {rule}" for rule in egress.allow]
    if config.admin:
        lines.append(f"admin: {config.admin.listen}")
    return lines
