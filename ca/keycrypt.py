"""The CA keys' passphrase encryption: PKCS#8 PBES2, PBKDF2-HMAC-SHA256 with ``KDF_ROUNDS`` rounds,
AES-256-CBC (RFC 5958 EncryptedPrivateKeyInfo, RFC 8018 PBES2).

cryptography's ``BestAvailableEncryption`` derives with only 2,048 PBKDF2 rounds, and its
``encryption_builder`` does not serve PKCS#8 (it refuses anything but OpenSSH and PKCS#12), so the
structure is built here from cryptography's primitives; cryptography, ``openssl pkey`` and
``openssl pkcs8`` read it back like any encrypted PKCS#8 key. ``kdf_rounds`` reads the rounds of an
existing key, so that a weaker one can be re-encrypted (``ca.store.StateDir.load_private_key``).
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

KDF_ROUNDS = 600_000  # OWASP's figure for PBKDF2-HMAC-SHA256 (2023)
SALT_BYTES = 16

# DER contents of the object identifiers used (RFC 8018, NIST).
PBES2 = bytes.fromhex("2a864886f70d01050d")  # 1.2.840.113549.1.5.13
PBKDF2 = bytes.fromhex("2a864886f70d01050c")  # 1.2.840.113549.1.5.12
HMAC_SHA256 = bytes.fromhex("2a864886f70d0209")  # 1.2.840.113549.2.9
AES256_CBC = bytes.fromhex("60864801650304012a")  # 2.16.840.1.101.3.4.1.42

SEQUENCE, INTEGER, OCTET_STRING, NULL, OID = 0x30, 0x02, 0x04, 0x05, 0x06


def encrypted_pkcs8_pem(key, passphrase: bytes, rounds: int = KDF_ROUNDS) -> bytes:
    """``key`` as an ``ENCRYPTED PRIVATE KEY`` PEM under ``passphrase``."""
    plain = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    salt, iv = os.urandom(SALT_BYTES), os.urandom(16)
    derived = PBKDF2HMAC(hashes.SHA256(), 32, salt, rounds).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(derived), modes.CBC(iv)).encryptor()
    encrypted = encryptor.update(padder.update(plain) + padder.finalize()) + encryptor.finalize()
    kdf = _der(SEQUENCE, _der(OID, PBKDF2) + _der(SEQUENCE, (
        _der(OCTET_STRING, salt) + _der(INTEGER, _unsigned(rounds))
        + _der(SEQUENCE, _der(OID, HMAC_SHA256) + _der(NULL, b""))
    )))
    scheme = _der(SEQUENCE, _der(OID, AES256_CBC) + _der(OCTET_STRING, iv))
    algorithm = _der(SEQUENCE, _der(OID, PBES2) + _der(SEQUENCE, kdf + scheme))
    der = _der(SEQUENCE, algorithm + _der(OCTET_STRING, encrypted))
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n" + lines + b"\n-----END ENCRYPTED PRIVATE KEY-----\n"


def kdf_rounds(pem: bytes) -> int | None:
    """The PBKDF2 rounds of an ``ENCRYPTED PRIVATE KEY`` PEM; None if it is not PBES2 with PBKDF2
    (PKCS#5 v1.5, scrypt) or cannot be parsed."""
    try:
        body = pem.split(b"-----BEGIN ENCRYPTED PRIVATE KEY-----", 1)[1].split(b"-----END", 1)[0]
        (info,) = _items(base64.b64decode(b"".join(body.split())))
        algorithm, _encrypted = _items(info[1])
        scheme_oid, params = _items(algorithm[1])
        kdf, _scheme = _items(params[1])
        kdf_oid, kdf_params = _items(kdf[1])
        if scheme_oid[1] != PBES2 or kdf_oid[1] != PBKDF2:
            return None
        return int.from_bytes(_items(kdf_params[1])[1][1], "big")
    except (IndexError, ValueError):
        return None


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _unsigned(value: int) -> bytes:
    return value.to_bytes(value.bit_length() // 8 + 1, "big")  # a leading zero keeps it positive


def _items(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, content) pairs of the DER elements concatenated in ``data``. ValueError if malformed."""
    items, offset = [], 0
    while offset < len(data):
        if offset + 2 > len(data):
            raise ValueError("truncated DER")
        tag, size = data[offset], data[offset + 1]
        offset += 2
        if size & 0x80:
            count = size & 0x7F
            size = int.from_bytes(data[offset : offset + count], "big")
            offset += count
        if offset + size > len(data):
            raise ValueError("truncated DER")
        items.append((tag, data[offset : offset + size]))
        offset += size
    return items
