"""``framecap ingest`` / ``framecap worker`` command lines: config checks (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud import ingest, worker


def test_validate_config_accepts_a_good_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ingest.yaml"
    path.write_text("share_group: ingest\nmax_payload_bytes: 200000\ns3:\n  bucket: frames-here\n")
    assert ingest.main(["--config", str(path), "--validate-config", "--mqtt-port", "1884"]) == 0
    assert "config OK" in capsys.readouterr().out


def test_bad_config_names_key_value_and_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text("batch_size: 0\nbeam_sise: 3\n")
    assert worker.main(["--config", str(path), "--validate-config"]) == 2
    err = capsys.readouterr().err
    assert "batch_size = 0" in err and "beam_sise" in err and "unknown key" in err


def test_overrides_are_validated_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker.main(["--validate-config", "--beam-size", "0"]) == 2
    assert "beam_size" in capsys.readouterr().err
    assert ingest.main(["--validate-config", "--share-group", "a/b"]) == 2


def test_a_missing_model_exits_1_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = worker.main(["--model", str(tmp_path / "nope.pt"), "--mqtt-port", "1"])
    assert code == 1
    assert "cannot load the model" in capsys.readouterr().err
