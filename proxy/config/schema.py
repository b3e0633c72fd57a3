"""The sidecar's config schema: which sections and keys exist, what each may hold, and rules across them.

Every section is read by one function ``(reader, node, key path) -> value or None`` built on the
generic ``yamlreader``; ``SECTIONS`` lists them in reading order. A Config is returned only when no
problem was recorded; otherwise ConfigError lists them all, sorted by line.

Adding a section: its frozen dataclass in ``model.py`` and a field of the same name on ``Config``,
a reader function here, and one line in ``SECTIONS``.

Rules of this schema: relative file paths under ``identity`` are resolved against the config file's
directory. Port 0 is accepted for ``listen`` (the OS picks a free port; tests rely on it) but not for
addresses we connect to. Listener names are unique across inbound and outbound, and no two
listeners (admin included) may bind the same port.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from yaml.nodes import MappingNode, Node, SequenceNode

from mtls.bundles import is_trust_domain
from mtls.endpoints import Endpoint, is_dns_name, parse_endpoint
from mtls.spiffe import InvalidSpiffeId, parse_spiffe_id
from proxy.config.model import (
    CRL_STALE_MODES,
    DEFAULT_CRL_GRACE,
    DEFAULT_RENEW_AT,
    DEFAULT_SYNC_EVERY,
    AdminConfig,
    Config,
    ConfigError,
    EgressConfig,
    HandshakeLimits,
    IdentityConfig,
    InboundConfig,
    Limits,
    LogConfig,
    OutboundConfig,
    RenewConfig,
    SyncConfig,
    Timeouts,
    TlsConfig,
    TrustDomainConfig,
)
from proxy.config.yamlreader import (
    DocumentError,
    Fields,
    Reader,
    compose,
    describe,
    join,
    line_of,
    read_document,
    value_of,
    written_scalar,
    written_text,
)
from proxy.egress_rules import EgressRule, parse_destination, parse_server_name

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
MODES = ("enforce", "audit")
LISTENER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


# --- entry points -----------------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem."""
    source = Path(path)
    try:
        text = read_document(source)
    except DocumentError as exc:
        raise ConfigError([str(exc)]) from None
    return parse_config(text, source)


def parse_config(text: str, source: Path) -> Config:
    """Validate config text; ``source`` names the file in messages and anchors relative paths."""
    source = Path(source)
    label = str(source)
    try:
        root = compose(text, label)
    except DocumentError as exc:
        raise ConfigError([str(exc)]) from None
    if root is None:
        raise ConfigError([f"{label}:1: the file has no settings; it needs at least an 'identity' section"])
    if not isinstance(root, MappingNode):
        raise ConfigError(
            [f"{label}:{line_of(root)}: the top level must be a mapping of sections "
             f"(identity, inbound, outbound, ...), got {describe(root)}"]
        )
    return _read_config(Reader(label, source.absolute().parent), root, source)


def _read_config(r: Reader, root: MappingNode, source: Path) -> Config:
    required = tuple(key for key, section in SECTIONS.items() if section.required)
    optional = tuple(key for key, section in SECTIONS.items() if not section.required)
    fields = r.mapping(root, "", required=required, optional=optional)
    assert fields is not None  # root is a mapping
    values = {key: fields.read(key, partial(section.read, r), section.absent) for key, section in SECTIONS.items()}
    for check in CROSS_CHECKS:
        check(r, fields)
    problems = r.problems()
    if problems:
        # read_identity returns None whenever it recorded a problem, so this is the identity only if valid
        raise ConfigError(problems, identity=values["identity"])
    return Config(**values, source=source)


# --- identity ---------------------------------------------------------------------------------


def read_identity(r: Reader, node: Node, path: str) -> IdentityConfig | None:
    start = r.checkpoint()
    fields = r.mapping(
        node, path, required=("cert", "key", "bundle"), optional=("crl", "renew", "crl_stale", "crl_grace", "sync")
    )
    if fields is None:
        return None
    files = {key: fields.read(key, r.file_path) for key in ("cert", "key", "bundle", "crl") if key in fields}
    renew = fields.read("renew", partial(_read_renew, r))
    crl_stale = fields.read("crl_stale", partial(r.choice, allowed=CRL_STALE_MODES), "refuse")
    crl_grace = fields.read("crl_grace", r.duration, DEFAULT_CRL_GRACE)
    sync = fields.read("sync", partial(_read_sync, r))
    if r.failed_since(start):
        return None
    return IdentityConfig(
        files["cert"], files["key"], files["bundle"], files.get("crl"), renew, crl_stale=crl_stale, crl_grace=crl_grace,
        sync=sync,
    )


def _read_sync(r: Reader, node: Node, path: str) -> SyncConfig | None:
    start = r.checkpoint()
    fields = r.mapping(node, path, required=("url",), optional=("every",))
    if fields is None or "url" not in fields:
        return None
    url = fields.read("url", partial(_service_url, r, "the CA service is authenticated by its SPIFFE ID over TLS"))
    every = fields.read("every", partial(_interval, r), DEFAULT_SYNC_EVERY)
    if r.failed_since(start):
        return None
    return SyncConfig(url, every)


def _service_url(r: Reader, why: str, node: Node, path: str) -> str | None:
    url = r.text(node, path)
    if url is not None and not _is_https_url(url):
        r.problem(node, path, f"{url!r} is not an https:// URL ({why})")
        return None
    return url


def _interval(r: Reader, node: Node, path: str) -> float | None:
    every = r.duration(node, path)
    if every is not None and every < 1:
        r.problem(node, path, f"{node.value} is too short; fetch at most once a second (e.g. 1m)")
        return None
    return every


# --- trust domains ----------------------------------------------------------------------------


def read_trust_domains(r: Reader, node: Node, path: str) -> tuple[TrustDomainConfig, ...] | None:
    """``trust_domains: {TD: {bundle: FILE, endpoint: URL, endpoint_id: ID, every: DURATION}}``."""
    if not isinstance(node, MappingNode):
        r.problem(node, path, f"expected a mapping of trust domain -> {{bundle: FILE}}, got {describe(node)}")
        return None
    start = r.checkpoint()
    found = []
    for key_node, value_node in node.value:
        name = written_scalar(key_node)
        key_path = join(path, str(name))
        if name is None or not is_trust_domain(name):
            r.problem(key_node, key_path, f"{name!r} is not a trust domain name (e.g. partner.org)")
            continue
        if any(other.name == name for other in found):
            r.problem(key_node, key_path, "duplicate trust domain")
            continue
        found.append(_read_trust_domain(r, name, value_node, key_path))
    if r.failed_since(start) or None in found:
        return None
    return tuple(found)


def _read_trust_domain(r: Reader, name: str, node: Node, path: str) -> TrustDomainConfig | None:
    start = r.checkpoint()
    fields = r.mapping(node, path, required=("bundle",), optional=("endpoint", "endpoint_id", "every"))
    if fields is None:
        return None
    bundle = fields.read("bundle", r.file_path)
    endpoint = fields.read("endpoint", partial(_service_url, r, "the https_spiffe profile authenticates it"))
    endpoint_id = fields.read("endpoint_id", partial(_endpoint_id, r, name))
    every = fields.read("every", partial(_interval, r))
    if endpoint is None and (endpoint_id is not None or every is not None) and not r.failed_since(start):
        r.problem(node, path, "endpoint_id and every go with endpoint (the URL the bundle is fetched from)")
    if r.failed_since(start):
        return None
    return TrustDomainConfig(name, bundle, endpoint, endpoint_id, every)


def _endpoint_id(r: Reader, trust_domain: str, node: Node, path: str) -> str | None:
    text = r.text(node, path)
    if text is None:
        return None
    try:
        spiffe_id = parse_spiffe_id(text)
    except InvalidSpiffeId as exc:
        r.problem(node, path, str(exc))
        return None
    if spiffe_id.trust_domain != trust_domain:
        r.problem(node, path, f"{text} is not in trust domain {trust_domain}, whose bundle the endpoint serves")
        return None
    return text


def _read_renew(r: Reader, node: Node, path: str) -> RenewConfig | None:
    start = r.checkpoint()
    fields = r.mapping(node, path, required=("url",), optional=("at",))
    if fields is None or "url" not in fields:
        return None
    url = fields.read("url", partial(_https_url, r))
    at = fields.read("at", partial(_renew_at, r), DEFAULT_RENEW_AT)
    if r.failed_since(start):
        return None
    return RenewConfig(url, at)


def _https_url(r: Reader, node: Node, path: str) -> str | None:
    url = r.text(node, path)
    if url is not None and not _is_https_url(url):
        r.problem(node, path, f"{url!r} is not an https:// URL (renewal authenticates over mTLS)")
        return None
    return url


def _is_https_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme == "https" and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed '[' in the host
        return False


def _renew_at(r: Reader, node: Node, path: str) -> float | None:
    at = r.number(node, path)
    if at is not None and not 0 < at < 1:
        r.problem(node, path, f"{node.value} is not between 0 and 1 (exclusive): it is the fraction "
                              "of the certificate lifetime after which to renew, e.g. 0.66")
        return None
    return at


# --- listeners --------------------------------------------------------------------------------


def read_inbound(r: Reader, node: Node, path: str) -> tuple[InboundConfig, ...]:
    return r.each(node, path, partial(_read_inbound_listener, r))


def read_outbound(r: Reader, node: Node, path: str) -> tuple[OutboundConfig, ...]:
    return r.each(node, path, partial(_read_outbound_listener, r))


def _read_inbound_listener(r: Reader, node: Node, path: str) -> InboundConfig | None:
    start = r.checkpoint()
    fields = r.mapping(node, path, required=("name", "listen", "forward", "allow"),
                       optional=("mode", "proxy_protocol"))
    if fields is None:
        return None
    name = fields.read("name", partial(_listener_name, r))
    listen = fields.read("listen", r.endpoint)
    forward = fields.read("forward", partial(_destination, r, unix=True))
    allow = fields.read("allow", r.patterns)
    mode = fields.read("mode", partial(r.choice, allowed=MODES), "enforce")
    proxy_protocol = fields.read("proxy_protocol", r.boolean, False)
    if r.failed_since(start):
        return None
    return InboundConfig(name, listen, forward, allow, mode, proxy_protocol)


def _read_outbound_listener(r: Reader, node: Node, path: str) -> OutboundConfig | None:
    start = r.checkpoint()
    fields = r.mapping(node, path, required=("name", "listen", "connect", "expect"), optional=("server_name",))
    if fields is None:
        return None
    name = fields.read("name", partial(_listener_name, r))
    listen = fields.read("listen", partial(_loopback_listen, r))
    connect = fields.read("connect", partial(_destination, r))
    expect = fields.read("expect", r.patterns)
    server_name = fields.read("server_name", partial(_server_name, r))
    if r.failed_since(start):
        return None
    return OutboundConfig(name, listen, connect, expect, server_name)


def _listener_name(r: Reader, node: Node, path: str) -> str | None:
    name = r.text(node, path)
    if name is not None and not LISTENER_NAME.fullmatch(name):
        r.problem(node, path,
                  f"{name!r} is not a valid name: use lower-case letters, digits, '_', '.' and '-', "
                  "starting with a letter or digit (it becomes a metric label)")
        return None
    return name


def _loopback_listen(r: Reader, node: Node, path: str) -> Endpoint | None:
    listen = r.endpoint(node, path)
    if listen is not None and not ipaddress.ip_address(listen.host).is_loopback:
        r.problem(node, path,
                  f"{str(listen)!r} is not a loopback address: the app connects here in plaintext and "
                  "the sidecar adds our identity, so anyone who can reach this port could use our "
                  "identity; listen on 127.0.0.1 or [::1]")
        return None
    return listen


def _destination(r: Reader, node: Node, path: str, *, unix: bool = False) -> Endpoint | None:
    """An address the sidecar connects to: host names allowed, port 0 not."""
    endpoint = r.endpoint(node, path, unix=unix, hostname=True)
    if endpoint is not None and endpoint.kind == "tcp" and endpoint.port == 0:
        r.problem(node, path, f"{str(endpoint)!r}: port 0 cannot be connected to")
        return None
    return endpoint


def _server_name(r: Reader, node: Node, path: str) -> str | None:
    name = r.text(node, path)
    if name is not None and not is_dns_name(name):
        r.problem(node, path, f"{name!r} is not a DNS name (SNI cannot carry an IP address)")
        return None
    return name


# --- admin, timeouts, limits, log, tls --------------------------------------------------------


def read_admin(r: Reader, node: Node, path: str) -> AdminConfig | None:
    fields = r.mapping(node, path, required=("listen",))
    if fields is None or "listen" not in fields:
        return None
    listen = fields.read("listen", r.endpoint)
    return AdminConfig(listen) if listen is not None else None


def read_timeouts(r: Reader, node: Node, path: str) -> Timeouts | None:
    fields = r.mapping(node, path, optional=("handshake", "connect", "idle", "drain"))
    if fields is None:
        return None
    values = {key: fields.read(key, r.duration) for key in fields}
    return None if None in values.values() else Timeouts(**values)


def read_limits(r: Reader, node: Node, path: str) -> Limits | None:
    start = r.checkpoint()
    fields = r.mapping(node, path, optional=("max_connections", "per_listener", "handshakes"))
    if fields is None:
        return None
    count = partial(_connection_count, r)
    max_connections = fields.read("max_connections", count, Limits.max_connections)
    per_listener = fields.read("per_listener", count)
    handshakes = fields.read("handshakes", partial(_read_handshake_limits, r), HandshakeLimits())
    if r.failed_since(start):
        return None
    return Limits(max_connections, per_listener, handshakes)


def _read_handshake_limits(r: Reader, node: Node, path: str) -> HandshakeLimits | None:
    start = r.checkpoint()
    fields = r.mapping(node, path, optional=("per_listener", "per_source", "waiting"))
    if fields is None:
        return None
    count = partial(_connection_count, r)
    values = {key: fields.read(key, count, getattr(HandshakeLimits, key)) for key in ("per_listener", "per_source",
                                                                                        "waiting")}
    if r.failed_since(start):
        return None
    return HandshakeLimits(**values)


def _connection_count(r: Reader, node: Node, path: str) -> int | None:
    value = r.integer(node, path)
    if value is not None and value < 1:
        r.problem(node, path, f"{value} is not a positive number of connections")
        return None
    return value


def read_log(r: Reader, node: Node, path: str) -> LogConfig | None:
    fields = r.mapping(node, path, optional=("level", "format"))
    if fields is None:
        return None
    level = fields.read("level", partial(r.choice, allowed=LOG_LEVELS), LogConfig.level)
    form = fields.read("format", partial(r.choice, allowed=LOG_FORMATS), LogConfig.format)
    return LogConfig(level, form) if level and form else None


def read_tls(r: Reader, node: Node, path: str) -> TlsConfig | None:
    fields = r.mapping(node, path, optional=("session_resumption", "session_lifetime"))
    if fields is None:
        return None
    resumption = fields.read("session_resumption", r.boolean, TlsConfig.session_resumption)
    lifetime = fields.read("session_lifetime", r.duration, TlsConfig.session_lifetime)
    if resumption is None or lifetime is None:
        return None
    return TlsConfig(resumption, lifetime)


# --- egress -----------------------------------------------------------------------------------


def read_egress(r: Reader, node: Node, path: str) -> EgressConfig | None:
    start = r.checkpoint()
    fields = r.mapping(node, path, required=("listen",), optional=("mode", "allow"))
    if fields is None:
        return None
    listen = fields.read("listen", partial(_loopback_listen, r))
    mode = fields.read("mode", partial(r.choice, allowed=MODES), "enforce")
    allow = fields.read("allow", partial(_read_egress_rules, r), ())
    if r.failed_since(start):
        return None
    return EgressConfig(listen, mode, allow)


def _read_egress_rules(r: Reader, node: Node, path: str) -> tuple[EgressRule, ...] | None:
    items = r.sequence(node, path)
    if items is None:
        return None
    rules = [_read_egress_rule(r, index, item, item_path) for index, (item_path, item) in enumerate(items)]
    return tuple(rules) if None not in rules else None


def _read_egress_rule(r: Reader, index: int, node: Node, path: str) -> EgressRule | None:
    start = r.checkpoint()
    fields = r.mapping(node, path, required=("to",), optional=("expect", "sni"))
    if fields is None:
        return None
    to = fields.read("to", partial(_parsed, r, parse_destination))
    expect = fields.read("expect", r.patterns)
    sni = fields.read("sni", partial(_server_names, r), ())
    if expect and sni:
        r.problem(node, path, "a rule takes 'expect' (the sidecar speaks mTLS for the app) or 'sni' (the app's "
                              "own TLS passes through), not both; write two rules")
    if r.failed_since(start):
        return None
    return EgressRule(index, to, expect, sni)


def _parsed(r: Reader, parse: Callable[[str], object], node: Node, path: str):
    text = r.text(node, path)
    if text is None:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        r.problem(node, path, str(exc))
        return None


def _server_names(r: Reader, node: Node, path: str) -> tuple[str, ...] | None:
    items = r.sequence(node, path)
    if items is None:
        return None
    if not items:
        r.problem(node, path, "must list at least one server name; an empty list allows nothing")
        return None
    names = [_parsed(r, parse_server_name, item, item_path) for item_path, item in items]
    return tuple(names) if None not in names else None


# --- the sections, in reading order -----------------------------------------------------------


@dataclass(frozen=True)
class Section:
    read: Callable[[Reader, Node, str], object]  # returns None after recording a problem
    absent: object = None  # the value when the file leaves the section out (or sets it to null)
    required: bool = False


SECTIONS: dict[str, Section] = {
    "identity": Section(read_identity, required=True),
    "inbound": Section(read_inbound, absent=()),
    "outbound": Section(read_outbound, absent=()),
    "admin": Section(read_admin),
    "timeouts": Section(read_timeouts, absent=Timeouts()),
    "limits": Section(read_limits, absent=Limits()),
    "log": Section(read_log, absent=LogConfig()),
    "tls": Section(read_tls, absent=TlsConfig()),
    "egress": Section(read_egress),
    "trust_domains": Section(read_trust_domains, absent=()),
}


# --- rules across sections --------------------------------------------------------------------
# These look at the raw nodes, so a listener broken elsewhere still takes part; a value that does
# not parse is skipped here, its own problem is reported where it is read.


def check_unique_names(r: Reader, fields: Fields) -> None:
    first: dict[str, tuple[str, Node]] = {}
    for path, listener in _listener_nodes(fields):
        node = value_of(listener, "name")
        name = written_scalar(node)
        if name is None:
            continue
        if name == "egress" and fields.node("egress") is not None:
            r.problem(node, f"{path}.name", "'egress' is the egress listener's name; choose another")
        elif name in first:
            other_path, other_node = first[name]
            r.problem(node, f"{path}.name",
                      f"{name!r} is already used by {other_path} (line {line_of(other_node)}); "
                      "listener names must be unique across inbound and outbound")
        else:
            first[name] = (path, node)


def check_listen_conflicts(r: Reader, fields: Fields) -> None:
    listens = [(f"{path}.listen", value_of(listener, "listen")) for path, listener in _listener_nodes(fields)]
    for section in ("admin", "egress"):
        node = fields.node(section)
        if isinstance(node, MappingNode):
            listens.append((f"{section}.listen", value_of(node, "listen")))
    bound: list[tuple[str, Node, Endpoint]] = []
    for path, node in listens:
        endpoint = _quiet_endpoint(node)
        if endpoint is None:
            continue
        for other_path, other_node, other in bound:
            if _overlap(endpoint, other):
                r.problem(node, path, f"{endpoint} overlaps {other_path} ({other}, line {line_of(other_node)}); "
                                      "two listeners cannot share a port")
                break
        else:
            bound.append((path, node, endpoint))


CROSS_CHECKS: tuple[Callable[[Reader, Fields], None], ...] = (check_unique_names, check_listen_conflicts)


def _listener_nodes(fields: Fields) -> Iterator[tuple[str, MappingNode]]:
    """(path, mapping node) of every inbound and outbound listener that is a mapping."""
    for section in ("inbound", "outbound"):
        node = fields.node(section)
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                if isinstance(item, MappingNode):
                    yield f"{section}[{i}]", item


def _quiet_endpoint(node: Node | None) -> Endpoint | None:
    """The listen endpoint if it parses, without recording a problem."""
    raw = written_text(node)
    if raw is None:
        return None
    try:
        return parse_endpoint(raw)
    except ValueError:
        return None


def _overlap(a: Endpoint, b: Endpoint) -> bool:
    """Whether binding both would clash: same port, and same address or one is a wildcard.

    Port 0 never clashes (the OS picks a free port). ``::`` may be dual-stack, so it clashes with IPv4 too.
    """
    if a.port == 0 or a.port != b.port:
        return False
    ip_a, ip_b = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    if ip_a == ip_b:
        return True
    if ip_a.version != ip_b.version:
        return any(ip.version == 6 and ip.is_unspecified for ip in (ip_a, ip_b))
    return ip_a.is_unspecified or ip_b.is_unspecified
