"""Keep trust bundle and CRL files current from the endpoints that publish them.

Theory of operation
-------------------
Two kinds of source, one mechanism:

- ``identity.sync: {url, every}``: our own ``ca serve``; ``GET URL/v1/bundle`` becomes
  ``identity.bundle`` and ``GET URL/v1/crl`` becomes ``identity.crl`` (when configured). The service
  must present ``spiffe://TD/ca`` (TD: our trust domain) chaining to the bundle we hold.
- ``trust_domains.TD.endpoint`` (the SPIFFE ``https_spiffe`` profile): a federated trust domain's
  bundle endpoint; the server must present ``endpoint_id`` (default ``spiffe://TD/ca``) chaining to
  the bundle of TD we hold now, so each fetch is authenticated by the previous bundle, starting from
  the file the operator provided.

``Syncer.run`` looks at the current snapshot's config once a second, so a reload that adds or
removes a source takes effect; each source is fetched when due (``every``; for a trust domain
without ``every``, its bundle's ``spiffe_refresh_hint``, else 5 minutes), with the ETag of the
last answer, so an unchanged document costs a 304. A changed one is checked before anything is
written: a SPIFFE bundle whose ``spiffe_sequence`` is lower than the last one accepted is refused,
then the new content is written to a temporary file next to the real one and the credentials are
loaded with it in place of the real file (exactly what a reload will check: our chain still
verifies, the roots serve their trust domain, the CRLs are bound). Only then is it renamed over
the file, all under the sidecar's ``files_lock`` (``Sidecar.install_identity``), followed by one
normal reload. A fetch that fails or a document refused is logged (``sync_failed``,
``sync_refused``) and counted (``sidecar_sync_total{result}``: updated, unchanged, failed,
refused); the files stay as they were.

A bundle is written in the form its file already has: PEM stays PEM (the roots), a SPIFFE bundle
stays the document as fetched.

Cancellation: ``run`` runs until cancelled; an install in progress is shielded by the sidecar, and a
temporary file never outlives the step that made it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from mtls.bundles import (
    PEM,
    BundleError,
    bundle_pem,
    check_sequence,
    check_serves,
    parse_bundle,
)
from mtls.events import EventLog
from mtls.files import PUBLIC_MODE, fsync_directory, write_temporary
from mtls.spiffe import SpiffeId, parse_spiffe_id
from proxy.caclient import SERVICE_PATH, ServiceError, ServiceUrl, client_context, get
from proxy.config import Config
from proxy.credentials import CredentialError, Credentials, load_credentials
from proxy.metrics import Metrics

CHECK_INTERVAL = 1.0  # seconds between looks at which source is due
DEFAULT_EVERY = 300.0  # a federated bundle without `every` or spiffe_refresh_hint
BUNDLE_PATH = "/v1/bundle"
CRL_PATH = "/v1/crl"


@dataclass(frozen=True)
class Source:
    """One endpoint and the files it keeps current. ``trust_domain`` is whose bundle it serves and
    authenticates it; ``crl`` is set for our own CA when ``identity.crl`` is configured."""

    setting: str  # "identity.sync" or "trust_domains.TD.endpoint", for messages
    url: ServiceUrl
    server_id: SpiffeId
    trust_domain: str
    bundle: Path
    crl: Path | None
    every: float


def sources(config: Config, creds: Credentials) -> list[Source]:
    """The sources the config names (URLs were validated when the config was read)."""
    found = []
    identity = config.identity
    own = creds.spiffe_id.trust_domain
    if identity.sync is not None:
        found.append(Source(
            "identity.sync", ServiceUrl.parse(identity.sync.url), parse_spiffe_id(f"spiffe://{own}{SERVICE_PATH}"),
            own, identity.bundle, identity.crl, identity.sync.every,
        ))
    for domain in config.trust_domains:
        if domain.endpoint is None:
            continue
        hint = creds.bundles[domain.name].refresh_hint
        every = domain.every or (float(hint) if hint else DEFAULT_EVERY)
        server_id = parse_spiffe_id(domain.endpoint_id or f"spiffe://{domain.name}{SERVICE_PATH}")
        found.append(Source(
            f"trust_domains.{domain.name}.endpoint", ServiceUrl.parse(domain.endpoint), server_id, domain.name,
            domain.bundle, None, max(1.0, every),
        ))
    return found


class SyncRefused(Exception):
    """A fetched document that must not replace the file it is for."""


class Syncer:
    """Fetches what ``sources`` name, when due. Knows the sidecar through ``current()`` (the config
    and credentials in force) and ``install(write, trigger)`` (``Sidecar.install_identity``)."""

    def __init__(
        self,
        current: Callable[[], tuple[Config, Credentials]],
        install: Callable[[Callable[[], None], str], Awaitable[bool]],
        log: EventLog,
        metrics: Metrics,
    ):
        self.current = current
        self.install = install
        self.log = log
        self.metrics = metrics
        self._due: dict[tuple[str, str], float] = {}  # (setting, url) -> monotonic time of the next fetch
        self._etags: dict[str, str] = {}  # URL of a document -> ETag of the version we hold
        self._sequences: dict[str, int] = {}  # trust domain -> the last spiffe_sequence accepted

    async def run(self) -> None:
        while True:
            config, creds = self.current()
            for source in sources(config, creds):
                key = (source.setting, source.url.text)
                if time.monotonic() >= self._due.get(key, 0.0):
                    await self.sync(source)
                    self._due[key] = time.monotonic() + source.every
            await trio.sleep(CHECK_INTERVAL)

    async def sync(self, source: Source) -> str:
        """Fetch ``source`` once and install what changed; the result as counted."""
        result = await self._sync(source)
        self.metrics.sync.labels(result).inc()
        return result

    async def _sync(self, source: Source) -> str:
        config, creds = self.current()
        ctx = client_context(creds.bundles[source.trust_domain].roots)
        try:
            bundle_doc = await self._fetch(source, BUNDLE_PATH, ctx)
            crl_doc = await self._fetch(source, CRL_PATH, ctx) if source.crl is not None else None
        except ServiceError as exc:
            self.log.emit("warning", "sync_failed", source=source.setting, url=source.url.text, detail=exc.detail,
                          action=f"keeping the files as they are; next try in {source.every:g}s")
            return "failed"
        if bundle_doc is None and crl_doc is None:
            return "unchanged"
        try:
            update = self._checked(source, creds, bundle_doc, crl_doc)
            if not update.files:  # what the files hold already (a first fetch, usually)
                self._remember(bundle_doc, crl_doc, update, source)
                return "unchanged"
            reloaded = await self.install(
                lambda: _stage_check_and_write(config, creds, update.files), f"sync from {source.url.text}"
            )
        except (SyncRefused, CredentialError, BundleError) as exc:
            detail = "; ".join(exc.problems) if isinstance(exc, CredentialError) else str(exc)
            self.log.emit("error", "sync_refused", source=source.setting, url=source.url.text, detail=detail,
                          action="keeping the files as they are")
            return "refused"
        except OSError as exc:
            self.log.emit("error", "sync_failed", source=source.setting, url=source.url.text,
                          detail=f"cannot write: {exc.strerror or exc}", action="keeping the files as they are")
            return "failed"
        self._remember(bundle_doc, crl_doc, update, source)
        self.log.emit("info", "sync_updated", source=source.setting, url=source.url.text,
                      files=[str(path) for path in update.files], sequence=update.sequence, reloaded=reloaded)
        return "updated"

    def _remember(self, bundle_doc: Document | None, crl_doc: Document | None, update: Update, source: Source) -> None:
        """What we now hold: the ETags to send next time, the bundle's sequence."""
        for document in (bundle_doc, crl_doc):
            if document is not None and document.etag:
                self._etags[document.url] = document.etag
        if update.sequence is not None:
            self._sequences[source.trust_domain] = update.sequence

    async def _fetch(self, source: Source, path: str, ctx) -> Document | None:
        """A changed document, or None when the server says we hold it (304)."""
        url = f"{source.url.text}{path}"
        answer = await get(source.url, path, ctx, expect_id=source.server_id, etag=self._etags.get(url))
        if answer.status == 304:
            return None
        if answer.status != 200:
            code, detail = answer.error()
            raise ServiceError(f"{url} answered {answer.status}: {detail}", refused=True, status=answer.status, code=code)
        return Document(url, answer.body, answer.etag)

    def _checked(self, source: Source, creds: Credentials, bundle_doc: Document | None,
                 crl_doc: Document | None) -> Update:
        """What to write where, after the checks that need no files: the bundle parses, serves the
        trust domain, and its sequence does not go back."""
        files: dict[Path, bytes] = {}
        sequence = None
        if bundle_doc is not None:
            fetched = parse_bundle(bundle_doc.body)
            check_serves(fetched, source.trust_domain)
            held = creds.bundles[source.trust_domain]
            last = self._sequences.get(source.trust_domain)
            check_sequence(fetched, held if last is None else replace(held, sequence=last))
            sequence = fetched.sequence
            files[source.bundle] = bundle_pem(fetched.roots) if held.format == PEM else bundle_doc.body
        if crl_doc is not None:
            if b"-----BEGIN X509 CRL-----" not in crl_doc.body:
                raise SyncRefused(f"{crl_doc.url} sent no PEM CRL")
            files[source.crl] = crl_doc.body
        return Update({path: data for path, data in files.items() if _content(path) != data}, sequence)


@dataclass(frozen=True)
class Document:
    url: str
    body: bytes
    etag: str | None


@dataclass(frozen=True)
class Update:
    files: dict[Path, bytes]  # file -> its new content
    sequence: int | None  # of the bundle in it


def _content(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _unstaged(problem: str, staged: dict[Path, Path]) -> str:
    for path, temporary in staged.items():
        problem = problem.replace(str(temporary), f"{path} (as fetched)")
    return problem


def _stage_check_and_write(config: Config, creds: Credentials, files: dict[Path, bytes]) -> None:
    """(Worker thread, under the sidecar's files_lock.) Write each new content to a temporary file,
    load the credentials with those in place of the real files, and only if that succeeds rename them
    over the real files. Raises CredentialError (nothing written) or OSError."""
    staged: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            staged[path] = write_temporary(path, data, PUBLIC_MODE)
        identity = config.identity
        identity = replace(identity, bundle=staged.get(identity.bundle, identity.bundle))
        if identity.crl is not None:
            identity = replace(identity, crl=staged.get(identity.crl, identity.crl))
        domains = tuple(replace(domain, bundle=staged.get(domain.bundle, domain.bundle)) for domain in config.trust_domains)
        try:
            load_credentials(identity, domains, previous=creds)
        except CredentialError as exc:  # name the real files, not the temporary ones
            problems = [_unstaged(problem, staged) for problem in exc.problems]
            raise CredentialError(problems, [_unstaged(problem, staged) for problem in exc.failed_bundles]) from None
        for path, temporary in staged.items():
            os.replace(temporary, path)
        for directory in {path.parent for path in staged}:
            fsync_directory(directory)
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)
