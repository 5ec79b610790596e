"""``framecap web``: pages, search, live captions and alerts in a browser.

Commands (``serve`` when none is given)::

    framecap web [serve] [--config FILE] [--host H] [--port P] ...   run the web server
    framecap web reindex [--config FILE] ...                        rebuild the index from S3
    framecap web add-user NAME --role admin|viewer [--device D ...] [--password-stdin]
    framecap web --config FILE --validate-config                    check the config and exit

Exit status: 0 done (``serve``: after SIGINT/SIGTERM), 1 a runtime failure (index, S3, port),
2 a bad config, rules file or argument.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.config import ConfigError, WebConfig, load_config

logger = logging.getLogger(__name__)

PROG = "framecap web"
COMMANDS = {
    "serve": "run the web server (the default): feed, alerts, pages and API",
    "reindex": "rebuild the caption index from S3 captions/ and exit with the counts",
    "add-user": "create or replace an account in the accounts file",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except None (those options say where their default comes from)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


# -- parsers ----------------------------------------------------------------------------------


def _config_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The config file and the overrides of its keys that ``command`` uses."""
    g = parser.add_argument_group("config (a value given here wins over the file and the environment)")
    g.add_argument("--config", type=Path, help="YAML config file (WebConfig); without it, defaults and $FRAMECAP_* variables")
    g.add_argument("--validate-config", action="store_true", help="check the config (and the rules file it names) and exit")
    g.add_argument("--state-dir", help="override state_dir: index, accounts and session secret live here (default .state/web)")
    if command in ("serve", "add-user"):
        g.add_argument("--accounts-file", help="override accounts_file (default STATE/accounts.yaml)")
    if command in ("serve", "reindex"):
        g.add_argument("--index", help="override index: a SQLite file or a postgresql://user@host/db URL "
                                       "(password from $FRAMECAP_WEB_INDEX_PASSWORD); default STATE/index.sqlite3")
        g.add_argument("--s3-endpoint", help="override s3.endpoint_url (default $FRAMECAP_S3_ENDPOINT_URL; AWS when empty)")
        g.add_argument("--bucket", help="override s3.bucket (default $FRAMECAP_S3_BUCKET, else framecap)")
    if command == "serve":
        g.add_argument("--mqtt-host", help="override mqtt.host (default $FRAMECAP_MQTT_HOST, else 127.0.0.1)")
        g.add_argument("--mqtt-port", type=int, help="override mqtt.port (default $FRAMECAP_MQTT_PORT, else 1883)")
        g.add_argument("--mqtt-username", help="override mqtt.username (default $FRAMECAP_MQTT_USERNAME; the 'web' account)")
        g.add_argument("--client-id", help="override mqtt.client_id (default framecap-web-HOST-RANDOM, a clean session)")
        g.add_argument("--topic-prefix", help="override mqtt.topic_prefix (default framecap)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("serve")
    g.add_argument("--host", help="override host, the address to bind (default $FRAMECAP_WEB_HOST, else 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, help="override port (default $FRAMECAP_WEB_PORT, else 8080; 0 picks a free port)")
    g.add_argument("--public-url", help="override public_url, the address in alert links (default http://HOST:PORT)")
    g.add_argument("--rules-file", help="override rules_file: YAML alert rules loaded at start")
    g.add_argument("--model", help="override model: checkpoint for attention maps and widening (default: the packaged model)")
    g.add_argument("--no-reindex", action="store_true", help="do not rebuild the index from S3 at start (reindex_at_start: false)")
    g.add_argument("--no-widening", action="store_true", help="do not widen query words outside the word map (widening: false)")


def _reindex_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("reindex")
    g.add_argument("--workers", type=int, default=4, help="threads reading caption objects from S3")
    g.add_argument("--batch-size", type=int, default=500, help="captions per index transaction")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal anyway)")


def _add_user_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="user name (letters, digits, '.', '_', '-')")
    g = parser.add_argument_group("add-user")
    g.add_argument("--role", choices=("admin", "viewer"), default="viewer",
                   help="admin: every device, rules of anyone; viewer: only the devices given with --device")
    g.add_argument("--device", action="append", default=[], metavar="DEVICE_ID",
                   help="a device the viewer may see; repeat for several")
    g.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin (else it is asked twice on the terminal)")


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one command (``serve``, ``reindex``, ``add-user``)."""
    parser = argparse.ArgumentParser(prog=f"{PROG} {command}", description=COMMANDS[command],
                                     formatter_class=HelpFormatter)
    if command == "add-user":
        _add_user_arguments(parser)
    _config_arguments(parser, command)
    if command == "serve":
        _serve_arguments(parser)
    elif command == "reindex":
        _reindex_arguments(parser)
    return parser


class _FullHelp(argparse.Action):
    """``framecap web --help``: the commands, then every command's options."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parts = [parser.format_help()]
        for command in COMMANDS:
            parts.append(f"\n=== {PROG} {command} ===\n" + command_parser(command).format_help())
        print("".join(parts))
        parser.exit()


def get_args_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``COMMAND`` (serve, reindex, add-user); ``--help`` shows every
    command's options."""
    width = max(len(c) for c in COMMANDS)
    epilog = "commands (serve when none is given):\n" + "\n".join(
        f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog=PROG, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pages, search, live captions and alerts of every device in a browser.", epilog=epilog,
        usage=f"{PROG} [COMMAND] [options]",
    )
    parser.add_argument("-h", "--help", action=_FullHelp, help="show this help, with every command's options, and exit")
    parser.add_argument("command", nargs="?", default="serve", choices=list(COMMANDS), help="what to do")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``framecap web`` arguments: a command word (default serve), then its options."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        get_args_parser().parse_args(args)  # prints and exits
    command = "serve"
    if args and not args[0].startswith("-"):
        command = get_args_parser().parse_args(args[:1]).command
        args = args[1:]
    namespace = command_parser(command).parse_args(args)
    namespace.command = command
    return namespace


_OVERRIDES = {
    "state_dir": "state_dir", "index": "index", "accounts_file": "accounts_file",
    "mqtt_host": "mqtt.host", "mqtt_port": "mqtt.port", "mqtt_username": "mqtt.username",
    "client_id": "mqtt.client_id", "topic_prefix": "mqtt.topic_prefix",
    "s3_endpoint": "s3.endpoint_url", "bucket": "s3.bucket", "host": "host", "port": "port",
    "public_url": "public_url", "rules_file": "rules_file", "model": "model",
}
"""Option dest -> the config key it overrides."""


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {key: getattr(args, dest, None) for dest, key in _OVERRIDES.items()}
    if getattr(args, "no_reindex", False):
        overrides["reindex_at_start"] = False
    if getattr(args, "no_widening", False):
        overrides["widening"] = False
    return overrides


def setup_logging(verbose: bool) -> None:
    """Log to stderr with timestamps; DEBUG when ``verbose``, else INFO with the chatty
    libraries quiet."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "uvicorn.access", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return status


# -- commands ---------------------------------------------------------------------------------


def validate(config: WebConfig) -> str | None:
    """What is wrong beyond the config's own fields (files it names that cannot be read: the
    model, the MQTT TLS files; the rules file), or None."""
    from common.config import missing_files

    problems = missing_files(config)
    if problems:
        return "invalid config:\n" + "\n".join(problems)
    if config.rules_file is not None:
        from cloud.web.alerts import RulesFileError, load_rules_file

        try:
            load_rules_file(config.rules_file)
        except RulesFileError as err:
            return f"invalid rules file:\n{err}"
    return None


def run_reindex(config: WebConfig, args: argparse.Namespace) -> int:
    """``framecap web reindex``: rebuild the index from S3, print the counts as JSON."""
    import json

    from cloud.web.feed import reindex
    from cloud.web.index import CaptionIndexError, open_index
    from common.storage import ObjectStore, StorageError

    try:
        index = open_index(config.index_location())
    except CaptionIndexError as err:
        return _fail(f"cannot open the index {config.index_display()}: {err}", 1)
    try:
        store = ObjectStore(config.s3, connect_timeout_s=3.0, read_timeout_s=15.0, max_attempts=3)
        result = reindex(store, index, not args.no_progress, batch_size=max(1, args.batch_size),
                         workers=max(1, args.workers))
    except (StorageError, CaptionIndexError) as err:
        return _fail(f"reindex failed: {err}", 1)
    finally:
        index.close()
    print(json.dumps({"index": config.index_display(), **result.as_dict()}))
    return 0


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n") or None
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass(f"password for {args.name}: ")
    if first != getpass.getpass("again: "):
        raise ValueError("the two passwords differ")
    return first or None


def run_add_user(config: WebConfig, args: argparse.Namespace) -> int:
    """``framecap web add-user``: hash the password into the accounts file (0600)."""
    from cloud.web.auth import AccountsError, add_user

    try:
        password = _read_password(args)
    except ValueError as err:
        return _fail(str(err), 2)
    if password is None:
        return _fail("no password: give it on stdin with --password-stdin, or run on a terminal", 2)
    if args.role == "viewer" and not args.device:
        print(f"{PROG}: note: viewer {args.name} sees no device until added with --device", file=sys.stderr)
    try:
        account = add_user(config.accounts_path, args.name, password, args.role, list(args.device))
    except AccountsError as err:
        return _fail(f"add-user: {err}", 2)
    devices = ", ".join(account.devices) if account.devices else ("every device" if args.role == "admin" else "none")
    print(f"{PROG}: user {account.name} ({account.role}; devices: {devices}) saved in {config.accounts_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``framecap web``; see the module docstring for the exit status."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        config = load_config(WebConfig, args.config, _overrides(args))
    except ConfigError as err:
        return _fail(f"invalid config:\n{err}", 2)
    problem = validate(config)
    if problem is not None:
        return _fail(problem, 2)
    if args.validate_config:
        print(f"{PROG}: config OK (index {config.index_display()}, accounts {config.accounts_path})")
        return 0
    if args.command == "reindex":
        return run_reindex(config, args)
    if args.command == "add-user":
        return run_add_user(config, args)
    return serve(config)


# -- serve ------------------------------------------------------------------------------------


def serve(config: WebConfig) -> int:
    """Run the web process until SIGINT or SIGTERM (:class:`cloud.web.server.WebServer`).
    Returns the exit status (0 after a signal, 1 if it cannot start)."""
    from cloud.web.server import WebServer, WebStartError

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    server = WebServer(config)
    try:
        server.start()
    except WebStartError as err:
        return _fail(str(err), 1)
    print(f"{PROG}: serving on {server.url}" + (f" (public URL {config.public_url})" if config.public_url else ""),
          flush=True)
    try:
        while not done.wait(0.5):
            if not server.running:
                logger.error("framecap web: the HTTP server stopped on its own")
                return 1
    finally:
        server.stop()
    return 0
