"""proxy.check: `proxy check -c FILE` lists every problem at once, or summarises what would run."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.certs import HOUR, NOW, WEB, Authority, pem

from proxy.check import check_main, run_check

LISTENERS = """\
inbound:
  - name: api
    listen: 0.0.0.0:8443
    forward: 127.0.0.1:8080
    allow: [spiffe://example.org/ns/prod/sa/frontend, spiffe://example.org/ns/ops/*]
outbound:
  - name: orders
    listen: 127.0.0.1:9001
    connect: orders.prod.svc:8443
    expect: [spiffe://example.org/ns/prod/sa/orders]
admin:
  listen: 127.0.0.1:15000
"""


def write_setup(tmp_path: Path, authority: Authority, listeners: str = LISTENERS, **issue_options) -> Path:
    """cert.pem, key.pem, bundle.pem and a config.yaml naming them, all in tmp_path."""
    authority.write_identity(tmp_path, authority.issue(WEB, **issue_options))
    config = tmp_path / "config.yaml"
    config.write_text("identity: {cert: cert.pem, key: key.pem, bundle: bundle.pem}\n" + listeners)
    return config


def test_passes_and_summarises_a_valid_setup(tmp_path, authority):
    ok, lines = run_check(write_setup(tmp_path, authority), now=NOW)

    assert ok, lines
    assert lines[0] == f"ok: {tmp_path / 'config.yaml'}"
    assert lines[1] == f"identity: {WEB}"
    assert lines[2].startswith(f"  certificate: {tmp_path / 'cert.pem'} (serial ")
    assert lines[2].endswith("(30d left)")
    assert ("inbound api: 0.0.0.0:8443 -> 127.0.0.1:8080, allows spiffe://example.org/ns/prod/sa/frontend, "
            "spiffe://example.org/ns/ops/*") in lines
    assert "outbound orders: 127.0.0.1:9001 -> orders.prod.svc:8443, expects spiffe://example.org/ns/prod/sa/orders" \
        in lines
    assert lines[-1] == "admin: 127.0.0.1:15000"


def test_summary_says_that_no_listeners_means_all_traffic_is_denied(tmp_path, authority):
    ok, lines = run_check(write_setup(tmp_path, authority, listeners=""), now=NOW)

    assert ok and lines[-1] == "no inbound or outbound listeners: all traffic is denied"


def test_reports_a_bad_allow_entry_and_a_missing_key_file_together(tmp_path, authority):
    config = write_setup(tmp_path, authority, listeners=LISTENERS.replace("example.org/ns/ops", "Example.org/ns/ops"))
    (tmp_path / "key.pem").unlink()

    ok, problems = run_check(config, now=NOW)

    assert not ok
    assert problems == [
        f"{config}:6: inbound[0].allow[1]: 'spiffe://Example.org/ns/ops/*' is not a valid SPIFFE ID: "
        "trust domain must be lower-case",
        f"{tmp_path / 'key.pem'}: private key file does not exist; check identity.key in the config",
    ]


def test_reports_duplicate_listener_names_and_ports(tmp_path, authority):
    listeners = LISTENERS.replace("name: orders", "name: api").replace("15000", "9001")

    ok, problems = run_check(write_setup(tmp_path, authority, listeners=listeners), now=NOW)

    assert not ok
    assert [p.split(": ")[1] for p in problems] == ["outbound[0].name", "admin.listen"]


def test_reports_a_certificate_expiring_within_24_hours(tmp_path, authority):
    ok, problems = run_check(write_setup(tmp_path, authority, not_after=NOW + 3 * HOUR), now=NOW)

    assert not ok
    (problem,) = problems
    assert problem.startswith(f"{tmp_path / 'cert.pem'}: our certificate for {WEB} expires at ")


def test_passes_a_fresh_24_hour_certificate_and_reports_it_in_its_last_third(tmp_path, authority):
    """`ca issue` gives 24 hours by default: fresh, that is not "expiring"; with 7 hours left it is."""
    config = write_setup(tmp_path, authority, not_before=NOW, not_after=NOW + 24 * HOUR)
    assert run_check(config, now=NOW + HOUR)[0]
    ok, problems = run_check(config, now=NOW + 17 * HOUR)
    assert not ok and "expires at" in problems[0]


def test_reports_an_expired_certificate(tmp_path, authority):
    ok, problems = run_check(write_setup(tmp_path, authority, not_after=NOW - HOUR), now=NOW)

    assert not ok and "expired at" in problems[0]


def test_reports_a_chain_from_another_ca_and_a_config_problem_together(tmp_path, authority):
    config = write_setup(tmp_path, authority, listeners=LISTENERS + "log: {level: loud}\n")
    (tmp_path / "bundle.pem").write_bytes(pem(Authority.create("Other").root))

    ok, problems = run_check(config, now=NOW)

    assert not ok and len(problems) == 2
    assert "log.level" in problems[0] and "chain does not verify" in problems[1]


def test_checks_no_files_when_the_identity_section_itself_is_broken(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("identity: {cert: cert.pem, key: key.pem}\n")

    ok, problems = run_check(config, now=NOW)

    assert (ok, problems) == (False, [f"{config}:1: identity.bundle: required key is missing"])


def test_reports_an_unreadable_config_file(tmp_path):
    ok, problems = run_check(tmp_path / "missing.yaml")

    assert (ok, problems) == (False, [f"{tmp_path / 'missing.yaml'}: cannot read the config file: "
                                      "No such file or directory"])


def test_check_main_prints_the_summary_on_stdout_and_returns_0(tmp_path, authority):
    out, err = io.StringIO(), io.StringIO()

    code = check_main(write_setup(tmp_path, authority), out, err)

    assert code == 0 and err.getvalue() == ""
    assert out.getvalue().startswith("ok: ") and f"identity: {WEB}\n" in out.getvalue()


def test_check_main_prints_every_problem_on_stderr_and_returns_1(tmp_path, authority):
    config = write_setup(tmp_path, authority, listeners="log: {level: loud, format: xml}\n")
    (tmp_path / "cert.pem").write_text("")
    out, err = io.StringIO(), io.StringIO()

    code = check_main(config, out, err)

    assert code == 1 and out.getvalue() == ""
    lines = err.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[-1] == f"check failed: 3 problems with {config}"


def test_check_main_counts_a_single_problem_in_the_singular(tmp_path):
    err = io.StringIO()

    check_main(tmp_path / "missing.yaml", io.StringIO(), err)

    assert err.getvalue().splitlines()[-1] == f"check failed: 1 problem with {tmp_path / 'missing.yaml'}"


def test_summary_lists_crl_renewal_audit_mode_and_sni(tmp_path, authority):
    authority.write_identity(tmp_path, authority.issue(WEB), crl=authority.crl((7, 8)))
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent("""\
        identity:
          cert: cert.pem
          key: key.pem
          bundle: bundle.pem
          crl: crl.pem
          renew: {url: 'https://ca:8443', at: 0.5}
        inbound:
          - {name: api, listen: 0.0.0.0:1, forward: 'unix:/run/app.sock', allow: [spiffe://example.org/x],
             mode: audit, proxy_protocol: true}
        outbound:
          - {name: db, listen: 127.0.0.1:2, connect: db:5432, expect: [spiffe://example.org/db], server_name: db.svc}
    """))

    ok, lines = run_check(config, now=NOW)

    assert ok, lines
    assert f"  crl: {tmp_path / 'crl.pem'} (2 revoked serials)" in lines
    assert "  renew: from https://ca:8443 at 50% of the lifetime" in lines
    assert ("inbound api: 0.0.0.0:1 -> unix:/run/app.sock (audit: denials are logged, not enforced) "
            "(PROXY v2 header to the app), allows spiffe://example.org/x") in lines
    assert "outbound db: 127.0.0.1:2 -> db:5432 (SNI db.svc), expects spiffe://example.org/db" in lines


@pytest.mark.e2e
def test_proxy_check_piped_into_a_closed_reader_exits_quietly(tmp_path, authority):
    """`proxy check -c FILE | head -1` with the reader gone: no traceback, exit code 1."""
    config = write_setup(tmp_path, authority)
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "check", "-c", str(config)],
            stdout=writer, stderr=subprocess.PIPE, text=True, timeout=60,
        )
    finally:
        os.close(writer)
    assert result.stderr == ""  # neither a traceback nor "Exception ignored ... BrokenPipeError"
    assert result.returncode == 1
