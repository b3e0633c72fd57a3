"""Real processes on loopback for end-to-end tests: our `ca`, `proxy run`, a counting app, forged certs.

Nothing here sleeps for a fixed time: every wait polls a condition until a deadline.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

PY = sys.executable
TD = "example.org"
DEADLINE = 20.0


def wait_until(predicate, timeout: float = DEADLINE, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)  # polling interval of a deadline loop, not a fixed wait


def run_ca(ca_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, CA_DIR=str(ca_dir))
    proc = subprocess.run([PY, "-m", "ca", *args], env=env, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"ca {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def issue(ca_dir: Path, out: Path, spiffe_id: str, *extra: str) -> Path:
    run_ca(ca_dir, "issue", spiffe_id, "--out", str(out), *extra)
    return out


class App:
    """A TCP echo app in a thread. Counts accepted connections; echoes until EOF, then half-closes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.received = bytearray()
        self.lock = threading.Lock()
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    with self.lock:
                        self.received += data[:4096]
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.sock.close()


def refused_port() -> tuple[socket.socket, int]:
    """A bound, never-listening socket: connecting to its port is refused while it stays open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


class Sidecar:
    """`proxy run` as a subprocess, its JSON log read back from a file."""

    def __init__(self, directory: Path, name: str, config: str, env: dict | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / f"{name}.yaml"
        self.config_path.write_text(config)
        self.log_path = directory / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [PY, "-m", "proxy", "run", "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL, stderr=self._log, env=dict(os.environ, **(env or {})),
        )
        self.ports: dict[str, int] = {}

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_ready(self, timeout: float = DEADLINE) -> "Sidecar":
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited {self.proc.returncode}: {self.log_path.read_text()}")
            return any(e["event"] == "ready" for e in self.events())

        wait_until(ready, timeout, "sidecar ready")
        for e in self.events():
            if e["event"] == "listening":
                self.ports[e["listener"]] = int(e["address"].rsplit(":", 1)[1])
        return self

    def wait_event(self, predicate, timeout: float = DEADLINE, what: str = "log event") -> dict:
        def found():
            for e in self.events():
                if predicate(e):
                    return e
            return None

        return wait_until(found, timeout, what)

    def count(self, predicate) -> int:
        return sum(1 for e in self.events() if predicate(e))

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


def identity_yaml(ident: Path, crl: Path | None = None) -> str:
    text = f"identity:\n  cert: {ident}/cert.pem\n  key: {ident}/key.pem\n  bundle: {ident}/bundle.pem\n"
    if crl is not None:
        text += f"  crl: {crl}\n"
    return text


def echo_through(port: int, payload: bytes = b"ping", timeout: float = 10) -> bytes:
    """Connect to a sidecar port, send, half-close, read until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


# --- forged certificates, signed by our CA's intermediate unless told otherwise ------------------


class Forge:
    """Builds leaves that break exactly one rule, signed with the key of a `ca` state directory."""

    def __init__(self, ca_dir: Path):
        self.issuer = x509.load_pem_x509_certificate((ca_dir / "intermediate.pem").read_bytes())
        self.issuer_key = serialization.load_pem_private_key((ca_dir / "intermediate.key").read_bytes(), None)
        self.bundle = (ca_dir / "bundle.pem").read_bytes()

    def leaf(
        self, out: Path, uris=(f"spiffe://{TD}/ns/prod/sa/frontend",), *, not_before=None, not_after=None,
        ca=False, eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        issuer=None, issuer_key=None, key_cert_sign=False,
    ) -> Path:
        now = dt.datetime.now(dt.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        issuer = issuer or self.issuer
        issuer_key = issuer_key or self.issuer_key
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(minutes=5))
            .not_valid_after(not_after or now + dt.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, key_cert_sign or ca, False, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        )
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True
            )
        cert = builder.sign(issuer_key, hashes.SHA256())
        out.mkdir(parents=True, exist_ok=True)
        pem = serialization.Encoding.PEM
        (out / "cert.pem").write_bytes(cert.public_bytes(pem) + issuer.public_bytes(pem))
        (out / "key.pem").write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        (out / "bundle.pem").write_bytes(self.bundle)
        return out


def other_authority() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA nobody trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "Untrusted CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key
