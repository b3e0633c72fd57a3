"""The PROXY v2 header, read back by a parser we did not write (the ``proxy-protocol`` package)."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv6Address

import pytest
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.tlv import Type
from proxyprotocol.v2 import ProxyProtocolV2
from support.network import read_header, recv_exactly

from proxy.proxy_protocol import PP2_TYPE_SPIFFE_ID, v2_header

PEER_ID = "spiffe://example.org/ns/prod/sa/frontend"


def _ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


FAMILIES = [
    pytest.param("127.0.0.1", ProxyResultIPv4, IPv4Address, id="ipv4"),
    pytest.param(
        "::1", ProxyResultIPv6, IPv6Address, id="ipv6",
        marks=pytest.mark.skipif(not _ipv6_loopback_works(), reason="no IPv6 loopback on this machine"),
    ),
]


@contextmanager
def accepted_connection(host: str):
    """A real loopback TCP connection: (client side, accepted side, listener address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as listener:
        address = listener.getsockname()
        with socket.create_connection(address[:2], timeout=5) as client:
            accepted, _ = listener.accept()
            with accepted:
                yield client, accepted, address


@pytest.mark.parametrize("host, result_type, address_type", FAMILIES)
def test_header_names_client_address_listener_address_and_spiffe_id(host, result_type, address_type):
    with accepted_connection(host) as (client, accepted, listener_address):
        accepted.sendall(v2_header(accepted.getpeername(), accepted.getsockname(), PEER_ID))
        result = read_header(client)
        client_address = client.getsockname()

    assert type(result) is result_type
    assert result.proxied
    assert result.protocol == socket.SOCK_STREAM
    assert result.source == (address_type(host), client_address[1])
    assert result.dest == (address_type(host), listener_address[1])
    assert result.tlv[PP2_TYPE_SPIFFE_ID] == PEER_ID.encode()
    assert set(result.tlv) == {PP2_TYPE_SPIFFE_ID}


def test_payload_starts_right_after_the_header():
    with accepted_connection("127.0.0.1") as (client, accepted, _):
        accepted.sendall(v2_header(accepted.getpeername(), accepted.getsockname(), PEER_ID) + b"GET / HTTP/1.1\r\n")
        accepted.shutdown(socket.SHUT_WR)
        read_header(client)
        assert recv_exactly(client, 16) == b"GET / HTTP/1.1\r\n"
        assert client.recv(1) == b""


def test_spiffe_id_tlv_type_is_the_first_custom_type_of_the_spec():
    assert PP2_TYPE_SPIFFE_ID == Type.PP2_TYPE_MIN_CUSTOM == 0xE0


def test_ipv4_mapped_addresses_are_sent_as_ipv4():
    header = v2_header(("::ffff:10.0.0.1", 40000, 0, 0), ("::ffff:10.0.0.2", 8443, 0, 0), PEER_ID)

    result = ProxyProtocolV2().unpack(header)

    assert type(result) is ProxyResultIPv4
    assert result.source == (IPv4Address("10.0.0.1"), 40000)
    assert result.dest == (IPv4Address("10.0.0.2"), 8443)


def test_mixed_families_send_the_ipv4_address_mapped_into_ipv6():
    header = v2_header(("10.0.0.1", 40000), ("2001:db8::2", 8443, 0, 0), PEER_ID)

    result = ProxyProtocolV2().unpack(header)

    assert type(result) is ProxyResultIPv6
    assert result.source == (IPv6Address("::ffff:10.0.0.1"), 40000)
    assert result.dest == (IPv6Address("2001:db8::2"), 8443)


def test_longest_spiffe_id_fits_in_the_tlv():
    longest = "spiffe://example.org/" + "a" * (2048 - len("spiffe://example.org/"))

    result = ProxyProtocolV2().unpack(v2_header(("10.0.0.1", 1), ("10.0.0.2", 2), longest))

    assert result.tlv[PP2_TYPE_SPIFFE_ID] == longest.encode()
