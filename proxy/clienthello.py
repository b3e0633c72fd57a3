"""Read the server name (SNI) out of the first bytes a TLS client sends. Pure: bytes in, answer out.

The egress listener peeks at the app's first bytes without consuming them, so that after the
decision the very same bytes reach the destination. ``parse_client_hello`` says whether those bytes
hold a complete ClientHello (possibly spread over several handshake records), how many bytes are
needed when they do not yet, or that they are not TLS at all.
"""

from __future__ import annotations

from dataclasses import dataclass

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME_EXTENSION = 0
_HOST_NAME = 0
_RECORD_HEADER = 5
MAX_HELLO = 64 * 1024  # a larger "ClientHello" is refused rather than buffered


class NotClientHello(ValueError):
    """The bytes are not the start of a TLS ClientHello; the message says what they are instead."""


@dataclass(frozen=True)
class Hello:
    """A complete ClientHello's server name (None when it sends no SNI)."""

    sni: str | None


@dataclass(frozen=True)
class NeedMore:
    """Incomplete: at least ``total`` bytes (from the start) are needed to go on."""

    total: int


def parse_client_hello(data: bytes) -> Hello | NeedMore:
    """Parse as much of ``data`` as has arrived. Raises NotClientHello."""
    message = bytearray()
    offset = 0
    needed_message = None  # the handshake message's full length, once its header has arrived
    while needed_message is None or len(message) < needed_message:
        if len(data) < offset + _RECORD_HEADER:
            return NeedMore(offset + _RECORD_HEADER)
        content_type, major = data[offset], data[offset + 1]
        length = int.from_bytes(data[offset + 3:offset + 5], "big")
        if content_type != _HANDSHAKE or major != 3:
            raise NotClientHello(_not_tls_text(data) if offset == 0 else "a non-handshake record inside the ClientHello")
        if length == 0 or length > 16384 + 256:
            raise NotClientHello(f"a TLS record of impossible length {length}")
        end = offset + _RECORD_HEADER + length
        if len(data) < end:
            return NeedMore(end)
        message += data[offset + _RECORD_HEADER:end]
        offset = end
        if needed_message is None and len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                raise NotClientHello(f"TLS handshake message type {message[0]}, not a ClientHello")
            needed_message = 4 + int.from_bytes(message[1:4], "big")
            if needed_message > MAX_HELLO:
                raise NotClientHello(f"a ClientHello of {needed_message} bytes (more than {MAX_HELLO})")
    return Hello(_server_name(bytes(message[4:needed_message])))


def _not_tls_text(data: bytes) -> str:
    head = data[:16]
    shown = head.decode("ascii", "replace") if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else head.hex()
    return f"not TLS: the app's first bytes are {shown!r}"


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise NotClientHello("a truncated ClientHello")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


def _server_name(body: bytes) -> str | None:
    r = _Reader(body)
    r.take(2 + 32)  # client_version, random
    r.vector(1)  # session id
    r.vector(2)  # cipher suites
    r.vector(1)  # compression methods
    if r.done:
        return None  # no extensions at all
    extensions = _Reader(r.vector(2))
    while not extensions.done:
        kind = extensions.number(2)
        payload = extensions.vector(2)
        if kind != _SERVER_NAME_EXTENSION:
            continue
        names = _Reader(_Reader(payload).vector(2))
        while not names.done:
            name_type = names.number(1)
            name = names.vector(2)
            if name_type == _HOST_NAME:
                try:
                    return name.decode("ascii").lower()
                except UnicodeDecodeError:
                    raise NotClientHello("a server name that is not ASCII") from None
        return None
    return None
