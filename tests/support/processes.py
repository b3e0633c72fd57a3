"""Our programs as real processes: `proxy run` (``Sidecar``) and `ca serve` (``CaService``), both
``LoggedProcess``es whose JSON log is read back from a file; their configs; the log lines that end a connection.

Nothing here sleeps for a fixed time: every wait polls the log until a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from support.polling import DEADLINE, wait_until

PY = sys.executable


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


class CaService(LoggedProcess):
    """`ca serve --listen 127.0.0.1:0` on ``ca_dir`` as a subprocess, started and ready; its log in ``log_dir``."""

    def __init__(self, ca_dir: Path, log_dir: Path, *extra: str, listen: str = "127.0.0.1:0", db: str | None = None):
        """``db``: the index URL ($CA_DB), e.g. a PostgreSQL database shared with other replicas."""
        self.ca_dir = ca_dir
        self.db = db
        env = {"CA_DIR": str(ca_dir), **({"CA_DB": db} if db else {})}
        super().__init__([PY, "-m", "ca", "serve", "--listen", listen, *extra],
                         log_dir / f"ca-serve-{os.urandom(3).hex()}.log", env)
        self.wait_ready()
        listening = next(e for e in self.events() if e["event"] == "listening")
        self.port = int(listening["address"].rsplit(":", 1)[1])
        self.url = f"https://127.0.0.1:{self.port}"

    def requests(self) -> list[dict]:
        return [e for e in self.events() if e["event"] == "request"]


def vm_rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` from /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# --- configs ---------------------------------------------------------------------------------------


def identity_yaml(ident: Path, crl: Path | None = None) -> str:
    text = f"identity:\n  cert: {ident}/cert.pem\n  key: {ident}/key.pem\n  bundle: {ident}/bundle.pem\n"
    if crl is not None:
        text += f"  crl: {crl}\n"
    return text


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


# --- the log line that ends a connection, found by the client's address ---------------------------


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
