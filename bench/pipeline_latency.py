"""The pipeline's speed on this machine, end to end on the real stack (issue 9).

Starts a private local stack (mosquitto + SeaweedFS, ``framecap stack``'s servers on free ports,
thrown away at the end), the ingest and the caption worker in this process (the packaged default
model, beam 3, ``WorkerConfig`` defaults) and ``framecap edge`` devices as subprocesses reading
``vtest.avi`` (768x576, 10 fps). Measures, each against a baseline of the same run:

* ``latency``: one device, one frame a second, the video paced at real time: capture -> caption
  back at the edge (``received_at - captured_at`` of the edge's captions JSONL), p50/p95,
  against the targets (150/300 ms) and the model alone on one frame (the floor).
* ``load``: four devices, 10 frames/s in all, real time: captions/s the worker delivers against
  min(offered rate, the model's own rate on batches of ``batch_size``), and the p95 latency.
* ``saturated``: ``--count`` frames already in S3, the worker asked for all at once: captions/s
  against the model alone on the same decoded images in batches of ``batch_size`` (the worker
  overlaps its S3 requests with the model: the ratio is what it loses to I/O).
* ``sweep``: latency and throughput against load: four devices at ``--sweep-rates`` frames/s in
  all (each rate a fresh run of ``load``), captions/s delivered and p50/p95 capture -> caption
  at each rate; ``--plot PATH`` draws both against the offered rate (PNG, for docs/performance.md).
* ``store``: one device sends every frame of the video as fast as it reads it, worker stopped:
  frames stored in S3 per second against a plain paho QoS 1 publish + boto3 put loop on the same
  (already encoded) JPEGs.

Prints one JSON line per measurement and a last line with every target and whether it was met.
It asserts nothing. ``make bench-pipeline`` runs it::

    .venv/bin/python bench/pipeline_latency.py [--modes latency load saturated store]

On a shared machine the figures move with the load: note ``os.getloadavg()`` (printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud.ingest import IngestService  # noqa: E402
from cloud.worker import CaptionerLike, CaptionWorker, load_captioner  # noqa: E402
from common.config import IngestConfig, WorkerConfig  # noqa: E402
from common.messages import FrameMetadata  # noqa: E402
from common.stack import LocalStack  # noqa: E402
from common.topics import frame_key  # noqa: E402
from edge.publisher import parse_caption_line, percentile  # noqa: E402

DEFAULT_VIDEO = REPO.parent / "shared" / "videos" / "vtest.avi"
logger = logging.getLogger("bench.pipeline")


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line (floats rounded)."""
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
    print(json.dumps(out), flush=True)


def video_frames(path: Path, limit: int | None = None) -> list[np.ndarray]:
    """The first ``limit`` BGR frames of a video (all when None)."""
    cap = cv2.VideoCapture(str(path))
    frames: list[np.ndarray] = []
    while limit is None or len(frames) < limit:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    if not frames:
        raise SystemExit(f"cannot read frames from {path}")
    return frames


def model_rate(captioner: CaptionerLike, images: list[np.ndarray], batch_size: int) -> float:
    """Captions/s of the model alone on RGB ``images`` in batches of ``batch_size`` (one warm-up
    batch first)."""
    captioner.caption_images(images[:batch_size])
    started = time.perf_counter()
    for i in range(0, len(images), batch_size):
        captioner.caption_images(images[i : i + batch_size])
    return len(images) / (time.perf_counter() - started)


class Bench:
    """A private stack, the ingest and the worker of one bench run."""

    def __init__(self, workdir: Path, captioner: CaptionerLike, batch_size: int) -> None:
        self.workdir = workdir
        self.captioner = captioner
        self.batch_size = batch_size
        self.stack = LocalStack(workdir / "stack")
        self.stack.up(timeout_s=120.0)
        self.ingest: IngestService | None = None
        self.worker: CaptionWorker | None = None

    def close(self) -> None:
        self.stop_services()
        self.stack.down(timeout_s=5.0)

    def namespace(self) -> tuple[str, str]:
        """A fresh topic prefix and bucket (created)."""
        tag = uuid.uuid4().hex[:8]
        prefix, bucket = f"b{tag}", f"b-{tag}"
        self.stack.storage(bucket).ensure_bucket()
        return prefix, bucket

    def start_services(self, prefix: str, bucket: str, *, worker: bool = True) -> None:
        self.ingest = IngestService(
            IngestConfig(mqtt=self.stack.mqtt_config("ingest", topic_prefix=prefix),
                         s3=self.stack.s3_config(bucket, role="ingest")),
            client_id=f"ingest-{prefix}")
        self.ingest.start()
        assert self.ingest.wait_connected(10)
        if worker:
            self.worker = CaptionWorker(
                WorkerConfig(mqtt=self.stack.mqtt_config("worker", topic_prefix=prefix),
                             s3=self.stack.s3_config(bucket, role="worker"),
                             batch_size=self.batch_size, list_interval_s=600.0),
                captioner=self.captioner, client_id=f"worker-{prefix}")
            self.worker.start()
            assert self.worker.wait_connected(10)

    def stop_services(self) -> None:
        for service in (self.worker, self.ingest):
            if service is not None:
                service.stop()
        self.worker = self.ingest = None

    def edge(self, prefix: str, name: str, video: Path, *, interval_s: float, realtime: bool,
             max_frames: int | None, wait_for_captions_s: float) -> subprocess.Popen[str]:
        """Start ``framecap edge`` as a device of its own; its stdout's last line is the summary."""
        device_id = f"{name}-{uuid.uuid4().hex[:6]}"
        self.stack.add_device(device_id)
        mqtt = self.stack.mqtt_config(device_id, topic_prefix=prefix)
        home = self.workdir / device_id
        home.mkdir()
        config = {
            "device_id": device_id, "source": str(video),
            "mqtt": {"host": mqtt.host, "port": mqtt.port, "username": device_id,
                     "topic_prefix": prefix},
            "spool": {"directory": str(home / "spool")},
            "sampling": {"interval_s": interval_s, "scene_change": False},
            "playback_speed": 1.0 if realtime else 0.0,
            "max_frames": max_frames, "captions_jsonl": str(home / "captions.jsonl"),
            "drain_timeout_s": 120.0, "wait_for_captions_s": wait_for_captions_s,
        }
        (home / "edge.yaml").write_text(yaml.safe_dump(config))
        password = mqtt.password.get_secret_value() if mqtt.password else ""
        env = os.environ | {"FRAMECAP_MQTT_PASSWORD": password}
        return subprocess.Popen(
            [str(Path(sys.executable).with_name("framecap")), "edge", "--config",
             str(home / "edge.yaml")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=home)


def finish_edge(proc: subprocess.Popen[str], timeout_s: float = 600.0) -> dict[str, Any]:
    """Wait for an edge; its summary (the last JSON line of stdout) with its captions' latencies."""
    out, _ = proc.communicate(timeout=timeout_s)
    summary = json.loads(out.strip().splitlines()[-1])
    jsonl = Path(str(proc.args[-1])).parent / "captions.jsonl"  # type: ignore[index]
    latencies: list[float] = []
    received: list[datetime] = []
    captured: list[datetime] = []
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            record, received_at = parse_caption_line(line)
            if received_at is not None and record.captured_at is not None:
                latencies.append((received_at - record.captured_at).total_seconds() * 1000)
                received.append(received_at)
                captured.append(record.captured_at)
    summary["_latencies_ms"] = latencies
    summary["_received"] = received
    summary["_captured"] = captured
    return summary


def run_latency(bench: Bench, video: Path, frames: int, floor_ms: float) -> dict[str, Any]:
    prefix, bucket = bench.namespace()
    bench.start_services(prefix, bucket)
    try:
        proc = bench.edge(prefix, "lat", video, interval_s=1.0, realtime=True, max_frames=frames,
                          wait_for_captions_s=30.0)
        summary = finish_edge(proc)
    finally:
        bench.stop_services()
    lat = summary["_latencies_ms"][1:]  # the first pays the connection and warm-up
    p50, p95 = percentile(lat, 0.5), percentile(lat, 0.95)
    return {"mode": "latency", "frames_per_s": 1, "captions": len(lat),
            "p50_ms": p50, "p95_ms": p95, "edge_summary_p50_ms": summary.get("caption_latency_p50_ms"),
            "model_one_frame_ms": floor_ms, "p50_over_target": (p50 or 0) / 150.0,
            "p95_over_target": (p95 or 0) / 300.0}


def run_load(bench: Bench, video: Path, seconds: float, devices: int, fps: float,
             rate_model: float) -> dict[str, Any]:
    prefix, bucket = bench.namespace()
    bench.start_services(prefix, bucket)
    per_device = fps / devices
    try:
        procs = [bench.edge(prefix, f"load{i}", video, interval_s=1.0 / per_device, realtime=True,
                            max_frames=int(seconds * per_device), wait_for_captions_s=60.0)
                 for i in range(devices)]
        summaries = [finish_edge(p) for p in procs]
        batches = bench.worker.counters.get("batches", 0) if bench.worker else 0
    finally:
        bench.stop_services()
    lat = [x for s in summaries for x in s["_latencies_ms"][1:]]
    received = sorted(r for s in summaries for r in s["_received"])
    # Each device's own rate, summed: the edge processes start one after another, so the span
    # from the first caption of all to the last would count their start-up as idle time.
    rate = _summed_rate(summaries, "_received")
    # What the devices really sampled: a 10 fps video sampled every 1/3 s gives a frame every
    # 0.4 s, so the nominal rate is not the offered one.
    sampled_rate = _summed_rate(summaries, "_captured")
    keep_up = min(sampled_rate, rate_model)
    return {"mode": "load", "devices": devices, "offered_frames_per_s": fps,
            "sampled_frames_per_s": sampled_rate,
            "captions": len(received), "captions_per_s": rate, "model_only_per_s": rate_model,
            "ratio_vs_min_offered_model": rate / keep_up, "batches": batches,
            "p50_ms": percentile(lat, 0.5), "p95_ms": percentile(lat, 0.95),
            "sampled": sum(s["frames_sampled"] for s in summaries)}


def _summed_rate(summaries: list[dict[str, Any]], field: str) -> float:
    """Sum over devices of (n - 1) / (last - first) of the times in ``field``: the edge processes
    start one after another, so one span over all devices would count their start-up as idle."""
    rate = 0.0
    for summary in summaries:
        times = sorted(summary[field])
        if len(times) > 1 and times[-1] > times[0]:
            rate += (len(times) - 1) / (times[-1] - times[0]).total_seconds()
    return rate


def run_saturated(bench: Bench, jpegs: list[bytes], rgb: list[np.ndarray],
                  rate_model: float) -> dict[str, Any]:
    prefix, bucket = bench.namespace()
    store = bench.stack.storage(bucket)
    device = "sat-cam"
    keys = []
    base = datetime.now().astimezone()
    for i, jpeg in enumerate(jpegs):
        captured = base + timedelta(milliseconds=100 * i)
        frame_id = f"{captured:%Y%m%dT%H%M%S}{captured.microsecond // 1000:03d}Z-{i:06d}"
        h, w = rgb[i].shape[:2]
        meta = FrameMetadata(device_id=device, frame_id=frame_id, captured_at=captured, seq=i,
                             width=w, height=h, sha256=hashlib.sha256(jpeg).hexdigest())
        key = frame_key(device, frame_id, meta.captured_at)
        store.put(key, jpeg, metadata=meta.to_s3_metadata(), content_type="image/jpeg")
        keys.append(key)
    bench.start_services(prefix, bucket)
    worker = bench.worker
    assert worker is not None
    try:
        started = time.perf_counter()
        for key in keys:
            worker.request(key)
        while worker.counters.get("captioned", 0) < len(keys) and time.perf_counter() - started < 600:
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        counters = worker.counters
    finally:
        bench.stop_services()
    rate = counters.get("captioned", 0) / seconds
    return {"mode": "saturated", "frames": len(keys), "captions_per_s": rate,
            "model_only_per_s": rate_model, "ratio_vs_model_only": rate / rate_model,
            "batches": counters.get("batches")}


def plain_loop(bench: Bench, jpegs: list[bytes]) -> float:
    """Frames/s of a plain paho QoS 1 publisher and a subscriber that boto3-puts each payload."""
    import paho.mqtt.client as mqtt

    prefix, bucket = bench.namespace()
    store = bench.stack.storage(bucket, role="ingest")
    cfg_sub = bench.stack.mqtt_config("ingest", topic_prefix=prefix)
    cfg_pub = bench.stack.mqtt_config("admin", topic_prefix=prefix)
    topic = f"{prefix}/plain-cam/frames"
    done = threading.Event()
    stored = [0]
    client_s3 = store.client  # boto3 client

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        client_s3.put_object(Bucket=bucket, Key=f"frames/plain/{stored[0]}.jpg", Body=msg.payload)
        stored[0] += 1
        if stored[0] == len(jpegs):
            done.set()

    def client(cfg: Any, name: str) -> Any:
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=name,
                        protocol=mqtt.MQTTv5)
        c.username_pw_set(cfg.username, cfg.password.get_secret_value())
        c.connect(cfg.host, cfg.port)
        c.loop_start()
        return c

    subscribed = threading.Event()
    sub = client(cfg_sub, f"plain-sub-{prefix}")
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe(f"$share/plain/{prefix}/+/frames", qos=1)
    subscribed.wait(10)
    pub = client(cfg_pub, f"plain-pub-{prefix}")
    time.sleep(0.2)  # both connected (bench only)
    started = time.perf_counter()
    for jpeg in jpegs:
        pub.publish(topic, jpeg, qos=1)
    done.wait(300)
    seconds = time.perf_counter() - started
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()
    return stored[0] / seconds


def run_store(bench: Bench, video: Path, jpegs: list[bytes]) -> dict[str, Any]:
    baseline = plain_loop(bench, jpegs)
    prefix, bucket = bench.namespace()
    bench.start_services(prefix, bucket, worker=False)
    ingest = bench.ingest
    assert ingest is not None
    try:
        proc = bench.edge(prefix, "store", video, interval_s=0.001, realtime=False,
                          max_frames=len(jpegs), wait_for_captions_s=0.0)
        first: tuple[float, int] | None = None
        last: tuple[float, int] | None = None
        seen = 0
        while True:  # from the first frame stored to the last
            n = ingest.counters.get("stored", 0)
            now = time.perf_counter()
            if n and first is None:
                first = (now, n)
            if n != seen:
                seen, last = n, (now, n)
            if proc.poll() is not None and (seen >= len(jpegs) or now - (last or (now, 0))[0] > 5):
                break
            time.sleep(0.005)
        summary = finish_edge(proc)
    finally:
        bench.stop_services()
    assert first is not None and last is not None
    rate = (last[1] - first[1]) / (last[0] - first[0])
    return {"mode": "store", "frames": seen, "edge_sampled": summary["frames_sampled"],
            "stored_per_s": rate, "plain_loop_per_s": baseline, "ratio": rate / baseline}


def run_sweep(bench: Bench, video: Path, rates: list[float], rate_model: float,
              min_seconds: float, min_frames: int) -> list[dict[str, Any]]:
    """``run_load`` at each offered rate (4 devices), long enough for ``min_frames`` frames."""
    points = []
    for fps in rates:
        seconds = max(min_seconds, min_frames / fps)
        point = run_load(bench, video, seconds, 4, fps, rate_model)
        point["mode"] = "sweep"
        emit(point)
        points.append(point)
    return points


def plot_sweep(points: list[dict[str, Any]], path: Path) -> None:
    """Captions/s and p50/p95 latency against the offered rate, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offered = [p["sampled_frames_per_s"] for p in points]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    top.plot(offered, [p["captions_per_s"] for p in points], "o-", label="captions/s delivered")
    top.plot(offered, offered, ":", color="grey", label="offered (sampled)")
    top.axhline(points[0]["model_only_per_s"], color="tab:red", ls="--",
                label="model alone (batches)")
    top.set_ylabel("captions / s")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.plot(offered, [p["p50_ms"] for p in points], "o-", label="p50")
    bottom.plot(offered, [p["p95_ms"] for p in points], "s-", label="p95")
    bottom.axhline(150, color="tab:green", ls=":", label="p50 target at 1 frame/s (150 ms)")
    bottom.axhline(1000, color="tab:red", ls=":", label="p95 target at 10 frames/s (1 s)")
    bottom.set_yscale("log")
    bottom.set_ylabel("capture -> caption at the edge, ms")
    bottom.set_xlabel("offered load: frames/s sampled by 4 devices (real time, same machine)")
    bottom.legend(loc="upper left")
    bottom.grid(alpha=0.3, which="both")
    fig.suptitle("framecap pipeline on one machine: throughput and latency against load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@contextmanager
def quiet_logs() -> Iterator[None]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    yield


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    p.add_argument("--modes", nargs="+", default=["latency", "load", "saturated", "store"],
                   choices=["latency", "load", "saturated", "store", "sweep"],
                   help="measurements to run (sweep is not in the default set)")
    p.add_argument("--sweep-rates", type=float, nargs="+", default=[1, 2, 4, 8, 10, 13.4, 20],
                   help="offered frames/s (4 devices in all) of the sweep; from a 10 fps video a device samples "
                        "10/k frames/s, so these map to distinct rates")
    p.add_argument("--sweep-seconds", type=float, default=20.0,
                   help="shortest run per sweep rate (longer where needed for 40 frames)")
    p.add_argument("--plot", type=Path, default=None, help="write the sweep's plot here (PNG)")
    p.add_argument("--latency-frames", type=int, default=30, help="frames of the latency run (1/s)")
    p.add_argument("--load-seconds", type=float, default=30.0)
    p.add_argument("--count", type=int, default=96, help="frames of the saturated run")
    p.add_argument("--batch-size", type=int, default=WorkerConfig().batch_size)
    p.add_argument("--precision", default=WorkerConfig().precision,
                   choices=["auto", "fp32", "bf16", "int8"],
                   help="the worker's precision (int8: its decoder quantized) (default: %(default)s)")
    args = p.parse_args(argv)
    with quiet_logs():
        emit({"mode": "machine", "cpus": os.cpu_count(), "loadavg": list(os.getloadavg()),
              "threads": WorkerConfig().threads, "batch_size": args.batch_size,
              "precision": args.precision})
        captioner = load_captioner(WorkerConfig(device="cpu", precision=args.precision))
        bgr = video_frames(args.video, max(args.count, 1))
        rgb = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in bgr]
        jpegs = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes() for f in bgr]
        rate_model = model_rate(captioner, rgb[: max(args.batch_size * 4, 32)], args.batch_size)
        one = [rgb[0]]
        captioner.caption_images(one)
        floor_ms = statistics.median(
            _timed(lambda: captioner.caption_images(one)) for _ in range(7)) * 1000
        emit({"mode": "model_only", "captions_per_s": rate_model, "batch_size": args.batch_size,
              "one_frame_ms": floor_ms})
        results: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory(prefix="framecap-bench-") as tmp:
            bench = Bench(Path(tmp), captioner, args.batch_size)
            try:
                for mode in args.modes:
                    if mode == "sweep":
                        points = run_sweep(bench, args.video, args.sweep_rates, rate_model,
                                           args.sweep_seconds, 40)
                        if args.plot is not None:
                            plot_sweep(points, args.plot)
                        continue
                    if mode == "latency":
                        results[mode] = run_latency(bench, args.video, args.latency_frames, floor_ms)
                    elif mode == "load":
                        results[mode] = run_load(bench, args.video, args.load_seconds, 4, 10.0,
                                                 rate_model)
                    elif mode == "saturated":
                        results[mode] = run_saturated(bench, jpegs[: args.count],
                                                      rgb[: args.count], rate_model)
                    else:
                        all_jpegs = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 85])[1]
                                     .tobytes() for f in video_frames(args.video)]
                        results[mode] = run_store(bench, args.video, all_jpegs)
                    emit(results[mode])
            finally:
                bench.close()
        targets: dict[str, Any] = {"mode": "targets", "loadavg": list(os.getloadavg())}
        if "latency" in results:
            r = results["latency"]
            targets["latency_p50_le_150ms"] = (r["p50_ms"] or 1e9) <= 150
            targets["latency_p95_le_300ms"] = (r["p95_ms"] or 1e9) <= 300
        if "load" in results:
            r = results["load"]
            targets["load_keeps_up_ge_0.9"] = r["ratio_vs_min_offered_model"] >= 0.9
            targets["load_p95_lt_1s"] = (r["p95_ms"] or 1e9) < 1000
        if "saturated" in results:
            targets["saturated_ge_0.9_model_only"] = results["saturated"]["ratio_vs_model_only"] >= 0.9
        if "store" in results:
            targets["store_ge_0.8_plain_loop"] = results["store"]["ratio"] >= 0.8
        emit(targets)
    return 0


def _timed(call: Any) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
