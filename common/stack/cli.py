"""``framecap stack up|down|status|add-device|env``: the local stack from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from common.stack.local import LocalStack, StackAlreadyRunning
from common.stack.process import StackError
from common.stack.state import DEFAULT_BUCKET, DEFAULT_STATE_DIR

DESCRIPTION = ("The local stack: mosquitto (MQTT) and SeaweedFS (S3) on 127.0.0.1, "
               "under one state directory.")


def _print_endpoints(stack: LocalStack) -> None:
    st = stack.status()
    mq, sw = st["mosquitto"], st["seaweedfs"]
    print(f"mosquitto  {mq['state']:8} pid {mq['pid']}  {mq['url']}"
          + (f"  {mq['tls_url']} (CA {mq['ca_certs']})" if "tls_url" in mq else ""))
    print(f"seaweedfs  {sw['state']:8} pid {sw['pid']}  {sw['endpoint_url']}  bucket {st['bucket']}")
    print(f"accounts   {', '.join(st['accounts'])}")
    print(f"secrets    {st['secrets']['mqtt_accounts']}, {st['secrets']['s3_credentials']}")
    print(f"state      {st['state_dir']}/stack.json")
    dead = [name for name in ("mosquitto", "seaweedfs") if st[name]["state"] == "dead"]
    if dead:
        print(f"dead       {' and '.join(dead)} (killed or crashed; its log: "
              f"{', '.join(st[name]['log'] for name in dead)}): 'framecap stack up' restarts "
              "what died and keeps what runs")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framecap stack", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="state directory (default: %(default)s)")
    up = sub.add_parser("up", parents=[common],
                        help="start mosquitto and SeaweedFS; on a partly dead stack, restart what died")
    up.add_argument("--mqtt-port", type=int, help="MQTT port (default: a free one)")
    up.add_argument("--s3-port", type=int, help="S3 port (default: a free one; port+10000 is used too)")
    up.add_argument("--bucket", default=DEFAULT_BUCKET, help="bucket to create (default: %(default)s)")
    up.add_argument("--device", action="append", default=[],
                    help="device account to create (repeatable; default: none)")
    up.add_argument("--tls", action="store_true", help="also open a TLS listener, CA generated (default: off)")
    up.add_argument("--timeout", type=float, default=90.0,
                    help="seconds to wait for the servers (default: %(default)s)")
    down = sub.add_parser("down", parents=[common], help="stop what 'up' started")
    down.add_argument("--timeout", type=float, default=30.0,
                      help="seconds before SIGKILL; SeaweedFS takes ~17 s to stop gracefully "
                           "(default: %(default)s)")
    status = sub.add_parser("status", parents=[common],
                            help="show what runs, what was stopped and what died (exit 3 unless both run)")
    status.add_argument("--json", action="store_true", help="print status as JSON (default: text)")
    add = sub.add_parser("add-device", parents=[common], help="create a device account and its ACL")
    add.add_argument("name", help="device_id (letters, digits, '.', '_', '-')")
    env = sub.add_parser("env", parents=[common],
                         help="print FRAMECAP_* exports (secrets!) for a user: its MQTT account and "
                              "its role's S3 identity (a device gets no S3 keys)")
    env.add_argument("--user", default="admin", help="MQTT account (default: %(default)s)")
    return parser


def _up(args: argparse.Namespace) -> int:
    # up creates the bucket through S3: without boto3 (the 'stack' extra) say so now, before
    # starting any server (framecap's entry point names the extra)
    import boto3  # noqa: F401

    stack = LocalStack(args.state_dir, mqtt_port=args.mqtt_port, s3_port=args.s3_port,
                       bucket=args.bucket, devices=args.device, tls=args.tls)
    try:
        stack.up(timeout_s=args.timeout)
    except StackAlreadyRunning:
        loaded = LocalStack.load(args.state_dir)
        for device in args.device:
            loaded.add_device(device)
        print(f"already running in {loaded.state_dir}")
        _print_endpoints(loaded)
        return 0
    if stack.healed:
        print(f"healed: restarted {' and '.join(stack.healed)} (it had died); "
              "kept what was running")
    print(f"stack up in {stack.timings['up_s']:.1f} s")
    _print_endpoints(stack)
    return 0


def _on_loaded(stack: LocalStack, args: argparse.Namespace) -> int:
    """``down``, ``status``, ``add-device`` and ``env`` on a stack from its stack.json."""
    if args.action == "down":
        took = stack.down(timeout_s=args.timeout)
        print(f"stack down in {took:.1f} s ({stack.state_dir})")
        return 0
    if args.action == "status":
        if args.json:
            print(json.dumps(stack.status(), indent=2))
        else:
            _print_endpoints(stack)
        return 0 if stack.running() else 3
    if args.action == "add-device":
        stack.add_device(args.name)
        print(f"device {args.name}: password stored in {stack.accounts_file} (key {args.name!r})")
        if not stack.mosquitto.running():
            print("mosquitto is not running: the account takes effect at the next 'stack up'")
        return 0
    if args.action == "env":
        for name, value in stack.env(args.user).items():
            print(f"export {name}={value}")
        return 0
    return 2


def main(argv: list[str] | None = None) -> int:
    """``framecap stack ...``: 0 on success, 1 on a stack error, 3 from status if not running."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.action == "up":
            return _up(args)
        return _on_loaded(LocalStack.load(args.state_dir), args)
    except (StackError, ValueError, OSError) as err:  # ValueError: a bad device name
        print(f"framecap stack {args.action}: {err}", file=sys.stderr)
        return 1
