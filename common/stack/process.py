"""Processes, ports and files of the local stack: :class:`StackError`, free ports, PID checks
and :class:`_Service`, one server process that the stack started."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # SeaweedFS listens for gRPC on each port + 10000


class StackError(RuntimeError):
    """The local stack cannot start, stop or be found; the message says which part and why."""


def port_is_free(port: int, host: str = HOST) -> bool:
    """True if a TCP listener could bind ``host:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_start() -> int:
    """First port of the kernel's ephemeral range (client sockets' local ports), 32768 if unknown."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def pick_port(*, grpc_too: bool = False, taken: Iterable[int] = (), host: str = HOST) -> int:
    """A free TCP port on ``host``, below the kernel's ephemeral range (so no client socket can
    take it while its server is down: a server restarted by ``stack up`` gets its old port back);
    with ``grpc_too`` port + 10000 is free (and below that range) as well.

    Raises:
        StackError: no free port after many tries.
    """
    avoid = set(taken)
    top = _ephemeral_start() - 1 - (GRPC_OFFSET if grpc_too else 0)
    if top < 12000:  # an unusual ephemeral range: fall back to the old span
        top = 39999
    for _ in range(500):
        port = random.randint(10000 if grpc_too else 20000, top)
        wanted = [port, port + GRPC_OFFSET] if grpc_too else [port]
        if any(p in avoid for p in wanted):
            continue
        if all(port_is_free(p, host) for p in wanted):
            return port
    raise StackError(f"no free TCP port found on {host}")


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def pid_alive(pid: int | None, needle: str | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when ``needle`` is given, its command line
    contains it (so a PID reused by another program after a reboot is not ours)."""
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    if state in ("Z", "X"):
        return False
    if needle is not None:
        cmd = _cmdline(pid)
        return cmd is not None and needle in cmd
    return True


def server_pids(program: str, needle: str) -> list[int]:
    """PIDs of running ``program`` processes (the basename of argv[0]) that have ``needle`` as an
    argument or as the value of a ``-flag=needle`` argument: the servers on one config or data
    directory, whoever started them (zombies have no command line and are not listed)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in args if a]
        if not words or os.path.basename(words[0]) != program:
            continue
        if any(w == needle or w.endswith("=" + needle) for w in words[1:]) and pid_alive(int(entry)):
            found.append(int(entry))
    return sorted(found)


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (0600), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file, or ``(no log)``."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class _Service:
    """One process of the stack: how to recognise it and how it was started."""

    name: str
    needle: str  # an argument that only our instance has (its config file or data directory)
    log: Path
    program: str = ""  # the binary's file name, to find our servers by command line
    pid: int | None = None
    stopped: bool = False  # stopped by us (down, stop, kill): not running is not "dead"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def running(self) -> bool:
        if self.proc is not None:
            # Our own child: poll() is the truth. Its command line is not checked, because
            # between fork and exec it is still Python's (that race made a healthy start
            # look like "exited at start" on a loaded machine).
            return self.proc.poll() is None and pid_alive(self.proc.pid)
        return pid_alive(self.pid, self.needle)

    def state(self) -> str:
        """``running``; ``stopped`` (never started, or stopped by the stack); or ``dead``: it was
        started and its PID is gone without the stack stopping it (killed, crashed)."""
        if self.running():
            return "running"
        return "dead" if self.pid and not self.stopped else "stopped"

    def others(self) -> list[int]:
        """PIDs of servers on our config/data that are not the process we know of."""
        if not self.program:
            return []
        mine = self.proc.pid if self.proc is not None else self.pid
        return [p for p in server_pids(self.program, self.needle) if p != mine]

    def signal(self, sig: int) -> None:
        if self.running() and self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.05)
            if not self.running() and not self._exiting():
                return True
            time.sleep(0.05)
        return not self.running()

    def _exiting(self) -> bool:
        # A killed process loses its command line before it is gone (or a zombie): running()
        # already says False then, but its ports and files may still be held.
        pid = self.proc.pid if self.proc is not None else self.pid
        return pid_alive(pid)

    def stop(self, sig: int, timeout_s: float) -> float:
        """Send ``sig``; SIGKILL after ``timeout_s``. Returns the seconds it took."""
        t0 = time.monotonic()
        self.stopped = True
        if not self.running():
            return 0.0
        self.signal(sig)
        if not self.wait_gone(timeout_s):
            logger.info("%s (pid %s) still running %.0f s after signal %d: SIGKILL",
                        self.name, self.pid, timeout_s, sig)
            self.signal(signal.SIGKILL)
            self.wait_gone(10.0)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=1)
        return time.monotonic() - t0
