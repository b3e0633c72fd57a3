"""``proxy enroll``: trade a one-time token from ``ca token`` for a workload's first certificate.

The token is a secret until it is spent, so it never travels in argv: any process on the host can
read ``/proc/PID/cmdline`` and redeem it first. It comes from ``--token-file FILE`` or from
``$MTLS_ENROLL_TOKEN`` (a process's environment is readable only by its own user and root).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mtls.files import KEY_MODE, write_atomically
from mtls.reasons import NOT_SVID
from mtls.spiffe import SpiffeId
from mtls.trust import TrustStore, VerifyError
from proxy.caclient import (
    ServiceError,
    ServiceUrl,
    chain_from,
    client_context,
    key_pem,
    new_key_and_csr,
    post,
    same_key,
)

TOKEN_ENV = "MTLS_ENROLL_TOKEN"
ARGV_REFUSED = (
    "--token is refused: a token on the command line can be read by any process on the host from "
    "/proc/PID/cmdline and redeemed first; put it in a file readable only by you (--token-file FILE) "
    f"or in ${TOKEN_ENV}"
)


def read_token(token_file: Path | None, environ) -> str:
    """The one-time token from ``token_file``, else from ``$MTLS_ENROLL_TOKEN``; ValueError saying what to do."""
    if token_file is not None:
        try:
            token = token_file.read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ValueError(f"cannot read --token-file {token_file}: {reason}") from None
        if not token:
            raise ValueError(f"--token-file {token_file} is empty; write the token from 'ca token' into it")
        return token
    token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ValueError(f"no token: give --token-file FILE or set ${TOKEN_ENV} to the token from 'ca token'")
    return token


def enroll_main(
    url: str, token_file: Path | None, bundle: Path, out: Path, out_stream: TextIO, err_stream: TextIO,
    *, token_in_argv: bool,
) -> int:
    """``proxy enroll``: trade a one-time token for a first certificate; write OUT/cert.pem, key.pem, bundle.pem.

    The token comes from ``token_file`` or ``$MTLS_ENROLL_TOKEN``; ``token_in_argv`` (``--token``
    was given) is refused. Exit 0; 1 if the service refused (one line with its reason); 2 for bad
    input, or when the service cannot be reached or verified (one line naming the URL).
    """

    def fail(code: int, message: str) -> int:
        print(f"proxy enroll: {message}", file=err_stream)
        return code

    if token_in_argv:
        return fail(2, ARGV_REFUSED)
    try:
        token = read_token(token_file, os.environ)
    except ValueError as exc:
        return fail(2, str(exc))
    try:
        service = ServiceUrl.parse(url)
    except ValueError as exc:
        return fail(2, f"--url {exc}")
    try:
        bundle_data = bundle.read_bytes()
        roots = x509.load_pem_x509_certificates(bundle_data)
    except OSError as exc:
        return fail(2, f"cannot read --bundle {bundle}: {exc.strerror or exc}")
    except ValueError:
        return fail(2, f"--bundle {bundle} holds no PEM certificate")
    if out.exists() and not out.is_dir():
        return fail(2, f"--out {out} exists and is not a directory")
    key, csr_pem = new_key_and_csr()
    body = json.dumps({"token": token, "csr": csr_pem.decode("ascii")}).encode()
    ctx = client_context(roots)
    try:
        answer = trio.run(
            lambda: post(service, "/v1/enroll", body, "application/json", ctx, expect_trust_domain=None)
        )
    except ServiceError as exc:
        return fail(2, exc.detail)
    if answer.status != 200:
        code, detail = answer.error()
        answered = f"{answer.status} {code}" if code else str(answer.status)
        return fail(1, f"{url} refused the enrollment ({answered}): {detail}")
    try:
        chain = chain_from(answer, url)
        spiffe_id = _check_issued(chain, key, roots, url, now=datetime.now(timezone.utc))
    except ServiceError as exc:
        return fail(2, exc.detail)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = serialization.Encoding.PEM
        write_atomically(out / "key.pem", key_pem(key), mode=KEY_MODE)
        write_atomically(out / "cert.pem", b"".join(cert.public_bytes(pem) for cert in chain))
        write_atomically(out / "bundle.pem", bundle_data)
    except OSError as exc:
        return fail(2, f"enrolled at {url} but cannot write {exc.filename or out}: {exc.strerror or exc}")
    leaf = chain[0]
    print(
        f"enrolled {spiffe_id} (serial {leaf.serial_number:x}, expires "
        f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}) into {out}: cert.pem, key.pem (0600), bundle.pem",
        file=out_stream,
    )
    return 0


def _check_issued(chain: list[x509.Certificate], key, roots, where: str, *, now: datetime) -> SpiffeId:
    """The returned certificate must be over our key and pass the shared chain verifier against
    ``roots``, taken as the bundle of the trust domain the certificate names."""
    leaf = chain[0]
    if not same_key(leaf, key):
        raise ServiceError(f"{where} returned a certificate for another key than the one we sent")
    try:
        trust = TrustStore.for_leaf(leaf, roots)
        return trust.verify(leaf, chain[1:], role=None, now=now).spiffe_id
    except VerifyError as exc:
        if exc.reason == NOT_SVID:
            raise ServiceError(f"{where} returned a certificate that is not an X.509-SVID: {exc.detail}") from None
        raise ServiceError(f"{where} returned a certificate that does not verify against the bundle: {exc}") from None
