"""`proxy demo`: a CA, three identities, two sidecars, two tiny apps, one allowed and one denied call.

Everything runs on loopback in a temporary directory with real processes (`ca`, `proxy run`), the
way an operator would run them, and is cleaned up at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TD = "example.org"
FRONTEND = f"spiffe://{TD}/ns/prod/sa/frontend"
API = f"spiffe://{TD}/ns/prod/sa/api"
INTRUDER = f"spiffe://{TD}/ns/prod/sa/intruder"
READY_TIMEOUT = 15.0


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(text: str) -> None:
    _say(f"\n== {text}")


def _run_ca(ca_dir: Path, *args: str) -> str:
    shown = " ".join(args)
    _say(f"$ ca {shown}")
    proc = subprocess.run(
        [sys.executable, "-m", "ca", *args], env=dict(os.environ, CA_DIR=str(ca_dir)),
        capture_output=True, text=True, timeout=60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ca {shown} failed: {proc.stderr.strip()}")
    return proc.stdout


class _ApiApp:
    """The api app: answers each connection with one line naming what it received."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                try:
                    request = conn.recv(4096).decode(errors="replace").strip()
                    conn.sendall(f"api says hello; you sent {request!r}\n".encode())
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class _Sidecar:
    def __init__(self, workdir: Path, name: str, config: str):
        self.name = name
        self.config = workdir / f"{name}.yaml"
        self.config.write_text(config)
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "-c", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=self._log,
        )
        self.ports: dict[str, int] = {}

    def events(self) -> list[dict]:
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def wait_for(self, predicate, what: str) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar {self.name} exited: {self.log_path.read_text().strip()}")
            for event in self.events():
                if predicate(event):
                    return event
            time.sleep(0.02)
        raise RuntimeError(f"sidecar {self.name}: no {what} within {READY_TIMEOUT:g}s")

    def wait_ready(self) -> None:
        self.wait_for(lambda e: e["event"] == "ready", "ready event")
        for event in self.events():
            if event["event"] == "listening":
                self.ports[event["listener"]] = int(event["address"].rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _identity(directory: Path) -> str:
    return f"identity:\n  cert: {directory}/cert.pem\n  key: {directory}/key.pem\n  bundle: {directory}/bundle.pem\n"


def _call(port: int, message: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(message)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while data := conn.recv(4096):
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace").strip()


def _intruder_call(identity: Path, port: int) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(identity / "bundle.pem")
    ctx.check_hostname = False
    ctx.load_cert_chain(identity / "cert.pem", identity / "key.pem")
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as conn:
            conn.sendall(b"GET /secrets")
            data = conn.recv(4096)
            return f"got {data!r}"
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {exc}"


def run_demo(keep: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="mtls-demo-"))
    sidecars: list[_Sidecar] = []
    app = None
    try:
        _step("1. An admin creates a CA and gives each workload an identity")
        ca_dir = workdir / "ca"
        _run_ca(ca_dir, "init", "--trust-domain", TD)
        ids = {}
        for name, spiffe_id in (("frontend", FRONTEND), ("api", API), ("intruder", INTRUDER)):
            ids[name] = workdir / "identities" / name
            _run_ca(ca_dir, "issue", spiffe_id, "--ttl", "1h", "--out", str(ids[name]))
        _say(_run_ca(ca_dir, "list").rstrip())

        _step("2. The api app listens on loopback; its sidecar admits only the frontend")
        app = _ApiApp()
        api_sidecar = _Sidecar(
            workdir, "api-sidecar",
            _identity(ids["api"])
            + f"inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app.port}\n"
            f"    allow: [{FRONTEND}]\n",
        )
        sidecars.append(api_sidecar)
        api_sidecar.wait_ready()
        api_port = api_sidecar.ports["api"]
        _say(f"api app on 127.0.0.1:{app.port}; api sidecar (mTLS) on 127.0.0.1:{api_port}, allow: [{FRONTEND}]")

        frontend_sidecar = _Sidecar(
            workdir, "frontend-sidecar",
            _identity(ids["frontend"])
            + f"outbound:\n  - name: api\n    listen: 127.0.0.1:0\n    connect: 127.0.0.1:{api_port}\n"
            f"    expect: [{API}]\n",
        )
        sidecars.append(frontend_sidecar)
        frontend_sidecar.wait_ready()
        out_port = frontend_sidecar.ports["api"]
        _say(f"frontend sidecar: plaintext 127.0.0.1:{out_port} -> mTLS 127.0.0.1:{api_port}, expect: [{API}]")

        _step("3. The frontend app calls the api through both sidecars (allowed)")
        reply = _call(out_port, b"GET /orders")
        _say(f"frontend got: {reply}")
        allowed = api_sidecar.wait_for(lambda e: e["event"] == "conn_allowed", "allowed decision")
        _say(f"api sidecar log: {json.dumps(allowed)}")

        _step("4. The intruder, with a valid identity from the same CA, calls the api (denied)")
        seen_before = app.connections
        _say(f"intruder got: {_intruder_call(ids['intruder'], api_port)}")
        denied = api_sidecar.wait_for(lambda e: e["event"] == "conn_denied", "denied decision")
        _say(f"api sidecar log: {json.dumps(denied)}")
        _say(f"reason: {denied['reason']}: {denied['detail']}")
        _say(f"connections the api app saw from the intruder: {app.connections - seen_before}")

        ok = reply.startswith("api says hello") and denied["reason"] == "identity_not_allowed"
        _step("Done: one call allowed, one denied, each with its reason." if ok else "Unexpected outcome")
        return 0 if ok else 1
    except RuntimeError as exc:
        print(f"proxy demo: {exc}", file=sys.stderr)
        return 1
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        if app is not None:
            app.close()
        if keep:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
