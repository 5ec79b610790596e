"""What the edge costs per frame on this machine, against decoding and JPEG-encoding alone (issue 9).

``framecap edge`` runs as a process of its own on a video, every frame sampled (no interval, no
scene change), the video read as fast as it decodes, against a private local stack with the
ingest acking (so the edge does all its work: encode, spool, publish, acks, spool removal).
Its CPU time (user + sys, from ``wait4``) per frame, less the CPU time of the same process
started with ``--validate-config`` (interpreter, imports, config), is compared with a baseline
process that only decodes the video and JPEG-encodes each frame once at the edge's quality and
size (less its own start-up). Peak RSS is the edge process's ``ru_maxrss``.

Two videos: ``vtest.avi`` (768x576) and a 1280x720 clip made from it with sensor noise (such
frames are over the 128 KB cap at quality 85: the edge must pick a lower quality, and should not
encode every frame twice to find it).

Each video is measured ``--rounds`` times (edge and baseline one after the other) and the
least CPU per frame of each is kept, as ``timeit`` keeps its best: on a shared 2-core machine
other work only ever adds time. Peak RSS is the largest seen.

Prints one JSON line per round and per video and a last line with the targets (<= 1.3x,
<= 120 MB). It asserts nothing. ``make bench-edge`` runs it::

    .venv/bin/python bench/edge_cost.py [--video PATH] [--frames N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud.ingest import IngestService  # noqa: E402
from common.config import EncodingConfig, IngestConfig  # noqa: E402
from common.stack import LocalStack  # noqa: E402

DEFAULT_VIDEO = REPO.parent / "shared" / "videos" / "vtest.avi"
FRAMECAP = Path(sys.executable).with_name("framecap")

BASELINE = """
import sys, cv2
path, quality, max_width, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if limit:
    cap = cv2.VideoCapture(path)
    n = 0
    while n < limit:
        ok, frame = cap.read()
        if not ok:
            break
        if frame.shape[1] > max_width:
            scale = max_width / frame.shape[1]
            frame = cv2.resize(frame, (max_width, round(frame.shape[0] * scale)),
                               interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
        n += 1
    print(n)
"""


def emit(record: dict[str, Any]) -> None:
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
    print(json.dumps(out), flush=True)


def _peak_rss_mb(proc: subprocess.Popen[Any]) -> float:
    """The process's peak RSS (VmHWM), MB, polled until it exits (not reaped here).

    ``wait4``'s ``ru_maxrss`` will not do: a child forked from this (large) process starts
    with this process's high-water mark."""
    peak = 0.0
    status = Path(f"/proc/{proc.pid}/status")
    while True:
        try:
            text = status.read_text()
        except OSError:
            return peak
        hwm = [line for line in text.splitlines() if line.startswith("VmHWM:")]
        if not hwm or "State:\tZ" in text:
            return peak
        peak = max(peak, int(hwm[0].split()[1]) / 1024)
        time.sleep(0.02)


def run_measured(cmd: list[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; its CPU seconds (user + sys), peak RSS in MB and stdout."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
        peak = _peak_rss_mb(proc)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode not in (0,):
        raise SystemExit(f"{cmd[:3]} exited {proc.returncode}: {text[-500:]}")
    return usage.ru_utime + usage.ru_stime, peak, text


def noisy_720p(source: Path, path: Path, frames: int) -> Path:
    """``frames`` frames of ``source`` at 1280x720 with sensor noise, as an MJPG AVI (q95)."""
    cap = cv2.VideoCapture(str(source))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (1280, 720))
    writer.set(cv2.VIDEOWRITER_PROP_QUALITY, 95)
    rng = np.random.default_rng(0)
    n = 0
    while n < frames:
        ok, frame = cap.read()
        if not ok:
            break
        frame = cv2.resize(frame, (1280, 720), interpolation=cv2.INTER_CUBIC)
        noise = rng.normal(0, 6, frame.shape)
        writer.write(np.clip(frame + noise, 0, 255).astype(np.uint8))
        n += 1
    writer.release()
    return path


def measure(stack: LocalStack, workdir: Path, video: Path, frames: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    prefix, bucket, device_id = f"e{tag}", f"e-{tag}", f"edge-{tag}"
    stack.storage(bucket).ensure_bucket()
    stack.add_device(device_id)
    ingest = IngestService(
        IngestConfig(mqtt=stack.mqtt_config("ingest", topic_prefix=prefix),
                     s3=stack.s3_config(bucket, role="ingest")),
        client_id=f"ingest-{prefix}")
    ingest.start()
    assert ingest.wait_connected(10)
    mqtt = stack.mqtt_config(device_id, topic_prefix=prefix)
    home = workdir / device_id
    home.mkdir()
    config = {
        "device_id": device_id, "source": str(video),
        "mqtt": {"host": mqtt.host, "port": mqtt.port, "username": device_id, "topic_prefix": prefix},
        "spool": {"directory": str(home / "spool")},
        "sampling": {"interval_s": 0.001, "scene_change": False},  # every frame
        "playback_speed": 0.0, "max_frames": frames, "drain_timeout_s": 120.0,
        "wait_for_captions_s": 0.0,
    }
    (home / "edge.yaml").write_text(yaml.safe_dump(config))
    env = os.environ | {"FRAMECAP_MQTT_PASSWORD": mqtt.password.get_secret_value() if mqtt.password else ""}
    edge_cmd = [str(FRAMECAP), "edge", "--config", str(home / "edge.yaml")]
    try:
        start_cpu, _, _ = run_measured([*edge_cmd, "--validate-config"], env, home)
        started = time.perf_counter()
        cpu, rss, out = run_measured(edge_cmd, env, home)
        wall = time.perf_counter() - started
    finally:
        ingest.stop()
    summary = json.loads(out.strip().splitlines()[-1])
    n = summary["frames_sampled"]
    enc = EncodingConfig()
    base_start, _, _ = run_measured([sys.executable, "-c", BASELINE, str(video), str(enc.quality),
                                     str(enc.max_width), "0"])
    base_cpu, base_rss, base_out = run_measured(
        [sys.executable, "-c", BASELINE, str(video), str(enc.quality), str(enc.max_width), str(n)])
    base_n = int(base_out.strip())
    edge_ms = (cpu - start_cpu) / n * 1000
    base_ms = (base_cpu - base_start) / base_n * 1000
    width = int(cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_HEIGHT))
    return {"video": video.name, "size": f"{width}x{height}", "frames": n,
            "acked": summary["frames_acked"], "edge_cpu_ms_per_frame": edge_ms,
            "decode_encode_cpu_ms_per_frame": base_ms, "ratio": edge_ms / base_ms,
            "edge_peak_rss_mb": rss, "baseline_peak_rss_mb": base_rss,
            "edge_frames_per_s_wall": n / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    p.add_argument("--frames", type=int, default=400, help="frames per video (every one sampled)")
    p.add_argument("--rounds", type=int, default=3,
                   help="runs of each video; the least CPU per frame of each side is kept (default: 3)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    emit({"mode": "machine", "cpus": os.cpu_count(), "loadavg": list(os.getloadavg())})
    results = []
    with tempfile.TemporaryDirectory(prefix="framecap-edge-bench-") as tmp:
        work = Path(tmp)
        stack = LocalStack(work / "stack")
        stack.up(timeout_s=120.0)
        try:
            videos = [args.video, noisy_720p(args.video, work / "noisy720p.avi", args.frames)]
            for video in videos:
                rounds = []
                for i in range(max(1, args.rounds)):
                    rounds.append(measure(stack, work, video, args.frames))
                    emit({"mode": "round", "round": i + 1, **rounds[-1]})
                result = dict(rounds[0])
                result["mode"] = "best_of_rounds"
                result["rounds"] = len(rounds)
                for key in ("edge_cpu_ms_per_frame", "decode_encode_cpu_ms_per_frame"):
                    result[key] = min(r[key] for r in rounds)
                    result[key + "_all"] = [round(r[key], 3) for r in rounds]
                for key in ("edge_peak_rss_mb", "baseline_peak_rss_mb"):
                    result[key] = max(r[key] for r in rounds)
                result["ratio"] = result["edge_cpu_ms_per_frame"] / result["decode_encode_cpu_ms_per_frame"]
                result["acked"] = min(r["acked"] for r in rounds)
                results.append(result)
                emit(result)
        finally:
            stack.down(timeout_s=5.0)
    emit({"mode": "targets", "loadavg": list(os.getloadavg()),
          "cpu_le_1.3x_decode_encode": all(r["ratio"] <= 1.3 for r in results),
          "peak_rss_le_120mb": all(r["edge_peak_rss_mb"] <= 120 for r in results)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
