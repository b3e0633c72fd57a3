"""``ca``: argv -> one call into the library (``ca.generations``, ``ca.issuance``, ``ca.revocation``,
``ca.enrollment``, ``ca.inspection``, ``ca.store``) -> printed result and exit code.

Exit codes (contract): 0 ok, 1 refused or invalid (including ``ca verify`` verdicts), 2 usage or
input error. Every error is one line on stderr, ``ca: <what>: <why>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

from ca import enrollment, generations, inspection, issuance, revocation
from ca.authority import (
    DEFAULT_KEY_TYPE,
    KEY_TYPES,
    REVOCATION_REASONS,
    format_serial,
    format_time,
)
from ca.errors import CaError, InputError
from ca.store import BUNDLE, CRL, EXPIRED, INTERMEDIATE_CERT, REVOKED, ROOT_CERT, VALID, Record, StateDir
from ca.verify import CrlError, verify_svid_chain
from mtls.bundles import (
    FORMATS,
    PEM,
    SPIFFE,
    BundleError,
    check_serves,
    declared_trust_domains,
    is_trust_domain,
    parse_bundle,
)
from mtls.console import run_command
from mtls.durations import parse_duration
from mtls.files import write_atomically
from mtls.spiffe import InvalidSpiffeId, parse_pattern
from mtls.trust import DEFAULT_CRL_GRACE, VerifyError, claimed_trust_domain

DEFAULT_DIR = "ca-data"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"ca: {message} (see '{self.prog} --help')\n")


def _duration(text: str) -> timedelta:
    try:
        return timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_state_options(parser: argparse.ArgumentParser, *, on_subcommand: bool) -> None:
    # On subcommands the default is SUPPRESS, so `ca --dir X issue ...` is not overwritten by None.
    default = argparse.SUPPRESS if on_subcommand else None
    parser.add_argument(
        "--dir", default=default, metavar="DIR", help=f"state directory (default: $CA_DIR, else ./{DEFAULT_DIR})"
    )
    parser.add_argument(
        "--db", default=default, metavar="URL",
        help="the index: sqlite:///PATH or postgresql://USER@HOST/DB, shared by several 'ca serve' replicas "
        "(default: $CA_DB, else sqlite:///DIR/ca.db)",
    )
    parser.add_argument(
        "--passphrase-file",
        default=default,
        metavar="FILE",
        help="passphrase of the CA keys (default: $CA_PASSPHRASE; without either, keys are not encrypted)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ca",
        description="A small SPIFFE CA: issues X.509-SVIDs to workloads, keeps an index, revokes.",
        epilog="Exit status: 0 ok, 1 refused or invalid, 2 usage or input error.",
    )
    _add_state_options(parser, on_subcommand=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help: str, *, state: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        if state:
            _add_state_options(sub, on_subcommand=True)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("init", _init, "create a root CA and an online intermediate CA; refuses to overwrite a CA")
    sub.add_argument("--trust-domain", required=True, metavar="TD", help="e.g. example.org")
    sub.add_argument("--key-type", choices=KEY_TYPES, default=DEFAULT_KEY_TYPE, help="(default: %(default)s)")
    sub.add_argument("--root-ttl", type=_duration, default="87600h", help="root lifetime (default: %(default)s)")
    sub.add_argument("--ttl", type=_duration, default="8760h", help="intermediate lifetime (default: %(default)s)")

    sub = command(
        "issue", _issue, "issue an X.509-SVID: OUTDIR/cert.pem, OUTDIR/key.pem (0600), OUTDIR/bundle.pem"
    )
    sub.add_argument("spiffe_id", metavar="SPIFFE_ID", help="e.g. spiffe://example.org/ns/prod/sa/web")
    sub.add_argument(
        "--ttl",
        type=_duration,
        default="24h",
        help="lifetime (default: %(default)s); refused (exit 1), not shortened, "
        "if it would outlive the intermediate",
    )
    sub.add_argument(
        "--out",
        type=Path,
        metavar="OUTDIR",
        help="output directory (default: ./NAME, NAME the ID's last path segment: ./web for "
        "spiffe://td/ns/prod/sa/web); created with mode 0700; the files of the same ID are replaced "
        "(renewal), another ID's are not",
    )
    sub.add_argument("--dns", action="append", default=[], metavar="NAME", help="add a DNS SAN (repeatable)")
    sub.add_argument(
        "--csr",
        type=Path,
        metavar="CSR.pem",
        help="certify the key of this CSR (its signature is checked, its names are ignored); writes no key.pem",
    )
    sub.add_argument("--json", action="store_true", help="print a JSON object instead of text")

    sub = command(
        "list", _list,
        "list issued certificates and their status (valid, expired, revoked), oldest first, as the index is read",
    )
    sub.add_argument("--json", action="store_true", help="print a JSON array")
    sub.add_argument("--status", choices=(VALID, EXPIRED, REVOKED), help="only certificates of this status")
    sub.add_argument(
        "--id", dest="id_pattern", metavar="PATTERN",
        help="only certificates of this SPIFFE ID, or of the IDs under a prefix: spiffe://TD/ns/prod/*",
    )

    sub = command(
        "revoke", _revoke,
        "revoke one certificate, every valid certificate of an ID, or all that a file names; updates crl.pem",
    )
    sub.add_argument(
        "target", nargs="?", metavar="SERIAL|SPIFFE_ID", help="hex serial (as 'ca list' shows) or a SPIFFE ID"
    )
    sub.add_argument(
        "--from", dest="from_file", metavar="FILE",
        help="revoke every serial or SPIFFE ID of FILE ('-': stdin), one per line, blank lines and # comments "
        "skipped: in one transaction, with one new CRL; a bad line refuses the whole file",
    )
    sub.add_argument("--reason", choices=REVOCATION_REASONS, default="unspecified", help="(default: %(default)s)")

    sub = command(
        "crl", _crl, "sign fresh CRLs (each intermediate's, and the root's for the intermediates), store them "
        "as DIR/crl.pem and print or write them",
    )
    sub.add_argument("--out", type=Path, metavar="FILE", help="write it here instead of stdout")
    sub.add_argument(
        "--validity", type=_duration, default=None, metavar="DURATION",
        help="time until the CRLs' next update, after which verifiers refuse them as stale; remembered for the "
        "CRLs 'ca revoke' and 'ca serve' sign later (default: the last one given, else 24h)",
    )

    sub = command("bundle", _bundle, "print or write the trust bundle (the root certificates)")
    sub.add_argument("--out", type=Path, metavar="FILE", help="write it here instead of stdout")
    sub.add_argument(
        "--format", choices=FORMATS, default=PEM,
        help="pem (default) or spiffe: a SPIFFE bundle (JWK Set with spiffe_sequence), for federated sidecars",
    )
    sub.add_argument(
        "--drop-old",
        action="store_true",
        help="after 'ca rotate': remove every root but the current one from DIR/bundle.pem (and their CRLs "
        "from DIR/crl.pem); refused (exit 1, listing them) while unexpired, unrevoked certificates still "
        "chain to such a root",
    )
    sub.add_argument("--force", action="store_true", help="with --drop-old: drop even if certificates still chain")

    sub = command(
        "rotate",
        _rotate,
        "make a new root and intermediate; bundle.pem then holds the old and the new root, new leaves "
        "come from the new intermediate, the old one keeps signing CRLs for its leaves",
    )
    sub.add_argument(
        "--key-type", choices=KEY_TYPES, default=None, help="(default: the current generation's)"
    )
    sub.add_argument("--root-ttl", type=_duration, default=None, help="(default: the current root's lifetime)")
    sub.add_argument("--ttl", type=_duration, default=None, help="(default: the current intermediate's lifetime)")

    sub = command("token", _token, "print a one-time enrollment token for 'proxy enroll' (only its hash is kept)")
    sub.add_argument("spiffe_id", metavar="SPIFFE_ID", help="the ID the enrolled workload will get")
    sub.add_argument("--ttl", type=_duration, default="10m", help="how long the token works (default: %(default)s)")
    sub.add_argument(
        "--cert-ttl", type=_duration, default="24h",
        help="lifetime of the certificate it buys (default: %(default)s); renewals keep it",
    )
    sub.add_argument("--json", action="store_true", help="print a JSON object (token, spiffe_id, expires)")

    sub = command(
        "serve",
        _serve,
        "HTTPS service (TLS 1.3): POST /v1/renew (mTLS, the current certificate) and POST /v1/enroll "
        "(a token from 'ca token'); one JSON log line per request on stderr; SIGTERM stops it",
    )
    sub.add_argument("--listen", required=True, metavar="HOST:PORT", help="e.g. 0.0.0.0:8443 (port 0: any)")
    sub.add_argument(
        "--dns", action="append", default=[], metavar="NAME",
        help="DNS name for the service's certificate, besides its ID spiffe://TD/ca (repeatable)",
    )

    sub = command(
        "migrate", _migrate,
        "copy this CA's SQLite index (and its certificates and keys) into an empty PostgreSQL database, for "
        "'ca serve' replicas: then run every ca with --db URL",
    )
    sub.add_argument("--to", required=True, metavar="URL", help="postgresql://USER@HOST/DB")

    sub = command(
        "inspect", _inspect, "show a certificate's ID, serial, issuer, validity, key and fingerprint", state=False
    )
    sub.add_argument("cert", type=Path, metavar="CERT", help="PEM or DER file; the first certificate is shown")
    sub.add_argument("--json", action="store_true", help="print a JSON object")

    sub = command("verify", _verify, "verify an X.509-SVID chain against a bundle (and a CRL)", state=False)
    sub.add_argument("cert", type=Path, metavar="CERT", help="PEM file: the leaf, then its intermediates")
    sub.add_argument(
        "--bundle", action="append", required=True, metavar="[TD=]FILE",
        help="trusted roots, PEM or a SPIFFE bundle (JSON); TD=FILE gives the roots of trust domain TD "
        "(repeatable: a leaf is verified against its own trust domain's roots only). Without TD=, each "
        "root serves the trust domain it names (O=TD, as 'ca init' makes it), else the leaf's",
    )
    sub.add_argument(
        "--crl", type=Path, metavar="C", help="CRL of the leaf's issuer; a CRL that does not verify is an error"
    )
    sub.add_argument(
        "--crl-grace", type=_duration, default=DEFAULT_CRL_GRACE, metavar="DURATION",
        help="how long past its next update a CRL is still relied on, as the sidecar's identity.crl_grace; "
        "later the verdict is crl_stale (default: %(default)s)",
    )
    sub.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="ID_OR_PATTERN",
        help="require this ID, or a prefix pattern like spiffe://td/ns/prod/* (repeatable: any may match)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error argparse has already printed (2)
        return exc.code if isinstance(exc.code, int) else 2
    return run_command(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    """Call the command's handler; turn its failures into one line on stderr and an exit code."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    try:
        return args.handler(args, now)
    except CaError as exc:
        print(f"ca: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        raise  # not a failure of the command: run_command handles it
    except OSError as exc:  # the filesystem said no somewhere we did not expect (full disk, permissions)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"ca: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


# --- helpers ---------------------------------------------------------------------------------


def _state_path(args: argparse.Namespace) -> Path:
    return Path(args.dir or os.environ.get("CA_DIR") or DEFAULT_DIR)


def _db_url(args: argparse.Namespace) -> str | None:
    """The index URL (``--db``, else $CA_DB); None for the default, DIR/ca.db."""
    return args.db or os.environ.get("CA_DB") or None


def _open_state(args: argparse.Namespace) -> StateDir:
    return StateDir.open(_state_path(args), _db_url(args))


def _passphrase(args: argparse.Namespace) -> bytes | None:
    if args.passphrase_file:
        data = inspection.read_file(args.passphrase_file, "--passphrase-file")
        data = data.removesuffix(b"\n").removesuffix(b"\r")  # as written by `echo secret > file`
        if not data:
            raise InputError(f"--passphrase-file {args.passphrase_file} is empty")
        return data
    from_env = os.environ.get("CA_PASSPHRASE")
    return from_env.encode("utf-8") if from_env else None


def _write_output(path: Path, data: bytes) -> None:
    try:
        write_atomically(path, data)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from None


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


# --- commands --------------------------------------------------------------------------------


def _init(args: argparse.Namespace, now: datetime) -> int:
    passphrase = _passphrase(args)
    state = generations.init_ca(
        _state_path(args),
        db=_db_url(args),
        trust_domain=args.trust_domain,
        key_type=args.key_type,
        root_ttl=args.root_ttl,
        ttl=args.ttl,
        passphrase=passphrase,
        now=now,
    )
    root = state.load_certificate(ROOT_CERT)
    intermediate = state.load_certificate(INTERMEDIATE_CERT)
    print(f"created a CA for trust domain {args.trust_domain} in {state.path}")
    root_expires = format_time(root.not_valid_after_utc)
    print(f"  root CA          {state.file(ROOT_CERT)}  ({args.key_type}, expires {root_expires})")
    intermediate_expires = format_time(intermediate.not_valid_after_utc)
    print(f"  intermediate CA  {state.file(INTERMEDIATE_CERT)}  (expires {intermediate_expires})")
    print(f"  trust bundle     {state.file(BUNDLE)}  (give it to every sidecar)")
    print(f"  CRL              {state.file('crl.pem')}")
    keys = f"{state.file('root.key')}, {state.file('intermediate.key')}"
    encrypted = (
        "encrypted with the passphrase" if passphrase else "NOT encrypted: use --passphrase-file or $CA_PASSPHRASE"
    )
    print(f"  keys             {keys}  (mode 0600, {encrypted})")
    return 0


def _issue(args: argparse.Namespace, now: datetime) -> int:
    issued = issuance.issue(
        _open_state(args),
        args.spiffe_id,
        ttl=args.ttl,
        now=now,
        out_dir=args.out,
        dns_names=args.dns,
        csr_path=args.csr,
        passphrase=_passphrase(args),
    )
    cert = issued.cert
    if args.json:
        _print_json(
            {
                "serial": format_serial(cert.serial_number),
                "spiffe_id": str(issued.spiffe_id),
                "not_before": format_time(cert.not_valid_before_utc),
                "not_after": format_time(cert.not_valid_after_utc),
                "files": {
                    "cert": str(issued.cert_path),
                    "key": None if issued.key_path is None else str(issued.key_path),
                    "bundle": str(issued.bundle_path),
                },
            }
        )
        return 0
    print(f"issued {issued.spiffe_id}")
    print(f"  serial      {format_serial(cert.serial_number)}")
    print(f"  valid       {format_time(cert.not_valid_before_utc)} to {format_time(cert.not_valid_after_utc)}")
    print(f"  cert        {issued.cert_path}  (leaf, then intermediate)")
    if issued.key_path is None:
        print(f"  key         none written: the CSR's owner holds it ({args.csr})")
    else:
        print(f"  key         {issued.key_path}  (mode 0600)")
    print(f"  bundle      {issued.bundle_path}")
    return 0


def _list(args: argparse.Namespace, now: datetime) -> int:
    try:
        pattern = parse_pattern(args.id_pattern) if args.id_pattern is not None else None
    except InvalidSpiffeId as exc:
        raise InputError(f"--id: {exc}") from None
    records = _open_state(args).stream_records(now=now, status=args.status, pattern=pattern)
    if args.json:  # streamed, in the layout json.dumps(indent=2) gives the whole array
        first = True
        for record in records:
            entry = textwrap.indent(json.dumps(_list_entry(record, now), indent=2), "  ")
            sys.stdout.write(("[\n" if first else ",\n") + entry)
            first = False
        print("[]" if first else "\n]")
        return 0
    print(f"{'SERIAL':<40}  {'STATUS':<7}  {'NOT_AFTER':<20}  SPIFFE_ID")
    for record in records:
        print(
            f"{format_serial(record.serial):<40}  {record.status(now):<7}  "
            f"{format_time(record.not_after):<20}  {record.spiffe_id}"
        )
    return 0


def _list_entry(record: Record, now: datetime) -> dict[str, str | None]:
    return {
        "serial": format_serial(record.serial),
        "spiffe_id": record.spiffe_id,
        "not_before": format_time(record.not_before),
        "not_after": format_time(record.not_after),
        "status": record.status(now),
        "revoked_at": format_time(record.revoked_at) if record.revoked_at else None,
        "reason": record.reason,
        "parent_serial": format_serial(record.parent_serial) if record.parent_serial else None,
    }


def _revoke(args: argparse.Namespace, now: datetime) -> int:
    if (args.target is None) == (args.from_file is None):
        raise InputError("revoke: give either SERIAL|SPIFFE_ID or --from FILE")
    state = _open_state(args)
    if args.from_file is None:
        result = revocation.revoke(state, args.target, reason=args.reason, now=now, passphrase=_passphrase(args))
    else:
        source = "stdin" if args.from_file == "-" else args.from_file
        data = sys.stdin.buffer.read() if args.from_file == "-" else inspection.read_file(Path(source), "--from")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"--from {source}: not UTF-8 text (one serial or SPIFFE ID per line)") from None
        targets = revocation.parse_target_lines(text, source, state.trust_domain)
        result = revocation.revoke_targets(state, targets, reason=args.reason, now=now, passphrase=_passphrase(args))
    for record in result.newly_revoked:
        print(f"revoked {format_serial(record.serial)} {record.spiffe_id} ({args.reason})")
    for record in result.renewals:
        print(f"revoked {format_serial(record.serial)} {record.spiffe_id} ({args.reason}), renewed from "
              f"{format_serial(record.parent_serial)}")
    for record in result.untouched:
        if record.revoked_at is not None:
            state = f"already revoked at {format_time(record.revoked_at)} ({record.reason})"
        else:
            state = f"expired at {format_time(record.not_after)}"
        print(f"skipped {format_serial(record.serial)} {record.spiffe_id}: {state}")
    if result.newly_revoked:
        print(f"CRL updated: {result.crl_path}")
    else:
        print("nothing to revoke; CRL unchanged")
    return 0


def _crl(args: argparse.Namespace, now: datetime) -> int:
    state = _open_state(args)
    crl = revocation.refresh_crl(state, now=now, validity=args.validity, passphrase=_passphrase(args))
    pem = state.file(CRL).read_bytes()  # one CRL, or one per live generation after a rotation
    if args.out is None:
        sys.stdout.write(pem.decode("ascii"))
        return 0
    _write_output(args.out, pem)
    crls = inspection.read_crls(state.file(CRL))
    counts = ", ".join(f"{len(one)} revoked by '{one.issuer.rfc4514_string()}'" for one in crls)
    if len(crls) == 1:
        counts = f"{len(crl)} revoked"
    print(f"wrote {args.out}: {counts}, next update {format_time(crl.next_update_utc)}")
    return 0


def _bundle(args: argparse.Namespace, now: datetime) -> int:
    state = _open_state(args)
    if args.force and not args.drop_old:
        raise InputError("--force only goes with --drop-old")
    if args.drop_old:
        _drop_old(state, args, now)
        if args.out is None:
            return 0
    data = generations.spiffe_bundle(state) if args.format == SPIFFE else state.file(BUNDLE).read_bytes()
    if args.out is None:
        sys.stdout.write(data.decode("ascii"))
        return 0
    _write_output(args.out, data)
    print(f"wrote {args.out}")
    return 0


def _drop_old(state: StateDir, args: argparse.Namespace, now: datetime) -> None:
    def show(blockers, verb: str) -> None:
        for blocker in blockers:
            record = blocker.record
            print(
                f"{verb} {format_serial(record.serial)}  {record.spiffe_id}  expires {format_time(record.not_after)}"
                f"  (chains to '{blocker.root.subject.rfc4514_string()}')"
            )

    try:
        result = generations.drop_old_roots(state, now=now, force=args.force, passphrase=_passphrase(args))
    except generations.DropRefused as exc:
        show(exc.blockers, "still valid:")
        raise
    if not result.dropped:
        print(f"nothing to drop: {state.file(BUNDLE)} holds only the current root")
        return
    show(result.forced_past, "forced past:")
    for root in result.dropped:
        print(f"dropped root '{root.subject.rfc4514_string()}' from {state.file(BUNDLE)}")
    print(f"bundle now holds {len(result.kept)} root(s); hand it to every sidecar")


def _rotate(args: argparse.Namespace, now: datetime) -> int:
    rotated = generations.rotate(
        _open_state(args),
        now=now,
        passphrase=_passphrase(args),
        key_type=args.key_type,
        root_ttl=args.root_ttl,
        ttl=args.ttl,
    )
    new, old = rotated.new, rotated.old
    print(f"rotated: generation {new.number} is current, generation {old.number} stays trusted")
    root_expires = format_time(new.root.not_valid_after_utc)
    print(f"  new root          '{new.root.subject.rfc4514_string()}' (expires {root_expires})")
    print(
        f"  new intermediate  '{new.intermediate.subject.rfc4514_string()}' "
        f"(expires {format_time(new.intermediate.not_valid_after_utc)}): signs every new certificate"
    )
    print(f"  old generation    {rotated.archive}  (its intermediate still signs CRLs for its leaves)")
    print(f"  trust bundle      {new.directory / BUNDLE}  ({len(rotated.bundle)} roots: old and new)")
    print("next: hand the bundle to every sidecar, re-issue each workload, then 'ca bundle --drop-old'")
    return 0


def _token(args: argparse.Namespace, now: datetime) -> int:
    issued = enrollment.create_token(
        _open_state(args), args.spiffe_id, ttl=args.ttl, cert_ttl=args.cert_ttl, now=now
    )
    if args.json:
        _print_json(
            {
                "token": issued.token,
                "spiffe_id": str(issued.spiffe_id),
                "expires": format_time(issued.expires_at),
                "cert_ttl_s": int(issued.cert_ttl.total_seconds()),
            }
        )
        return 0
    print(issued.token)
    return 0


def _serve(args: argparse.Namespace, now: datetime) -> int:
    from ca.serve import serve_main

    return serve_main(
        _open_state(args), listen=args.listen, dns_names=args.dns, passphrase=_passphrase(args)
    )


def _migrate(args: argparse.Namespace, now: datetime) -> int:
    state = _open_state(args)
    copied = state.copy_index_to(args.to)
    target = StateDir(state.path, args.to).index
    print(f"copied {state.index} to {target}: {copied['certs']} certificate(s), {copied['tokens']} token(s)")
    print(f"next: run every 'ca' and 'ca serve' with --db {target} (or $CA_DB); keep {state.index} as a backup")
    return 0


def _inspect(args: argparse.Namespace, now: datetime) -> int:
    first, *rest = inspection.read_certificates(args.cert)
    facts = inspection.describe(first, now=now)
    facts["chain"] = [cert.subject.rfc4514_string() for cert in rest]
    if args.json:
        _print_json(facts)
        return 0
    identity = facts["spiffe_id"] or f"none (not an X.509-SVID leaf: {facts['not_svid']})"
    print(f"spiffe_id    {identity}")
    print(f"serial       {facts['serial']}")
    print(f"subject      {facts['subject'] or '(empty)'}")
    print(f"issuer       {facts['issuer']}")
    print(f"not_before   {facts['not_before']}")
    print(f"not_after    {facts['not_after']}  ({facts['status'].replace('_', ' ')})")
    print(f"key_type     {facts['key_type']}")
    print(f"sha256       {facts['sha256_fingerprint']}")
    if facts["dns_names"]:
        print(f"dns_names    {', '.join(facts['dns_names'])}")
    print(f"ca           {'yes' if facts['ca'] else 'no'}")
    if rest:
        print(f"chain        {len(rest)} more in the file: {'; '.join(facts['chain'])}")
    return 0


def _verify(args: argparse.Namespace, now: datetime) -> int:
    try:
        allowed = [parse_pattern(value) for value in args.expect]
    except InvalidSpiffeId as exc:
        raise InputError(f"--expect: {exc}") from None
    leaf, *intermediates = inspection.read_certificates(args.cert)
    bundles = _trust_bundles(args.bundle, leaf)
    crls = inspection.read_crls(args.crl) if args.crl is not None else []
    try:
        result = verify_svid_chain(
            leaf, intermediates, bundles, now=now, crls=crls, crl_file=args.crl, crl_grace=args.crl_grace,
            allowed=allowed,
        )
    except VerifyError as exc:
        print(exc)
        return 1
    except CrlError as exc:
        raise InputError(f"--crl {args.crl}: {exc}") from None
    leaf_issuer = result.chain[1] if len(result.chain) > 1 else leaf
    if crls and not any(crl.issuer == leaf_issuer.subject for crl in result.crls_used):
        issuer = leaf.issuer.rfc4514_string()
        raise InputError(
            f"--crl {args.crl}: no CRL in it is from '{issuer}', the issuer of {args.cert}, "
            "so it cannot say whether the certificate is revoked"
        )
    print(
        f"valid: {result.spiffe_id} (serial {format_serial(leaf.serial_number)}, "
        f"expires {format_time(leaf.not_valid_after_utc)})"
    )
    return 0


def _trust_bundles(values: list[str], leaf) -> dict[str, list] | list:
    """``--bundle [TD=]FILE`` values as the roots of each trust domain (see the option's help); the
    roots of an unnamed file that name no trust domain are the leaf's (a list, when nothing is named)."""
    named: dict[str, list] = {}
    unnamed: list = []
    for value in values:
        trust_domain, sep, file = value.partition("=")
        if not (sep and "/" not in trust_domain and is_trust_domain(trust_domain)):
            trust_domain, file = None, value
        try:
            bundle = parse_bundle(inspection.read_file(Path(file), "bundle"))
            if trust_domain is not None:
                check_serves(bundle, trust_domain)
        except BundleError as exc:
            raise InputError(f"--bundle {value}: {exc}") from None
        if trust_domain is not None:
            named.setdefault(trust_domain, []).extend(bundle.roots)
            continue
        for root in bundle.roots:
            declared = declared_trust_domains(root)
            if len(declared) == 1:
                named.setdefault(declared.pop(), []).append(root)
            else:
                unnamed.append(root)
    if not named:
        return unnamed
    if unnamed:
        leaf_domain = claimed_trust_domain(leaf)
        if leaf_domain is None:
            return unnamed + [root for roots in named.values() for root in roots]  # verify says not_svid
        named.setdefault(leaf_domain, []).extend(unnamed)
    return named
