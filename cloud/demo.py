"""``framecap demo``: the whole pipeline on one video with the local stack, in one process.

It starts mosquitto and SeaweedFS (:class:`common.stack.LocalStack`, with passwords and ACLs),
the ingest (:class:`cloud.ingest.IngestService`), the caption worker
(:class:`cloud.worker.CaptionWorker`, the committed default model unless ``--model``), the web
pages (:class:`cloud.web.server.WebServer`, with a ``demo`` account made for this run) and the
edge daemon (:class:`edge.daemon.EdgeDaemon`) on the video; prints the web URL, then each caption
as it comes back to the edge; ends with one JSON line::

    {"frames_sampled": N, "frames_stored": N, "captions": N, "captions_indexed": N,
     "bucket": "framecap", "elapsed_s": T}

and stops everything it started (``--keep-stack`` leaves the servers up for a look with
``framecap stack status --state-dir STATE/stack``). With ``--serve`` it keeps the stack, ingest,
worker and web running instead: once the captions are in the web index it prints one more JSON
line ``{"web_url": ..., "username": "demo", "password": ...}`` and waits for Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from common.cli import check_checkpoint, error_line, format_caption_line
from common.config import (
    EdgeConfig,
    IngestConfig,
    SamplingConfig,
    SpoolConfig,
    WorkerConfig,
)
from common.messages import CaptionRecord
from common.topics import CAPTIONS_PREFIX, FRAMES_PREFIX, validate_id

if TYPE_CHECKING:  # imported when the demo runs: edge and cloud pull in OpenCV, boto3, torch
    from cloud.web.server import WebServer
    from common.stack import LocalStack
    from common.storage import ObjectStore
    from edge.daemon import EdgeDaemon, EdgeSummary

logger = logging.getLogger(__name__)

class _Stoppable(Protocol):
    """What the demo stops at the end: the ingest, the worker, the web server."""

    def stop(self) -> None: ...


SOURCE_ENV = "FRAMECAP_DEMO_SOURCE"
DEFAULT_STATE_DIR = Path(".state/demo")
# A development checkout (this file under a git work tree) beside the project's shared sample
# data captions this video when neither --source nor $FRAMECAP_DEMO_SOURCE is given; an
# installed framecap has no such default.
_CHECKOUT = Path(__file__).resolve().parents[1]
_CHECKOUT_VIDEO = _CHECKOUT.parent / "shared" / "videos" / "vtest.avi"


def default_source() -> str | None:
    """``$FRAMECAP_DEMO_SOURCE``, else a development checkout's sample video, else None."""
    if os.environ.get(SOURCE_ENV):
        return os.environ[SOURCE_ENV]
    if (_CHECKOUT / ".git").exists() and _CHECKOUT_VIDEO.is_file():
        return str(_CHECKOUT_VIDEO)
    return None


def source_problem(source: str) -> str | None:
    """Why ``source`` cannot be a video source, when it names a file that is not one (missing,
    a directory); None for a file, a camera index, a URL or a GStreamer pipeline."""
    if source.isdigit() or "://" in source or "!" in source:
        return None
    path = Path(source)
    if path.is_dir():
        return f"--source {source}: is a directory, not a video file"
    if not path.exists():
        return (f"--source {source}: no such video file (or give a camera index, an RTSP URL "
                "or a GStreamer pipeline)")
    return None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="framecap demo",
        description="Run the whole pipeline (edge -> MQTT -> ingest -> S3 -> caption worker -> "
        "captions back to the edge) on a video, with a local mosquitto and SeaweedFS.",
        epilog="Examples: framecap demo; framecap demo --source cup.mp4 --max-frames 10; "
        "framecap demo --source 0 (camera index; stop with Ctrl-C); framecap demo --source "
        "rtsp://host/stream",
    )
    p.add_argument("--source", default=None,
                   help=f"video file, camera index, RTSP URL or GStreamer pipeline "
                   f"(default: ${SOURCE_ENV})")
    p.add_argument("--max-frames", type=int, default=12, metavar="N",
                   help="stop after sampling N frames (default 12; 0 = the whole source)")
    p.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="send at most one frame per S seconds of video (default 2)")
    p.add_argument("--no-scene-change", action="store_true",
                   help="sample by interval only (default: also skip unchanged scenes)")
    p.add_argument("--device-id", default="demo-cam", help="the edge device's id (default demo-cam)")
    p.add_argument("--model", type=Path, default=None, help="caption model checkpoint (default: the committed model)")
    p.add_argument("--beam-size", type=int, default=3, help="beam width (default 3)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help=f"where the stack, spool and captions.jsonl go (default {DEFAULT_STATE_DIR})")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="give up waiting for acks, then captions, after S seconds each (default 300)")
    p.add_argument("--keep-stack", action="store_true", help="leave mosquitto and SeaweedFS running")
    p.add_argument("--serve", action="store_true",
                   help="after the video, keep the stack, ingest, worker and web pages running until Ctrl-C "
                   "(prints the web URL and a demo login as one JSON line)")
    p.add_argument("--web-port", type=int, default=8080, metavar="PORT",
                   help="port of the web pages on 127.0.0.1 (default 8080; a free one if it is taken)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the services' INFO logs and the traceback of an error (default: warnings only)")
    return p


def _print_caption(record: CaptionRecord) -> None:
    """FRAME_ID<TAB>CAPTION<TAB>SCORE, as ``framecap caption`` and ``framecap edge`` print."""
    print(format_caption_line(record.frame_id, record.caption, record.score, record.error), flush=True)


def _count(store: ObjectStore, prefix: str, frame_ids: set[str]) -> int:
    """Objects under ``prefix`` of this run's frames (the state dir's bucket keeps earlier runs')."""
    return sum(1 for key in store.list_keys(prefix) if key.rsplit("/", 1)[-1].rsplit(".", 1)[0] in frame_ids)


def run_demo(args: argparse.Namespace) -> dict[str, object]:
    """Start everything, run the edge over the source, stop everything; returns the summary.

    Raises:
        common.stack.StackError: mosquitto or SeaweedFS could not start.
        ImportError: an extra the demo needs is not installed.
    """
    # everything it needs is imported before any server starts: a missing extra stops it here
    from cloud.ingest import IngestService
    from cloud.web.server import WebServer  # noqa: F401
    from cloud.worker import CaptionWorker
    from common.stack import LocalStack
    from edge.daemon import EdgeDaemon

    source = args.source
    device_id = validate_id(args.device_id, "device_id")
    state = args.state_dir.resolve()
    shutil.rmtree(state / "spool", ignore_errors=True)  # a demo starts from an empty spool
    started = time.monotonic()
    stack = LocalStack(state / "stack", devices=[device_id])
    print(f"starting mosquitto and SeaweedFS under {stack.state_dir} ...", flush=True)
    stack.up()
    print(f"MQTT mqtt://{stack.host}:{stack.mqtt_port}  S3 {stack.s3_endpoint}  "
          f"bucket {stack.bucket}", flush=True)
    services: list[_Stoppable] = []  # stopped in reverse order
    try:
        ingest = IngestService(IngestConfig(mqtt=stack.mqtt_config("ingest"), s3=stack.s3_config(role="ingest")))
        ingest.start()
        services.append(ingest)
        worker = CaptionWorker(WorkerConfig(
            mqtt=stack.mqtt_config("worker"), s3=stack.s3_config(role="worker"), model=args.model,
            beam_size=args.beam_size, batch_size=8, max_wait_s=0.5, list_interval_s=10.0))
        print("loading the caption model ...", flush=True)
        worker.start()
        services.append(worker)
        web, password = _start_web(stack, state, args)
        services.append(web)
        print(f"web: {web.url}  (user demo, password {password}; captions appear live at {web.url}/live)",
              flush=True)
        edge_config = EdgeConfig(
            device_id=device_id, source=source, max_frames=args.max_frames or None,
            mqtt=stack.mqtt_config(device_id),
            sampling=SamplingConfig(interval_s=args.interval, scene_change=not args.no_scene_change),
            spool=SpoolConfig(directory=state / "spool"),
            captions_jsonl=state / "captions.jsonl",
            drain_timeout_s=args.timeout, wait_for_captions_s=args.timeout,
        )
        sampled: set[str] = set()
        edge = EdgeDaemon(edge_config, on_caption=_print_caption, print_captions=False,
                          on_spooled=lambda metadata: sampled.add(metadata.frame_id))
        print(f"edge {device_id}: capturing {source}", flush=True)
        summary = _run_edge(edge)
        store = stack.storage()
        captions = _count(store, f"{CAPTIONS_PREFIX}{device_id}/", sampled)
        result = {
            "frames_sampled": summary.frames_sampled,
            "frames_stored": _count(store, f"{FRAMES_PREFIX}{device_id}/", sampled),
            "captions": captions,
            "captions_indexed": _wait_indexed(web, device_id, sampled, captions, args.timeout),
            "bucket": stack.bucket,
            "elapsed_s": round(time.monotonic() - started, 1),
        }
        if args.serve:
            print(json.dumps(result), flush=True)
            print(json.dumps({"web_url": web.url, "username": "demo", "password": password}), flush=True)
            _wait_for_interrupt()
        return result
    finally:
        for service in reversed(services):
            service.stop()
        if args.keep_stack:
            print(f"stack left running: framecap stack down --state-dir {stack.state_dir}")
        else:
            stack.down()


def _start_web(stack: LocalStack, state: Path, args: argparse.Namespace) -> tuple[WebServer, str]:
    """``framecap web`` in this process on 127.0.0.1 (``--web-port``, else a free port), with
    an admin account ``demo`` and a new password; returns the running server and the password."""
    import secrets

    from cloud.web.auth import add_user
    from cloud.web.server import WebServer
    from common.config import WebConfig
    from common.stack import port_is_free

    web_state = state / "web"
    password = secrets.token_urlsafe(12)
    add_user(web_state / "accounts.yaml", "demo", password, "admin")
    port = args.web_port if args.web_port and port_is_free(args.web_port) else 0
    config = WebConfig(mqtt=stack.mqtt_config("web"), s3=stack.s3_config(role="web"), host="127.0.0.1", port=port,
                       state_dir=web_state, model=args.model, widening=args.serve)
    server = WebServer(config, log_level="info" if args.verbose else "warning")
    server.start()
    return server, password


def _wait_indexed(web: WebServer, device_id: str, frame_ids: set[str], expected: int, timeout_s: float) -> int:
    """How many of this run's captions the web index holds, waiting (at most ``timeout_s``)
    until all ``expected`` are in."""
    from datetime import datetime, timezone

    def indexed() -> int:
        now = datetime.now(timezone.utc)
        docs = web.ctx.index.timeline(device_id, datetime(1970, 1, 1, tzinfo=timezone.utc), now, limit=100_000)
        return sum(1 for doc in docs if doc.frame_id in frame_ids)

    deadline = time.monotonic() + timeout_s
    count = indexed()
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        count = indexed()
    return count


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C (SIGINT) or SIGTERM."""
    import signal

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("serving until Ctrl-C ...", flush=True)
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    print("stopping ...", flush=True)


def _run_edge(edge: EdgeDaemon) -> EdgeSummary:
    """Run the edge on another thread; Ctrl-C (on this one) asks it to stop cleanly."""
    result: list[EdgeSummary] = []
    thread = threading.Thread(target=lambda: result.append(edge.run()), name="edge")
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        edge.request_stop()
        thread.join()
    return result[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``framecap demo``: 0 when every sampled frame was stored and captioned;
    1 when not, or when something failed (one line on stderr; ``-v`` adds the traceback); 2 on
    a bad option (no source, a source or model path that is missing or a directory)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args.source = args.source or default_source()
    if not args.source:
        parser.exit(2, "framecap demo: no video to caption: give --source (a video file, camera "
                    f"index, RTSP URL or GStreamer pipeline) or set ${SOURCE_ENV}\n")
    problem = source_problem(args.source)
    if problem is None and args.model is not None:
        problem = check_checkpoint(args.model)
    if problem is not None:
        parser.exit(2, f"framecap demo: {problem}\n")
    try:
        result = run_demo(args)
    except ImportError:
        raise  # framecap's entry point names the extra to install
    except Exception as err:  # noqa: BLE001 - one line for the user, the traceback with -v
        logger.debug("framecap demo failed", exc_info=True)
        hint = "" if args.verbose else " (-v shows the details)"
        print(f"framecap demo: {type(err).__name__}: {error_line(err)}{hint}", file=sys.stderr)
        return 1
    if not args.serve:  # --serve printed it before it waited
        print(json.dumps(result), flush=True)
    ok = result["frames_sampled"] == result["frames_stored"] == result["captions"] == result["captions_indexed"]
    return 0 if ok and result["frames_sampled"] else 1
