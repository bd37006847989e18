"""The ``tunnelgate`` command: keygen, fingerprint, check, run, bench and the admin clients.

Exit codes: 0 ok, 1 an operation failed (e.g. refusing to overwrite a key),
2 the config or the command line is wrong.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Literal

from gateway.errors import ConfigError, TunnelgateError

EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnelgate",
        description="Application-layer TCP/UDP tunneling gateway over mutual-TLS carriers.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    keygen = verbs.add_parser(
        "keygen", help="make an Ed25519 key (NAME.key, mode 0600) and certificate (NAME.crt)"
    )
    keygen.add_argument("name", metavar="NAME", help="gateway name, or a path prefix dir/NAME")
    fingerprint = verbs.add_parser("fingerprint", help="print the fingerprint of a .crt or .key")
    fingerprint.add_argument("file", metavar="FILE")
    check = verbs.add_parser("check", help="validate a config file")
    check.add_argument("config", metavar="CONFIG.toml")
    status = verbs.add_parser("status", help="carriers and tunnels of a running gateway"
                              " (through its admin endpoint)")
    status.add_argument("config", metavar="CONFIG.toml")
    status.add_argument("--json", action="store_true", help="print /status as is")
    reload = verbs.add_parser("reload", help="make the running gateway re-read its config"
                              " (through its admin endpoint; or send it SIGHUP)")
    reload.add_argument("config", metavar="CONFIG.toml")
    passwd = verbs.add_parser("passwd", help="hash a password for a users_file; prints NAME:HASH"
                              " (the password from the terminal, or stdin if it is not one)")
    passwd.add_argument("name", metavar="NAME")
    passwd.add_argument("--scheme", choices=["scrypt", "argon2id"], default="scrypt")
    bench = verbs.add_parser("bench", help="measure throughput, latency, sessions/s and UDP loss through"
                             " a tunnel, against the far gateway's built-in services")
    bench.add_argument("config", metavar="CONFIG.toml")
    bench.add_argument("--via", required=True, type=_via, metavar="PEER[,PEER...]",
                       help="the route; the first peer must be one this config dials")
    bench.add_argument("--duration", type=_bounded(float, 0.1, 3600), default=5.0, metavar="SECONDS",
                       help="of each phase (default 5)")
    bench.add_argument("--end-to-end", action="store_true", help="as a tunnel with end_to_end = true")
    bench.add_argument("--concurrency", type=_bounded(int, 1, 256), default=1, metavar="N",
                       help="clients opening sessions at once (default 1)")
    bench.add_argument("--udp-rate", type=_bounded(int, 1, 100_000), default=1000, metavar="PPS",
                       help="datagrams per second to UDP service:echo (default 1000)")
    bench.add_argument("--udp-size", type=_bounded(int, 8, 65_507), default=512, metavar="BYTES",
                       help="of each datagram (default 512)")
    bench.add_argument("--json", metavar="FILE", help="write every number and sample here")
    bench.add_argument("--plot", metavar="FILE.png",
                       help="throughput over time and the latency histogram (needs matplotlib)")
    run = verbs.add_parser("run", help="run the gateway")
    run.add_argument("config", metavar="CONFIG.toml")
    run.add_argument("--ready-file", metavar="FILE",
                     help="once every listener is bound, write their addresses here as JSON")
    run.add_argument("--log-format", choices=["text", "json"],
                     help="text lines (default) or one JSON object per line; overrides gateway.log_format")
    loud = run.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    loud.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return parser


def _via(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected PEER[,PEER...], got {text!r}")
    return names


def _bounded(kind: type[float] | type[int], low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low:g}..{high:g}, got {text}")
        return value

    return parse


def _keygen(name: str) -> int:
    from pathlib import Path

    from gateway.config import NAME_RE
    from gateway.security.identity import write_identity

    prefix = Path(name)
    stem = prefix.name.removesuffix(".key").removesuffix(".crt")
    if not NAME_RE.match(stem):
        print(
            f"tunnelgate: {stem!r} is not a valid gateway name"
            " (1-63 letters, digits, '.', '_' or '-')",
            file=sys.stderr,
        )
        return EXIT_USAGE
    identity = write_identity(prefix)
    print(f"wrote {identity.key_path} (private, mode 0600) and {identity.cert_path}")
    print(identity.fingerprint)
    return 0


def _check(path: str) -> int:
    from gateway.config import load_config

    config = load_config(path)
    for warning in config.tier_warnings():
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: ok ({len(config.peers)} peers, {len(config.tunnels)} tunnels)")
    return 0


def _passwd(name: str, scheme: Literal["scrypt", "argon2id"]) -> int:
    """Print a users_file line; prompts go to the terminal, so ``>> users.txt`` works."""
    import getpass

    from gateway.security.users import NAME_MAX_BYTES, hash_password, is_valid_name

    def refuse(message: str) -> int:
        print(f"tunnelgate: {message}", file=sys.stderr)
        return EXIT_USAGE

    if not is_valid_name(name):
        return refuse(f"{name!r} is not a valid user name (1-{NAME_MAX_BYTES} bytes, no ':' or whitespace)")
    if sys.stdin.isatty():
        try:
            password = getpass.getpass(f"Password for {name}: ")
            if getpass.getpass("Again: ") != password:
                return refuse("the two passwords differ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return EXIT_FAILED
    else:
        try:
            password = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            return refuse("the password on stdin is not UTF-8")
        password = password.removesuffix("\n").removesuffix("\r")
        if "\n" in password:
            return refuse("expected one line on stdin (the password, once)")
    if not password:
        return refuse("refusing an empty password")
    print(f"{name}:{hash_password(password, scheme)}")
    return 0


def _run(path: str, verbosity: int, ready_file: str | None, log_format: str | None = None) -> int:
    from pathlib import Path

    import trio

    from gateway.config import load_config
    from gateway.logs import setup_logging

    config = load_config(path)
    setup_logging(verbosity, log_format or config.gateway.log_format)
    from gateway.app import run_gateway, sole_exception
    from gateway.process import tune_process

    tune_process()

    try:
        trio.run(run_gateway, config, Path(ready_file) if ready_file else None)
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:  # a listener that cannot bind, from inside nurseries
        if isinstance(sole := sole_exception(group), ConfigError):
            raise sole from None
        raise
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tunnelgate`` console script and ``python -m gateway``."""
    args = _parser().parse_args(argv)
    try:
        if args.verb == "keygen":
            return _keygen(args.name)
        if args.verb == "fingerprint":
            from gateway.security.identity import fingerprint_of_file

            print(fingerprint_of_file(args.file))
            return 0
        if args.verb == "check":
            return _check(args.config)
        if args.verb == "passwd":
            return _passwd(args.name, args.scheme)
        if args.verb == "reload":
            from gateway.admin.client import reload

            return reload(args.config)
        if args.verb == "status":
            from gateway.admin.client import print_status

            return print_status(args.config, args.json)
        if args.verb == "bench":
            from pathlib import Path

            from gateway.bench import BenchOptions, run_bench

            return run_bench(BenchOptions(
                Path(args.config), args.via, args.duration, args.end_to_end, args.concurrency,
                args.udp_rate, args.udp_size, Path(args.json) if args.json else None,
                Path(args.plot) if args.plot else None))
        verbosity = 1 if args.verbose else -1 if args.quiet else 0
        return _run(args.config, verbosity, args.ready_file, args.log_format)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except TunnelgateError as exc:  # IdentityError and the rest
        print(f"tunnelgate: {exc}", file=sys.stderr)
        return EXIT_FAILED
