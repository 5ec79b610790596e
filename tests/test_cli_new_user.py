"""The ``framecap`` command as a new user meets it (issue 8 items 13, 15, 16).

Every subcommand's ``--help`` (in a subprocess, plain and under ``python -OO``): exit 0, every
option with help, no development paths, no reST markup. ``--help`` without the optional
dependencies; a missing extra named. Wrong input: one line, no traceback, exit 2 (or 1). One
caption line shape.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import cli
from common.cli import COMMANDS, EXTRAS, format_caption_line
from common.messages import CaptionRecord

ROOT = Path(__file__).resolve().parents[1]

# Every command and sub-command a user can ask --help of.
HELP_COMMANDS: list[list[str]] = [
    [], ["edge"], ["ingest"], ["worker"], ["data"], ["data", "prepare"], ["train"], ["evaluate"],
    ["caption"], ["export"], ["stack"], ["stack", "up"], ["stack", "down"], ["stack", "status"],
    ["stack", "add-device"], ["stack", "env"], ["demo"], ["web"], ["web", "serve"],
    ["web", "reindex"], ["web", "add-user"],
]

# Runs ``framecap ARGV --help`` for each ARGV in one interpreter (one torch import, not twenty)
# and prints {argv: {code, out, err}}; an exception is recorded with its traceback. Modules in
# BLOCKED (argv[2]) are made unimportable first, as if their extra were not installed.
DRIVER = r"""
import contextlib, io, json, sys, traceback
for name in json.loads(sys.argv[2]):
    sys.modules[name] = None
from common.cli import main
results = {}
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            code = -1
            err.write(traceback.format_exc())
    results[" ".join(argv)] = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
print(json.dumps(results))
"""

# What the optional extras bring (cloud, edge, stack, web): blocked, the core install is left.
EXTRA_MODULES = ["torch", "torchvision", "boto3", "botocore", "cv2", "PIL", "prometheus_client",
                 "matplotlib", "tqdm", "h5py", "pycocoevalcap", "fastapi", "uvicorn", "jinja2",
                 "psycopg", "sentence_transformers", "efficientnet_lite_pytorch"]

FORBIDDEN = ["../shared", "/work/", "``", ":class:", ":mod:", ":func:", ":meth:", ":data:",
             "Traceback"]


def run_driver(argvs: list[list[str]], *, optimize: bool, blocked: list[str] | None = None
               ) -> dict[str, dict]:
    cmd = [sys.executable, *(["-OO"] if optimize else []), "-c", DRIVER, json.dumps(argvs),
           json.dumps(blocked or [])]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def options_without_help(text: str) -> list[str]:
    """Option lines of an argparse help text that have no help after them."""
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^  (-{1,2}\S.*?)(?:\s{2,}(\S.*))?$", line)
        if not m:
            continue
        if m.group(2):
            continue  # help on the same line
        after = lines[i + 1] if i + 1 < len(lines) else ""
        if not re.match(r"^\s{6,}\S", after):  # argparse indents the help of a long option
            missing.append(m.group(1).strip())
    return missing


@pytest.fixture(scope="module")
def helps() -> dict[bool, dict[str, dict]]:
    """``--help`` of every command, plain and under ``python -OO``."""
    argvs = [[*argv, "--help"] for argv in HELP_COMMANDS]
    return {optimize: run_driver(argvs, optimize=optimize) for optimize in (False, True)}


def test_the_help_list_covers_every_command() -> None:
    assert {argv[0] for argv in HELP_COMMANDS if argv} == set(COMMANDS)
    assert set(EXTRAS) == set(COMMANDS)
    assert COMMANDS["export"][0] == "cloud.captioning.export"


@pytest.mark.parametrize("optimize", [False, True], ids=["plain", "-OO"])
def test_every_help_exits_0_with_help_for_every_option_and_no_dev_text(
        helps: dict[bool, dict[str, dict]], optimize: bool) -> None:
    bad: list[str] = []
    for argv in HELP_COMMANDS:
        key = " ".join([*argv, "--help"])
        result = helps[optimize][key]
        text = result["out"] + result["err"]
        if result["code"] != 0:
            bad.append(f"{key}: exit {result['code']}: {text[-500:]}")
            continue
        if "usage:" not in text:
            bad.append(f"{key}: no usage line")
        bad += [f"{key}: contains {s!r}" for s in FORBIDDEN if s in text]
        bad += [f"{key}: option {o} has no help" for o in options_without_help(result["out"])]
    assert not bad, "\n".join(bad)


def test_data_help_shows_the_prepare_command(helps: dict[bool, dict[str, dict]]) -> None:
    out = helps[True]["data --help"]["out"]
    assert "prepare" in out and "framecap data" in out
    assert "--karpathy-json" in helps[True]["data prepare --help"]["out"]


def _actions(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _actions(sub, f"{name} {sub_name}")
        else:
            yield name, action


def our_parsers() -> dict[str, argparse.ArgumentParser]:
    from cloud import demo, ingest, worker
    from cloud.captioning import caption, evaluate, export, prepare, train
    from common.stack import cli as stack_cli

    return {"caption": caption.get_args_parser(), "evaluate": evaluate.get_args_parser(),
            "train": train.get_args_parser(), "data": prepare.get_data_parser(),
            "export": export.get_args_parser(), "stack": stack_cli.get_args_parser(),
            "demo": demo.get_args_parser(), "ingest": ingest.get_args_parser(),
            "worker": worker.get_args_parser()}


def test_every_option_says_its_default() -> None:
    """Each option that takes a value says its default (or that it is required); the
    ingest's and worker's say the environment variable behind the config key."""
    flags = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
             argparse._AppendAction)
    bad = []
    for command, parser in our_parsers().items():
        for where, action in _actions(parser, command):
            if not action.option_strings:
                assert action.help, f"{where}: {action.dest} has no help"
                continue
            if isinstance(action, flags) or action.dest in ("validate_config", "verbose"):
                assert action.help, f"{where}: {action.option_strings} has no help"
                continue
            text = action.help or ""
            if not ("required" in text if action.required else "default" in text):
                bad.append(f"{where} {'/'.join(action.option_strings)}: {text!r}")
    assert not bad, "\n".join(bad)
    worker_help = our_parsers()["worker"].format_help()
    for variable in ("$FRAMECAP_MQTT_HOST", "$FRAMECAP_MQTT_PORT", "$FRAMECAP_S3_BUCKET",
                     "$FRAMECAP_S3_ENDPOINT_URL", "$FRAMECAP_MQTT_PASSWORD"):
        assert variable in worker_help


# -- without the extras ---------------------------------------------------------------------
def test_help_works_without_the_extras_and_a_missing_extra_is_named(tmp_path: Path) -> None:
    work = [["caption", "--help"], ["evaluate", "--help"], ["data", "--help"],
            ["data", "prepare", "--help"], ["export", "--help"], ["stack", "--help"],
            ["stack", "up", "--help"], ["demo", "--help"]]
    needs_cloud = [["train", "--help"], ["ingest", "--help"], ["worker", "--help"]]
    state = tmp_path / "stack"
    stack_up = ["stack", "up", "--state-dir", str(state)]
    results = run_driver([*work, *needs_cloud, ["edge", "--help"], stack_up], optimize=True,
                         blocked=EXTRA_MODULES)
    for argv in work:
        result = results[" ".join(argv)]
        assert result["code"] == 0 and "usage:" in result["out"], (argv, result)
    for argv in needs_cloud:
        result = results[" ".join(argv)]
        assert result["code"] == 1, (argv, result)
        assert "needs the 'cloud' extra" in result["err"] and "pip install 'framecap[cloud]'" in result["err"]
        assert "Traceback" not in result["err"] and len(result["err"].strip().splitlines()) == 1
    edge = results["edge --help"]
    assert edge["code"] == 1 and "pip install 'framecap[edge]'" in edge["err"], edge
    # the reported case: framecap[stack] without boto3; nothing is started before it says so
    up = results[" ".join(stack_up)]
    assert up["code"] == 1 and "needs the 'stack' extra" in up["err"] and "boto3" in up["err"], up
    assert "Traceback" not in up["err"] and not (state / "stack.json").exists()


def test_a_missing_module_of_our_own_is_not_blamed_on_an_extra() -> None:
    err = ModuleNotFoundError("No module named 'cloud.nothing'", name="cloud.nothing")
    assert cli.missing_extra_message("worker", err) is None
    err = ModuleNotFoundError("No module named 'boto3'", name="boto3")
    message = cli.missing_extra_message("stack", err)
    assert message is not None and "pip install 'framecap[stack]'" in message


# -- wrong input ----------------------------------------------------------------------------
def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``framecap ARGV`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line(err: str, *needles: str) -> None:
    """The error is one line (argparse's usage lines aside) holding every needle."""
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines()
             if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, err)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cloud.captioning.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "grey.png"
    Image.new("RGB", (48, 40), (120, 120, 120)).save(path)
    return path


@pytest.mark.parametrize("command", ["caption", "evaluate", "train"])
def test_an_unknown_device_is_a_usage_error(command: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    extra = {"caption": ["x.jpg"],
             "evaluate": ["--karpathy-json", "k.json", "--image-dir", str(tmp_path)],
             "train": ["--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run")]}[command]
    code, err = run_cli([command, *extra, "--device", "foo"], capsys)
    assert code == 2
    assert_one_line(err, "--device", "'foo' is not a device")


@pytest.mark.parametrize("command", ["caption", "evaluate", "train", "worker"])
def test_cuda_without_a_gpu_says_so(command: str, tmp_path: Path, image: Path, tiny_model: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    extra = {"caption": [str(image)],
             "evaluate": ["--karpathy-json", "k.json", "--image-dir", str(tmp_path)],
             "train": ["--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run")],
             "worker": ["--model", str(tiny_model)]}[command]
    code, err = run_cli([command, *extra, "--device", "cuda"], capsys)
    assert code == 2
    assert_one_line(err, f"framecap {command}: --device cuda: torch sees no CUDA GPU", "--device cpu")


def test_cuda_n_beyond_the_gpus_is_refused() -> None:
    import torch

    problem = cli.check_device(f"cuda:{torch.cuda.device_count() + 3}")
    assert problem is not None and "--device cuda:" in problem
    assert cli.check_device("cpu") is None and cli.check_device("auto") is None


def test_a_directory_where_a_file_is_expected(tmp_path: Path, image: Path, tiny_model: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    code, err = run_cli(["caption", str(folder), "--model", str(tiny_model)], capsys)
    assert code == 1 and f"{folder}: is a directory" in err and "Traceback" not in err
    for argv in (["caption", str(image), "--model", str(folder)],
                 ["export", str(folder), "--output", str(tmp_path / "out.pt")],
                 ["evaluate", "--karpathy-json", str(folder), "--image-dir", str(tmp_path)],
                 ["data", "prepare", "--karpathy-json", str(folder), "--image-dir", str(tmp_path),
                  "--output-dir", str(tmp_path / "out")],
                 ["train", "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"),
                  "--resume", str(folder)],
                 ["worker", "--model", str(folder)]):
        code, err = run_cli(argv, capsys)
        assert code == 1, (argv, err)
        assert_one_line(err, f"{folder}: is a directory")
    code, err = run_cli(["ingest", "--config", str(folder), "--validate-config"], capsys)
    assert code == 2 and "Is a directory" in err and "Traceback" not in err


def test_a_model_that_is_not_a_checkpoint_says_what_it_is_not(
        tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    for argv in (["caption", str(image), "--model", str(notes)],
                 ["export", str(notes), "--output", str(tmp_path / "out.pt")],
                 ["worker", "--model", str(notes)]):
        code, err = run_cli(argv, capsys)
        assert code == 1, (argv, err)
        assert_one_line(err, f"{notes}: not a model checkpoint", "torch.save")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_busy_metrics_port(busy_port: int, tiny_model: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["ingest", "--metrics-port", str(busy_port)],
                 ["worker", "--metrics-port", str(busy_port), "--model", str(tiny_model),
                  "--device", "cpu"]):
        code, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)
        assert_one_line(err, f"--metrics-port {busy_port}: cannot listen on it")


def test_a_bad_environment_value_names_its_variable(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FRAMECAP_MQTT_PORT", "eighteen")
    code, err = run_cli(["ingest", "--validate-config"], capsys)
    assert code == 2 and "mqtt.port = 'eighteen' from $FRAMECAP_MQTT_PORT" in err
    assert "Traceback" not in err
    # the same value given on the command line is not blamed on the environment
    monkeypatch.setenv("FRAMECAP_S3_BUCKET", "b")
    code, err = run_cli(["worker", "--validate-config", "--mqtt-port", "1884"], capsys)
    assert code == 2 and "s3.bucket = 'b' from $FRAMECAP_S3_BUCKET" in err
    assert "FRAMECAP_MQTT_PORT" not in err


def test_validate_config_checks_the_files_it_names(tmp_path: Path, tiny_model: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ingest.yaml"
    config.write_text(f"mqtt:\n  tls:\n    ca_certs: {tmp_path / 'no-ca.pem'}\n")
    code, err = run_cli(["ingest", "--config", str(config), "--validate-config"], capsys)
    assert code == 2 and "mqtt.tls.ca_certs" in err and "no such file (CA bundle)" in err
    code, err = run_cli(["worker", "--validate-config", "--model", str(tmp_path / "none.pt")], capsys)
    assert code == 2 and "model" in err and "no such file (model checkpoint)" in err
    code, err = run_cli(["worker", "--validate-config", "--model", str(tiny_model)], capsys)
    assert code == 0, err


def test_demo_without_a_video_or_with_a_bad_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from cloud import demo

    monkeypatch.delenv(demo.SOURCE_ENV, raising=False)
    monkeypatch.setattr(demo, "_CHECKOUT_VIDEO", tmp_path / "no-video.avi")
    code, err = run_cli(["demo"], capsys)
    assert code == 2
    assert_one_line(err, "no video to caption", "--source", "$FRAMECAP_DEMO_SOURCE")
    code, err = run_cli(["demo", "--source", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line(err, "is a directory")
    code, err = run_cli(["demo", "--source", str(tmp_path / "missing.mp4")], capsys)
    assert code == 2
    assert_one_line(err, "no such video file")


def test_demo_failures_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever goes wrong inside the demo: one line, no traceback (-v logs it)."""
    from cloud import demo

    def broken(args: argparse.Namespace) -> dict[str, object]:
        raise KeyError("mosquitto went away\nsecond line")

    monkeypatch.setattr(demo, "run_demo", broken)
    code, err = run_cli(["demo", "--source", "0"], capsys)
    assert code == 1
    assert_one_line(err, "framecap demo: KeyError", "mosquitto went away")


# -- one caption line ------------------------------------------------------------------------
def test_caption_prints_the_one_caption_line_shape(image: Path, tiny_model: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert cli.main(["caption", str(image), "--model", str(tiny_model), "--device", "cpu",
                     "--max-caption-length", "5"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    subject, caption, score = line.split("\t")
    assert subject == str(image) and caption and float(score) <= 0
    assert line == format_caption_line(str(image), caption, float(score))


def _record(caption: str = "a man walks", error: str | None = None) -> CaptionRecord:
    from datetime import datetime, timezone

    return CaptionRecord(
        frame_id="20261122T064012345Z-000000", device_id="cam1",
        captured_at=datetime(2026, 11, 22, 6, 40, 12, 345000, tzinfo=timezone.utc),
        caption=caption, score=-4.25 if caption else None, model="sat-test", error=error,
        frame_key="frames/cam1/2026/11/22/20261122T064012345Z-000000.jpg",
        caption_key="captions/cam1/2026/11/22/20261122T064012345Z-000000.json")


def test_the_demo_prints_the_same_shape(capsys: pytest.CaptureFixture[str]) -> None:
    from cloud import demo

    capsys.readouterr()
    demo._print_caption(_record())
    demo._print_caption(_record("", error="corrupt image"))
    assert capsys.readouterr().out.splitlines() == [
        "20261122T064012345Z-000000\ta man walks\t-4.250",
        "20261122T064012345Z-000000\t(no caption: corrupt image)\t-",
    ]


def test_the_edge_prints_the_same_shape() -> None:
    from edge.publisher import format_caption

    for record in (_record(), _record("", error="corrupt image")):
        assert format_caption(record) == format_caption_line(
            record.frame_id, record.caption, record.score, record.error)
