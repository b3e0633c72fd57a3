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

    def __init__(self, sock: socket.socket | None = None) -> None:
        """``sock``: an already listening socket to serve (e.g. one made inside a network namespace)."""
        if sock is None:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen(512)
        self.sock = sock
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.received = bytearray()
        self.endings: list[str] = []  # per finished connection: "eof" (clean) or the error's name
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
        ending = "eof"
        with conn:
            try:
                while data := conn.recv(65536):
                    with self.lock:
                        self.received += data[:4096]
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError as exc:
                ending = type(exc).__name__
        with self.lock:
            self.endings.append(ending)

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


class LoggedProcess:
    """A subprocess whose JSON log (stderr) is read back from a file; SIGTERM, then SIGKILL, to stop."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None, preexec_fn=None):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=self._log, env=dict(os.environ, **(env or {})),
            preexec_fn=preexec_fn,
        )
        self.ports: dict[str, int] = {}  # listener name -> port, from the "listening" events

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_ready(self, timeout: float = DEADLINE):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.log_path.stem} exited {self.proc.returncode}: {self.log_path.read_text()}")
            return any(e["event"] == "ready" for e in self.events())

        wait_until(ready, timeout, f"{self.log_path.stem} ready")
        for e in self.events():
            if e["event"] == "listening" and "listener" in e:
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


class Sidecar(LoggedProcess):
    """`proxy run` as a subprocess, with its config written to ``directory/name.yaml``."""

    def __init__(self, directory: Path, name: str, config: str, env: dict | None = None, *,
                 prefix: tuple[str, ...] = (), preexec_fn=None):
        """``prefix`` goes before the command (``("ip", "netns", "exec", NS)``); ``preexec_fn`` runs in
        the child before exec (e.g. to lower RLIMIT_NOFILE)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / f"{name}.yaml"
        self.config_path.write_text(config)
        super().__init__([*prefix, PY, "-m", "proxy", "run", "-c", str(self.config_path)],
                         directory / f"{name}.log", env, preexec_fn)


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
        issuer=None, issuer_key=None, key_cert_sign=False, key=None, chain=None,
    ) -> Path:
        """``key``: the leaf's private key (default a fresh P-256 key); ``chain``: the certificates
        written after the leaf in cert.pem (default: the issuer)."""
        now = dt.datetime.now(dt.timezone.utc)
        key = key or ec.generate_private_key(ec.SECP256R1())
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
        chain = (issuer,) if chain is None else chain
        (out / "cert.pem").write_bytes(cert.public_bytes(pem) + b"".join(c.public_bytes(pem) for c in chain))
        (out / "key.pem").write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        (out / "bundle.pem").write_bytes(self.bundle)
        return out

    def intermediate(self, path_length: int | None = None):
        """A CA certificate (and key) signed by our intermediate, whose ``pathlen:0`` forbids it."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "Sub-intermediate CA")])
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(self.issuer.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.issuer_key.public_key()), critical=False
            )
            .sign(self.issuer_key, hashes.SHA256())
        )
        return cert, key


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


# --- hardening helpers: configs, TLS clients and servers, probes, process facts -------------------


def inbound_config(ident: Path, forward: str, allow, *, name: str = "api", listen: str = "127.0.0.1:0",
                   crl: Path | None = None, extra: str = "") -> str:
    """One inbound listener forwarding to ``forward`` (``host:port``), allowing ``allow``."""
    return identity_yaml(ident, crl) + (
        f"inbound:\n  - name: {name}\n    listen: {listen}\n    forward: {forward}\n"
        f"    allow: [{', '.join(allow)}]\n{extra}"
    )


def outbound_config(ident: Path, targets: dict[str, str], expect, *, crl: Path | None = None,
                    extra: str = "", listen: str = "127.0.0.1:0") -> str:
    """One outbound listener per ``name -> host:port`` target, each expecting ``expect``."""
    text = identity_yaml(ident, crl) + "outbound:\n"
    for name, target in targets.items():
        text += (f"  - name: {name}\n    listen: {listen}\n    connect: {target}\n"
                 f"    expect: [{', '.join(expect)}]\n")
    return text + extra


def client_context(ident: Path | None = None, *, maximum_version=None, seclevel: int | None = None):
    """A stdlib TLS client context that presents ``ident`` and does not check the server (the sidecar does)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if seclevel is not None:
        ctx.set_ciphers(f"DEFAULT:@SECLEVEL={seclevel}")
    if maximum_version is not None:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = maximum_version
    if ident is not None:
        ctx.load_cert_chain(ident / "cert.pem", ident / "key.pem")
    return ctx


def tls_attempt(ctx, port: int, payload: bytes = b"hello", host: str = "127.0.0.1", timeout: float = 10):
    """Connect with ``ctx``, send, read one reply. Returns (local port, "data b'...'" or "error ...")."""
    import ssl

    raw = socket.socket()
    raw.settimeout(timeout)
    raw.bind((host, 0))
    local_port = raw.getsockname()[1]
    try:
        raw.connect((host, port))
        with ctx.wrap_socket(raw) as s:
            s.sendall(payload)
            return local_port, f"data {s.recv(len(payload) + 100)!r}"
    except (ssl.SSLError, OSError) as exc:
        return local_port, f"error {exc}"
    finally:
        raw.close()


def denial(side: Sidecar, local_port: int, host: str = "127.0.0.1", timeout: float = DEADLINE) -> dict:
    """The conn_denied event of the connection that came from ``host:local_port``."""
    return side.wait_event(
        lambda e: e["event"] == "conn_denied" and e.get("peer_addr") == f"{host}:{local_port}",
        timeout, f"denial of {host}:{local_port}",
    )


def closed_event(side: Sidecar, local_port: int, host: str = "127.0.0.1", timeout: float = DEADLINE) -> dict:
    """The conn_closed event of the connection that came from ``host:local_port``."""
    return side.wait_event(
        lambda e: e["event"] == "conn_closed" and e.get("peer_addr") == f"{host}:{local_port}",
        timeout, f"conn_closed of {host}:{local_port}",
    )


def final_event(side: Sidecar, local_port: int, host: str = "127.0.0.1", timeout: float = DEADLINE) -> dict:
    """The line that ends the connection from ``host:local_port``: its conn_denied or conn_closed."""
    return side.wait_event(
        lambda e: e["event"] in ("conn_denied", "conn_closed") and e.get("peer_addr") == f"{host}:{local_port}",
        timeout, f"the final log line of {host}:{local_port}",
    )


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Read until EOF, reset or ``timeout``; returns (bytes, "eof" | "reset" | "timeout" | error name)."""
    sock.settimeout(timeout)
    end = time.monotonic() + timeout
    got = bytearray()
    while time.monotonic() < end:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return bytes(got), "timeout"
        except ConnectionResetError:
            return bytes(got), "reset"
        except OSError as exc:
            return bytes(got), type(exc).__name__
        if not data:
            return bytes(got), "eof"
        got += data
    return bytes(got), "timeout"


class Trickle:
    """Sends ``data`` one byte every ``interval`` seconds from a thread, until done or ``stop_after``."""

    def __init__(self, sock: socket.socket, data: bytes, interval: float = 1.0, stop_after: float = 10.0):
        self.sock = sock
        self.sent = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._deadline = time.monotonic() + stop_after
        self._thread = threading.Thread(target=self._run, args=(data, interval), daemon=True)
        self._thread.start()

    def _run(self, data: bytes, interval: float) -> None:
        for byte in data:
            if self._stop.is_set() or time.monotonic() > self._deadline:
                return
            try:
                self.sock.send(bytes([byte]))
            except OSError as exc:
                self.error = type(exc).__name__
                return
            self.sent += 1
            self._stop.wait(interval)  # the trickle's pace, interrupted at once by stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def client_hello(server_name: str = "api") -> bytes:
    """The bytes of a real TLS 1.3 ClientHello (what a stdlib client sends first)."""
    import ssl

    ctx = client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def vm_rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` from /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state in this network namespace (IPv4 and IPv6)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def free_port() -> int:
    """A port that was free a moment ago (for tests that must name the port in advance)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_netns(name: str, fn, *args):
    """Run ``fn(*args)`` in a thread that has joined network namespace ``name``; return its result.

    Network namespaces are per thread, so the test process stays where it is, while sockets created
    by ``fn`` belong to ``name`` and can then be used from any thread.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000
    result: dict = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, clone_newnet) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn(*args)
        except BaseException as exc:  # handed to the calling thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    if "error" in result:
        raise result["error"]
    if "value" not in result:
        raise AssertionError(f"{fn} in netns {name} did not finish within {DEADLINE}s")
    return result["value"]


def plain_attempt(port: int, payload: bytes = b"", host: str = "127.0.0.1", timeout: float = 10):
    """What an app sees on a plaintext connection to ``host:port``: (local port, bytes, how it ended).

    The local port is bound first, so the sidecar's log line can be found even when the sidecar
    resets the connection before connect() has returned ("reset").
    """
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((host, 0))
    local_port = sock.getsockname()[1]
    with sock:
        try:
            sock.connect((host, port))
        except ConnectionResetError:
            return local_port, b"", "reset"
        try:
            sock.sendall(payload)
        except OSError:
            pass
        got, how = read_until_closed(sock, timeout)
    return local_port, got, how
