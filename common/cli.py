"""The ``framecap`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module with a ``main(argv) -> int`` and its own argparse help;
modules are imported only when their command runs, so ``framecap edge`` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). "data" takes a second word ("data prepare").
COMMANDS: dict[str, tuple[str, str]] = {
    "edge": ("edge.daemon", "capture, sample, spool and publish frames of one device"),
    "ingest": ("cloud.ingest", "store frames from MQTT in S3 and acknowledge them"),
    "worker": ("cloud.worker", "caption every frame under frames/ in S3"),
    "data": ("cloud.captioning.prepare", "data prepare: word map, encoded captions, feature cache"),
    "train": ("cloud.captioning.train", "train a Show, Attend and Tell model"),
    "evaluate": ("cloud.captioning.evaluate", "caption a Karpathy split and score it (BLEU, METEOR, ROUGE-L, CIDEr)"),
    "caption": ("cloud.captioning.caption", "caption image files"),
    "stack": ("common.stack", "start, stop or inspect the local mosquitto + SeaweedFS stack"),
    "demo": ("cloud.demo", "run the whole pipeline on a video with the local stack"),
    "web": ("cloud.web.cli", "pages, search, live captions and alerts in a browser"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: framecap COMMAND [options]",
        "",
        "Caption live video: edge capture -> MQTT -> S3 -> Show, Attend and Tell -> captions.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'framecap COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] == "--version":
        from importlib.metadata import version

        print(f"framecap {version('framecap')}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"framecap: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        print(
            f"framecap {command}: cannot import {module_name} ({err}); "
            "is the right extra installed (pip install 'framecap[edge]', 'framecap[cloud]' or 'framecap[web]')?",
            file=sys.stderr,
        )
        return 2
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
