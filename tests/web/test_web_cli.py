"""``framecap web``: help on every option, ``--validate-config``, ``add-user``, ``reindex``, and
``serve`` as a real process on the local stack (reindex at start, a live caption, SIGTERM)."""

from __future__ import annotations

import base64
import io
import json
import os
import select
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud.web.auth import Accounts
from cloud.web.cli import COMMANDS, command_parser, main
from common.cli import COMMANDS as FRAMECAP_COMMANDS
from common.config import MqttConfig
from common.messages import CaptionRecord
from common.topics import caption_key, frame_key

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 2, 3, 22, 15, 0, tzinfo=timezone.utc)
WEB_ENV = ("FRAMECAP_WEB_HOST", "FRAMECAP_WEB_PORT", "FRAMECAP_WEB_STATE_DIR", "FRAMECAP_WEB_INDEX",
           "FRAMECAP_WEB_INDEX_PASSWORD", "FRAMECAP_WEB_ACCOUNTS_FILE", "FRAMECAP_WEB_SESSION_SECRET",
           "FRAMECAP_WEBHOOK_SECRET", "FRAMECAP_WEB_PUBLIC_URL", "FRAMECAP_MQTT_PASSWORD")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in WEB_ENV:
        monkeypatch.delenv(name, raising=False)


def record(device_id: str, frame_id: str, caption: str, at: datetime = T0) -> CaptionRecord:
    return CaptionRecord(frame_id=frame_id, device_id=device_id, captured_at=at, caption=caption, score=-3.0,
                         model="sat-test", frame_key=frame_key(device_id, frame_id, at),
                         caption_key=caption_key(device_id, frame_id, at))


# -- help and config -------------------------------------------------------------------------


def test_framecap_lists_the_web_command() -> None:
    assert FRAMECAP_COMMANDS["web"] == ("cloud.web.cli", "pages, search, live captions and alerts in a browser")


def test_help_lists_every_option_of_every_command_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"framecap web {command}" in out
        for action in command_parser(command)._actions:
            assert action.help, f"{command}: {action.option_strings or action.dest} has no help"
            for option in action.option_strings:
                assert option in out, f"{command} {option} missing from framecap web --help"
    for shown in ("(default: 4)", "(default: viewer)", "(default: 500)", "(default: False)"):
        assert shown in out, shown
    assert "../shared" not in out


def test_each_command_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in COMMANDS:
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert f"usage: framecap web {command}" in capsys.readouterr().out


def test_validate_config_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("- {id: trucks, query: truck OR lorry, cooldown_s: 600}\n")
    config = tmp_path / "web.yaml"
    config.write_text(f"port: 9000\nstate_dir: {tmp_path / 'state'}\nrules_file: {rules}\n"
                      "index: postgresql://framecap:pg-secret@db.example/framecap\n")
    assert main(["--config", str(config), "--validate-config"]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "pg-secret" not in out and "postgresql://framecap:***@db.example" in out
    assert not (tmp_path / "state").exists()  # validating creates nothing


@pytest.mark.parametrize(("text", "expected"), [
    ("prot: 8080\n", "prot = 8080: unknown key"),
    ("port: eighty\n", "port = 'eighty'"),
    ("mqtt:\n  hots: x\n", "mqtt.hots = 'x': unknown key"),
    ("index: 'postgresql://u:hunter2@/nodb'\n", "index = 'postgresql://u:***@/nodb'"),
    ("webhook_secret: [hunter2]\n", "webhook_secret = '***'"),
])
def test_validate_config_on_a_bad_file_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str,
) -> None:
    config = tmp_path / "web.yaml"
    config.write_text(text)
    assert main(["--config", str(config), "--validate-config"]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(config) in err and "hunter2" not in err


def test_a_bad_rules_file_or_override_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("- {id: trucks, query: truck, cooldwn_s: 5}\n")
    assert main(["--rules-file", str(rules), "--validate-config"]) == 2
    assert "rule 1 ('trucks'): cooldwn_s: unknown key" in capsys.readouterr().err
    assert main(["serve", "--port", "70000", "--validate-config"]) == 2
    assert "port = 70000" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


# -- add-user --------------------------------------------------------------------------------


def test_add_user_writes_an_account_that_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret pass\n"))
    state = tmp_path / "state"
    assert main(["add-user", "vic", "--role", "viewer", "--device", "cam1", "--device", "cam2",
                 "--password-stdin", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    path = state / "accounts.yaml"
    assert str(path) in out and "s3cret" not in out and "s3cret" not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    accounts = Accounts.load(path)
    vic = accounts.verify("vic", "s3cret pass")
    assert vic is not None and vic.role == "viewer" and vic.devices == ("cam1", "cam2")
    assert accounts.verify("vic", "s3cret pas") is None and accounts.verify("vic", "s3cret pass\n") is None
    monkeypatch.setattr(sys, "stdin", io.StringIO("admin-pw\n"))
    assert main(["add-user", "root", "--role", "admin", "--password-stdin", "--state-dir", str(state)]) == 0
    accounts = Accounts.load(path)
    root = accounts.verify("root", "admin-pw")
    assert root is not None and root.is_admin and accounts.verify("vic", "s3cret pass") is not None


@pytest.mark.parametrize(("argv", "stdin", "expected"), [
    (["add-user", "../evil", "--password-stdin"], "pw\n", "user name"),
    (["add-user", "vic", "--device", "cam/1", "--password-stdin"], "pw\n", "device_id"),
    (["add-user", "vic", "--password-stdin"], "\n", "no password"),
])
def test_add_user_refuses_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str], argv: list[str], stdin: str,
                                    expected: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main([*argv, "--state-dir", str(tmp_path)]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "accounts.yaml").exists()


# -- against the local stack -----------------------------------------------------------------


def test_reindex_command_rebuilds_from_s3_and_prints_counts(
    stack_ns: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    store = stack_ns.storage()
    for i in range(3):
        r = record("cam1", f"f{i}", "a dog on a beach", T0 + timedelta(minutes=i))
        store.put(r.caption_key, r.to_json())
    store.put(caption_key("cam1", "bad", T0), b"{")
    for name, value in stack_ns.stack.env("web", bucket=stack_ns.bucket).items():
        monkeypatch.setenv(name, value)
    index = tmp_path / "idx.sqlite3"
    assert main(["reindex", "--bucket", stack_ns.bucket, "--index", str(index), "--no-progress"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["listed"], counts["indexed"], counts["skipped"], counts["failed"]) == (4, 3, 1, 0)
    assert counts["index"] == str(index) and index.exists()


def mqtt_client(config: MqttConfig) -> mqtt.Client:
    """A connected paho MQTT v5 client of one account."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    assert config.password is not None
    client.username_pw_set(config.username, config.password.get_secret_value())
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(config.host, config.port)
    client.loop_start()
    assert connected.wait(5), "no CONNACK"
    return client


def _get(url: str, user: str, password: str) -> tuple[int, Any]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, None


def test_serve_runs_the_feed_and_api_and_stops_cleanly_on_sigterm(
    stack_ns: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wait_until: Callable[..., bool],
) -> None:
    cam = stack_ns.device("cam")
    store = stack_ns.storage()
    old = record(cam, "old", "a dog on a beach")
    store.put(old.caption_key, old.to_json())  # indexed by the reindex at start
    state = tmp_path / "state"
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw-for-tests\n"))
    assert main(["add-user", "boss", "--role", "admin", "--password-stdin", "--state-dir", str(state)]) == 0
    env = {**os.environ, **stack_ns.stack.env("web", bucket=stack_ns.bucket), "FRAMECAP_WEB_SESSION_SECRET": "x" * 40}
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "web", "--port", "0", "--state-dir", str(state),
         "--topic-prefix", stack_ns.prefix, "--bucket", stack_ns.bucket, "--no-widening"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "framecap web printed no URL within 60 s"
        line = proc.stdout.readline()
        assert line.startswith("framecap web: serving on http://127.0.0.1:"), line
        url = line.split("serving on ")[1].split()[0]
        assert _get(f"{url}/api/v1/search?q=dog", "boss", "wrong")[0] == 401

        def hits(q: str) -> list[dict[str, Any]]:
            status, body = _get(f"{url}/api/v1/search?q={q}", "boss", "pw-for-tests")
            return list(body["results"]) if status == 200 else []

        assert wait_until(lambda: [h["frame_id"] for h in hits("dog")] == ["old"], 30)
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as answer:
            assert answer.status == 200
        worker = mqtt_client(stack_ns.mqtt_config("worker"))
        try:  # until the feed is subscribed, a caption may pass unheard: resend (idempotent)
            live = record(cam, f"live-{uuid.uuid4().hex[:6]}", "a red truck on a road")
            topic = stack_ns.topics.captions(cam)

            def sent_and_found() -> bool:
                worker.publish(topic, live.to_json(), qos=1).wait_for_publish(5)
                return bool(hits("truck"))

            assert wait_until(sent_and_found, 30, 0.5)
        finally:
            worker.disconnect()
            worker.loop_stop()
        assert [h["frame_id"] for h in hits("truck")] == [live.frame_id]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
    assert rc == 0, err[-3000:]
    assert "framecap web: stopped" in err and "Traceback" not in err
    assert env["FRAMECAP_MQTT_PASSWORD"] not in err


def test_the_example_config_validates(capsys: pytest.CaptureFixture[str]) -> None:
    example = REPO / "deploy" / "config" / "web.yaml"
    assert main(["--config", str(example), "--validate-config"]) == 0
    assert "config OK" in capsys.readouterr().out


def test_validate_config_names_a_model_that_is_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--validate-config", "--state-dir", str(tmp_path), "--model", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert "model = " in err and "no such file (model checkpoint)" in err and "Traceback" not in err
