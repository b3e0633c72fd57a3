"""proxy.credentials: every identity file problem is found, named, and explained; a good load is one value."""

from __future__ import annotations

import builtins
import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from support.certs import (
    DAY,
    HOUR,
    MINUTE,
    NOW,
    SECOND,
    WEB,
    Authority,
    key_pem,
    new_key,
    pem,
)

from mtls.durations import roughly
from mtls.spiffe import parse_spiffe_id
from proxy.config import IdentityConfig
from proxy.credentials import (
    CredentialError,
    FileStamp,
    expiry_warnings,
    load_credentials,
)


def identity_of(files) -> IdentityConfig:
    return IdentityConfig(files.cert, files.key, files.bundle, files.crl, renew=None)


def problems_loading(identity: IdentityConfig) -> list[str]:
    with pytest.raises(CredentialError) as caught:
        load_credentials(identity, now=NOW)
    return caught.value.problems


def good_identity(tmp_path: Path, authority: Authority, **issue_options) -> IdentityConfig:
    return identity_of(authority.write_identity(tmp_path, authority.issue(WEB, **issue_options)))


# --- a good load ------------------------------------------------------------------------------


def test_loads_a_valid_identity_into_one_value(tmp_path, authority):
    leaf = authority.issue(WEB)
    identity = identity_of(authority.write_identity(tmp_path, leaf))

    creds = load_credentials(identity, now=NOW)

    assert creds.spiffe_id == parse_spiffe_id(WEB)
    assert creds.cert_chain == (leaf.cert, authority.intermediate)
    assert creds.leaf == leaf.cert
    assert creds.bundle == (authority.root,)
    assert creds.not_after == leaf.cert.not_valid_after_utc and creds.not_after.tzinfo is not None
    assert creds.not_before == leaf.cert.not_valid_before_utc
    assert creds.key.private_numbers() == leaf.key.private_numbers()
    assert (creds.crls, creds.revoked_serials) == ((), frozenset())
    assert creds.config == identity


def test_collects_revoked_serials_from_a_trusted_crl(tmp_path, authority):
    crl = authority.crl((1111, 2222))
    identity = identity_of(authority.write_identity(tmp_path, authority.issue(WEB), crl=crl))

    creds = load_credentials(identity, now=NOW)

    assert creds.revoked_serials == frozenset({1111, 2222})
    assert creds.crls == (crl,)


def test_accepts_a_bundle_with_several_roots(tmp_path, authority):
    identity = good_identity(tmp_path, authority)
    identity.bundle.write_bytes(pem(Authority.create("Old").root, authority.root))

    assert len(load_credentials(identity, now=NOW).bundle) == 2


def test_credentials_cannot_be_changed_after_loading(tmp_path, authority):
    creds = load_credentials(good_identity(tmp_path, authority), now=NOW)

    with pytest.raises(dataclasses.FrozenInstanceError):
        creds.spiffe_id = None
    with pytest.raises(TypeError):
        creds.files[Path("/x")] = None


def test_reads_each_file_exactly_once(tmp_path, authority, monkeypatch):
    identity = identity_of(authority.write_identity(tmp_path, authority.issue(WEB), crl=authority.crl()))
    opened = []
    real_open = builtins.open

    def counting_open(path, *args, **kwargs):
        opened.append(Path(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    load_credentials(identity, now=NOW)
    monkeypatch.undo()

    assert sorted(opened) == sorted([identity.cert, identity.key, identity.bundle, identity.crl])


# --- change detection -------------------------------------------------------------------------


def test_stamps_every_file_it_read(tmp_path, authority):
    identity = identity_of(authority.write_identity(tmp_path, authority.issue(WEB), crl=authority.crl()))

    creds = load_credentials(identity, now=NOW)

    assert set(creds.files) == {identity.cert, identity.key, identity.bundle, identity.crl}
    assert all(isinstance(stamp, FileStamp) for stamp in creds.files.values())


def changed(creds) -> list:
    return [path for path, stamp in creds.files.items() if FileStamp.now(path) != stamp]


def test_file_stamps_taken_at_load_match_untouched_files(tmp_path, authority):
    creds = load_credentials(good_identity(tmp_path, authority), now=NOW)

    assert changed(creds) == []


def test_file_stamps_notice_a_file_replaced_by_rename(tmp_path, authority):
    identity = good_identity(tmp_path, authority)
    creds = load_credentials(identity, now=NOW)
    replacement = tmp_path / "new-key.pem"
    replacement.write_bytes(identity.key.read_bytes())

    replacement.replace(identity.key)

    assert changed(creds) == [identity.key]


def test_file_stamps_notice_a_file_that_disappeared(tmp_path, authority):
    identity = good_identity(tmp_path, authority)
    creds = load_credentials(identity, now=NOW)

    identity.bundle.unlink()

    assert changed(creds) == [identity.bundle]


# --- files that cannot be read or parsed ------------------------------------------------------


@pytest.mark.parametrize("which, setting", [("cert", "identity.cert"), ("key", "identity.key"),
                                            ("bundle", "identity.bundle")])
def test_reports_a_missing_file_and_the_setting_to_check(tmp_path, authority, which, setting):
    identity = good_identity(tmp_path, authority)
    getattr(identity, which).unlink()

    assert f"{getattr(identity, which)}: " in problems_loading(identity)[0]
    assert f"does not exist; check {setting} in the config" in problems_loading(identity)[0]


def test_reports_a_missing_crl_file(tmp_path, authority):
    identity = dataclasses.replace(good_identity(tmp_path, authority), crl=tmp_path / "crl.pem")

    assert problems_loading(identity) == [f"{tmp_path / 'crl.pem'}: CRL file does not exist; "
                                          "check identity.crl in the config"]


@pytest.mark.parametrize("which, what", [("cert", "certificate"), ("key", "private key"),
                                         ("bundle", "trust bundle")])
def test_reports_an_empty_file(tmp_path, authority, which, what):
    identity = good_identity(tmp_path, authority)
    getattr(identity, which).write_bytes(b"")

    assert f"{getattr(identity, which)}: {what} file is empty; is it still being written?" in problems_loading(identity)


def test_reports_a_half_written_certificate_file(tmp_path, authority):
    identity = good_identity(tmp_path, authority)
    data = identity.cert.read_bytes()
    identity.cert.write_bytes(data[:200])

    assert problems_loading(identity) == [
        f"{identity.cert}: no complete PEM certificate block; is the file half-written?"
    ]


def test_reports_a_certificate_file_cut_off_in_its_last_block(tmp_path, authority):
    identity = good_identity(tmp_path, authority)
    data = identity.cert.read_bytes()
    identity.cert.write_bytes(data[: len(data) - 100])

    assert problems_loading(identity) == [
        f"{identity.cert}: the last PEM certificate block has no END line; is the file half-written?"
    ]


def test_reports_a_half_written_key_file(tmp_path, authority):
    identity = good_identity(tmp_path, authority)
    identity.key.write_bytes(identity.key.read_bytes()[:60])

    assert problems_loading(identity) == [f"{identity.key}: no complete PEM private key block; is the file half-written?"]


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"hello, I am not a certificate\n", "no PEM block found; expected a PEM certificate"),
        (None, "looks like binary DER, not PEM; expected a PEM certificate"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
         "holds only PRIVATE KEY blocks; expected a PEM certificate"),
    ],
)
def test_reports_a_certificate_file_that_is_not_pem(tmp_path, authority, content, reason):
    identity = good_identity(tmp_path, authority)
    if content is None:
        content = authority.issue(WEB).cert.public_bytes(serialization.Encoding.DER)
    identity.cert.write_bytes(content)

    assert problems_loading(identity) == [f"{identity.cert}: {reason}"]


def test_reports_a_pem_block_that_does_not_parse(tmp_path, authority):
    identity = good_identity(tmp_path, authority)
    identity.bundle.write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")

    (problem,) = problems_loading(identity)

    assert problem.startswith(f"{identity.bundle}: certificate #1 cannot be parsed: ")


def test_reports_an_encrypted_key(tmp_path, authority):
    leaf = authority.issue(WEB)
    identity = identity_of(authority.write_identity(tmp_path, leaf))
    identity.key.write_bytes(leaf.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))

    assert problems_loading(identity) == [
        f"{identity.key}: the private key is encrypted; the sidecar needs an unencrypted key "
        "(protect it with file mode 0600 instead)"
    ]


def test_reports_a_key_file_with_two_keys(tmp_path, authority):
    identity = good_identity(tmp_path, authority)
    identity.key.write_bytes(identity.key.read_bytes() + key_pem(new_key()))

    assert problems_loading(identity) == [f"{identity.key}: holds 2 private keys; it must hold exactly one"]


# --- what the certificates say ----------------------------------------------------------------


def test_reports_a_key_that_does_not_match_the_certificate(tmp_path, authority):
    identity = good_identity(tmp_path, authority)
    identity.key.write_bytes(key_pem(new_key()))

    assert problems_loading(identity) == [
        f"{identity.key}: this private key does not belong to the certificate in {identity.cert}; "
        "install the key that was issued together with that certificate"
    ]


def test_reports_a_leaf_that_is_not_an_svid(tmp_path, authority):
    leaf = authority.issue(WEB, uris=(WEB, "spiffe://example.org/ns/prod/sa/other"))
    identity = identity_of(authority.write_identity(tmp_path, leaf))

    assert problems_loading(identity) == [
        f"{identity.cert}: the first certificate is not an X.509-SVID: leaf must have exactly one URI SAN, it has 2"
    ]


def test_hints_that_the_leaf_must_come_first(tmp_path, authority):
    leaf = authority.issue(WEB)
    identity = identity_of(authority.write_identity(tmp_path, leaf))
    identity.cert.write_bytes(pem(authority.intermediate, leaf.cert))

    problems = problems_loading(identity)

    assert any(p.endswith("the workload certificate must come first in the file, then its intermediates")
               for p in problems), problems


def test_reports_a_chain_that_does_not_verify_against_the_bundle(tmp_path, authority):
    identity = good_identity(tmp_path, authority)
    identity.bundle.write_bytes(pem(Authority.create("Other").root))

    assert problems_loading(identity) == [
        f"{identity.cert}: the chain does not verify against {identity.bundle}: unable to get local issuer "
        f"certificate (at 'CN=Test Intermediate CA', depth 1); is {identity.bundle} the bundle of the CA "
        "that issued this certificate?"
    ]


def test_reports_a_certificate_file_without_its_intermediate(tmp_path, authority):
    leaf = authority.issue(WEB)
    identity = identity_of(authority.write_identity(tmp_path, leaf))
    identity.cert.write_bytes(pem(leaf.cert))

    (problem,) = problems_loading(identity)

    assert problem.endswith("the file holds only the leaf: append its intermediate CA certificate")


def test_reports_a_bundle_holding_a_workload_certificate(tmp_path, authority):
    identity = good_identity(tmp_path, authority)
    identity.bundle.write_bytes(identity.cert.read_bytes())

    problems = problems_loading(identity)

    assert f"{identity.bundle}: certificate #1 ('CN=web') is not a CA certificate; the bundle must hold " \
           "trust roots (the CA's bundle.pem), not a workload certificate" in problems


def test_reports_an_expired_certificate(tmp_path, authority):
    identity = good_identity(tmp_path, authority, not_before=NOW - 2 * DAY, not_after=NOW - 3 * HOUR)

    (problem,) = problems_loading(identity)

    assert problem.startswith(f"{identity.cert}: certificate 'CN=web' expired at ")
    assert problem.endswith("(3h ago); install a renewed one")


def test_reports_a_certificate_that_is_not_yet_valid(tmp_path, authority):
    identity = good_identity(tmp_path, authority, not_before=NOW + 2 * HOUR, not_after=NOW + 2 * DAY)

    (problem,) = problems_loading(identity)

    assert "certificate 'CN=web' is not valid until" in problem
    assert problem.endswith("(in 2h); check this machine's clock")


def test_expiry_within_a_day_is_not_a_load_problem(tmp_path, authority):
    identity = good_identity(tmp_path, authority, not_after=NOW + HOUR)

    assert load_credentials(identity, now=NOW).not_after == NOW + HOUR


# --- revocation -------------------------------------------------------------------------------


def test_reports_a_crl_that_lists_our_own_serial(tmp_path, authority):
    leaf = authority.issue(WEB)
    crl = authority.crl((leaf.cert.serial_number,))
    identity = identity_of(authority.write_identity(tmp_path, leaf, crl=crl))

    assert problems_loading(identity) == [
        f"{identity.crl}: our own certificate (serial {leaf.cert.serial_number:x}) is revoked by the CRL "
        "from 'CN=Test Intermediate CA'; install a newly issued certificate"
    ]


def test_refuses_to_trust_a_crl_not_signed_by_our_cas(tmp_path, authority):
    forged = authority.crl((1234,), signed_by=Authority.create("Forger"))
    identity = identity_of(authority.write_identity(tmp_path, authority.issue(WEB), crl=forged))

    (problem,) = problems_loading(identity)

    assert problem.startswith(f"{identity.crl}: CRL #1 (issuer 'CN=Test Intermediate CA') is not signed by any CA")
    assert "so it cannot be trusted" in problem


def test_reports_a_half_written_crl(tmp_path, authority):
    identity = identity_of(authority.write_identity(tmp_path, authority.issue(WEB), crl=authority.crl()))
    identity.crl.write_bytes(pem(authority.crl())[:50])

    assert problems_loading(identity) == [f"{identity.crl}: no complete PEM CRL block; is the file half-written?"]


# --- all at once ------------------------------------------------------------------------------


def test_reports_every_problem_in_one_load(tmp_path, authority):
    identity = good_identity(tmp_path, authority, not_after=NOW - HOUR)
    identity.key.unlink()
    identity.bundle.write_bytes(pem(Authority.create("Other").root))

    problems = problems_loading(identity)

    assert [p.split(": ")[0] for p in problems] == [str(identity.key), str(identity.cert), str(identity.cert)]
    assert "does not exist" in problems[0]
    assert "chain does not verify" in problems[1]
    assert "expired" in problems[2]


@pytest.mark.parametrize(
    "delta, text",
    [(30 * DAY, "30d"), (30 * DAY - HOUR, "29d 23h"), (2 * HOUR - MINUTE, "1h 59m"), (3 * HOUR, "3h"),
     (90 * SECOND, "1m 30s"), (SECOND, "1s"), (0 * SECOND, "0s"), (-HOUR, "0s")],
)
def test_roughly_names_a_span_in_its_two_largest_units(delta, text):
    assert roughly(delta) == text


def test_names_a_leaf_with_an_empty_subject_by_its_spiffe_id(tmp_path, authority):
    leaf = authority.issue(WEB, not_after=NOW - HOUR, subject="")
    identity = identity_of(authority.write_identity(tmp_path, leaf))

    (problem,) = problems_loading(identity)

    assert problem.startswith(f"{identity.cert}: certificate {WEB} expired at ")


# --- warnings ---------------------------------------------------------------------------------


def test_warns_when_our_certificate_expires_within_a_day(tmp_path, authority):
    creds = load_credentials(good_identity(tmp_path, authority, not_after=NOW + 5 * HOUR), now=NOW)

    (warning,) = expiry_warnings(creds, NOW)

    assert warning.startswith(f"{creds.config.cert}: our certificate for {WEB} expires at ")
    assert warning.endswith(", in 5h; renew it")


def test_does_not_warn_when_expiry_is_more_than_a_day_away(tmp_path, authority):
    creds = load_credentials(good_identity(tmp_path, authority, not_after=NOW + DAY + HOUR), now=NOW)

    assert expiry_warnings(creds, NOW) == []


def test_warns_that_a_loaded_certificate_has_since_expired(tmp_path, authority):
    creds = load_credentials(good_identity(tmp_path, authority, not_after=NOW + HOUR), now=NOW)

    (warning,) = expiry_warnings(creds, NOW + 2 * HOUR)

    assert f"our certificate for {WEB} expired at" in warning


def test_warns_about_a_trust_root_that_expired(tmp_path, authority):
    identity = good_identity(tmp_path, authority)
    creds = load_credentials(identity, now=NOW)

    warnings = expiry_warnings(creds, authority.root.not_valid_after_utc + HOUR)

    assert any(w.startswith(f"{identity.bundle}: trust root 'CN=Test Root CA' expired at") for w in warnings)
