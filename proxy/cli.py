"""``proxy`` command line: argv -> calls, and exit codes. Nothing else lives here.

Exit codes: 0 ok; 1 refused or not ready (``check`` found problems, ``health`` not ready);
2 usage or input error (bad config or identity files at start-up, listener cannot bind).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mtls.console import run_command


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mtls-sidecar")
    except PackageNotFoundError:
        return "unknown"


class _ShowVersion(argparse.Action):
    """``--version``: the installed version, looked up only when asked. importlib.metadata costs about
    1 MiB of resident memory and 15 ms, which every `proxy run` paid when the parser was built."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {_version()}")
        parser.exit()


def _config_path(args) -> Path | None:
    value = args.config or os.environ.get("PROXY_CONFIG")
    return Path(value) if value else None


def _cmd_run(args) -> int:
    import trio

    from mtls.events import EventLog
    from mtls.sockets import listen_socket
    from proxy.capacity import (
        capacity_warnings,
        cgroup_memory_limit,
        raise_open_file_limit,
    )
    from proxy.metrics import Metrics
    from proxy.renewer import Renewer
    from proxy.sidecar import Sidecar
    from proxy.snapshot import StartupError, load_snapshot

    config_path = _config_path(args)
    if config_path is None:
        print("proxy: no config: pass -c FILE or set PROXY_CONFIG", file=sys.stderr)
        return 2
    try:
        snapshot = load_snapshot(config_path)
    except StartupError as exc:
        for problem in exc.problems:
            print(f"proxy: {problem}", file=sys.stderr)
        print(f"proxy: not started: {len(exc.problems)} problem(s) in {config_path}", file=sys.stderr)
        return 2
    config = snapshot.config
    log = EventLog(config.log.level, config.log.format)
    for warning in capacity_warnings(config, raise_open_file_limit(), cgroup_memory_limit()):
        log.emit("warning", "capacity", detail=warning)
    metrics = Metrics()
    sidecar = Sidecar(config_path, snapshot, log, metrics)
    try:
        sidecar.bind()
        admin_sock = listen_socket(config.admin.listen) if config.admin else None
    except StartupError as exc:
        for problem in exc.problems:
            print(f"proxy: {problem}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"proxy: admin: cannot listen on {config.admin.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    renewer = None
    if config.identity.renew is not None:
        renewer = Renewer(sidecar.current_identity, sidecar.install_identity, log, metrics)
    trio.run(sidecar.serve, admin_sock, renewer)
    return 0


def _cmd_check(args) -> int:
    from proxy.check import check_main

    config_path = _config_path(args)
    if config_path is None:
        print("proxy: no config: pass -c FILE or set PROXY_CONFIG", file=sys.stderr)
        return 2
    return check_main(config_path, sys.stdout, sys.stderr)


def _cmd_demo(args) -> int:
    from proxy.demo import run_demo

    return run_demo(keep=args.keep)


def _cmd_health(args) -> int:
    from proxy.admin import health_main

    return health_main(args.admin, sys.stdout, sys.stderr)


def _cmd_enroll(args) -> int:
    from proxy.enroll import enroll_main

    return enroll_main(
        args.url, args.token_file and Path(args.token_file), Path(args.bundle), Path(args.out), sys.stdout, sys.stderr,
        token_in_argv=args.token is not None,
    )


def _cmd_redirect(args) -> int:
    from proxy.redirect import RedirectError, redirect_main, requested_rules

    action = "apply" if args.apply else "remove" if args.remove else "print"
    rules = None
    try:
        if action == "remove" and (args.egress or args.inbound):
            raise RedirectError("--remove takes away every rule --apply wrote, egress and inbound, and takes no "
                                "--egress or --inbound; to keep some, --apply them alone (it replaces the rest)")
        if action != "remove":
            rules = requested_rules(_config_path(args), egress=args.egress or not args.inbound, inbound=args.inbound,
                                    uid=args.uid, port=args.port, ipv6=args.ipv6)
    except RedirectError as exc:
        print(f"proxy redirect: {exc}", file=sys.stderr)
        return 2
    return redirect_main(action, rules, args.backend, sys.stdout, sys.stderr)


def _cmd_suggest(args) -> int:
    from proxy.suggest import suggest_main

    return suggest_main(Path(args.log), sys.stdout, sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy", description="mTLS sidecar with SPIFFE allowlists.")
    parser.add_argument("--version", action=_ShowVersion, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the sidecar until SIGTERM/SIGINT (SIGHUP reloads)")
    run.add_argument("-c", "--config", help="config file (default: $PROXY_CONFIG)")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check", help="validate the config and every file it names")
    check.add_argument("-c", "--config", help="config file (default: $PROXY_CONFIG)")
    check.set_defaults(func=_cmd_check)

    demo = sub.add_parser("demo", help="CA, three identities, two sidecars, one allowed and one denied call")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    demo.set_defaults(func=_cmd_demo)

    health = sub.add_parser("health", help="exit 0 if the admin endpoint's /readyz says ready")
    health.add_argument("--admin", default="127.0.0.1:15000", help="admin HOST:PORT (default 127.0.0.1:15000)")
    health.set_defaults(func=_cmd_health)

    enroll = sub.add_parser("enroll", help="get a first certificate from 'ca serve' with a one-time token")
    enroll.add_argument("--url", required=True, help="CA service, e.g. https://ca:8443")
    enroll.add_argument(
        "--token-file", metavar="FILE",
        help="file holding the one-time token from 'ca token' (default: $MTLS_ENROLL_TOKEN; never --token)",
    )
    enroll.add_argument("--token", help=argparse.SUPPRESS)  # refused with the reason: see proxy.enroll
    enroll.add_argument("--bundle", required=True, help="trust bundle to verify the CA service")
    enroll.add_argument("--out", required=True, help="directory for cert.pem, key.pem, bundle.pem")
    enroll.set_defaults(func=_cmd_enroll)

    redirect = sub.add_parser(
        "redirect", help="print, apply or remove the rules sending the app's outbound TCP to the egress listener "
                         "(and, with --inbound, outside TCP to the app's ports to the inbound listeners)")
    action = redirect.add_mutually_exclusive_group(required=True)
    action.add_argument("--print", action="store_true", help="print the script --apply runs")
    action.add_argument("--apply", action="store_true", help="apply the rules (needs CAP_NET_ADMIN)")
    action.add_argument("--remove", action="store_true", help="remove the rules")
    redirect.add_argument("--egress", action="store_true", help="the egress rules (the default without --inbound)")
    redirect.add_argument("--inbound", action="store_true",
                          help="outside TCP to each inbound listener's forward port goes to its listen port")
    redirect.add_argument("--uid", type=int, help="the sidecar's uid: its own connections are not redirected")
    redirect.add_argument("-c", "--config", help="config naming the listeners to redirect to (default: $PROXY_CONFIG)")
    redirect.add_argument("--port", type=int, help="the egress listener's port, instead of reading a config")
    redirect.add_argument("--ipv6", action="store_true", help="with --port: the listener is on [::1]")
    redirect.add_argument("--backend", choices=("nft", "iptables"), help="default: nft if installed, else iptables")
    redirect.set_defaults(func=_cmd_redirect)

    suggest = sub.add_parser("suggest", help="egress.allow and inbound allow rules that admit what a log saw")
    suggest.add_argument("--log", required=True, help="the sidecar's JSON log (its stderr)")
    suggest.set_defaults(func=_cmd_suggest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(lambda: args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
