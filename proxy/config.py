"""The sidecar's YAML config, read into frozen dataclasses.

Theory of operation: the YAML is *composed* with SafeLoader, not constructed, so every value is still a
node that knows its line. A ``_Reader`` walks the node tree following the schema, records one problem
per broken rule as ``FILE:LINE: key.path: what is wrong`` and carries on, so an operator sees every
problem in one run. A Config is returned only when no problem was recorded; otherwise ConfigError
lists them all, sorted by line.

Strictness: unknown keys, duplicated keys, wrong types and missing required keys are errors. An
optional key set to null (``admin:`` with nothing after it) counts as absent. Relative file paths
under ``identity`` are resolved against the config file's directory. Port 0 is accepted for
``listen`` (the OS picks a free port; tests rely on it) but not for addresses we connect to.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mtls.durations import parse_duration
from mtls.endpoints import Endpoint, is_dns_name, parse_endpoint
from mtls.spiffe import IdPattern, InvalidSpiffeId, parse_pattern

_TAG = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL, TIMESTAMP = (_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
MERGE = _TAG + "merge"

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
MODES = ("enforce", "audit")
DEFAULT_RENEW_AT = 0.66
LISTENER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_SCALARS = SafeConstructor()


# --- the result -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenewConfig:
    url: str
    at: float = DEFAULT_RENEW_AT  # renew when this fraction of the lifetime has passed, 0 < at < 1


@dataclass(frozen=True)
class IdentityConfig:
    cert: Path
    key: Path
    bundle: Path
    crl: Path | None
    renew: RenewConfig | None


@dataclass(frozen=True)
class InboundConfig:
    name: str
    listen: Endpoint
    forward: Endpoint
    allow: tuple[IdPattern, ...]
    mode: str  # "enforce" | "audit"
    proxy_protocol: bool


@dataclass(frozen=True)
class OutboundConfig:
    name: str
    listen: Endpoint
    connect: Endpoint
    expect: tuple[IdPattern, ...]
    server_name: str | None


@dataclass(frozen=True)
class AdminConfig:
    listen: Endpoint


@dataclass(frozen=True)
class Timeouts:
    handshake: float = 10.0
    connect: float = 5.0
    idle: float = 3600.0
    drain: float = 30.0


@dataclass(frozen=True)
class Limits:
    max_connections: int = 10000


@dataclass(frozen=True)
class TlsConfig:
    """TLS 1.3 session resumption between sidecars (off by default: every connection is a full handshake)."""

    session_resumption: bool = False
    session_lifetime: float = 3600.0  # also capped by the certificates' remaining life


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True)
class Config:
    identity: IdentityConfig
    inbound: tuple[InboundConfig, ...]
    outbound: tuple[OutboundConfig, ...]
    admin: AdminConfig | None
    timeouts: Timeouts
    limits: Limits
    log: LogConfig
    source: Path  # the config file, as given to load_config / parse_config
    tls: TlsConfig = TlsConfig()


class ConfigError(Exception):
    """Every problem found in a config file, one ``FILE:LINE: key.path: message`` string each.

    ``identity`` is the identity section when that section alone was valid, so ``proxy check`` can
    go on to report problems with the certificate files in the same run.
    """

    def __init__(self, problems: list[str], identity: IdentityConfig | None = None):
        super().__init__("\n".join(problems))
        self.problems = list(problems)
        self.identity = identity


# --- entry points -----------------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem."""
    source = Path(path)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read the config file: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError([f"{source}:{line}: the config file is not UTF-8 text ({exc.reason})"]) from None
    return parse_config(text, source)


def parse_config(text: str, source: Path) -> Config:
    """Validate config text; ``source`` names the file in messages and anchors relative paths."""
    source = Path(source)
    label = str(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([_syntax_problem(label, text, exc)]) from None
    except RecursionError:
        raise ConfigError([f"{label}: YAML syntax error: the document is nested too deeply"]) from None
    if root is None or (isinstance(root, ScalarNode) and root.tag == NULL):
        raise ConfigError([f"{label}:1: the file has no settings; it needs at least an 'identity' section"])
    if not isinstance(root, MappingNode):
        raise ConfigError(
            [f"{label}:{_line(root)}: the top level must be a mapping of sections "
             f"(identity, inbound, outbound, ...), got {_describe(root)}"]
        )
    return _Reader(label, source.absolute().parent).config(root, source)


# --- reading nodes ----------------------------------------------------------------------------


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _syntax_problem(label: str, text: str, exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        what = ", ".join(part for part in (exc.context, exc.problem) if part) or "unreadable"
    else:  # yaml.reader.ReaderError: a character YAML does not allow
        line = text[: getattr(exc, "position", 0)].count("\n") + 1
        what = str(exc).splitlines()[0]
    return f"{label}:{line}: YAML syntax error: {what}"


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == NULL:
        return "nothing (null)"
    if node.tag == STR:
        return f"the string {node.value!r}"
    kind = {INT: "the number", FLOAT: "the number", BOOL: "the boolean", TIMESTAMP: "the date"}.get(node.tag)
    return f"{kind} {node.value}" if kind else f"a value tagged {node.tag!r}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _did_you_mean(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; expected one of: {', '.join(known)}"


class _Reader:
    """Reads nodes by the schema; each method returns a value, or None after recording a problem."""

    def __init__(self, label: str, base_dir: Path):
        self.label = label
        self.base_dir = base_dir
        self.problems: list[tuple[int, str]] = []

    def problem(self, node: Node, path: str, message: str) -> None:
        self.problems.append((_line(node), f"{self.label}:{_line(node)}: {path}: {message}"))

    # generic shapes

    def mapping(
        self, node: Node, path: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()
    ) -> dict[str, Node] | None:
        """The known keys' value nodes. Null optional values are left out, as if absent."""
        if not isinstance(node, MappingNode):
            self.problem(node, path, f"expected a mapping, got {_describe(node)}")
            return None
        known = required + optional
        seen: dict[str, Node] = {}
        fields: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE:
                self.problem(key_node, path, "YAML merge keys ('<<') are not supported; write the keys out")
                continue
            if not (isinstance(key_node, ScalarNode) and key_node.tag == STR):
                self.problem(key_node, path, f"keys must be strings, got {_describe(key_node)}")
                continue
            key = key_node.value
            key_path = _join(path, key)
            if key in seen:
                self.problem(key_node, key_path, f"duplicate key (first set on line {_line(seen[key])})")
                continue
            seen[key] = key_node
            if key not in known:
                self.problem(key_node, key_path, "unknown key" + _did_you_mean(key, known))
            elif value_node.tag == NULL and isinstance(value_node, ScalarNode):
                if key in required:
                    self.problem(value_node, key_path, "needs a value")
            else:
                fields[key] = value_node
        for key in required:
            if key not in seen:
                self.problem(node, _join(path, key), "required key is missing")
        return fields

    def sequence(self, node: Node, path: str) -> list[tuple[str, Node]] | None:
        """The items with their key paths (``path[i]``)."""
        if not isinstance(node, SequenceNode):
            self.problem(node, path, f"expected a list, got {_describe(node)}")
            return None
        return [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]

    def text(self, node: Node, path: str) -> str | None:
        """A string as written. Unquoted numbers count (``name: 123``), booleans and null do not."""
        if not (isinstance(node, ScalarNode) and node.tag in (STR, INT, FLOAT)):
            hint = "; quote it if you mean text" if node.tag == BOOL else ""
            self.problem(node, path, f"expected a string, got {_describe(node)}{hint}")
            return None
        try:
            node.value.encode("utf-8")
        except UnicodeEncodeError:
            self.problem(node, path, "contains an unpaired surrogate escape; it is not valid text")
            return None
        return node.value

    def choice(self, node: Node, path: str, allowed: tuple[str, ...]) -> str | None:
        value = self.text(node, path)
        if value is not None and value not in allowed:
            self.problem(node, path, f"{value!r} is not one of: {', '.join(allowed)}")
            return None
        return value

    def integer(self, node: Node, path: str) -> int | None:
        if not (isinstance(node, ScalarNode) and node.tag == INT):
            self.problem(node, path, f"expected a whole number, got {_describe(node)}")
            return None
        try:
            return _SCALARS.construct_yaml_int(node)
        except (ValueError, IndexError):
            self.problem(node, path, f"{node.value!r} is not a whole number")
            return None

    def number(self, node: Node, path: str) -> float | None:
        if not (isinstance(node, ScalarNode) and node.tag in (INT, FLOAT)):
            self.problem(node, path, f"expected a number, got {_describe(node)}")
            return None
        construct = _SCALARS.construct_yaml_int if node.tag == INT else _SCALARS.construct_yaml_float
        try:
            return float(construct(node))
        except (ValueError, IndexError, OverflowError):
            self.problem(node, path, f"{node.value!r} is not a number")
            return None

    def boolean(self, node: Node, path: str) -> bool | None:
        value = None
        if isinstance(node, ScalarNode) and node.tag == BOOL:
            value = SafeConstructor.bool_values.get(node.value.lower())
        if value is None:
            self.problem(node, path, f"expected true or false, got {_describe(node)}")
            return None
        return value

    def duration(self, node: Node, path: str) -> float | None:
        raw = self.integer(node, path) if node.tag == INT else self.text(node, path)
        if raw is None:
            return None
        try:
            return parse_duration(raw)
        except ValueError as exc:
            self.problem(node, path, str(exc))
            return None

    def endpoint(self, node: Node, path: str, *, unix: bool = False, hostname: bool = False) -> Endpoint | None:
        raw = self.text(node, path)
        if raw is None:
            return None
        try:
            return parse_endpoint(raw, unix=unix, hostname=hostname)
        except ValueError as exc:
            self.problem(node, path, str(exc))
            return None

    def file_path(self, node: Node, path: str) -> Path | None:
        raw = self.text(node, path)
        if raw is None:
            return None
        if not raw or any(ord(ch) < 0x20 for ch in raw):
            self.problem(node, path, f"{raw!r} is not a file path (did you paste the file's contents?)"
                         if "\n" in raw else f"{raw!r} is not a file path")
            return None
        return self.base_dir / raw

    def patterns(self, node: Node, path: str) -> tuple[IdPattern, ...] | None:
        items = self.sequence(node, path)
        if items is None:
            return None
        if not items:
            self.problem(node, path, "must list at least one SPIFFE ID or pattern; an empty list allows nothing")
            return None
        parsed = []
        for item_path, item in items:
            raw = self.text(item, item_path)
            if raw is None:
                continue
            try:
                parsed.append(parse_pattern(raw))
            except InvalidSpiffeId as exc:
                self.problem(item, item_path, f"{raw!r} is not a valid SPIFFE ID: {exc.rule}")
        return tuple(parsed) if len(parsed) == len(items) else None

    # the schema

    def config(self, root: MappingNode, source: Path) -> Config:
        fields = self.mapping(
            root, "", required=("identity",),
            optional=("inbound", "outbound", "admin", "timeouts", "limits", "log", "tls"),
        )
        assert fields is not None  # root is a mapping
        before = len(self.problems)
        identity = self.identity(fields["identity"]) if "identity" in fields else None
        valid_identity = identity if len(self.problems) == before else None

        inbound = self.listeners(fields.get("inbound"), "inbound", self.inbound)
        outbound = self.listeners(fields.get("outbound"), "outbound", self.outbound)
        admin = self.admin(fields["admin"]) if "admin" in fields else None
        timeouts = self.timeouts(fields["timeouts"]) if "timeouts" in fields else Timeouts()
        limits = self.limits(fields["limits"]) if "limits" in fields else Limits()
        log = self.log(fields["log"]) if "log" in fields else LogConfig()
        tls = self.tls(fields["tls"]) if "tls" in fields else TlsConfig()
        self.check_unique_names(fields)
        self.check_listen_conflicts(fields)

        if self.problems:
            ordered = [message for _, message in sorted(self.problems, key=lambda p: p[0])]
            raise ConfigError(ordered, identity=valid_identity)
        return Config(identity, inbound, outbound, admin, timeouts, limits, log, source, tls)

    def identity(self, node: Node) -> IdentityConfig | None:
        before = len(self.problems)
        fields = self.mapping(node, "identity", required=("cert", "key", "bundle"), optional=("crl", "renew"))
        if fields is None:
            return None
        paths = {key: self.file_path(value, f"identity.{key}") for key, value in fields.items() if key != "renew"}
        renew = self.renew(fields["renew"]) if "renew" in fields else None
        if len(self.problems) > before:
            return None
        return IdentityConfig(paths["cert"], paths["key"], paths["bundle"], paths.get("crl"), renew)

    def renew(self, node: Node) -> RenewConfig | None:
        before = len(self.problems)
        fields = self.mapping(node, "identity.renew", required=("url",), optional=("at",))
        if fields is None or "url" not in fields:
            return None
        url = self.text(fields["url"], "identity.renew.url")
        if url is not None and not _is_https_url(url):
            self.problem(fields["url"], "identity.renew.url",
                         f"{url!r} is not an https:// URL (renewal authenticates over mTLS)")
        at = self.number(fields["at"], "identity.renew.at") if "at" in fields else DEFAULT_RENEW_AT
        if at is not None and not 0 < at < 1:
            self.problem(fields["at"], "identity.renew.at",
                         f"{fields['at'].value} is not between 0 and 1 (exclusive): it is the fraction "
                         "of the certificate lifetime after which to renew, e.g. 0.66")
        if len(self.problems) > before:
            return None
        return RenewConfig(url, at)

    def listeners(self, node: Node | None, section: str, read_one) -> tuple:
        if node is None:
            return ()
        items = self.sequence(node, section)
        if items is None:
            return ()
        read = [read_one(item, item_path) for item_path, item in items]
        return tuple(listener for listener in read if listener is not None)

    def name(self, node: Node, path: str) -> str | None:
        name = self.text(node, path)
        if name is not None and not LISTENER_NAME.fullmatch(name):
            self.problem(node, path,
                         f"{name!r} is not a valid name: use lower-case letters, digits, '_', '.' and '-', "
                         "starting with a letter or digit (it becomes a metric label)")
        return name

    def inbound(self, node: Node, path: str) -> InboundConfig | None:
        before = len(self.problems)
        fields = self.mapping(node, path, required=("name", "listen", "forward", "allow"),
                              optional=("mode", "proxy_protocol"))
        if fields is None:
            return None
        get = fields.get
        name = self.name(get("name"), f"{path}.name") if "name" in fields else None
        listen = self.endpoint(get("listen"), f"{path}.listen") if "listen" in fields else None
        forward = self.destination(get("forward"), f"{path}.forward", unix=True) if "forward" in fields else None
        allow = self.patterns(get("allow"), f"{path}.allow") if "allow" in fields else None
        mode = self.choice(get("mode"), f"{path}.mode", MODES) if "mode" in fields else "enforce"
        proxy_protocol = (self.boolean(get("proxy_protocol"), f"{path}.proxy_protocol")
                          if "proxy_protocol" in fields else False)
        if len(self.problems) > before:
            return None
        return InboundConfig(name, listen, forward, allow, mode, proxy_protocol)

    def outbound(self, node: Node, path: str) -> OutboundConfig | None:
        before = len(self.problems)
        fields = self.mapping(node, path, required=("name", "listen", "connect", "expect"),
                              optional=("server_name",))
        if fields is None:
            return None
        get = fields.get
        name = self.name(get("name"), f"{path}.name") if "name" in fields else None
        listen = self.outbound_listen(get("listen"), f"{path}.listen") if "listen" in fields else None
        connect = self.destination(get("connect"), f"{path}.connect") if "connect" in fields else None
        expect = self.patterns(get("expect"), f"{path}.expect") if "expect" in fields else None
        server_name = (self.server_name(get("server_name"), f"{path}.server_name")
                       if "server_name" in fields else None)
        if len(self.problems) > before:
            return None
        return OutboundConfig(name, listen, connect, expect, server_name)

    def outbound_listen(self, node: Node, path: str) -> Endpoint | None:
        listen = self.endpoint(node, path)
        if listen is not None and not ipaddress.ip_address(listen.host).is_loopback:
            self.problem(node, path,
                         f"{str(listen)!r} is not a loopback address: the app connects here in plaintext and "
                         "the sidecar adds our identity, so anyone who can reach this port could use our "
                         "identity; listen on 127.0.0.1 or [::1]")
            return None
        return listen

    def destination(self, node: Node, path: str, *, unix: bool = False) -> Endpoint | None:
        """An address the sidecar connects to: host names allowed, port 0 not."""
        endpoint = self.endpoint(node, path, unix=unix, hostname=True)
        if endpoint is not None and endpoint.kind == "tcp" and endpoint.port == 0:
            self.problem(node, path, f"{str(endpoint)!r}: port 0 cannot be connected to")
            return None
        return endpoint

    def server_name(self, node: Node, path: str) -> str | None:
        name = self.text(node, path)
        if name is not None and not is_dns_name(name):
            self.problem(node, path, f"{name!r} is not a DNS name (SNI cannot carry an IP address)")
            return None
        return name

    def admin(self, node: Node) -> AdminConfig | None:
        fields = self.mapping(node, "admin", required=("listen",))
        if fields is None or "listen" not in fields:
            return None
        listen = self.endpoint(fields["listen"], "admin.listen")
        return AdminConfig(listen) if listen is not None else None

    def timeouts(self, node: Node) -> Timeouts | None:
        names = ("handshake", "connect", "idle", "drain")
        fields = self.mapping(node, "timeouts", optional=names)
        if fields is None:
            return None
        values = {key: self.duration(value, f"timeouts.{key}") for key, value in fields.items()}
        return None if None in values.values() else Timeouts(**values)

    def limits(self, node: Node) -> Limits | None:
        fields = self.mapping(node, "limits", optional=("max_connections",))
        if fields is None:
            return None
        if "max_connections" not in fields:
            return Limits()
        value = self.integer(fields["max_connections"], "limits.max_connections")
        if value is not None and value < 1:
            self.problem(fields["max_connections"], "limits.max_connections",
                         f"{value} is not a positive number of connections")
            return None
        return Limits(value) if value is not None else None

    def log(self, node: Node) -> LogConfig | None:
        fields = self.mapping(node, "log", optional=("level", "format"))
        if fields is None:
            return None
        level = self.choice(fields["level"], "log.level", LOG_LEVELS) if "level" in fields else "info"
        form = self.choice(fields["format"], "log.format", LOG_FORMATS) if "format" in fields else "json"
        return LogConfig(level, form) if level and form else None

    def tls(self, node: Node) -> TlsConfig | None:
        fields = self.mapping(node, "tls", optional=("session_resumption", "session_lifetime"))
        if fields is None:
            return None
        resumption = (self.boolean(fields["session_resumption"], "tls.session_resumption")
                      if "session_resumption" in fields else False)
        lifetime = (self.duration(fields["session_lifetime"], "tls.session_lifetime")
                    if "session_lifetime" in fields else TlsConfig.session_lifetime)
        if resumption is None or lifetime is None:
            return None
        return TlsConfig(resumption, lifetime)

    # rules across sections

    def _listener_nodes(self, fields: dict[str, Node]):
        """(path, mapping node) of every inbound and outbound listener that is a mapping."""
        for section in ("inbound", "outbound"):
            node = fields.get(section)
            if isinstance(node, SequenceNode):
                for i, item in enumerate(node.value):
                    if isinstance(item, MappingNode):
                        yield f"{section}[{i}]", item

    @staticmethod
    def _value_of(mapping: MappingNode, key: str) -> Node | None:
        for key_node, value_node in mapping.value:
            if isinstance(key_node, ScalarNode) and key_node.value == key:
                return value_node
        return None

    def check_unique_names(self, fields: dict[str, Node]) -> None:
        first: dict[str, tuple[str, Node]] = {}
        for path, listener in self._listener_nodes(fields):
            node = self._value_of(listener, "name")
            if not isinstance(node, ScalarNode) or node.tag == NULL:
                continue
            if node.value in first:
                other_path, other_node = first[node.value]
                self.problem(node, f"{path}.name",
                             f"{node.value!r} is already used by {other_path} (line {_line(other_node)}); "
                             "listener names must be unique across inbound and outbound")
            else:
                first[node.value] = (path, node)

    def check_listen_conflicts(self, fields: dict[str, Node]) -> None:
        listens = [(f"{path}.listen", self._value_of(listener, "listen"))
                   for path, listener in self._listener_nodes(fields)]
        if isinstance(fields.get("admin"), MappingNode):
            listens.append(("admin.listen", self._value_of(fields["admin"], "listen")))
        bound: list[tuple[str, Node, Endpoint]] = []
        for path, node in listens:
            endpoint = _quiet_endpoint(node)
            if endpoint is None:
                continue
            for other_path, other_node, other in bound:
                if _overlap(endpoint, other):
                    self.problem(node, path, f"{endpoint} overlaps {other_path} ({other}, line {_line(other_node)}); "
                                             "two listeners cannot share a port")
                    break
            else:
                bound.append((path, node, endpoint))


def _is_https_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme == "https" and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed '[' in the host
        return False


def _quiet_endpoint(node: Node | None) -> Endpoint | None:
    """The listen endpoint if it parses; its own problems are reported where it is read."""
    if not (isinstance(node, ScalarNode) and node.tag in (STR, INT, FLOAT)):
        return None
    try:
        return parse_endpoint(node.value)
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
