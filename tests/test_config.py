"""Unit tests of common/config.py: typed sections, clear errors (key, value, why), secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import (
    ConfigError,
    EdgeConfig,
    IngestConfig,
    MqttConfig,
    S3Config,
    WebConfig,
    WorkerConfig,
    load_config,
    parse_config,
)

WEB_ENV = ("FRAMECAP_WEB_HOST", "FRAMECAP_WEB_PORT", "FRAMECAP_WEB_STATE_DIR", "FRAMECAP_WEB_INDEX",
           "FRAMECAP_WEB_INDEX_PASSWORD", "FRAMECAP_WEB_ACCOUNTS_FILE", "FRAMECAP_WEB_SESSION_SECRET",
           "FRAMECAP_WEBHOOK_SECRET", "FRAMECAP_WEB_PUBLIC_URL")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_minimal_edge_config_gets_defaults(tmp_path: Path) -> None:
    config = load_config(EdgeConfig, _write(tmp_path, "device_id: cam1\n"))
    assert config.device_id == "cam1"
    assert config.mqtt.port == 1883 and config.mqtt.topic_prefix == "framecap"
    assert config.encoding.max_bytes == 128 * 1024
    assert load_config(IngestConfig, None).share_group == "ingest"
    assert load_config(WorkerConfig, None).s3.bucket == "framecap"


@pytest.mark.parametrize(("text", "expected"), [
    ("device_id: cam1\nmqtt:\n  prot: 1883\n", ["mqtt.prot", "1883", "unknown key"]),
    ("device_id: cam1\nmqtt:\n  port: 70000\n", ["mqtt.port", "70000", "less than or equal to 65535"]),
    ("device_id: ../cam\n", ["device_id", "'../cam'", "'..'"]),
    ("device_id: 'cam/1'\n", ["device_id", "cam/1", "'/'"]),
    ("device_id: cam1\nsampling:\n  interval_s: -1\n", ["sampling.interval_s", "-1", "greater than 0"]),
    ("device_id: cam1\nmqtt:\n  topic_prefix: 'a/#'\n", ["mqtt", "topic prefix", "wildcards"]),
    ("mqtt: {}\n", ["device_id", "required key is missing"]),
    ("device_id: cam1\nmqtt:\n  reconnect_min_s: 5\n  reconnect_max_s: 1\n", ["mqtt", "reconnect_max_s"]),
    ("device_id: cam1\nmqtt:\n  tls:\n    certfile: c.pem\n", ["mqtt.tls", "together"]),
])
def test_bad_edge_configs_name_key_value_and_why(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(EdgeConfig, path)
    message = str(info.value)
    assert message.startswith(str(path))
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize(("text", "expected"), [
    ("s3:\n  bucket: ab\n", ["s3.bucket", "'ab'", "at least 3"]),
    ("share_group: 'a+b'\n", ["share_group", "'+'"]),
    ("max_payload_bytes: lots\n", ["max_payload_bytes", "'lots'", "valid integer"]),
])
def test_bad_ingest_configs_name_key_value_and_why(tmp_path: Path, text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(IngestConfig, _write(tmp_path, text))
    for part in expected:
        assert part in str(info.value)


def test_worker_device_must_be_known(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="device = 'tpu'"):
        load_config(WorkerConfig, _write(tmp_path, "device: tpu\n"))


@pytest.mark.parametrize(("text", "reason"), [
    ("device_id: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
])
def test_unreadable_files_are_config_errors(tmp_path: Path, text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        load_config(EdgeConfig, _write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(EdgeConfig, tmp_path / "absent.yaml")


def test_overrides_are_dotted_keys_and_none_is_ignored(tmp_path: Path) -> None:
    path = _write(tmp_path, "device_id: cam1\nmqtt:\n  port: 1883\n")
    config = load_config(EdgeConfig, path, {"mqtt.port": 2000, "sampling.interval_s": 0.5, "source": None})
    assert config.mqtt.port == 2000 and config.sampling.interval_s == 0.5 and config.source == "0"
    with pytest.raises(ConfigError, match="mqtt must be a mapping"):
        load_config(EdgeConfig, _write(tmp_path, "device_id: cam1\nmqtt: 5\n"), {"mqtt.port": 1})


def test_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAMECAP_MQTT_PASSWORD", "env-password")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "aws-key")
    monkeypatch.setenv("FRAMECAP_S3_SECRET_ACCESS_KEY", "fc-secret")
    monkeypatch.delenv("FRAMECAP_S3_ACCESS_KEY_ID", raising=False)
    config = parse_config(IngestConfig, {"mqtt": {"username": "ingest"}})
    assert config.mqtt.password is not None and config.mqtt.password.get_secret_value() == "env-password"
    assert config.s3.access_key_id is not None and config.s3.access_key_id.get_secret_value() == "aws-key"
    assert config.s3.secret_access_key is not None
    assert config.s3.secret_access_key.get_secret_value() == "fc-secret"
    shown = f"{config!r} {config} {config.model_dump()}"
    for secret in ("env-password", "aws-key", "fc-secret"):
        assert secret not in shown
    with pytest.raises(ConfigError, match="no username"):
        parse_config(IngestConfig, {})  # a password from the environment needs a user name


def test_endpoints_come_from_the_environment_as_stack_env_exports_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FRAMECAP_MQTT_HOST", "broker.example")
    monkeypatch.setenv("FRAMECAP_MQTT_PORT", "18830")
    monkeypatch.setenv("FRAMECAP_MQTT_USERNAME", "ingest")
    monkeypatch.setenv("FRAMECAP_S3_ENDPOINT_URL", "http://127.0.0.1:18333")
    monkeypatch.setenv("FRAMECAP_S3_BUCKET", "from-env")
    config = load_config(IngestConfig, None)
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.username) == ("broker.example", 18830, "ingest")
    assert (config.s3.endpoint_url, config.s3.bucket) == ("http://127.0.0.1:18333", "from-env")
    path = _write(tmp_path, "mqtt:\n  host: file-host\n  port: 1884\ns3:\n  bucket: from-file\n")
    config = load_config(IngestConfig, path, {"mqtt.username": "cli-user"})
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.username) == ("file-host", 1884, "cli-user")
    assert (config.s3.endpoint_url, config.s3.bucket) == ("http://127.0.0.1:18333", "from-file")
    monkeypatch.setenv("FRAMECAP_MQTT_PORT", "")  # empty counts as unset
    assert load_config(IngestConfig, None).mqtt.port == 1883
    monkeypatch.setenv("FRAMECAP_MQTT_PORT", "not-a-port")
    with pytest.raises(ConfigError, match="not-a-port"):
        load_config(IngestConfig, None)


def test_file_secret_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAMECAP_MQTT_PASSWORD", "env-password")
    config = MqttConfig(username="u", password="file-password")  # type: ignore[arg-type]
    assert config.password is not None and config.password.get_secret_value() == "file-password"


@pytest.mark.parametrize("data", [
    {"mqtt": {"password": "hunter2-secret"}},
    {"mqtt": {"username": "u", "password": ["hunter2-secret"]}},
    {"s3": {"secret_access_key": {"x": "hunter2-secret"}}},
    {"s3": {"access_key_id": 12345, "bucket": "x", "secret_access_key": "hunter2-secret"}},
])
def test_config_errors_never_show_secret_values(monkeypatch: pytest.MonkeyPatch, data: dict) -> None:
    monkeypatch.delenv("FRAMECAP_MQTT_PASSWORD", raising=False)
    with pytest.raises(ConfigError) as info:
        parse_config(IngestConfig, data)
    assert "hunter2-secret" not in str(info.value) and "12345" not in str(info.value)
    assert "***" in str(info.value)


def test_s3_config_defaults() -> None:
    config = S3Config(access_key_id=None, secret_access_key=None)
    assert config.path_style and config.region == "us-east-1" and config.endpoint_url is None


# --- framecap web -------------------------------------------------------------------------


@pytest.fixture
def no_web_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in WEB_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_web_config_defaults_bind_loopback_and_keep_state_under_state_dir(no_web_env: pytest.MonkeyPatch) -> None:
    config = parse_config(WebConfig, {})
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert config.state_dir == Path(".state/web")
    assert config.index_location() == str(Path(".state/web") / "index.sqlite3")
    assert not config.index_is_postgres
    assert config.accounts_path == Path(".state/web/accounts.yaml")
    assert config.base_url == "http://127.0.0.1:8080"
    assert config.widening and config.reindex_at_start and not config.https_only_cookies
    assert config.rules_file is None and config.model is None
    assert config.session_secret is None and config.webhook_secret is None
    described = [name for name, field in WebConfig.model_fields.items() if not field.description]
    assert described == []


def test_web_config_comes_from_the_environment(no_web_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_web_env.setenv("FRAMECAP_WEB_HOST", "0.0.0.0")
    no_web_env.setenv("FRAMECAP_WEB_PORT", "9090")
    no_web_env.setenv("FRAMECAP_WEB_STATE_DIR", str(tmp_path))
    no_web_env.setenv("FRAMECAP_WEB_SESSION_SECRET", "cookie-key-secret")
    no_web_env.setenv("FRAMECAP_WEBHOOK_SECRET", "webhook-key-secret")
    no_web_env.setenv("FRAMECAP_WEB_PUBLIC_URL", "https://cams.example.org/")
    config = parse_config(WebConfig, {})
    assert (config.host, config.port, config.state_dir) == ("0.0.0.0", 9090, tmp_path)
    assert config.session_secret_value().get_secret_value() == "cookie-key-secret"
    assert config.webhook_secret is not None and config.webhook_secret.get_secret_value() == "webhook-key-secret"
    assert config.base_url == "https://cams.example.org"
    assert config.index_location() == str(tmp_path / "index.sqlite3")
    shown = f"{config!r} {config} {config.model_dump()}"
    assert "cookie-key-secret" not in shown and "webhook-key-secret" not in shown
    no_web_env.setenv("FRAMECAP_WEB_PORT", "http")
    with pytest.raises(ConfigError, match="port = 'http'"):
        parse_config(WebConfig, {})


def test_web_session_secret_is_generated_once_and_private(no_web_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = parse_config(WebConfig, {"state_dir": str(tmp_path / "state")})
    first = config.session_secret_value().get_secret_value()
    path = tmp_path / "state" / "session-secret"
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(first) >= 32
    again = parse_config(WebConfig, {"state_dir": str(tmp_path / "state")}).session_secret_value()
    assert again.get_secret_value() == first
    other = parse_config(WebConfig, {"state_dir": str(tmp_path / "other")}).session_secret_value()
    assert other.get_secret_value() != first


def test_web_postgres_index_password_comes_from_the_environment_and_is_never_shown(
    no_web_env: pytest.MonkeyPatch,
) -> None:
    no_web_env.setenv("FRAMECAP_WEB_INDEX_PASSWORD", "pg:p@ss/word")
    config = parse_config(WebConfig, {"index": "postgresql://framecap@db.example:5433/framecap"})
    assert config.index_is_postgres
    assert config.index_location() == "postgresql://framecap:pg%3Ap%40ss%2Fword@db.example:5433/framecap"
    assert config.index_display() == "postgresql://framecap:***@db.example:5433/framecap"
    in_url = parse_config(WebConfig, {"index": "postgresql://u:url-secret@db/fc"})
    assert in_url.index_location() == "postgresql://u:url-secret@db/fc"  # the URL's own wins
    assert "url-secret" not in in_url.index_display()


@pytest.mark.parametrize(("data", "expected"), [
    ({"index": "postgresql://u:hunter2-secret@/nodb"}, "index = 'postgresql://u:***@/nodb'"),
    ({"index": "postgresql://u:hunter2-secret@db:notaport/fc"}, "bad port"),
    ({"index": "  "}, "index = '  '"),
    ({"public_url": "ftp://x"}, "public_url = 'ftp://x'"),
    ({"webhook_secret": ["hunter2-secret"]}, "webhook_secret = '***'"),
    ({"port": 70000}, "port = 70000"),
    ({"widenning": False}, "widenning = False: unknown key"),
    ({"mqtt": {"prot": 1}}, "mqtt.prot = 1: unknown key"),
])
def test_bad_web_configs_name_key_value_and_why(no_web_env: pytest.MonkeyPatch, data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(WebConfig, data)
    assert expected in str(info.value)
    assert "hunter2-secret" not in str(info.value)
