"""Helpers for the CA tests: run ``ca`` the way an admin does, and build CAs and leaves in memory."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.authority import (
    Issuer,
    PrivateKey,
    certificate_pem,
    generate_key,
    make_intermediate,
    make_root,
)

NOW = datetime(2026, 11, 28, 10, 0, 0, tzinfo=timezone.utc)
TRUST_DOMAIN = "example.org"
WEB = "spiffe://example.org/ns/prod/sa/web"


def ca_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any CA_* variable the developer may have set."""
    env = {key: value for key, value in os.environ.items() if key not in ("CA_DIR", "CA_PASSPHRASE")}
    env.update(extra)
    return env


def run_ca(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m ca ARGS`` in ``cwd``; never raises on a non-zero exit."""
    return subprocess.run(
        [sys.executable, "-m", "ca", *map(str, args)],
        cwd=cwd,
        env=env if env is not None else ca_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def start_ca(*args: str | Path, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ca", *map(str, args)],
        cwd=cwd,
        env=ca_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The contract's error shape: the exit code, one line on stderr starting 'ca: ', no traceback."""
    assert result.returncode == exit_code, result.stderr
    assert result.stderr.startswith("ca: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.strip()


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


@dataclass(frozen=True)
class MemoryCa:
    """A root and an intermediate built with the library, for tests that need explicit times."""

    root: x509.Certificate
    root_key: PrivateKey
    issuer: Issuer

    @property
    def intermediate(self) -> x509.Certificate:
        return self.issuer.cert

    def leaf(
        self,
        spiffe_id: str = WEB,
        *,
        now: datetime = NOW,
        ttl: timedelta = timedelta(hours=24),
    ) -> tuple[x509.Certificate, PrivateKey]:
        key = generate_key()
        return self.issuer.issue(spiffe_id, key.public_key(), ttl=ttl, now=now), key


def memory_ca(
    trust_domain: str = TRUST_DOMAIN,
    *,
    now: datetime = NOW,
    key_type: str = "ec-p256",
    ttl: timedelta = timedelta(days=365),
) -> MemoryCa:
    root_key = generate_key(key_type)
    root = make_root(trust_domain, root_key, ttl=timedelta(days=3650), now=now)
    key = generate_key(key_type)
    intermediate = make_intermediate(trust_domain, key, root=root, root_key=root_key, ttl=ttl, now=now)
    return MemoryCa(root, root_key, Issuer(intermediate, key, trust_domain))


def write_pem(path: Path, *items: x509.Certificate | x509.CertificateRevocationList) -> Path:
    path.write_bytes(b"".join(item.public_bytes(serialization.Encoding.PEM) for item in items))
    return path


def write_chain(path: Path, leaf: x509.Certificate, *intermediates: x509.Certificate) -> Path:
    path.write_bytes(certificate_pem(leaf, *intermediates))
    return path
