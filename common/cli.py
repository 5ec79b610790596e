"""The ``framecap`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module with a ``main(argv) -> int`` and its own argparse help;
modules are imported only when their command runs, so ``framecap edge`` never imports torch.
A command whose optional dependencies are not installed says which extra to install
(``pip install 'framecap[cloud]'``) instead of a traceback, whether the import fails when the
command starts or later.

Also here, for every command: the checks of a few options that each command would otherwise
word differently (:func:`device_arg`, :func:`check_device`, :func:`check_file`), one line for an
error (:func:`error_line`) and one line for a caption (:func:`format_caption_line`). This module
imports nothing beyond the standard library, so every command may use it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path

# command -> (module, one-line help). "data" takes a second word ("data prepare").
COMMANDS: dict[str, tuple[str, str]] = {
    "edge": ("edge.daemon", "capture, sample, spool and publish frames of one device"),
    "ingest": ("cloud.ingest", "store frames from MQTT in S3 and acknowledge them"),
    "worker": ("cloud.worker", "caption every frame under frames/ in S3"),
    "data": ("cloud.captioning.prepare", "data prepare: word map, encoded captions, feature cache"),
    "train": ("cloud.captioning.train", "train a Show, Attend and Tell model"),
    "evaluate": ("cloud.captioning.evaluate", "caption a Karpathy split and score it (BLEU, METEOR, ROUGE-L, CIDEr)"),
    "caption": ("cloud.captioning.caption", "caption image files"),
    "export": ("cloud.captioning.export", "turn training checkpoints into a small inference model"),
    "stack": ("common.stack", "start, stop or inspect the local mosquitto + SeaweedFS stack"),
    "demo": ("cloud.demo", "run the whole pipeline on a video with the local stack"),
    "web": ("cloud.web.cli", "pages, search, live captions and alerts in a browser"),
}

# command -> the one extra of pyproject.toml it needs (pip install 'framecap[EXTRA]').
EXTRAS: dict[str, str] = {
    "edge": "edge", "ingest": "cloud", "worker": "cloud", "data": "cloud", "train": "cloud",
    "evaluate": "cloud", "caption": "cloud", "export": "cloud", "stack": "stack", "demo": "demo",
    "web": "web",
}

# command -> environment variables set (unless the user set them) before its module is imported.
# The edge never multiplies matrices with numpy, yet numpy's OpenBLAS starts one worker thread
# per core at import, and each spins for a while (40-90 ms of CPU here) before it sleeps: on a
# Jetson that is CPU taken from capture and encoding, at every start, for nothing.
ENVIRONMENT: dict[str, dict[str, str]] = {
    "edge": {"OPENBLAS_NUM_THREADS": "1"},
}

# Our own import packages: a ModuleNotFoundError naming one of these is a bug or a broken
# install, not a missing extra.
OWN_PACKAGES = frozenset({"edge", "cloud", "common"})


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


def missing_extra_message(command: str, err: ImportError) -> str | None:
    """The message for ``err``, a missing optional dependency of ``command``: the module and the
    one extra to install. None when ``err`` is not that (one of our own modules is missing,
    or an import failed for another reason): the caller re-raises it."""
    name = (err.name or "").split(".")[0]
    if not isinstance(err, ModuleNotFoundError) or not name or name in OWN_PACKAGES:
        return None
    extra = EXTRAS.get(command)
    install = f"pip install 'framecap[{extra}]'" if extra else "pip install framecap"
    what = f"the '{extra}' extra" if extra else "a dependency that is not installed"
    return f"framecap {command}: needs {what} (Python module {name!r} is missing): {install}"


def error_line(err: BaseException | str, limit: int = 300) -> str:
    """An error message on one line: its first line, at most ``limit`` characters (a library's
    message can run over many lines)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if first != text:
        first += " ..."
    return first if len(first) <= limit else first[: limit - 4] + " ..."


# -- options that several commands share ----------------------------------------------------
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DEVICE_HELP = ("torch device: auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N "
               "(default: %(default)s)")


def device_arg(value: str) -> str:
    """argparse ``type=`` of ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        argparse.ArgumentTypeError: anything else (argparse exits 2 with the message).
    """
    value = value.strip().lower()
    if not _DEVICE_RE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N")
    return value


def check_device(device: str) -> str | None:
    """Why ``device`` cannot be used here (no CUDA GPU, no GPU N), or None when it can.

    Imports torch (only for ``cuda``); a command calls it after parsing its options and exits
    2 with the message, instead of failing deep in torch.
    """
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return (f"--device {device}: torch sees no CUDA GPU on this machine "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); "
                "use --device cpu, or auto")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    count = torch.cuda.device_count()
    if index >= count:
        return f"--device {device}: this machine has {count} CUDA GPU(s), numbered from 0"
    return None


def check_file(path: str | Path, what: str = "file") -> str | None:
    """Why ``path`` is not a readable ``what`` (missing, a directory, unreadable), or None.

    ``what`` names the expected file in the message, e.g. ``"checkpoint"``."""
    p = Path(path)
    if p.is_dir():
        return f"{p}: is a directory, not a {what}"
    if not p.exists():
        return f"{p}: no such {what}"
    if not p.is_file():
        return f"{p}: not a regular file (a {what} is expected)"
    try:
        with p.open("rb"):
            pass
    except OSError as err:
        return f"{p}: cannot read the {what}: {err.strerror or err}"
    return None


def check_checkpoint(path: str | Path) -> str | None:
    """Why ``path`` is not a model checkpoint, or None when it may be one: :func:`check_file`,
    then the format (``torch.save`` writes a zip archive; anything else, a text file or an
    image say, is not a checkpoint). Whether the archive holds a captioning model is for the
    loader to say."""
    import zipfile

    problem = check_file(path, "checkpoint")
    if problem is None and not zipfile.is_zipfile(path):
        problem = (f"{path}: not a model checkpoint (not the zip archive that torch.save writes; "
                   "checkpoints come from 'framecap train' or 'framecap export')")
    return problem


def format_caption_line(subject: str, caption: str | None, score: float | None = None,
                        error: str | None = None) -> str:
    """The one shape of a caption line, printed by ``framecap caption``, ``framecap demo`` and
    ``framecap edge``: ``SUBJECT<TAB>CAPTION<TAB>SCORE``.

    ``subject`` is what was captioned (an image path, or a frame_id, which starts with the
    capture time in UTC); ``score`` the caption's log-probability (``-`` when unknown). A frame
    without a caption shows ``(no caption: ERROR)`` in its place.
    """
    text = caption if caption else f"(no caption: {error or 'unknown'})"
    shown = "-" if score is None else f"{score:.3f}"
    return f"{subject}\t{text}\t{shown}"


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
    for name, value in ENVIRONMENT.get(command, {}).items():
        os.environ.setdefault(name, value)
    try:
        module = importlib.import_module(COMMANDS[command][0])
        return int(module.main(rest) or 0)
    except ImportError as err:  # at import, or an import inside the command
        message = missing_extra_message(command, err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
