"""Scale-out of the pipeline on this machine: 1, 2 and 4 ingest replicas, 1 and 2 caption workers.

Starts a private local stack (mosquitto + SeaweedFS on free ports, thrown away at the end) and
runs the services as real processes (``framecap ingest``, ``framecap worker``), the way they are
deployed: replicas of one role share the MQTT 5 shared subscription ``$share/{role}/...`` and the
broker splits the messages between them. Each configuration gets a fresh topic prefix and bucket.

* ``ingest``: ``--devices`` device accounts publish ``--frames`` pre-encoded JPEG frames (the
  first frames of ``vtest.avi``, 768x576, quality 85, with the frame metadata as MQTT user
  properties, exactly what ``framecap edge`` sends) at QoS 1, each with at most ``--window``
  frames not yet acknowledged by the ingest (as the edge's window). Frames stored per second
  (the ingest's acks: sent after the S3 write), from the first ack to the last, for 1, 2 and 4
  replicas; the ratio against 1 replica of the same run.
* ``worker``: ``--captions`` frames are put in S3 and announced on the acks topic (what the
  ingest does) while 1, then 2, workers share the acks; captions per second on the captions
  topic from the first to the last, the ratio against 1 worker of the same run, and duplicates
  (a frame captioned twice: there must be none).

Every worker process gets ``--worker-threads`` model threads (default: the worker's default), so
2 workers on a 2-core machine use twice the threads of 1: the ratio says what another replica
buys on the same cores, not on another machine. ``docs/performance.md`` reads these figures.
Prints one JSON line per configuration and a summary line. It asserts nothing::

    .venv/bin/python bench/pipeline_scaleout.py [--modes ingest worker]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.config import WorkerConfig  # noqa: E402
from common.messages import CaptionRecord, FrameAck, FrameMetadata  # noqa: E402
from common.stack import LocalStack  # noqa: E402
from common.topics import frame_key  # noqa: E402

DEFAULT_VIDEO = REPO.parent / "shared" / "videos" / "vtest.avi"
FRAMECAP = str(Path(sys.executable).with_name("framecap"))
logger = logging.getLogger("bench.scaleout")


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line (floats rounded)."""
    out = {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}
    print(json.dumps(out), flush=True)


def encoded_frames(video: Path, count: int) -> list[tuple[bytes, int, int]]:
    """(JPEG q85, width, height) of the first ``count`` frames of ``video`` (looped if shorter)."""
    cap = cv2.VideoCapture(str(video))
    out: list[tuple[bytes, int, int]] = []
    while len(out) < count:
        ok, frame = cap.read()
        if not ok:
            if not out:
                raise SystemExit(f"cannot read frames from {video}")
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
        out.append((jpeg, frame.shape[1], frame.shape[0]))
    return out


def paho_client(stack: LocalStack, user: str, client_id: str) -> mqtt.Client:
    """A connected paho MQTT 5 client (network loop started) for ``user`` of the stack."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(user, stack.password(user))
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p=None: connected.set() if not rc.is_failure else None
    client.connect(stack.host, stack.mqtt_port)
    client.loop_start()
    if not connected.wait(15):
        raise RuntimeError(f"{client_id}: no CONNACK within 15 s")
    return client


def subscribe(client: mqtt.Client, topic_filter: str) -> None:
    """Subscribe at QoS 1 and wait for the SUBACK (raises if it is a refusal)."""
    done = threading.Event()
    codes: list[Any] = []

    def on_subscribe(c: Any, u: Any, mid: int, reason_codes: list[Any], props: Any = None) -> None:
        codes.extend(reason_codes)
        done.set()

    client.on_subscribe = on_subscribe
    client.subscribe(topic_filter, qos=1)
    if not done.wait(15) or any(rc.is_failure for rc in codes):
        raise RuntimeError(f"subscription to {topic_filter} refused or unanswered: {codes}")


class Service:
    """One ``framecap ingest|worker`` process, its log in a file."""

    def __init__(self, role: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.role, self.log = role, log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen([FRAMECAP, role, "-v", *args], env=os.environ | env,
                                     stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_for(self, text: str, timeout_s: float) -> None:
        """Wait until the log holds ``text`` (e.g. the SUBACK of its share group)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.role} never logged {text!r}:\n"
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


class ScaleBench:
    """The private stack and the processes of one run."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.stack = LocalStack(workdir / "stack")
        self.stack.up(timeout_s=120.0)

    def close(self) -> None:
        self.stack.down(timeout_s=5.0)

    def namespace(self) -> tuple[str, str]:
        """A fresh topic prefix and bucket (created, granted to the service identities)."""
        tag = uuid.uuid4().hex[:8]
        prefix, bucket = f"s{tag}", f"s-{tag}"
        self.stack.storage(bucket).ensure_bucket()
        self.stack.grant_bucket(bucket)
        return prefix, bucket

    def services(self, role: str, n: int, prefix: str, bucket: str,
                 extra: list[str] | None = None) -> list[Service]:
        """Start ``n`` replicas of ``role`` and wait for each one's share-group SUBACK."""
        started = []
        for i in range(n):
            name = f"{role}{i}-{prefix}"
            started.append(Service(role, ["--client-id", name, "--topic-prefix", prefix,
                                          "--bucket", bucket, *(extra or [])],
                                   self.stack.env(role, bucket=bucket),
                                   self.workdir / f"{name}.log"))
        kind = "frames" if role == "ingest" else "acks"
        for service in started:
            service.wait_for(f"subscribed to $share/{role}/{prefix}/+/{kind}", 60 if role == "ingest" else 180)
        return started


def run_ingest(bench: ScaleBench, replicas: int, frames: list[tuple[bytes, int, int]],
               devices: int, window: int) -> dict[str, Any]:
    """Frames stored per second with ``replicas`` ingest processes (see the module docstring)."""
    prefix, bucket = bench.namespace()
    services = bench.services("ingest", replicas, prefix, bucket)
    per_device = len(frames) // devices
    acked: list[float] = []
    lock = threading.Lock()
    clients: list[mqtt.Client] = []
    try:
        senders = []
        for d in range(devices):
            device = f"dev{d}-{prefix}"
            bench.stack.add_device(device)
            client = paho_client(bench.stack, device, device)
            clients.append(client)
            slots = threading.Semaphore(window)

            def on_message(c: Any, u: Any, msg: Any, slots: threading.Semaphore = slots) -> None:
                FrameAck.from_json(msg.payload)
                with lock:
                    acked.append(time.perf_counter())
                slots.release()

            client.on_message = on_message
            subscribe(client, f"{prefix}/{device}/acks")

            def send(client: mqtt.Client = client, device: str = device,
                     slots: threading.Semaphore = slots, first: int = d * per_device) -> None:
                base = datetime.now(UTC)
                for seq in range(per_device):
                    jpeg, width, height = frames[first + seq]
                    captured = base + timedelta(milliseconds=seq)
                    meta = FrameMetadata(
                        device_id=device, frame_id=f"{captured:%Y%m%dT%H%M%S%f}Z-{seq:06d}",
                        captured_at=captured, seq=seq, width=width, height=height,
                        sha256=hashlib.sha256(jpeg).hexdigest())
                    props = Properties(PacketTypes.PUBLISH)
                    props.UserProperty = meta.to_user_properties()
                    slots.acquire()
                    client.publish(f"{prefix}/{device}/frames", jpeg, qos=1, properties=props)

            senders.append(threading.Thread(target=send, daemon=True))
        total = per_device * devices
        for t in senders:
            t.start()
        deadline = time.monotonic() + 600
        while len(acked) < total and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        for client in clients:
            client.loop_stop()
            client.disconnect()
        for service in services:
            service.stop()
    stored = sum(1 for _ in bench.stack.storage(bucket).list_keys("frames/"))
    rate = (len(acked) - 1) / (acked[-1] - acked[0]) if len(acked) > 1 else 0.0
    return {"mode": "ingest", "replicas": replicas, "devices": devices, "frames": total,
            "acked": len(acked), "stored_in_s3": stored, "stored_per_s": rate}


def run_worker(bench: ScaleBench, workers: int, frames: list[tuple[bytes, int, int]],
               batch_size: int, threads: int | None) -> dict[str, Any]:
    """Captions per second with ``workers`` worker processes (see the module docstring)."""
    prefix, bucket = bench.namespace()
    extra = ["--batch-size", str(batch_size)]
    if threads is not None:
        config = bench.workdir / f"worker-{prefix}.yaml"
        config.write_text(yaml.safe_dump({"threads": threads}))
        extra += ["--config", str(config)]
    services = bench.services("worker", workers, prefix, bucket, extra)
    device = f"cam-{prefix}"
    arrivals: list[float] = []
    per_frame: Counter[str] = Counter()
    lock = threading.Lock()
    admin = paho_client(bench.stack, "admin", f"bench-{prefix}")
    try:
        def on_caption(c: Any, u: Any, msg: Any) -> None:
            record = CaptionRecord.from_json(msg.payload)
            with lock:
                per_frame[record.frame_id] += 1
                arrivals.append(time.perf_counter())

        admin.on_message = on_caption
        subscribe(admin, f"{prefix}/+/captions")
        store = bench.stack.storage(bucket)
        base = datetime.now(UTC)

        def put_and_announce(i: int) -> None:
            jpeg, width, height = frames[i]
            captured = base + timedelta(milliseconds=i)
            meta = FrameMetadata(device_id=device, frame_id=f"{captured:%Y%m%dT%H%M%S%f}Z-{i:06d}",
                                 captured_at=captured, seq=i, width=width, height=height,
                                 sha256=hashlib.sha256(jpeg).hexdigest())
            key = frame_key(device, meta.frame_id, meta.captured_at)
            store.put(key, jpeg, metadata=meta.to_s3_metadata(), content_type="image/jpeg")
            ack = FrameAck(device_id=device, frame_id=meta.frame_id, key=key)
            admin.publish(f"{prefix}/{device}/acks", ack.to_json(), qos=1)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put_and_announce, range(len(frames))))
        deadline = time.monotonic() + 900
        while len(per_frame) < len(frames) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        admin.loop_stop()
        admin.disconnect()
        for service in services:
            service.stop()
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
    return {"mode": "worker", "workers": workers, "threads_each": threads or WorkerConfig().threads,
            "batch_size": batch_size, "frames": len(frames), "captioned": len(per_frame),
            "duplicates": sum(n - 1 for n in per_frame.values()), "captions_per_s": rate}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="video whose frames are sent")
    p.add_argument("--modes", nargs="+", default=["ingest", "worker"], choices=["ingest", "worker"],
                   help="what to scale")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4], help="ingest replicas to try")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker replicas to try")
    p.add_argument("--frames", type=int, default=2000, help="frames sent per ingest configuration")
    p.add_argument("--devices", type=int, default=4, help="devices sending them at once")
    p.add_argument("--window", type=int, default=32, help="frames in flight per device")
    p.add_argument("--captions", type=int, default=160, help="frames captioned per worker configuration")
    p.add_argument("--batch-size", type=int, default=WorkerConfig().batch_size, help="worker batch size")
    p.add_argument("--worker-threads", type=int, default=None,
                   help="model threads of each worker (default: the worker's own default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    emit({"mode": "machine", "cpus": os.cpu_count(), "loadavg": list(os.getloadavg())})
    frames = encoded_frames(args.video, max(args.frames, args.captions))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="framecap-scaleout-") as tmp:
        bench = ScaleBench(Path(tmp))
        try:
            if "ingest" in args.modes:
                for n in args.replicas:
                    r = run_ingest(bench, n, frames[: args.frames], args.devices, args.window)
                    base = next(x for x in results + [r] if x["mode"] == "ingest")
                    r["ratio_vs_first"] = r["stored_per_s"] / base["stored_per_s"]
                    results.append(r)
                    emit(r)
            if "worker" in args.modes:
                for n in args.workers:
                    r = run_worker(bench, n, frames[: args.captions], args.batch_size,
                                   args.worker_threads)
                    base = next(x for x in results + [r] if x["mode"] == "worker")
                    r["ratio_vs_first"] = r["captions_per_s"] / base["captions_per_s"]
                    results.append(r)
                    emit(r)
        finally:
            bench.close()
    emit({"mode": "summary", "loadavg": list(os.getloadavg()),
          "ingest": {r["replicas"]: round(r["ratio_vs_first"], 2) for r in results if r["mode"] == "ingest"},
          "worker": {r["workers"]: round(r["ratio_vs_first"], 2) for r in results if r["mode"] == "worker"},
          "lost": sum(r.get("frames", 0) - r.get("acked", r.get("captioned", 0)) for r in results),
          "duplicates": sum(r.get("duplicates", 0) for r in results)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
