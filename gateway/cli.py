"""Command line: ``gateway run | check | explain | reload | version``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from gateway import __version__
from gateway.config import ConfigInvalid, config_warnings, format_errors, load_config
from gateway.config.model import GatewayConfig
from gateway.config.secrets import SCRUBBER, install_log_redaction

log = logging.getLogger("gateway")

DEFAULT_CONFIG = "config/gateway.yaml"
DEFAULT_ADMIN = "127.0.0.1:9901"


def _load_or_report(path: str) -> GatewayConfig | None:
    from gateway.tls.certs import load_with_tls

    try:
        config = load_config(path)
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        # Certificates, keys and CAs: missing, unreadable or mismatched ones are errors.
        return load_with_tls(config, text)[0]
    except ConfigInvalid as invalid:
        print(format_errors(invalid.errors), file=sys.stderr)
        return None
    except OSError as error:
        print(f"{path}: cannot read config: {error.strerror or error}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        print(f"{args.config}: configuration is invalid", file=sys.stderr)
        return 1
    for warning in config_warnings(config):
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    print(
        f"{args.config}: configuration is valid "
        f"({len(config.routes)} routes, {len(config.upstreams)} upstreams, "
        f"sha256 {config.sha256[:12]})"
    )
    return _report_warnings(args, config)


def cmd_version(_args: argparse.Namespace) -> int:
    """The version, then the interpreter and which hot-path modules run compiled."""
    from gateway import compiled

    print(__version__)
    print(compiled.report())
    return 0


def _report_warnings(args: argparse.Namespace, config: GatewayConfig) -> int:
    """Valid but suspicious settings (gateway/config/lint.py); --strict makes them fatal."""
    from gateway.config.lint import lint_text

    with open(args.config, encoding="utf-8-sig") as f:
        warnings: list[object] = [*lint_text(f.read(), config), *config.tls_warnings]
    for warning in warnings:
        print(warning, file=sys.stderr)
    if warnings and args.strict:
        print(f"{args.config}: {len(warnings)} warning(s), failing (--strict)", file=sys.stderr)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        print(f"{args.config}: refusing to start on an invalid configuration", file=sys.stderr)
        return 1
    SCRUBBER.set_secrets(config.secrets)
    import uvloop

    from gateway.app import serve

    return uvloop.run(serve(config, args.config, with_demo=args.with_demo))


def cmd_reload(args: argparse.Namespace) -> int:
    """POST /admin/reload on a running gateway's admin port; print the outcome."""
    import orjson

    admin = args.admin if "://" in args.admin else f"http://{args.admin}"
    url = admin.rstrip("/") + "/admin/reload" + ("?force=1" if args.force else "")
    request = urllib.request.Request(url, method="POST", data=b"")
    if args.token:
        request.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            body = orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            body = orjson.loads(error.read())
        except orjson.JSONDecodeError:
            print(f"{admin}: reload failed: HTTP {error.code}", file=sys.stderr)
            return 1
    except OSError as error:
        print(f"{admin}: cannot reach the admin server: {error}", file=sys.stderr)
        return 1
    if body.get("result") != "success":
        errors = body.get("errors") or [body.get("message") or body.get("error") or str(body)]
        print("\n".join(str(e) for e in errors), file=sys.stderr)
        if body.get("result") == "refused":
            print(
                "reload refused: the running config is unchanged (--force applies it)",
                file=sys.stderr,
            )
        else:
            print("reload rejected: the running config is unchanged", file=sys.stderr)
        return 1
    print(f"config reloaded: {body.get('routes')} routes, sha256 {str(body.get('sha256'))[:12]}")
    for key in body.get("restart_required") or ():
        print(f"note: {key} changed and takes effect after a restart")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gateway", description="asyncio reverse proxy and API gateway"
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the gateway")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="route YAML file")
    run.add_argument(
        "--with-demo",
        action="store_true",
        help="also start the bundled demo service on the instances of the 'demo' upstream",
    )
    run.set_defaults(handler=cmd_run)
    check = commands.add_parser("check", help="validate a config file and exit (like nginx -t)")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="route YAML file")
    check.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    check.set_defaults(handler=cmd_check)
    from gateway.explain import add_parser as add_explain

    add_explain(commands, DEFAULT_CONFIG)
    reload = commands.add_parser(
        "reload", help="make a running gateway re-read its config file (via the admin port)"
    )
    reload.add_argument(
        "-a", "--admin", default=DEFAULT_ADMIN, help=f"admin address (default {DEFAULT_ADMIN})"
    )
    reload.add_argument(
        "--token",
        default=os.environ.get("GATEWAY_ADMIN_TOKEN"),
        help="admin.token, if configured (default: $GATEWAY_ADMIN_TOKEN)",
    )
    reload.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (60)")
    reload.add_argument(
        "--force",
        action="store_true",
        help="apply the file even if it removes reload.refuse_drop_ratio of the routes or"
        " upstreams, or more",
    )
    reload.set_defaults(handler=cmd_reload)
    version = commands.add_parser(
        "version", help="print the version, the Python build and which modules are compiled"
    )
    version.set_defaults(handler=cmd_version)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_log_redaction()
    with contextlib.suppress(KeyboardInterrupt):
        return int(args.handler(args))
    return 130
