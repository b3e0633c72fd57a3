"""The identity lifecycle end to end with real processes: `proxy enroll` against `ca serve`, sidecars that
renew their own short-lived certificates under traffic, a renewal that keeps failing, and how long a
revocation takes to cut an open connection."""

from __future__ import annotations

import io
import json
import os
import random
import socket
import ssl
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from cryptography import x509
from support.ca_cli import issue, run_ca
from support.certs import API, FRONTEND, TD, Authority, write_pem
from support.network import App, Stream, echo_through, free_port, tls_connection
from support.polling import DEADLINE, wait_until
from support.processes import PY, CaService, Sidecar, identity_yaml

pytestmark = pytest.mark.e2e


def renewing_identity(ident: Path, url: str, at: float, crl: Path | None = None) -> str:
    return identity_yaml(ident, crl) + f"  renew: {{url: '{url}', at: {at}}}\n"


def inbound(app_port: int, allow: str = FRONTEND) -> str:
    return (f"inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app_port}\n"
            f"    allow: [{allow}]\n")


def outbound(target_port: int) -> str:
    return (f"outbound:\n  - name: api\n    listen: 127.0.0.1:0\n    connect: 127.0.0.1:{target_port}\n"
            f"    expect: [{API}]\n")


def proxy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "proxy", *args], capture_output=True, text=True, timeout=60)


def token_file(directory: Path, token: str) -> str:
    """The token in a file of its own (0600), for ``proxy enroll --token-file``."""
    path = directory / f"token-{token[-8:]}"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path)


def renewals(side: Sidecar) -> int:
    return side.count(lambda e: e["event"] == "reloaded" and e.get("trigger") == "renewal")


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def renewal_metric(port: int, result: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f'sidecar_renewals_total{{result="{result}"}}'):
                return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    ca_dir = root / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    service = CaService(ca_dir, root)
    yield ca_dir, service
    service.stop()


# --- proxy enroll ----------------------------------------------------------------------------------


def test_proxy_enroll_writes_an_identity_a_sidecar_accepts(ca, tmp_path):
    ca_dir, service = ca
    spiffe_id = f"spiffe://{TD}/ns/prod/sa/fresh"
    # 48h: `proxy check` counts a certificate expiring within 24 h as a problem
    token = run_ca("token", spiffe_id, "--ttl", "10m", "--cert-ttl", "48h", ca_dir=ca_dir).stdout.strip()
    out = tmp_path / "identity"
    result = proxy("enroll", "--url", service.url, "--token-file", token_file(tmp_path, token),
                   "--bundle", str(ca_dir / "bundle.pem"),
                   "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"enrolled {spiffe_id}" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["bundle.pem", "cert.pem", "key.pem"]
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (out / "bundle.pem").read_bytes() == (ca_dir / "bundle.pem").read_bytes()
    leaf, _ = x509.load_pem_x509_certificates((out / "cert.pem").read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id]
    config = tmp_path / "check.yaml"
    config.write_text(identity_yaml(out) + inbound(free_port()))
    checked = proxy("check", "-c", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert run_ca("verify", str(out / "cert.pem"), "--bundle", str(out / "bundle.pem"), ca_dir=ca_dir).returncode == 0


def test_proxy_enroll_with_a_spent_token_exits_1_with_one_line_naming_the_url(ca, tmp_path):
    ca_dir, service = ca
    token = run_ca("token", f"spiffe://{TD}/ns/prod/sa/once", ca_dir=ca_dir).stdout.strip()
    args = ("enroll", "--url", service.url, "--token-file", token_file(tmp_path, token),
            "--bundle", str(ca_dir / "bundle.pem"))
    assert proxy(*args, "--out", str(tmp_path / "first")).returncode == 0
    result = proxy(*args, "--out", str(tmp_path / "second"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and service.url in result.stderr and "token_used" in result.stderr
    assert not (tmp_path / "second").exists()


def test_proxy_enroll_exits_2_naming_the_url_when_the_service_is_unreachable(ca, tmp_path):
    ca_dir, _ = ca
    url = f"https://127.0.0.1:{free_port()}"
    result = proxy("enroll", "--url", url, "--token-file", token_file(tmp_path, "mst1_x"),
                   "--bundle", str(ca_dir / "bundle.pem"),
                   "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert url in result.stderr and "cannot connect" in result.stderr


def test_proxy_enroll_exits_2_when_the_service_does_not_verify_against_the_bundle(ca, tmp_path):
    ca_dir, service = ca
    bundle = write_pem(tmp_path / "foreign.pem", Authority.create("Untrusted").root)
    token = run_ca("token", f"spiffe://{TD}/ns/prod/sa/wary", ca_dir=ca_dir).stdout.strip()
    result = proxy("enroll", "--url", service.url, "--token-file", token_file(tmp_path, token), "--bundle", str(bundle),
                   "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "does not verify against our trust bundle" in result.stderr and service.url in result.stderr
    # the token never left this machine, so it still works with the right bundle
    assert proxy("enroll", "--url", service.url, "--token-file", token_file(tmp_path, token),
                 "--bundle", str(ca_dir / "bundle.pem"),
                 "--out", str(tmp_path / "out")).returncode == 0


def test_proxy_enroll_sends_no_token_to_a_server_that_is_not_the_ca_service(ca, tmp_path):
    """A workload of the same CA (its certificate verifies against the bundle) is not the CA service."""
    ca_dir, _ = ca
    impostor = issue(ca_dir, tmp_path / "impostor", API)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(impostor / "cert.pem", impostor / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    heard = bytearray()

    def serve_once() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(DEADLINE)
            try:
                while data := tls.recv(65536):
                    heard.extend(data)
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}"
    result = proxy("enroll", "--url", url, "--token-file", token_file(tmp_path, "mst1_secret"),
                   "--bundle", str(ca_dir / "bundle.pem"),
                   "--out", str(tmp_path / "out"))
    thread.join(DEADLINE)
    listener.close()
    assert result.returncode == 2
    assert f"{url} is {API}, not the CA service (spiffe://TD/ca)" in result.stderr
    assert b"mst1_secret" not in heard and heard == b""


# --- the acceptance test of issue 4 ----------------------------------------------------------------


def test_sidecars_renew_10_second_certificates_three_times_in_40_s_of_traffic_without_a_failed_connection(tmp_path):
    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    service = CaService(ca_dir, tmp_path)
    app = App()
    sides: list[Sidecar] = []
    try:
        api_ident = issue(ca_dir, tmp_path / "api", API, "--ttl", "10s")
        api = Sidecar(tmp_path, "api", renewing_identity(api_ident, service.url, 0.5) + inbound(app.port))
        sides.append(api.wait_ready())
        front_ident = issue(ca_dir, tmp_path / "front", FRONTEND, "--ttl", "10s")
        front = Sidecar(tmp_path, "front", renewing_identity(front_ident, service.url, 0.66)
                        + outbound(api.ports["api"]))
        sides.append(front.wait_ready())
        port = front.ports["api"]

        # Long-lived connections echoing as fast as they can: each lives through renewals until the first
        # certificate it was authorized with expires (peer_expired), then the next one opens.
        streams = [Stream(port)]
        results = {"ok": 0, "failed": []}
        lock = threading.Lock()
        stop_at = time.monotonic() + 40

        def long_lived() -> None:
            step = 0
            while time.monotonic() < stop_at:
                try:
                    streams[-1].push(step, 4096)
                except ConnectionError:
                    streams.append(Stream(port))
                except (OSError, AssertionError) as exc:
                    with lock:
                        results["failed"].append(f"long-lived connection after {streams[-1].pushed} bytes: {exc}")
                    return
                step += 1

        def traffic(worker: int) -> None:
            rng = random.Random(worker)
            while time.monotonic() < stop_at:
                payload = os.urandom(rng.randint(1, 32 * 1024))
                try:
                    echoed = echo_through(port, payload, timeout=10)
                    outcome = None if echoed == payload else f"short echo {len(echoed)}/{len(payload)}"
                except OSError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                with lock:
                    if outcome is None:
                        results["ok"] += 1
                    else:
                        results["failed"].append(outcome)

        workers = [threading.Thread(target=traffic, args=(i,)) for i in range(4)]  # at most 4 at once
        workers.append(threading.Thread(target=long_lived))
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)

        assert results["failed"] == []
        assert results["ok"] > 200
        for side in sides:
            events = side.events()
            assert renewals(side) >= 3, [e for e in events if e["event"] in ("renewed", "renew_failed")]
            bad = [e for e in events if e["event"] in ("conn_denied", "reload_failed", "renew_failed")]
            assert bad == [], bad
            closed = [e for e in events if e["event"] == "conn_closed" and e.get("reason") not in (None, "peer_expired")]
            assert closed == [], closed
        cuts = sum(side.count(lambda e: e.get("reason") == "peer_expired") for side in sides)
        assert cuts >= 2 and len(streams) >= 3  # 40 s of 10-second certificates
        streams[-1].close()
        assert sum(stream.pushed for stream in streams) > 1_000_000
    finally:
        for side in sides:
            side.stop()
        service.stop()
        app.close()


# --- renewal that keeps failing -----------------------------------------------------------------------


def test_failing_renewal_is_logged_counted_and_turns_readyz_503_before_expiry_then_recovers(tmp_path):
    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    port = free_port()  # the CA service is not there yet
    url = f"https://127.0.0.1:{port}"
    ident = issue(ca_dir, tmp_path / "api", API, "--ttl", "16s")
    not_after = x509.load_pem_x509_certificates((ident / "cert.pem").read_bytes())[0].not_valid_after_utc
    app = App()
    side = Sidecar(tmp_path, "api", renewing_identity(ident, url, 0.1) + inbound(app.port)
                   + "admin:\n  listen: 127.0.0.1:0\n").wait_ready()
    service = None
    try:
        failed = side.wait_event(lambda e: e["event"] == "renew_failed", what="renew_failed")
        assert failed["url"] == url and url in failed["detail"] and failed["reason"] == "unreachable"
        admin = side.ports["admin"]
        wait_until(lambda: renewal_metric(admin, "failed") >= 2, what="failures counted")
        attempts = [e for e in side.events() if e["event"] == "renew_failed"]
        assert [e["attempt"] for e in attempts[:2]] == [1, 2]

        def unready_for_renewal():
            status, body = readyz(admin)
            return status == 503 and "certificate renewal failing since" in body and body

        body = wait_until(unready_for_renewal, timeout=15, what="/readyz 503 for renewal")
        assert time.time() < not_after.timestamp(), "readiness must turn before the certificate expires"
        assert url in body and "certificate expires in" in body

        service = CaService(ca_dir, tmp_path, listen=f"127.0.0.1:{port}")
        renewed = side.wait_event(lambda e: e["event"] == "reloaded" and e.get("trigger") == "renewal",
                                  what="renewal once the service is back")
        assert renewed["spiffe_id"] == API
        assert "renewal failing" not in readyz(admin)[1]
        assert renewal_metric(admin, "ok") == 1
    finally:
        side.stop()
        app.close()
        if service is not None:
            service.stop()


# --- how long a revocation takes to cut an open connection -------------------------------------------


def test_revocation_cuts_an_open_connection_within_2_s_measured_over_5_runs(tmp_path, tmp_path_factory):
    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    ident = issue(ca_dir, tmp_path / "api", API)
    crl = tmp_path / "crl.pem"
    run_ca("crl", "--out", str(crl), ca_dir=ca_dir)
    app = App()
    side = Sidecar(tmp_path, "api", identity_yaml(ident, crl) + inbound(app.port, f"spiffe://{TD}/ns/prod/*"))
    side.wait_ready()
    runs = []
    try:
        for run in range(5):
            victim_id = f"spiffe://{TD}/ns/prod/sa/victim-{run}"
            victim = issue(ca_dir, tmp_path / f"victim-{run}", victim_id)
            conn = tls_connection(victim, side.ports["api"])
            conn.sendall(b"open")
            assert conn.recv(10) == b"open"
            started = time.time()
            run_ca("revoke", victim_id, ca_dir=ca_dir)
            run_ca("crl", "--out", str(crl), ca_dir=ca_dir)  # writes atomically into the sidecar's crl path
            landed = crl.stat().st_mtime_ns / 1e9
            event = side.wait_event(lambda e: e.get("reason") == "policy_revoked" and e["peer_id"] == victim_id,
                                    timeout=5, what=f"run {run}: policy_revoked")
            cut = datetime.fromisoformat(event["ts"]).timestamp()
            runs.append({"from_crl_file": round(cut - landed, 3), "from_ca_revoke": round(cut - started, 3)})
            conn.close()
    finally:
        side.stop()
        app.close()
    summary = {
        "runs": runs,
        "median_from_crl_file_s": statistics.median(r["from_crl_file"] for r in runs),
        "median_from_ca_revoke_s": statistics.median(r["from_ca_revoke"] for r in runs),
    }
    (tmp_path_factory.getbasetemp() / "revocation-cut.json").write_text(json.dumps(summary, indent=2))
    print(f"\nrevocation -> open connection cut: {json.dumps(summary)}")
    assert all(r["from_crl_file"] <= 2.0 for r in runs), summary


# --- in process: the renewal schedule and the watcher's pause ----------------------------------------


@pytest.fixture
def one_sidecar(tmp_path):
    """A real Sidecar object (not started) for an identity with a 10-second certificate and renewal set."""
    from mtls.events import EventLog
    from proxy.metrics import Metrics
    from proxy.sidecar import Sidecar as SidecarObject
    from proxy.snapshot import load_snapshot

    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    ident = issue(ca_dir, tmp_path / "api", API, "--ttl", "10s")
    config = tmp_path / "api.yaml"
    config.write_text(renewing_identity(ident, "https://127.0.0.1:1", 0.5) + inbound(free_port()))
    log = io.StringIO()
    sidecar = SidecarObject(config, load_snapshot(config), EventLog("info", "json", log), Metrics())
    return sidecar, ca_dir, ident, log


def renewer_for(sidecar, **options):
    """A Renewer wired to ``sidecar`` as ``proxy run`` wires it."""
    from proxy.renewer import Renewer

    return Renewer(sidecar.current_identity, sidecar.install_identity, sidecar.log, sidecar.metrics, **options)


def test_renewal_point_is_at_the_fraction_of_the_lifetime_with_at_most_5_percent_jitter(one_sidecar):
    sidecar, *_ = one_sidecar
    creds = sidecar.snapshot.creds
    start, end = creds.not_before.timestamp(), creds.not_after.timestamp()
    points = [renewer_for(sidecar, rng=random.Random(seed)).renewal_time(creds, 0.5) for seed in range(200)]
    fractions = [(point - start) / (end - start) for point in points]
    assert 0.45 <= min(fractions) < 0.47 and 0.53 < max(fractions) <= 0.55
    renewer = renewer_for(sidecar)
    assert renewer.renewal_time(creds, 0.5) == renewer.renewal_time(creds, 0.5)  # drawn once per certificate


def test_retry_backoff_doubles_from_2_percent_of_the_lifetime_up_to_a_cap_with_jitter(one_sidecar):
    renewer = renewer_for(one_sidecar[0], rng=random.Random(1))
    delays = []
    for failures in range(1, 12):
        renewer.failures = failures
        delays.append(renewer._backoff(86400.0))  # a 24-hour certificate
    assert 1.0 <= delays[0] <= 2.0 and delays[-1] <= 300.0
    assert all(150.0 <= delay for delay in delays[-3:])  # capped at 5 min, jitter keeps at least half
    renewer.failures = 20
    assert renewer._backoff(11.0) <= 1.0  # a 10-second certificate retries within a second


async def test_file_watcher_waits_while_the_renewer_swaps_key_and_certificate(one_sidecar, autojump_clock):
    """A new key next to the old certificate is what the watcher would see between the two renames:
    while the renewer holds ``files_lock`` (as ``install_identity`` does) it must not try (and fail)
    to reload."""
    import trio

    from proxy.sidecar import FILE_POLL_INTERVAL

    sidecar, ca_dir, ident, log = one_sidecar
    new = issue(ca_dir, ident.parent / "next", API, "--ttl", "10s")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sidecar._watch_files)
        async with sidecar.files_lock:
            os.replace(new / "key.pem", ident / "key.pem")  # half-way through a swap
            await trio.sleep(FILE_POLL_INTERVAL * 4)
            assert "reload" not in log.getvalue()
            os.replace(new / "cert.pem", ident / "cert.pem")
        await trio.sleep(FILE_POLL_INTERVAL * 2)
        nursery.cancel_scope.cancel()
    events = [json.loads(line)["event"] for line in log.getvalue().splitlines()]
    assert events == ["reloaded"]


async def test_install_identity_writes_under_the_watchers_lock_and_reloads_once(one_sidecar, autojump_clock):
    import trio

    from proxy.sidecar import FILE_POLL_INTERVAL

    sidecar, ca_dir, ident, log = one_sidecar
    new = issue(ca_dir, ident.parent / "next", API, "--ttl", "10s")

    def write():
        assert sidecar.files_lock.locked()
        os.replace(new / "key.pem", ident / "key.pem")
        os.replace(new / "cert.pem", ident / "cert.pem")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sidecar._watch_files)
        assert await sidecar.install_identity(write)
        await trio.sleep(FILE_POLL_INTERVAL * 4)
        nursery.cancel_scope.cancel()
    events = [(e["event"], e.get("trigger")) for e in map(json.loads, log.getvalue().splitlines())]
    assert events == [("reloaded", "renewal")]
