"""`proxy enroll` keeps its one-time token out of argv: ``--token-file`` or ``$MTLS_ENROLL_TOKEN``, and
``--token`` refused with the reason. A running enrollment's /proc/PID/cmdline does not hold the token."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.ca_cli import run_ca
from support.certs import TD
from support.polling import DEADLINE
from support.processes import CaService

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    root = tmp_path_factory.mktemp("enroll-secrets")
    ca_dir = root / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    service = CaService(ca_dir, root)
    yield ca_dir, service
    service.stop()


def _token(ca_dir: Path, name: str) -> str:
    return run_ca("token", f"spiffe://{TD}/ns/prod/sa/{name}", ca_dir=ca_dir).stdout.strip()


def _enroll_argv(url: str, ca_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "enroll", "--url", url, "--bundle", str(ca_dir / "bundle.pem"),
            "--out", str(out), *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "MTLS_ENROLL_TOKEN"}
    env.update(extra)
    return env


class StalledRelay:
    """A TCP relay to ``port`` that holds its one connection until ``release`` (the CA seems slow)."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connected = threading.Event()
        self.released = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        self.connected.set()
        self.released.wait(DEADLINE)
        upstream = socket.create_connection(("127.0.0.1", self.target))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def release(self) -> None:
        self.released.set()
        self.listener.close()


def test_the_token_is_not_in_the_cmdline_of_a_running_enrollment(ca, tmp_path):
    ca_dir, service = ca
    token = _token(ca_dir, "quiet")
    token_path = tmp_path / "token"
    token_path.write_text(token + "\n")
    token_path.chmod(0o600)
    relay = StalledRelay(service.port)
    enroll = subprocess.Popen(
        _enroll_argv(f"https://127.0.0.1:{relay.port}", ca_dir, tmp_path / "out", "--token-file", str(token_path)),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert relay.connected.wait(DEADLINE), "proxy enroll never connected"
        cmdline = Path(f"/proc/{enroll.pid}/cmdline").read_bytes()  # what any process on the host can read
        assert b"enroll" in cmdline and token.encode() not in cmdline
        relay.release()
        out, err = enroll.communicate(timeout=DEADLINE)
    finally:
        if enroll.poll() is None:
            enroll.kill()
            enroll.wait()
    assert enroll.returncode == 0, err
    assert f"enrolled spiffe://{TD}/ns/prod/sa/quiet" in out


def test_the_token_can_come_from_the_environment(ca, tmp_path):
    ca_dir, service = ca
    result = subprocess.run(
        _enroll_argv(service.url, ca_dir, tmp_path / "out"), env=_env(MTLS_ENROLL_TOKEN=_token(ca_dir, "env")),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "cert.pem").exists()


def test_token_in_argv_is_refused_saying_why_and_what_to_use_and_the_token_stays_unspent(ca, tmp_path):
    ca_dir, service = ca
    token = _token(ca_dir, "argv")
    result = subprocess.run(
        _enroll_argv(service.url, ca_dir, tmp_path / "out", "--token", token), env=_env(),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "/proc/PID/cmdline" in result.stderr
    assert "--token-file FILE" in result.stderr and "$MTLS_ENROLL_TOKEN" in result.stderr
    assert not (tmp_path / "out").exists()
    unspent = subprocess.run(_enroll_argv(service.url, ca_dir, tmp_path / "out"), env=_env(MTLS_ENROLL_TOKEN=token),
                             capture_output=True, text=True, timeout=60)
    assert unspent.returncode == 0, unspent.stderr  # nothing was sent with --token


def test_no_token_at_all_and_an_empty_token_file_are_one_line_errors(ca, tmp_path):
    ca_dir, service = ca
    result = subprocess.run(_enroll_argv(service.url, ca_dir, tmp_path / "out"), env=_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "give --token-file FILE or set $MTLS_ENROLL_TOKEN" in result.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = subprocess.run(_enroll_argv(service.url, ca_dir, tmp_path / "out", "--token-file", str(empty)),
                            env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"--token-file {empty} is empty" in result.stderr
