"""The pipeline end to end against the real mosquitto and SeaweedFS (issue 3, item 9).

edge daemon (real video) -> MQTT -> ingest -> S3 frames/ -> caption worker (the committed
default model) -> S3 captions/ + MQTT -> captions back at the edge.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from cloud.ingest import IngestService
from cloud.worker import CaptionWorker
from common.config import EdgeConfig, IngestConfig, SamplingConfig, SpoolConfig, WorkerConfig
from common.messages import CaptionRecord, FrameMetadata
from edge.daemon import EdgeDaemon, EdgeSummary

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def captioner():  # type: ignore[no-untyped-def]
    """The committed default model (what `framecap worker` uses without --model)."""
    from cloud.captioning.inference import Captioner

    return Captioner.load(None, device="cpu", beam_size=3)


@pytest.fixture
def ingest(stack_ns) -> Iterator[IngestService]:  # type: ignore[no-untyped-def]
    service = IngestService(
        IngestConfig(mqtt=stack_ns.mqtt_config("ingest"), s3=stack_ns.s3_config(role="ingest")),
        client_id=stack_ns.client_id("ingest"),
    )
    service.start()
    assert service.wait_connected(10)
    yield service
    service.stop()


@pytest.fixture
def worker(stack_ns, captioner) -> Iterator[CaptionWorker]:  # type: ignore[no-untyped-def]
    service = CaptionWorker(
        WorkerConfig(
            mqtt=stack_ns.mqtt_config("worker"), s3=stack_ns.s3_config(role="worker"),
            batch_size=8, max_wait_s=0.3, list_interval_s=5.0,
        ),
        captioner=captioner,
        client_id=stack_ns.client_id("worker"),
    )
    service.start()
    assert service.wait_connected(10)
    yield service
    service.stop()


def edge_config(stack_ns, device_id: str, source: Path, spool: Path, **fields) -> EdgeConfig:  # type: ignore[no-untyped-def]
    fields.setdefault("sampling", SamplingConfig(interval_s=5.0, scene_change=False))
    return EdgeConfig(
        device_id=device_id, source=str(source), mqtt=stack_ns.mqtt_config(device_id),
        spool=SpoolConfig(directory=spool), **fields,
    )


def stored_frames(stack_ns, device_id: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """frame_id -> key of every frames/{device_id}/... object."""
    keys = list(stack_ns.storage().list_keys(f"frames/{device_id}/"))
    return {Path(k).stem: k for k in keys}


def test_vtest_every_sampled_frame_stored_and_captioned_once(
    stack_ns, ingest, worker, shared_dir, tmp_path, wait_until  # type: ignore[no-untyped-def]
) -> None:
    device_id = stack_ns.device("street")
    captions_jsonl = tmp_path / "captions.jsonl"
    config = edge_config(
        stack_ns, device_id, shared_dir / "videos" / "vtest.avi", tmp_path / "spool",
        captions_jsonl=captions_jsonl, drain_timeout_s=120, wait_for_captions_s=180,
    )
    summary: EdgeSummary = EdgeDaemon(config, print_captions=False).run()

    # vtest.avi: 795 frames at 10 fps = 79.5 s of video; one frame per 5 s of video time.
    assert summary.drained and summary.error is None
    assert summary.frames_read == 795
    assert summary.frames_sampled == 16
    assert summary.frames_acked == 16 and summary.frames_pending == 0

    store = stack_ns.storage()
    frames = stored_frames(stack_ns, device_id)
    assert len(frames) == 16
    for frame_id, key in frames.items():
        obj = store.get_object(key)
        meta = FrameMetadata.from_s3_metadata(obj.metadata)
        assert meta.frame_id == frame_id and meta.device_id == device_id
        assert hashlib.sha256(obj.body).hexdigest() == meta.sha256

    assert wait_until(lambda: len(list(store.list_keys(f"captions/{device_id}/"))) >= 16, 60)
    captions = {}
    for key in store.list_keys(f"captions/{device_id}/"):
        record = CaptionRecord.from_json(store.get(key))
        assert record.error is None and record.caption.strip(), record
        assert record.caption_key == key and record.frame_key == frames[record.frame_id]
        captions[record.frame_id] = record
    assert set(captions) == set(frames)

    # Captions came back to the edge, each exactly once.
    lines = [json.loads(line) for line in captions_jsonl.read_text().splitlines()]
    assert sorted(line["frame_id"] for line in lines) == sorted(frames)
    assert summary.captions_received == 16
    # Stored once, captioned once: the services' own counters agree.
    assert ingest.counters.get("stored") == 16
    assert worker.counters.get("captioned") == 16


def _first_frame(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    cap = cv2.VideoCapture(str(path))
    ok, frame = cap.read()
    cap.release()
    assert ok, path
    return cv2.resize(frame, size) if size else frame


def _mostly_static_clip(path: Path, shared_dir: Path) -> Path:
    """60 frames at 10 fps with sensor noise: 3 s of a street (vtest), then 3 s of a cup."""
    street = _first_frame(shared_dir / "videos" / "vtest.avi")
    h, w = street.shape[:2]
    cup = _first_frame(shared_dir / "videos" / "cup.mp4", (w, h))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
    rng = np.random.default_rng(0)
    for i in range(60):
        base = street if i < 30 else cup
        noise = rng.integers(-2, 3, size=base.shape, dtype=np.int16)
        writer.write(np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8))
    writer.release()
    return path


def test_scene_change_sends_fewer_frames_than_interval_on_a_static_clip(
    stack_ns, ingest, shared_dir, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    clip = _mostly_static_clip(tmp_path / "static.avi", shared_dir)
    counts = {}
    for scene_change in (False, True):
        device_id = stack_ns.device("static")
        config = edge_config(
            stack_ns, device_id, clip, tmp_path / f"spool-{scene_change}",
            sampling=SamplingConfig(interval_s=0.5, scene_change=scene_change),
            drain_timeout_s=60,
        )
        summary = EdgeDaemon(config, print_captions=False).run()
        assert summary.drained
        stored = stored_frames(stack_ns, device_id)
        assert len(stored) == summary.frames_sampled
        counts[scene_change] = len(stored)
    assert counts[False] == 12  # 6 s of video, one frame per 0.5 s
    assert counts[True] == 2  # one frame per scene, nothing for the noise


def test_edge_restarted_with_unacked_frames_delivers_them(
    stack_ns, shared_dir, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    device_id = stack_ns.device("restart")
    spool = tmp_path / "spool"
    video = shared_dir / "videos" / "vtest.avi"
    # No ingest yet: nothing is acked, the frames stay in the spool when the edge gives up.
    first = EdgeDaemon(edge_config(stack_ns, device_id, video, spool, max_frames=5,
                                   drain_timeout_s=1.0), print_captions=False).run()
    assert first.frames_sampled == 5 and first.frames_pending == 5 and not first.drained
    assert stored_frames(stack_ns, device_id) == {}

    service = IngestService(
        IngestConfig(mqtt=stack_ns.mqtt_config("ingest"), s3=stack_ns.s3_config(role="ingest")),
        client_id=stack_ns.client_id("ingest"),
    )
    service.start()
    try:
        assert service.wait_connected(10)
        second = EdgeDaemon(edge_config(stack_ns, device_id, video, spool, max_frames=2,
                                        drain_timeout_s=60), print_captions=False).run()
    finally:
        service.stop()
    assert second.drained and second.frames_pending == 0
    stored = stored_frames(stack_ns, device_id)
    assert len(stored) == 7  # the 5 left over and the 2 new ones, each once
    assert service.counters.get("stored") == 7


def test_demo_command_captions_a_real_video(shared_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`framecap demo` (what `make demo` runs): its own stack, the default model, real video."""
    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "demo", "--max-frames", "4",
         "--state-dir", str(tmp_path / "demo")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["frames_sampled"] == summary["frames_stored"] == summary["captions"] == 4
    assert summary["bucket"] == "framecap"
    caption_lines = [line for line in proc.stdout.splitlines() if line.count("\t") == 2]  # frame_id, caption, score
    assert len(caption_lines) == 4
    # a second run on the same state dir (whose bucket keeps the first run's objects) counts its own
    again = subprocess.run(
        [sys.executable, "-m", "common.cli", "demo", "--max-frames", "3",
         "--state-dir", str(tmp_path / "demo")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=400,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["frames_sampled"] == summary["frames_stored"] == summary["captions"] == 3


def test_demo_serve_keeps_the_web_pages_up_until_interrupted(shared_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`framecap demo --serve`: once its captions are in the web index it prints the URL and a
    login, answers searches there, and stops everything it started on Ctrl-C (SIGINT)."""
    import signal

    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "demo", "--max-frames", "2", "--serve", "--web-port", "0",
         "--state-dir", str(tmp_path / "demo")],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        login = None
        for line in proc.stdout:  # the process prints its lines as it goes; no fixed sleeps
            lines.append(line)
            if line.startswith('{"web_url"'):
                login = json.loads(line)
                break
        assert login is not None, "".join(lines)[-3000:]
        summary = json.loads(lines[-2])
        assert summary["captions"] == summary["captions_indexed"] == 2
        auth = (login["username"], login["password"])
        found = httpx.get(f"{login['web_url']}/api/v1/search", params={"q": ""}, auth=auth, timeout=30).json()
        assert found["total"] == 2 and {r["device_id"] for r in found["results"]} == {"demo-cam"}
        assert httpx.get(f"{login['web_url']}/api/v1/search", auth=("demo", "wrong"), timeout=30).status_code == 401
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, rest[-3000:]
        state = json.loads((tmp_path / "demo" / "stack" / "stack.json").read_text())
        from common.stack import pid_alive

        assert not pid_alive(state["mosquitto"]["pid"]) and not pid_alive(state["seaweedfs"]["pid"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_frames_the_ingest_refuses_are_rejected_and_leave_the_edge_spool(
    stack_ns, shared_dir, tmp_path, caplog  # type: ignore[no-untyped-def]
) -> None:
    """A refusal for the frame's own sake (here: larger than the ingest takes) is final: the
    ingest tells the device, which logs why and drops the frame instead of resending it for
    ever, and the run drains."""
    import logging

    caplog.set_level(logging.WARNING, logger="edge.publisher")
    device_id = stack_ns.device("reject")
    service = IngestService(
        IngestConfig(mqtt=stack_ns.mqtt_config("ingest"), s3=stack_ns.s3_config(role="ingest"),
                     max_payload_bytes=1024),  # every frame of vtest is larger
        client_id=stack_ns.client_id("ingest"),
    )
    service.start()
    try:
        assert service.wait_connected(10)
        summary = EdgeDaemon(edge_config(stack_ns, device_id, shared_dir / "videos" / "vtest.avi",
                                         tmp_path / "spool", max_frames=3, drain_timeout_s=60),
                             print_captions=False).run()
    finally:
        service.stop()
    assert summary.drained and summary.frames_pending == 0
    assert summary.frames_rejected == 3 and summary.frames_acked == 0
    assert stored_frames(stack_ns, device_id) == {}
    assert service.counters.get("invalid.too_large", 0) >= 3
    assert service.counters.get("rejections_published", 0) >= 3
    lines = [r.getMessage() for r in caplog.records if "rejected by the ingest" in r.getMessage()]
    assert len(lines) == 3 and all("(too_large: " in line and device_id in line for line in lines)
