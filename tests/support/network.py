"""The network side of end-to-end tests: an echo app, TLS and plain clients, ports, network namespaces.

Clients bind their local port before connecting, so that the sidecar's log line for the connection can
be found by that port (``support.processes.denial``) even when the sidecar resets it at once.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

from proxyprotocol import ProxyProtocolIncompleteError
from proxyprotocol.result import ProxyResult
from proxyprotocol.v2 import ProxyProtocolV2

from support.polling import DEADLINE, wait_until


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
        self.endings: list[str] = []  # per finished connection: "eof" (clean) or the error's name
        self.lock = threading.Lock()
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


# --- ports -------------------------------------------------------------------------------------------


def refused_port() -> tuple[socket.socket, int]:
    """A bound, never-listening socket: connecting to its port is refused while it stays open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def free_port() -> int:
    """A port that was free a moment ago (for tests that must name the port in advance)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# --- clients -----------------------------------------------------------------------------------------


def echo_through(port: int, payload: bytes = b"ping", timeout: float = 10) -> bytes:
    """Connect to a sidecar port, send, half-close, read until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def client_context(ident: Path | None = None, *, maximum_version=None, seclevel: int | None = None):
    """A stdlib TLS client context that presents ``ident`` and does not check the server (the sidecar does)."""
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


def tls_exchange(ctx, sock: socket.socket, payload: bytes = b"hello") -> str:
    """Over connected ``sock`` (closed after): TLS with ``ctx``, send, read one reply.
    Returns "data b'...'" or "error ..."."""
    try:
        with ctx.wrap_socket(sock) as s:
            s.sendall(payload)
            return f"data {s.recv(len(payload) + 100)!r}"
    except (ssl.SSLError, OSError) as exc:
        return f"error {exc}"
    finally:
        sock.close()


def tls_attempt(ctx, port: int, payload: bytes = b"hello", host: str = "127.0.0.1", timeout: float = 10):
    """Connect with ``ctx``, send, read one reply. Returns (local port, "data b'...'" or "error ...")."""
    raw = socket.socket()
    raw.settimeout(timeout)
    raw.bind((host, 0))
    local_port = raw.getsockname()[1]
    try:
        raw.connect((host, port))
    except OSError as exc:
        raw.close()
        return local_port, f"error {exc}"
    return local_port, tls_exchange(ctx, raw, payload)


def tls_client(ident: Path | None, port: int, payload: bytes = b"hello"):
    """``tls_attempt`` presenting ``ident`` (None: no certificate): (local port, what happened)."""
    return tls_attempt(client_context(ident), port, payload)


def tls_connection(ident: Path, port: int) -> ssl.SSLSocket:
    """A TLS connection presenting ``ident`` that the test holds open (and closes)."""
    return client_context(ident).wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))


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


def client_hello(server_name: str = "api") -> bytes:
    """The bytes of a real TLS 1.3 ClientHello (what a stdlib client sends first)."""
    ctx = client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


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


class Stream:
    """One connection through a sidecar pair held open for a whole test; each ``push`` must come back intact."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.pushed = 0  # bytes sent and echoed back intact
        self.received = bytearray()  # echoed, not yet checked (the reader thread only appends)
        self.ended = False  # the other end closed or reset the connection
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            while data := self.sock.recv(65536):
                self.received += data
        except OSError:
            pass
        self.ended = True

    def push(self, step: int, size: int = 20_000) -> None:
        """Send ``size`` bytes and wait for their echo; ConnectionError at once if the connection ends first."""
        chunk = bytes([step % 256]) * size
        self.sock.sendall(chunk)

        def echoed() -> bool:
            if len(self.received) >= size:
                return True
            if self.ended:
                raise ConnectionError(f"the connection ended before step {step} came back")
            return False

        wait_until(echoed, what=f"open connection echoes step {step}")
        assert self.received[:size] == chunk, f"step {step}: the echo differs"
        del self.received[:size]
        self.pushed += size

    def close(self) -> None:
        """Half-close; the echo must end cleanly with nothing unexpected after the last push. A connection
        the far end cut in the meantime (a certificate expiring at that instant) can only be seen to have ended."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:  # ENOTCONN: already reset, nothing left to half-close
            self.reader.join(10)
            assert self.ended and bytes(self.received) == b""
            self.sock.close()
            return
        self.reader.join(10)
        assert not self.reader.is_alive() and bytes(self.received) == b""
        self.sock.close()


# --- what an app behind the sidecar reads ------------------------------------------------------------


def read_header(sock: socket.socket) -> ProxyResult:
    """A PROXY v2 header read as an app does: exactly as many bytes as the parser asks for, never more."""
    parser = ProxyProtocolV2()
    data = b""
    while True:
        try:
            return parser.unpack(data)
        except ProxyProtocolIncompleteError as incomplete:
            data += recv_exactly(sock, incomplete.want_read.want_bytes)


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, f"connection closed after {len(data)} of {count} bytes"
        data += chunk
    return data


# --- network namespaces ------------------------------------------------------------------------------


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


def ip(*args: str) -> None:
    """Run ``ip ARGS``; RuntimeError with its stderr if it fails."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def bridged_namespaces(names: dict[str, str], addresses: dict[str, tuple[str, ...]], created: list[str]) -> None:
    """Hosts on one LAN: a namespace per host (``names[host]``), its ``eth0`` with ``addresses[host]``
    (CIDR; IPv6 without duplicate address detection), joined by a bridge in the ``names["hub"]`` namespace.

    Both ends of every veth pair are created inside our namespaces, so no name ever appears in the
    host's namespace. Each namespace is appended to ``created`` as soon as it exists, for the
    caller's clean-up, even when a later step fails.
    """
    hub = names["hub"]
    ip("netns", "add", hub)
    created.append(hub)
    ip("-n", hub, "link", "add", "br0", "type", "bridge")
    ip("-n", hub, "link", "set", "br0", "up")
    for host, cidrs in addresses.items():
        ns = names[host]
        ip("netns", "add", ns)
        created.append(ns)
        ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"to-{host}", "netns", hub)
        ip("-n", hub, "link", "set", f"to-{host}", "master", "br0")
        ip("-n", hub, "link", "set", f"to-{host}", "up")
        for cidr in cidrs:
            ip("-n", ns, "addr", "add", cidr, "dev", "eth0", *(("nodad",) if ":" in cidr else ()))
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
