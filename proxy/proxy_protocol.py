"""PROXY protocol v2 header that tells the app who is calling (``proxy_protocol: true``).

With ``proxy_protocol: true`` on an inbound listener, the sidecar writes one binary PROXY protocol
v2 header (HAProxy's ``proxy-protocol.txt``, section 2.2) to the app's connection before the first
byte of payload, and nothing else is ever added to the stream. What an app author parses:

- 12-byte signature ``\\r\\n\\r\\n\\x00\\r\\nQUIT\\n``;
- byte 13 = ``0x21``: version 2, command PROXY;
- byte 14 = ``0x11`` (TCP over IPv4) or ``0x21`` (TCP over IPv6);
- bytes 15-16: length of the rest of the header, big-endian;
- source address, destination address, source port, destination port (4+4+2+2 bytes for IPv4,
  16+16+2+2 for IPv6): source is the TLS client, destination is the sidecar's inbound listener;
- one TLV of type ``PP2_TYPE_SPIFFE_ID = 0xE0`` (the first of the spec's custom range
  ``PP2_TYPE_MIN_CUSTOM..PP2_TYPE_MAX_CUSTOM``), whose value is the peer's verified SPIFFE ID in
  UTF-8, without a trailing NUL, e.g. ``spiffe://example.org/ns/prod/sa/frontend``.

An IPv4 client reaching a dual-stack listener appears to the sidecar as ``::ffff:a.b.c.d``; such
addresses are sent as plain IPv4. If the two addresses still differ in family, the IPv4 one is
sent IPv4-mapped in an IPv6 header, as the spec requires both to share one family.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_2_PROXY = 0x21
TCP_OVER_IPV4 = 0x11
TCP_OVER_IPV6 = 0x21
PP2_TYPE_SPIFFE_ID = 0xE0

_PREAMBLE = struct.Struct("!12sBBH")  # signature, version/command, family/protocol, length
_TLV_HEAD = struct.Struct("!BH")  # type, length


def v2_header(src: tuple, dst: tuple, spiffe_id: str) -> bytes:
    """The PROXY v2 header for a TCP connection from ``src`` to ``dst``, carrying ``spiffe_id``.

    ``src`` and ``dst`` are socket addresses as ``getpeername()``/``getsockname()`` return them
    for AF_INET or AF_INET6: ``(host, port)`` or ``(host, port, flowinfo, scope_id)``.
    """
    src_ip, dst_ip = _unmapped(src[0]), _unmapped(dst[0])
    if type(src_ip) is not type(dst_ip):
        src_ip, dst_ip = _as_ipv6(src_ip), _as_ipv6(dst_ip)
    family = TCP_OVER_IPV4 if isinstance(src_ip, IPv4Address) else TCP_OVER_IPV6
    value = spiffe_id.encode("utf-8")
    body = (
        src_ip.packed
        + dst_ip.packed
        + struct.pack("!HH", src[1], dst[1])
        + _TLV_HEAD.pack(PP2_TYPE_SPIFFE_ID, len(value))
        + value
    )
    return _PREAMBLE.pack(SIGNATURE, VERSION_2_PROXY, family, len(body)) + body


def _unmapped(host: str) -> IPv4Address | IPv6Address:
    """The address of ``host``, with an IPv4-mapped IPv6 address turned back into IPv4."""
    ip = ip_address(host)
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _as_ipv6(ip: IPv4Address | IPv6Address) -> IPv6Address:
    return IPv6Address(f"::ffff:{ip}") if isinstance(ip, IPv4Address) else ip
