"""The daemon without a network: frame ids, CLI config handling, the torch-free import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from edge_helpers import REPO

from common.topics import validate_id
from edge.daemon import SUMMARY_KEYS, EdgeSummary, main, make_frame_id


def test_frame_id_is_safe_sortable_and_unique() -> None:
    t = datetime(2026, 1, 31, 12, 0, 0, 123456, tzinfo=timezone.utc)
    assert make_frame_id(t, 42) == "20260131T120000123Z-000042"
    local = t.astimezone(timezone(timedelta(hours=-5)))
    assert make_frame_id(local, 42) == "20260131T120000123Z-000042"  # always UTC
    ids = [make_frame_id(t, seq) for seq in range(1000)]
    assert len(set(ids)) == 1000 and ids == sorted(ids)
    assert all(validate_id(i, "frame_id") == i for i in ids)
    assert validate_id(make_frame_id(t, 10**9), "frame_id")  # seq past 6 digits still safe
    with pytest.raises(ValueError):
        make_frame_id(datetime(2026, 1, 1), 1)


def test_summary_json_has_the_documented_keys() -> None:
    line = EdgeSummary(device_id="cam-1", frames_read=3, elapsed_s=1.23456).to_json()
    data = json.loads(line)
    assert list(data)[: len(SUMMARY_KEYS)] == list(SUMMARY_KEYS)
    assert data["elapsed_s"] == 1.235 and "\n" not in line


def test_bad_config_exits_2_naming_the_key(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("device_id: cam-1\nsampling:\n  interval_s: -1\n")
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "sampling.interval_s" in err and "-1" in err
    assert main(["--device-id", "../etc"]) == 2
    cfg.write_text("device_id: cam-1\nsampling:\n  intervall_s: 1\n")
    assert main(["--config", str(cfg)]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_validate_config_applies_overrides(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("device_id: cam-1\nsource: '0'\n")
    assert main(["--config", str(cfg), "--source", "clip.avi", "--validate-config"]) == 0
    assert "device cam-1, source clip.avi" in capsys.readouterr().out


def test_missing_source_file_ends_with_an_error(tmp_path: Path, capsys) -> None:
    rc = main(["--device-id", "cam-1", "--source", str(tmp_path / "none.avi"),
               "--spool-dir", str(tmp_path / "spool"), "--mqtt-port", "1"])
    assert rc == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames_read"] == 0 and "does not exist" in summary["error"]


def test_edge_daemon_imports_neither_torch_nor_boto3() -> None:
    code = (
        "import sys, edge.daemon, edge.capture, edge.publisher, edge.spool\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'boto3', 'botocore', 'cloud'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == ""


def _threads_after_edge_command(tmp_path: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run ``framecap edge --validate-config`` in a fresh interpreter (numpy and cv2 imported
    by it), then count the process's OS threads: numpy's OpenBLAS pool is native threads."""
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("device_id: cam-1\nsource: '0'\n")
    code = (
        "import os, sys\n"
        "from common.cli import main\n"
        f"assert main(['edge', '--config', {str(cfg)!r}, '--validate-config']) == 0\n"
        "import numpy, cv2\n"
        "print(len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"} | env
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60, env=env)
    threads, value = out.stdout.split()[-2:]
    return int(threads), value


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or (os.cpu_count() or 1) < 2,
                    reason="counts threads in /proc on a machine of 2+ cores")
def test_edge_command_starts_no_openblas_worker_threads(tmp_path: Path) -> None:
    # without the setting numpy starts one OpenBLAS thread per extra core, spinning at import
    assert _threads_after_edge_command(tmp_path, {}) == (1, "1")
    # a user's own value wins
    threads, value = _threads_after_edge_command(tmp_path, {"OPENBLAS_NUM_THREADS": "2"})
    assert value == "2" and threads > 1


def test_sigterm_stops_a_live_source_cleanly(tmp_path: Path) -> None:
    # an RTSP source that never opens: the daemon keeps reopening with backoff until SIGTERM
    cmd = [sys.executable, "-m", "common.cli", "edge", "--device-id", "cam-1",
           "--source", "rtsp://127.0.0.1:1/none", "--spool-dir", str(tmp_path / "spool"),
           "--mqtt-port", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    lines: list[str] = []
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "retrying in" in line or not line:
            break
    assert any("retrying in" in x for x in lines), "".join(lines)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["device_id"] == "cam-1" and summary["stopped"] is True
    assert "signal SIGTERM: stopping" in err


def test_inconsistent_edge_settings_are_config_errors(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("device_id: cam-1\nreopen_min_s: 10\nreopen_max_s: 1\n")
    assert main(["--config", str(cfg)]) == 2
    cfg.write_text("device_id: cam-1\nencoding:\n  quality: 30\n  min_quality: 60\n")
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "reopen_max_s must be >= reopen_min_s" in err and "min_quality must be <= quality" in err
