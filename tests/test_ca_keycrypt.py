"""The CA keys' passphrase encryption: PBES2 with PBKDF2-HMAC-SHA256 at 600,000 rounds and AES-256-CBC, as
`openssl asn1parse` reads it; a key written with the old 2,048 rounds keeps working and is re-encrypted."""

from __future__ import annotations

import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from support.ca_cli import run_ca
from support.certs import WEB

from ca.keycrypt import KDF_ROUNDS, kdf_rounds

pytestmark = pytest.mark.e2e

PASSPHRASE = b"correct horse battery staple"


def kdf_of(key_file) -> dict:
    """What `openssl asn1parse` says of an encrypted PKCS#8 key: its algorithm names and the PBKDF2 rounds."""
    parsed = subprocess.run(["openssl", "asn1parse", "-in", str(key_file)], capture_output=True, text=True, check=True)
    lines = parsed.stdout.splitlines()
    objects = [line.rsplit(":", 1)[1].strip() for line in lines if "OBJECT" in line]
    (rounds,) = [int(line.rsplit(":", 1)[1], 16) for line in lines if "prim: INTEGER" in line]
    return {"objects": objects, "rounds": rounds}


def test_ca_init_encrypts_its_keys_with_pbkdf2_sha256_at_600000_rounds(tmp_path):
    (tmp_path / "pass").write_bytes(PASSPHRASE + b"\n")
    run_ca("init", "--trust-domain", "example.org", "--passphrase-file", "pass", cwd=tmp_path)
    for key_file in (tmp_path / "ca-data" / "root.key", tmp_path / "ca-data" / "intermediate.key"):
        kdf = kdf_of(key_file)
        assert kdf["objects"] == ["PBES2", "PBKDF2", "hmacWithSHA256", "aes-256-cbc"], kdf
        assert kdf["rounds"] == KDF_ROUNDS >= 600_000
        decrypted = subprocess.run(
            ["openssl", "pkey", "-in", str(key_file), "-passin", f"file:{tmp_path / 'pass'}", "-noout"],
            capture_output=True, text=True,
        )
        assert decrypted.returncode == 0, decrypted.stderr


def test_a_key_encrypted_with_2048_rounds_keeps_working_and_is_re_encrypted_when_the_passphrase_is_given(tmp_path):
    (tmp_path / "pass").write_bytes(PASSPHRASE + b"\n")
    run_ca("init", "--trust-domain", "example.org", "--passphrase-file", "pass", cwd=tmp_path)
    key_file = tmp_path / "ca-data" / "intermediate.key"
    key = serialization.load_pem_private_key(key_file.read_bytes(), PASSPHRASE)
    old = key.private_bytes(  # what earlier versions wrote
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(PASSPHRASE)
    )
    key_file.write_bytes(old)
    assert kdf_rounds(old) == 2048 == kdf_of(key_file)["rounds"]

    run_ca("issue", WEB, "--out", tmp_path / "web", "--passphrase-file", "pass", cwd=tmp_path)

    assert kdf_of(key_file)["rounds"] == KDF_ROUNDS
    assert key_file.stat().st_mode & 0o777 == 0o600
    upgraded = serialization.load_pem_private_key(key_file.read_bytes(), PASSPHRASE)
    assert upgraded.private_numbers() == key.private_numbers()  # the same key, only better protected
    run_ca("issue", WEB, "--out", tmp_path / "web2", "--passphrase-file", "pass", cwd=tmp_path)  # still works
