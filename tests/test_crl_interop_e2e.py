"""Our CRL set in other verifiers: `ca crl` writes the intermediate's CRL and the root's over the
intermediate, so `openssl verify -crl_check_all`, nginx (``ssl_crl``) and haproxy (``crl-file``), which
want a CRL for every CA on the chain, accept a valid client and refuse a revoked one with it."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess

import pytest
from support.ca_cli import issue, run_ca
from support.certs import TD
from support.network import client_context, free_port
from support.polling import wait_until
from support.processes import LoggedProcess

pytestmark = pytest.mark.e2e

VALID = f"spiffe://{TD}/ns/prod/sa/frontend"
REVOKED = f"spiffe://{TD}/ns/prod/sa/stolen"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """`ca init`; a server certificate; a valid client and a revoked one; the CRL set from `ca crl`."""
    root = tmp_path_factory.mktemp("crl-interop")
    ca_dir = root / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    server = issue(ca_dir, root / "server", f"spiffe://{TD}/ns/prod/sa/gateway", "--dns", "localhost")
    valid = issue(ca_dir, root / "valid", VALID)
    revoked = issue(ca_dir, root / "revoked", REVOKED)
    run_ca("revoke", REVOKED, "--reason", "keyCompromise", ca_dir=ca_dir)
    crl_set = root / "crl-set.pem"
    run_ca("crl", "--out", crl_set, ca_dir=ca_dir)
    # haproxy wants the certificate, its chain and its key in one file.
    (root / "server.pem").write_bytes((server / "cert.pem").read_bytes() + (server / "key.pem").read_bytes())
    return {"root": root, "ca_dir": ca_dir, "server": server, "valid": valid, "revoked": revoked, "crl": crl_set}


def get(port: int, ident) -> tuple[int | None, str]:
    """GET / over TLS presenting ``ident``: (status, body), or (None, the TLS error) if refused."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(ident), timeout=10)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        return response.status, response.read().decode()
    except (ssl.SSLError, ConnectionError) as exc:
        return None, str(exc)
    finally:
        connection.close()


def serving(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_openssl_verify_crl_check_all_accepts_the_valid_client_and_refuses_the_revoked_one(pki):
    ca_dir = pki["ca_dir"]
    base = ["openssl", "verify", "-crl_check_all", "-CAfile", str(ca_dir / "bundle.pem"),
            "-untrusted", str(ca_dir / "intermediate.pem"), "-CRLfile", str(pki["crl"])]
    valid = subprocess.run([*base, str(pki["valid"] / "cert.pem")], capture_output=True, text=True)
    assert valid.returncode == 0 and valid.stdout.strip().endswith(": OK"), valid.stdout + valid.stderr
    revoked = subprocess.run([*base, str(pki["revoked"] / "cert.pem")], capture_output=True, text=True)
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stdout + revoked.stderr


def test_nginx_ssl_crl_accepts_the_valid_client_and_refuses_the_revoked_one(pki, tmp_path):
    port = free_port()
    server = pki["server"]
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
user root;
daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{}}
http {{
    access_log {tmp_path}/access.log;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate {server}/cert.pem;
        ssl_certificate_key {server}/key.pem;
        ssl_client_certificate {pki['ca_dir']}/bundle.pem;
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_crl {pki['crl']};
        location / {{ return 200 "client $ssl_client_s_dn verify $ssl_client_verify\\n"; }}
    }}
}}
""")
    nginx = LoggedProcess(["nginx", "-p", str(tmp_path), "-c", str(conf)], tmp_path / "nginx.stderr")
    try:
        wait_until(lambda: serving(port), what="nginx listening")
        assert get(port, pki["valid"]) == (200, "client CN=frontend,O=example.org verify SUCCESS\n")
        status, body = get(port, pki["revoked"])
        assert status == 400 and "certificate error" in body
        wait_until(lambda: "certificate revoked" in (tmp_path / "error.log").read_text(), what="nginx's error line")
    finally:
        nginx.stop()
    print("nginx access.log:\n" + (tmp_path / "access.log").read_text())
    print("nginx error.log:\n" + "".join(
        line + "\n" for line in (tmp_path / "error.log").read_text().splitlines() if "verify" in line))


def test_haproxy_crl_file_accepts_the_valid_client_and_refuses_the_revoked_one(pki, tmp_path):
    port = free_port()
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(f"""
global
    log stdout format raw local0 info
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 5s
    timeout server 5s
frontend gateway
    bind 127.0.0.1:{port} ssl crt {pki['root']}/server.pem ca-file {pki['ca_dir']}/bundle.pem verify required crl-file {pki['crl']} ssl-min-ver TLSv1.3
    http-request return status 200 content-type text/plain lf-string "client %[ssl_c_s_dn] verify %[ssl_c_verify]\\n"
""")
    check = subprocess.run(["haproxy", "-c", "-f", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    haproxy = LoggedProcess(["sh", "-c", f"exec haproxy -db -f {conf} >&2"], tmp_path / "haproxy.log")
    try:
        wait_until(lambda: serving(port), what="haproxy listening")
        assert get(port, pki["valid"]) == (200, "client /O=example.org/CN=frontend verify 0\n")
        status, error = get(port, pki["revoked"])
        assert status is None, error
        # haproxy names every verify failure so; the valid client, same chain, same CRL file, passed.
        wait_until(lambda: "SSL client certificate not trusted" in (tmp_path / "haproxy.log").read_text(),
                   what="haproxy's log line")
    finally:
        haproxy.stop()
    print("haproxy log:\n" + (tmp_path / "haproxy.log").read_text())
