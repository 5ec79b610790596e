"""``framecap edge``: capture, sample, encode, spool and publish the frames of one device.

Threads: a capture thread runs source -> :class:`FrameSampler` -> :func:`encode_jpeg` ->
:meth:`FrameSpool.put` and wakes the :class:`FramePublisher`, whose own thread does all the
network work; so the capture loop never waits on the network. A live source never waits at
all (a full spool drops its oldest frames); a video file, which can wait, pauses while the
spool is full, so batch runs over long files lose nothing. The thread that calls
:meth:`EdgeDaemon.run` waits for the end: a stop request (SIGINT/SIGTERM), or the end of a video
file (or ``max_frames``) followed by every frame acked or ``drain_timeout_s`` passed (frames not
acked stay in the spool for the next run).

Embedding (``framecap demo`` runs it in-process)::

    daemon = EdgeDaemon(load_config(EdgeConfig, "edge.yaml"))
    summary = daemon.run()          # blocks; daemon.request_stop() from another thread ends it
    print(summary.to_json())
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.config import ConfigError, EdgeConfig, load_config, missing_files
from common.messages import CaptionRecord, FrameMetadata
from common.topics import validate_id
from edge.capture import CapturedFrame, FrameSource, SourceError
from edge.encoding import EncodingError, JpegEncoder
from edge.gstreamer import check_source_backend
from edge.publisher import FramePublisher
from edge.sampling import FrameSampler, SampleDecision
from edge.spool import FrameSpool, FsyncPolicy, SpoolError

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("device_id", "frames_read", "frames_sampled", "frames_acked", "frames_dropped",
                "captions_received", "elapsed_s")


def make_frame_id(captured_at: datetime, seq: int) -> str:
    """``{YYYYMMDDTHHMMSSmmm}Z-{seq:06d}`` from the UTC capture time; safe for topics and keys.

    Unique per device because ``seq`` never repeats within a spool's life.

    Raises:
        ValueError: ``captured_at`` is naive or ``seq`` is negative.
    """
    if captured_at.tzinfo is None:
        raise ValueError("captured_at must be timezone-aware")
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")
    utc = captured_at.astimezone(timezone.utc)
    return validate_id(f"{utc:%Y%m%dT%H%M%S}{utc.microsecond // 1000:03d}Z-{seq:06d}", "frame_id")


@dataclass
class EdgeSummary:
    """What a run did; :meth:`to_json` is the one-line summary ``framecap edge`` prints.

    ``frames_pending`` frames were left in the spool (not acked); ``frames_rejected`` were
    refused for good by the ingest (its reason logged) and dropped from the spool; ``drained``
    is True when the source ended and every frame was acked or rejected; ``publishes_refused`` counts frame publishes the
    broker refused (MQTT v5 PUBACK failure, e.g. "not authorized": those frames stay in the
    spool and are retried); ``caption_latency_p50_ms``/``_p95_ms`` are the median and 95th
    percentile of capture -> caption back at the edge (``received_at - captured_at`` of the
    captions this run received, milliseconds; None without captions); ``error`` says why the
    run failed, if it did.
    """

    device_id: str
    frames_read: int = 0
    frames_sampled: int = 0
    frames_acked: int = 0
    frames_dropped: int = 0
    captions_received: int = 0
    elapsed_s: float = 0.0
    frames_pending: int = 0
    frames_rejected: int = 0  # frames the ingest refused for good (bad JPEG, too large, ...)
    publishes_refused: int = 0  # publishes the broker refused (not delivered; frames kept)
    caption_latency_p50_ms: float | None = None  # capture -> caption at the edge, median
    caption_latency_p95_ms: float | None = None  # capture -> caption at the edge, 95th percentile
    drained: bool = False
    stopped: bool = False
    source_ended_early: bool = False  # a video file gave fewer frames than it announced
    error: str | None = None

    @property
    def exit_code(self) -> int:
        """0: drained or stopped on request; 1: an error, or the drain timed out."""
        if self.error is not None:
            return 1
        return 0 if self.drained or self.stopped else 1

    def to_json(self) -> str:
        """One JSON line with the counters (the keys of :data:`SUMMARY_KEYS` first)."""
        data = asdict(self)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        for key in ("caption_latency_p50_ms", "caption_latency_p95_ms"):
            if data[key] is not None:
                data[key] = round(data[key], 1)
        if data["error"] is None:
            del data["error"]
        return json.dumps(data)


class EdgeDaemon:
    """One device's capture -> spool -> MQTT pipeline; :meth:`run` once per object.

    Args:
        config: the validated edge config.
        on_caption: called with each caption that comes back (on the publisher's thread).
        print_captions: print ``HH:MM:SS frame_id caption`` lines to stdout.
        on_spooled: called with each sampled frame's metadata once it is durably spooled (on
            the capture thread; must return quickly): the edge's record of what it sampled.
        source_factory: builds the frame source from the config and the capture stop event
            (embedding and tests: e.g. a live source); :meth:`make_source` when None.
        spool_fsync: the spool's fsync policy, ``"interval"`` (a power cut loses at most the
            frames of the last ``spool_fsync_interval_s`` not yet acked; a crash nothing) or
            ``"always"`` (two fsyncs a frame); see :mod:`edge.spool`.
        spool_fsync_interval_s: seconds, for ``"interval"``.
    """

    def __init__(
        self,
        config: EdgeConfig,
        *,
        on_caption: Callable[[CaptionRecord], None] | None = None,
        print_captions: bool = True,
        on_spooled: Callable[[FrameMetadata], None] | None = None,
        source_factory: Callable[[EdgeConfig, threading.Event], FrameSource] | None = None,
        spool_fsync: FsyncPolicy | None = None,
        spool_fsync_interval_s: float | None = None,
    ) -> None:
        self._spool_fsync: FsyncPolicy = config.spool.fsync if spool_fsync is None else spool_fsync
        self._spool_fsync_interval_s = (config.spool.fsync_interval_s if spool_fsync_interval_s is None
                                        else spool_fsync_interval_s)
        self._encoder = JpegEncoder(config.encoding)
        self.config = config
        self.on_spooled = on_spooled
        self._source_factory = source_factory or self.make_source
        self.device_id = config.device_id
        self.on_caption = on_caption
        self.print_captions = print_captions
        self._stop_requested = threading.Event()
        self._capture_stop = threading.Event()
        self._capture_done = threading.Event()
        self._summary = EdgeSummary(device_id=config.device_id)
        self._spool: FrameSpool | None = None
        self._publisher: FramePublisher | None = None
        self._started = 0.0

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop soon and cleanly (thread- and signal-safe)."""
        self._stop_requested.set()
        self._capture_stop.set()

    def summary(self) -> EdgeSummary:
        """The counters now (a copy; also valid while running)."""
        s = self._summary
        if self._spool is not None:
            s.frames_dropped = self._spool.dropped
            s.frames_pending = len(self._spool)
        if self._publisher is not None:
            s.frames_acked = self._publisher.stats.acked
            s.frames_rejected = self._publisher.stats.rejected
            s.captions_received = self._publisher.stats.captions_received
            s.publishes_refused = self._publisher.stats.refused
            s.caption_latency_p50_ms, s.caption_latency_p95_ms = (
                self._publisher.caption_latency_ms())
        if self._started:
            s.elapsed_s = time.monotonic() - self._started
        return EdgeSummary(**asdict(s))

    def run(self) -> EdgeSummary:
        """Run until stopped, or until a file source has ended and drained; never raises."""
        self._started = time.monotonic()
        cfg = self.config
        try:
            self._spool = FrameSpool(cfg.spool.directory, cfg.device_id,
                                     max_frames=cfg.spool.max_frames, max_bytes=cfg.spool.max_bytes,
                                     fsync=self._spool_fsync,
                                     fsync_interval_s=self._spool_fsync_interval_s)
        except (SpoolError, OSError) as err:
            self._summary.error = str(err)
            logger.error("%s: %s", self.device_id, err)
            return self.summary()
        source = self._source_factory(cfg, self._capture_stop)
        if not source.is_live and not Path(cfg.source).is_file():
            self._summary.error = f"{cfg.device_id}: video file {cfg.source!r} does not exist"
            logger.error("%s", self._summary.error)
            return self.summary()
        self._publisher = FramePublisher(
            cfg.device_id, cfg.mqtt, self._spool,
            resend_after_s=cfg.spool.resend_after_s, reconnect_grace_s=cfg.spool.reconnect_grace_s,
            overtaken_grace_s=cfg.spool.overtaken_grace_s, captions_jsonl=cfg.captions_jsonl,
            captions_jsonl_max_bytes=cfg.captions_jsonl_max_bytes,
            on_caption=self.on_caption, print_captions=self.print_captions,
            track_captions=cfg.wait_for_captions_s > 0,
        )
        self._publisher.start()
        capture = threading.Thread(target=self._capture, args=(source,), name="capture", daemon=True)
        capture.start()
        try:
            self._wait_capture()
            if not self._stop_requested.is_set() and self._summary.error is None:
                self._drain()
        finally:
            self._capture_stop.set()
            capture.join(timeout=10)
            self._publisher.stop()
            self._close_spool()
        summary = self.summary()
        summary.stopped = self._stop_requested.is_set()
        logger.info("%s: finished: %s", self.device_id, summary.to_json())
        return summary

    def _close_spool(self) -> None:
        """Make the frames left in the spool durable and record the exact next seq."""
        if self._spool is None:
            return
        try:
            self._spool.close()
        except OSError as err:
            logger.error("%s: spool %s: cannot sync it at exit: %s", self.device_id,
                         self.config.spool.directory, err)

    @staticmethod
    def make_source(cfg: EdgeConfig, stop_event: threading.Event) -> FrameSource:
        """The :class:`FrameSource` of ``cfg.source`` (reopen backoff, file pacing) that ends when
        ``stop_event`` is set."""
        return FrameSource(cfg.source, reopen_min_s=cfg.reopen_min_s, reopen_max_s=cfg.reopen_max_s,
                           stop_event=stop_event, label=cfg.device_id,
                           playback_speed=cfg.playback_speed)

    def _wait_capture(self) -> None:
        while not self._stop_requested.is_set() and not self._capture_done.wait(0.2):
            pass

    def _drain(self) -> None:
        """Wait until every spooled frame is acked, a stop request, or drain_timeout_s."""
        assert self._spool is not None
        deadline = time.monotonic() + self.config.drain_timeout_s
        pending = len(self._spool)
        logger.info("%s: source done; waiting up to %.0f s for %d frames to be acked",
                    self.device_id, self.config.drain_timeout_s, pending)
        while pending and not self._stop_requested.is_set() and time.monotonic() < deadline:
            self._stop_requested.wait(0.1)
            pending = len(self._spool)
        if pending == 0:
            self._summary.drained = True
            logger.info("%s: every frame acked; spool empty", self.device_id)
            self._wait_for_captions()
        elif not self._stop_requested.is_set():
            logger.warning("%s: drain timeout (%.0f s): %d frames not acked stay in the spool %s",
                           self.device_id, self.config.drain_timeout_s, pending,
                           self.config.spool.directory)
            assert self._publisher is not None
            client = self._publisher.client
            if not client.is_connected and client.last_connect_error:
                logger.error("%s: the broker %s:%d was not reached: %s", self.device_id,
                             client.config.host, client.config.port, client.last_connect_error)
            refused = self._publisher.stats.refused
            if refused:
                logger.error("%s: the broker refused %d publishes (%s); check that the MQTT user "
                             "name is the device_id and topic_prefix matches the broker's ACL",
                             self.device_id, refused, self._publisher.last_refusal)

    def _wait_for_captions(self) -> None:
        """Wait up to wait_for_captions_s for the caption of every frame acked in this run
        (spooled by an earlier run included; frames a full spool dropped never get one)."""
        assert self._publisher is not None
        wait_s = self.config.wait_for_captions_s
        if wait_s <= 0:
            return
        deadline = time.monotonic() + wait_s
        while (self._publisher.captions_pending()
               and not self._stop_requested.is_set() and time.monotonic() < deadline):
            self._stop_requested.wait(0.1)
        missing = self._publisher.captions_pending()
        if missing:
            logger.warning("%s: %d of %d acked frames still have no caption after %.0f s",
                           self.device_id, missing, self._publisher.stats.acked, wait_s)

    # -- capture thread ------------------------------------------------------------------
    def _capture(self, source: FrameSource) -> None:
        sampler = FrameSampler(self.config.sampling)
        try:
            for frame in source.frames():
                self._summary.frames_read += 1
                decision = sampler.offer(frame.image, frame.timestamp_s)
                if not decision.send:
                    logger.debug("%s: frame %d at %.3f s skipped (%s)", self.device_id,
                                 frame.index, frame.timestamp_s, decision.reason)
                    continue
                if not source.is_live:
                    self._wait_for_room()
                if self._spool_frame(frame, decision):
                    self._summary.frames_sampled += 1
                limit = self.config.max_frames
                if limit is not None and self._summary.frames_sampled >= limit:
                    logger.info("%s: max_frames=%d sampled; capture ends", self.device_id, limit)
                    break
            self._summary.source_ended_early = source.ended_early
        except SourceError as err:
            self._summary.error = str(err)
            logger.error("%s", err)
        except Exception as err:  # noqa: BLE001 - report, then let run() stop cleanly
            self._summary.error = f"capture failed: {err}"
            logger.exception("%s: capture failed", self.device_id)
        finally:
            self._capture_done.set()

    def _wait_for_room(self) -> None:
        """A file can wait: pause reading while the spool is full instead of dropping frames."""
        assert self._spool is not None
        # the largest entry (JPEG cap plus header), but never more than an empty spool holds
        size = min(self.config.encoding.max_bytes + 4096, self._spool.max_bytes)
        if self._spool.has_room(size):
            return
        logger.info("%s: spool full; pausing the video file until frames are acked", self.device_id)
        while not self._spool.has_room(size) and not self._capture_stop.wait(0.05):
            pass

    def _spool_frame(self, frame: CapturedFrame, decision: SampleDecision) -> bool:
        """Encode and spool one sampled frame; False (logged) if it could not be."""
        assert self._spool is not None and self._publisher is not None
        try:
            encoded = self._encoder.encode(frame.image)
            seq = self._spool.allocate_seq()
            frame_id = make_frame_id(frame.captured_at, seq)
            metadata = FrameMetadata(
                device_id=self.device_id, frame_id=frame_id, captured_at=frame.captured_at,
                seq=seq, width=encoded.width, height=encoded.height,
                sha256=_sha256(encoded.jpeg),
            )
            self._spool.put(metadata, encoded.jpeg, verify=False)  # hashed just above
        except (EncodingError, SpoolError, OSError) as err:
            logger.error("%s: source frame %d at %.3f s not spooled: %s",
                         self.device_id, frame.index, frame.timestamp_s, err)
            return False
        logger.info("%s: frame %s sampled (%s, t=%.3f s) and spooled (%dx%d, q%d, %d bytes, "
                    "sha256 %s)", self.device_id, frame_id, decision.reason, frame.timestamp_s,
                    encoded.width, encoded.height, encoded.quality, len(encoded.jpeg),
                    metadata.sha256)
        self._publisher.notify()
        if self.on_spooled is not None:
            try:
                self.on_spooled(metadata)
            except Exception:  # noqa: BLE001 - a user hook must not stop the capture
                logger.exception("%s: frame %s: on_spooled hook failed", self.device_id, frame_id)
        return True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- command line --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``framecap edge`` argument parser."""
    p = argparse.ArgumentParser(
        prog="framecap edge",
        description="Capture frames from a camera, video file, RTSP URL or GStreamer pipeline; "
        "sample them by interval and scene change; spool them on disk; publish them over MQTT "
        "until the cloud acknowledges each; print the captions that come back. Options override "
        "the YAML config. The MQTT password comes from $FRAMECAP_MQTT_PASSWORD.",
    )
    p.add_argument("--config", metavar="EDGE_YAML",
                   help="edge config file (YAML) (default: none; the defaults and $FRAMECAP_* variables)")
    p.add_argument("--device-id", help="this device's id (letters, digits, '.', '_', '-') (required, here or in the file)")
    p.add_argument("--source", help="camera index ('0'), video file, rtsp://... URL, or a "
                   "GStreamer pipeline containing '!' (Jetson CSI: 'nvarguscamerasrc ! ... ! appsink') "
                   "(default: 0, the first camera)")
    p.add_argument("--mqtt-host", help="broker host (default: $FRAMECAP_MQTT_HOST, else 127.0.0.1)")
    p.add_argument("--mqtt-port", type=int, help="broker TCP port (default: $FRAMECAP_MQTT_PORT, else 1883)")
    p.add_argument("--mqtt-username", help="broker user name (default: $FRAMECAP_MQTT_USERNAME; "
                   "password: $FRAMECAP_MQTT_PASSWORD)")
    p.add_argument("--spool-dir", help="spool directory for frames not yet acknowledged (default: spool)")
    p.add_argument("--interval", type=float, metavar="S", help="send at most one frame per S seconds (default: 1)")
    p.add_argument("--scene-threshold", type=float, metavar="T",
                   help="skip frames whose grey-thumbnail mean absolute difference (0..1) to the "
                   "last frame sent is below T (default: 0.02)")
    p.add_argument("--no-scene-change", action="store_true",
                   help="sample by interval only (default: also skip unchanged scenes)")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after sampling N frames (default: no limit)")
    p.add_argument("--playback-speed", type=float, metavar="X",
                   help="read a video file at X times its frame rate (0: as fast as it decodes) (default: 0)")
    p.add_argument("--realtime", action="store_true",
                   help="read a video file in real time, as a camera delivers it (--playback-speed 1) (default: off)")
    p.add_argument("--captions-jsonl", metavar="FILE",
                   help="append each caption received to FILE (default: none)")
    p.add_argument("--drain-timeout", type=float, metavar="S",
                   help="after a video file ends, wait at most S seconds for every ack (default: 120)")
    p.add_argument("--wait-for-captions", type=float, metavar="S",
                   help="then wait at most S seconds for the captions of the frames sent (default: 0, don't wait)")
    p.add_argument("--validate-config", action="store_true",
                   help="check the config (and the files it names) and exit (default: off)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: INFO)")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted config keys set on the command line (None values are ignored by load_config)."""
    return {
        "device_id": args.device_id,
        "source": args.source,
        "mqtt.host": args.mqtt_host,
        "mqtt.port": args.mqtt_port,
        "mqtt.username": args.mqtt_username,
        "spool.directory": args.spool_dir,
        "sampling.interval_s": args.interval,
        "sampling.scene_threshold": args.scene_threshold,
        "sampling.scene_change": False if args.no_scene_change else None,
        "max_frames": args.max_frames,
        "playback_speed": 1.0 if args.realtime else args.playback_speed,
        "captions_jsonl": args.captions_jsonl,
        "drain_timeout_s": args.drain_timeout,
        "wait_for_captions_s": args.wait_for_captions,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``framecap edge``; returns the exit status (2: bad config)."""
    args = build_parser().parse_args(argv)
    # the log format names no process or thread: do not look them up for every record (a
    # getpid system call each; the capture thread logs every frame it spools)
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(EdgeConfig, args.config, overrides_from_args(args))
    except ConfigError as err:
        print(f"framecap edge: invalid config:\n{err}", file=sys.stderr)
        return 2
    problems = missing_files(config)
    if Path(config.source).is_dir():
        problems.append(f"source = {config.source!r}: is a directory, not a video file or camera")
    if problems:
        print("framecap edge: invalid config:\n" + "\n".join(problems), file=sys.stderr)
        return 2
    if (problem := check_source_backend(config.source)) is not None:
        print(f"framecap edge: {problem}", file=sys.stderr)
        return 2
    if args.validate_config:
        print(f"framecap edge: config OK (device {config.device_id}, source {config.source})")
        return 0
    daemon = EdgeDaemon(config)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, _frame: _on_signal(daemon, signum))
    try:
        summary = daemon.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(summary.to_json(), flush=True)
    return summary.exit_code


def _on_signal(daemon: EdgeDaemon, signum: int) -> None:
    logger.info("%s: signal %s: stopping", daemon.device_id, signal.Signals(signum).name)
    daemon.request_stop()
