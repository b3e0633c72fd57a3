"""``proxy`` command line: argv -> calls, and exit codes. Nothing else lives here.

Exit codes: 0 ok; 1 refused or not ready (``check`` found problems, ``health`` not ready);
2 usage or input error (bad config or identity files at start-up, listener cannot bind).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mtls-sidecar")
    except PackageNotFoundError:
        return "unknown"


def _config_path(args) -> Path | None:
    value = args.config or os.environ.get("PROXY_CONFIG")
    return Path(value) if value else None


def _cmd_run(args) -> int:
    import trio

    from mtls.events import EventLog
    from mtls.sockets import listen_socket
    from proxy.metrics import Metrics
    from proxy.sidecar import Sidecar, StartupError, load_generation

    config_path = _config_path(args)
    if config_path is None:
        print("proxy: no config: pass -c FILE or set PROXY_CONFIG", file=sys.stderr)
        return 2
    try:
        generation = load_generation(config_path)
    except StartupError as exc:
        for problem in exc.problems:
            print(f"proxy: {problem}", file=sys.stderr)
        print(f"proxy: not started: {len(exc.problems)} problem(s) in {config_path}", file=sys.stderr)
        return 2
    config = generation.config
    log = EventLog(config.log.level, config.log.format)
    sidecar = Sidecar(config_path, generation, log, Metrics())
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
    if config.admin:
        from mtls.sockets import bound_address

        sidecar.bound["admin"] = bound_address(admin_sock)
    trio.run(sidecar.serve, admin_sock)
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

    return enroll_main(args.url, args.token, Path(args.bundle), Path(args.out), sys.stdout, sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy", description="mTLS sidecar with SPIFFE allowlists.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
    enroll.add_argument("--token", required=True, help="one-time token from 'ca token'")
    enroll.add_argument("--bundle", required=True, help="trust bundle to verify the CA service")
    enroll.add_argument("--out", required=True, help="directory for cert.pem, key.pem, bundle.pem")
    enroll.set_defaults(func=_cmd_enroll)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
