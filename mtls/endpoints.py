"""Network endpoints as operators write them and as logs show them.

Pure: no sockets are opened here. ``Endpoint`` is what the config holds (``host:port``,
``[v6]:port`` or ``unix:/path``); ``format_address`` is the one way an address reaches a log line;
``server_name_for`` decides whether a host name goes into SNI (DNS names do, IP literals never).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_PORT = re.compile(r"[0-9]{1,5}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class Endpoint:
    """A TCP ``host:port`` or a ``unix:/abs/path`` socket. ``host`` is kept as written, without brackets."""

    kind: str  # "tcp" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return format_host_port(self.host, self.port)


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:443``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_address(addr) -> str:
    """A socket address as a log line shows it: ``host:port``, ``[v6]:port``, or ``unix:PATH``."""
    if isinstance(addr, tuple):
        return format_host_port(addr[0], addr[1])
    return f"unix:{addr}" if addr else "unix"


def server_name_for(host: str) -> str | None:
    """The SNI to send for ``host``: DNS names only; an IP address is not a valid server_name."""
    if not host:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def parse_endpoint(text: str, *, unix: bool = False, hostname: bool = False) -> Endpoint:
    """Parse ``host:port``, ``[v6]:port`` or (with ``unix=True``) ``unix:/abs/path``; ValueError says why not.

    Without ``hostname=True`` the host must be an IP address literal.
    """
    if text.startswith("unix:"):
        if not unix:
            raise ValueError(f"{text!r}: a unix socket is not allowed here; write host:port")
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: the unix socket path must be absolute, e.g. unix:/run/app.sock")
        return Endpoint("unix", path=path)
    expected = "host:port or unix:PATH" if unix else "host:port"
    if text.startswith("["):
        host, close, port_text = text[1:].partition("]:")
        if not close:
            raise ValueError(f"{text!r} is not [IPv6-address]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"{text!r} is not {expected}")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:443")
        if not host:
            raise ValueError(f"{text!r}: the host is missing; write e.g. 0.0.0.0{text} or 127.0.0.1{text}")
        _check_host(text, host, hostname)
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number from 0 to 65535")
    return Endpoint("tcp", host=host, port=int(port_text))


def _check_host(text: str, host: str, hostname: bool) -> None:
    try:
        ipaddress.IPv4Address(host)
        return
    except ValueError:
        pass
    if not hostname:
        raise ValueError(f"{text!r}: {host!r} is not an IP address; use e.g. 127.0.0.1, 0.0.0.0 or [::1]")
    if not is_dns_name(host):
        raise ValueError(f"{text!r}: {host!r} is neither an IPv4 address nor a valid host name")


def is_dns_name(name: str) -> bool:
    """A syntactically valid host name (letters, digits, '-', dots), not an all-numeric last label."""
    labels = name.split(".")
    return (
        len(name) <= 253
        and all(_DNS_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )
