"""The sidecar's automatic renewal from ``ca serve``.

Theory of operation
-------------------
Renewal runs in ``Renewer.run``, which ``proxy run`` hands to ``Sidecar.serve`` when
``identity.renew`` is set. The renewer knows the sidecar through two functions only: ``current()``
gives the identity section and the credentials of the current snapshot, and ``install(write)``
replaces the files and reloads.

- due at ``not_before + (at ± 5%) * lifetime``; the jitter is drawn once per certificate, so a
  fleet issued together does not renew together, and a re-check never moves the date;
- an attempt makes a NEW P-256 key and a CSR, POSTs it to ``/v1/renew`` authenticated by the
  current certificate (mTLS), and checks the answer exactly as a reload would (``load_credentials``
  on temporary files next to the real ones: same ID, chain to our bundle, key matches);
- install: key and certificate are each written to a temporary file (0600 for the key from its
  first byte, fsync) and renamed into place. Two renames are not one atomic step, so they run
  inside ``install`` (``Sidecar.install_identity``), which holds the lock the sidecar's file
  watcher also takes and then reloads once, re-stamping the files. The watcher therefore never
  sees a new key next to the old certificate (no spurious ``reload_failed``);
- a failed attempt is logged (``renew_failed``: URL, reason, next try) and counted
  (``sidecar_renewals_total{result="failed"}``); retries back off exponentially from ~2% of the
  lifetime (0.2-2 s) to at most 5% of it (1 s-5 min), each delay with 50-100% jitter. Once the
  certificate is past halfway from its renewal point to its expiry with the last attempt failed,
  ``readiness_problems`` reports it and ``/readyz`` answers 503, before the certificate expires.

Cancellation: ``Renewer.run`` runs until cancelled; a cancelled attempt leaves no temporary file
behind and never leaves the key and certificate files out of step (``install`` is shielded, and
the renames run in a thread that trio waits for).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

import trio
from cryptography.hazmat.primitives import serialization

from mtls.durations import roughly
from mtls.events import EventLog
from mtls.files import fsync_directory, write_temporary
from mtls.spiffe import SpiffeId
from mtls.workers import run_in_worker
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
from proxy.config import IdentityConfig
from proxy.credentials import CredentialError, Credentials, load_credentials
from proxy.metrics import Metrics

RECHECK_INTERVAL = 1.0  # seconds: how often the renewer looks at the (possibly reloaded) certificate
JITTER = 0.05  # renewal point: at ± this fraction of the lifetime
MIN_GAP_FRACTION = 0.05  # after a renewal, the next one waits at least this much of the new lifetime
BACKOFF_FIRST = (0.02, 0.2, 2.0)  # first retry delay: this fraction of the lifetime, clamped to [min, max] s
BACKOFF_CAP = (0.05, 1.0, 300.0)  # longest retry delay, likewise


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Renewer:
    """Keeps the sidecar's certificate renewed from ``identity.renew.url`` (see the module docstring).

    ``current()`` returns the identity section and credentials in use now; ``install(write)`` runs
    ``write`` (blocking: it renames the new files into place) where the file watcher cannot look,
    then reloads and returns whether the reload succeeded.
    """

    def __init__(
        self,
        current: Callable[[], tuple[IdentityConfig, Credentials]],
        install: Callable[[Callable[[], None]], Awaitable[bool]],
        log: EventLog,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
        clock=time.time,
    ):
        self.current = current
        self.install = install
        self.log = log
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.clock = clock
        self.failures = 0  # failed attempts in a row, for the current certificate
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self._failed_serial: int | None = None
        self._retry_at = 0.0
        self._not_before_next = 0.0  # no new attempt before this (after a success)
        self._jitter: dict[int, float] = {}

    # --- schedule ------------------------------------------------------------------------------

    def renewal_time(self, creds, at: float) -> float:
        """When ``creds``' certificate is due: ``at`` ± JITTER of its lifetime after not_before."""
        serial = creds.leaf.serial_number
        if serial not in self._jitter:
            self._jitter = {serial: self.rng.uniform(-JITTER, JITTER)}  # forget older certificates
        start = creds.not_before.timestamp()
        lifetime = creds.not_after.timestamp() - start
        fraction = min(max(at + self._jitter[serial], 0.01), 0.98)
        return start + fraction * lifetime

    def _backoff(self, lifetime: float) -> float:
        fraction, low, high = BACKOFF_FIRST
        first = min(max(lifetime * fraction, low), high)
        fraction, low, high = BACKOFF_CAP
        cap = min(max(lifetime * fraction, low), high)
        delay = min(cap, first * 2 ** (self.failures - 1))
        return delay * self.rng.uniform(0.5, 1.0)

    def readiness_problems(self, now: float) -> list[str]:
        """Not ready once renewal has failed past halfway from the renewal point to expiry."""
        identity, creds = self.current()
        renew = identity.renew
        if renew is None or self.failing_since is None or self._failed_serial != creds.leaf.serial_number:
            return []
        due = self.renewal_time(creds, renew.at)
        expires = creds.not_after.timestamp()
        if now < due + (expires - due) / 2:
            return []
        left = roughly(creds.not_after - datetime.fromtimestamp(now, timezone.utc))
        return [
            f"certificate renewal failing since {_iso(self.failing_since)} ({self.failures} attempts; last: "
            f"{self.last_error}); certificate expires in {left}"
        ]

    # --- the task ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Renew whenever due, for as long as the sidecar runs (until cancelled)."""
        while True:
            identity, creds = self.current()
            renew = identity.renew
            if renew is None:  # a reload removed it
                await trio.sleep(RECHECK_INTERVAL)
                continue
            now = self.clock()
            if self._failed_serial == creds.leaf.serial_number:
                due = self._retry_at
            else:
                due = max(self.renewal_time(creds, renew.at), self._not_before_next)
            if now < due:
                await trio.sleep(min(due - now, RECHECK_INTERVAL))
                continue
            await self.attempt(identity, creds)

    async def attempt(self, identity: IdentityConfig, creds: Credentials) -> bool:
        """One renewal: request, check, install, reload. Never raises (but Cancelled)."""
        renew = identity.renew
        started = self.clock()
        lifetime = creds.not_after.timestamp() - creds.not_before.timestamp()
        try:
            try:
                new_serial, not_after = await self._renew(identity, creds)
            except ServiceError:
                raise
            except Exception as exc:  # a bug or an unexpected OS error: this attempt fails, the sidecar runs on
                raise ServiceError(f"internal error: {type(exc).__name__}: {exc}", code="internal_error") from exc
        except ServiceError as exc:
            self.failures = self.failures + 1 if self._failed_serial == creds.leaf.serial_number else 1
            self._failed_serial = creds.leaf.serial_number
            if self.failures == 1:
                self.failing_since = started
            self.last_error = exc.detail
            delay = self._backoff(lifetime)
            self._retry_at = self.clock() + delay
            self.metrics.renewals.labels("failed").inc()
            reason = exc.code or ("refused" if exc.refused else "failed")
            self.log.emit(
                "error", "renew_failed", url=renew.url, reason=reason,
                detail=exc.detail, spiffe_id=str(creds.spiffe_id), serial=f"{creds.leaf.serial_number:x}",
                attempt=self.failures, retry_in_s=round(delay, 3),
                expires_in_s=round(creds.not_after.timestamp() - self.clock(), 3),
            )
            return False
        self.failures = 0
        self.failing_since = None
        self.last_error = None
        self._failed_serial = None
        self._not_before_next = self.clock() + MIN_GAP_FRACTION * max(not_after - self.clock(), 0.0)
        self.metrics.renewals.labels("ok").inc()
        self.log.emit(
            "info", "renewed", url=renew.url, spiffe_id=str(creds.spiffe_id),
            previous_serial=f"{creds.leaf.serial_number:x}", serial=f"{new_serial:x}",
            expires=_iso(not_after), duration_s=round(self.clock() - started, 3),
        )
        return True

    async def _renew(self, identity: IdentityConfig, creds: Credentials) -> tuple[int, float]:
        try:
            service = ServiceUrl.parse(identity.renew.url)
        except ValueError as exc:
            raise ServiceError(str(exc), code="bad_url") from None
        key, csr_pem = await trio.to_thread.run_sync(new_key_and_csr)
        ctx = client_context(creds.bundle, creds.cert_chain, creds.key)
        answer = await post(
            service, "/v1/renew", csr_pem, "application/pkcs10", ctx,
            expect_trust_domain=creds.spiffe_id.trust_domain,
        )
        if answer.status != 200:
            code, detail = answer.error()
            raise ServiceError(f"{service.text} answered {answer.status}: {detail}", refused=True,
                               status=answer.status, code=code)
        chain = chain_from(answer, service.text)
        if not same_key(chain[0], key):
            raise ServiceError(f"{service.text} returned a certificate for another key than the one we sent",
                               code="bad_answer")
        pem = serialization.Encoding.PEM
        cert_data = b"".join(cert.public_bytes(pem) for cert in chain)
        staged = await run_in_worker(self._stage, identity, cert_data, key_pem(key), creds.spiffe_id)
        if not await self._install(staged):
            raise ServiceError("the renewed certificate was written but the reload failed (see reload_failed)",
                               code="reload_failed")
        leaf = chain[0]
        return leaf.serial_number, leaf.not_valid_after_utc.timestamp()

    @staticmethod
    def _stage(identity: IdentityConfig, cert_data: bytes, key_data: bytes, spiffe_id: SpiffeId):
        """Write both files next to their final names and validate them as a reload would (thread)."""
        try:
            cert_tmp = write_temporary(identity.cert, cert_data, 0o644)
        except OSError as exc:
            raise ServiceError(f"cannot write next to {identity.cert}: {exc.strerror or exc}",
                               code="write_failed") from None
        try:
            key_tmp = write_temporary(identity.key, key_data, 0o600)
        except OSError as exc:
            cert_tmp.unlink(missing_ok=True)
            raise ServiceError(f"cannot write next to {identity.key}: {exc.strerror or exc}",
                               code="write_failed") from None
        staged = IdentityConfig(cert_tmp, key_tmp, identity.bundle, identity.crl, identity.renew)
        try:
            creds = load_credentials(staged)
            if creds.spiffe_id != spiffe_id:
                raise CredentialError([f"the CA returned a certificate for {creds.spiffe_id}, not {spiffe_id}"])
        except CredentialError as exc:
            cert_tmp.unlink(missing_ok=True)
            key_tmp.unlink(missing_ok=True)
            raise ServiceError("the renewed certificate does not load: " + "; ".join(exc.problems),
                               code="bad_answer") from None
        return identity, cert_tmp, key_tmp

    async def _install(self, staged) -> bool:
        """Rename key and certificate into place through ``install``, which then reloads once."""
        identity, cert_tmp, key_tmp = staged

        def swap() -> None:
            try:
                os.replace(key_tmp, identity.key)
                os.replace(cert_tmp, identity.cert)
            finally:
                key_tmp.unlink(missing_ok=True)
                cert_tmp.unlink(missing_ok=True)
            for directory in {identity.key.parent, identity.cert.parent}:
                fsync_directory(directory)

        try:
            return await self.install(swap)
        except OSError as exc:
            raise ServiceError(f"cannot replace {exc.filename}: {exc.strerror or exc}", code="write_failed") from None
