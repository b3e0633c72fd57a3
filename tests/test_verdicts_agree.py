"""One verifier: on the same files, the sidecar's handshake (``PeerCheck`` of a loaded snapshot, which
asks ``mtls.trust``), ``proxy check`` and ``ca verify`` give the same verdict about a CRL past its
next update, and the same ``crl_stale`` detail (``ca verify`` names its ``--crl-grace`` flag where the
sidecar names ``identity.crl_grace``).

The subject certificate is the peer for the sidecar (whose own identity is another certificate of
the same CA, with the same bundle and CRL files), the identity for ``proxy check``, and CERT for
``ca verify``.
"""

from __future__ import annotations

import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from support.certs import API, DAY, HOUR, WEB, Authority

from ca.cli import main as ca_main
from mtls.reasons import CRL_STALE, REVOKED
from proxy.check import run_check
from proxy.snapshot import INBOUND, load_snapshot

STALE_PREFIX = "new handshakes would be refused crl_stale: "


def write_config(path: Path, identity_dir: Path, files: Path, crl_stale: str) -> Path:
    """A config whose identity is the one in ``identity_dir``, with the bundle and CRL of ``files``."""
    path.write_text(textwrap.dedent(f"""\
        identity:
          cert: {identity_dir / 'cert.pem'}
          key: {identity_dir / 'key.pem'}
          bundle: {files / 'bundle.pem'}
          crl: {files / 'crl.pem'}
          crl_grace: 1h
          crl_stale: {crl_stale}
        inbound:
          - {{name: api, listen: 127.0.0.1:1, forward: 127.0.0.1:2, allow: ['{WEB}']}}
    """))
    return path


def setup(tmp_path: Path, authority: Authority, next_update: datetime, *, revoked: bool, crl_stale: str = "refuse"):
    """(path of the subject as a peer presents it, sidecar config, subject config, subject files)."""
    subject = authority.issue(WEB)
    crl = authority.crl((subject.cert.serial_number,) if revoked else (), next_update=next_update, number=1)
    files = authority.write_identity(tmp_path / "subject", subject, crl=crl).directory
    sidecar_dir = authority.write_identity(tmp_path / "sidecar", authority.issue(API)).directory
    sidecar_config = write_config(tmp_path / "sidecar.yaml", sidecar_dir, files, crl_stale)
    subject_config = write_config(tmp_path / "subject.yaml", files, files, crl_stale)
    path = (subject.cert, *authority.chain, authority.root)
    return path, sidecar_config, subject_config, files


def sidecar_verdict(config: Path, path, now: datetime) -> tuple[bool, str | None, str | None]:
    """(admitted, reason, detail) of a new inbound handshake with the peer ``path`` under ``config``;
    when admitted, ``detail`` is the stale CRL it was let through with (crl_stale: warn), if any."""
    check = load_snapshot(config).policy(INBOUND, "api").peer_check()
    if check.check_path(path, now):
        return True, None, check.stale_crl
    return False, *check.failure


def check_verdict(config: Path, now: datetime) -> tuple[str | None, str | None, list[str]]:
    """(reason, detail, lines) of ``proxy check``: the reason of its one problem, or None when it passes."""
    ok, lines = run_check(config, now=now)
    if ok:
        return None, None, lines
    (problem,) = lines
    if problem.startswith(STALE_PREFIX):
        return CRL_STALE, problem.removeprefix(STALE_PREFIX), lines
    assert "our own certificate" in problem and "is revoked by the CRL" in problem, problem
    return REVOKED, None, lines


def verify_verdict(files: Path, capsys) -> tuple[str | None, str]:
    """(reason, detail) printed by ``ca verify CERT --bundle B --crl C`` (reason None: valid)."""
    code = ca_main([
        "verify", str(files / "cert.pem"), "--bundle", str(files / "bundle.pem"), "--crl", str(files / "crl.pem"),
    ])
    out = capsys.readouterr().out.strip()
    if code == 0:
        assert out.startswith(f"valid: {WEB} "), out
        return None, out
    assert code == 1, out
    reason, _, detail = out.partition(": ")
    return reason, detail


HALF_HOUR = timedelta(minutes=30)


@pytest.mark.parametrize(
    ("next_update", "revoked", "reason"),
    [
        pytest.param(DAY, False, None, id="fresh"),
        pytest.param(-HALF_HOUR, False, None, id="stale-within-grace"),
        pytest.param(-(2 * HOUR + HALF_HOUR), False, CRL_STALE, id="stale-past-grace"),
        pytest.param(-(2 * HOUR + HALF_HOUR), True, REVOKED, id="revoked-and-stale"),
    ],
)
def test_the_sidecar_proxy_check_and_ca_verify_agree(tmp_path, authority, capsys, next_update, revoked, reason):
    # ca verify reads the clock itself: ages are chosen half-way between whole minutes of roughly().
    now = datetime.now(timezone.utc).replace(microsecond=0)
    due = now + next_update
    path, sidecar_config, subject_config, files = setup(tmp_path, authority, due, revoked=revoked)

    admitted, sidecar_reason, sidecar_detail = sidecar_verdict(sidecar_config, path, now)
    check_reason, check_detail, check_lines = check_verdict(subject_config, now)
    verify_reason, verify_detail = verify_verdict(files, capsys)

    assert (admitted, sidecar_reason, check_reason, verify_reason) == (reason is None, reason, reason, reason)
    if reason == CRL_STALE:
        assert check_detail == sidecar_detail
        assert verify_detail == sidecar_detail.replace("identity.crl_grace", "--crl-grace")
        issuer = authority.issuer.cert.subject.rfc4514_string()
        assert sidecar_detail.startswith(f"the CRL in {files / 'crl.pem'} from '{issuer}' expired 2h 30m ago")
    if reason == REVOKED:
        assert sidecar_detail.startswith(f"certificate serial {path[0].serial_number:x} ({WEB}) was revoked at ")
        assert verify_detail == sidecar_detail
    crl_warnings = [line for line in check_lines if line.startswith("warning: ") and "crl.pem" in line]
    if next_update == -HALF_HOUR:
        (warning,) = crl_warnings
        assert warning.endswith(
            f"handshakes still pass until {due + HOUR:%Y-%m-%dT%H:%M:%SZ}; deliver a fresh CRL (ca crl)"
        )
    elif reason is None:
        assert crl_warnings == []


def test_with_crl_stale_warn_the_sidecar_and_proxy_check_agree_that_peers_pass_and_are_counted(tmp_path, authority):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    path, sidecar_config, subject_config, _ = setup(
        tmp_path, authority, now - 2 * HOUR - HALF_HOUR, revoked=False, crl_stale="warn"
    )

    admitted, _, stale = sidecar_verdict(sidecar_config, path, now)
    check_reason, _, lines = check_verdict(subject_config, now)

    assert admitted and check_reason is None
    assert (
        f"warning: new handshakes would pass and be counted in sidecar_crl_stale_accepted_total "
        f"(identity.crl_stale: warn): {stale}"
    ) in lines
