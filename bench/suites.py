"""Which TLS 1.3 cipher suite a pair really negotiates, read off the wire.

A second client side of the system under test (same configuration, own port) connects to the
pair's server side through a tap: a small TCP relay that reads the ServerHello going back and
takes its cipher_suite field (TLS 1.3 sends it in the clear). One request goes through, then the
probe stops. This sees what the two sides agree on, whatever each one's configuration says.
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

from procs import Child, free_port, wait_listening

SUITE_NAMES = {0x1301: "TLS_AES_128_GCM_SHA256", 0x1302: "TLS_AES_256_GCM_SHA384",
               0x1303: "TLS_CHACHA20_POLY1305_SHA256"}
PATIENCE = 10.0  # seconds for the probe's one connection


def _server_hello_suite(data: bytes) -> str | None:
    """The cipher suite of a ServerHello at the start of ``data`` (a server's first bytes), if complete."""
    if len(data) < 5 + 4 + 2 + 32 + 1 or data[0] != 0x16 or data[5] != 0x02:
        return None
    session_id_end = 5 + 4 + 2 + 32 + 1 + data[5 + 4 + 2 + 32]
    if len(data) < session_id_end + 2:
        return None
    (code,) = struct.unpack(">H", data[session_id_end:session_id_end + 2])
    return SUITE_NAMES.get(code, f"0x{code:04x}")


class Tap:
    """Relays one connection from its port to ``target`` and records the ServerHello's suite."""

    def __init__(self, target: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target
        self.suite: str | None = None
        self.seen = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.listener.settimeout(PATIENCE)
        try:
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.target), timeout=PATIENCE)
        except OSError:
            self.seen.set()
            return
        threading.Thread(target=self._copy, args=(client, server, False), daemon=True).start()
        self._copy(server, client, True)

    def _copy(self, source: socket.socket, destination: socket.socket, from_server: bool) -> None:
        first = b""
        source.settimeout(PATIENCE)
        try:
            while data := source.recv(65536):
                if from_server and self.suite is None:
                    first += data
                    self.suite = _server_hello_suite(first)
                    if self.suite:
                        self.seen.set()
                destination.sendall(data)
        except OSError:
            pass
        finally:
            if from_server:
                self.seen.set()
            for sock in (source, destination):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def negotiated_suite(system, identities, server_port: int, workdir: Path, logdir: Path) -> str:
    """The suite ``system``'s client side and its server side (at ``server_port``) agree on."""
    tap = Tap(server_port)
    probe_dir = workdir / "suite-probe"
    probe_dir.mkdir(exist_ok=True)
    listen = free_port()
    side = system.client(identities["client"], listen, tap.port, probe_dir)
    child = Child(f"{system.name} suite probe", side.argv, logdir / f"{system.name}-suite-probe.log")
    try:
        wait_listening(listen, child)
        with socket.create_connection(("127.0.0.1", listen), timeout=PATIENCE) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\nHost: probe\r\n\r\n")
            tap.seen.wait(PATIENCE)
        return tap.suite or "not seen"
    except (OSError, RuntimeError) as exc:
        return f"not seen ({exc})"
    finally:
        child.stop()
        tap.close()
