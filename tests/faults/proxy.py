"""A TCP proxy on 127.0.0.1 that a fault test can cut and restore: a link that fails.

:class:`TcpProxy` forwards every connection made to its port to ``target``. :meth:`TcpProxy.cut`
makes the link fail the way a lost uplink does: bytes in both directions are silently dropped
(neither end is told; an MQTT client keeps "connected" until its keepalive notices), and new
connections are accepted but go nowhere. :meth:`TcpProxy.restore` resets (RST) every connection
that lived through the cut, as a NAT or router that lost its state would, and forwards new
connections again, so clients reconnect over a working link.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_RECV_TIMEOUT_S = 0.2


def _reset(sock: socket.socket | None) -> None:
    """Abort ``sock`` with a TCP RST (SO_LINGER 0) instead of an orderly FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class _Link:
    """One client connection and (unless it arrived during a cut) its upstream connection."""

    client: socket.socket
    upstream: socket.socket | None
    closed: threading.Event = field(default_factory=threading.Event)
    cut: bool = False  # lived through a cut: reset at restore

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            _reset(self.client)
            _reset(self.upstream)


class TcpProxy:
    """Forward ``127.0.0.1:{port}`` to ``target_host:target_port``, with a switch to cut it.

    Args:
        target_host: where connections go (the broker).
        target_port: its port.

    Attributes:
        port: the proxy's own port (free, chosen at :meth:`start`).
        connections: how many client connections were accepted in all.
        dropped_bytes: bytes thrown away while cut.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0
        self.dropped_bytes = 0
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> TcpProxy:
        """Listen on a free port and start forwarding; returns self."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(_RECV_TIMEOUT_S)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._thread.start()
        logger.info("proxy 127.0.0.1:%d -> %s:%d", self.port, *self.target)
        return self

    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    def cut(self) -> None:
        """From now on drop every byte both ways; connections stay open, silently dead."""
        with self._lock:
            self._cut.set()
            for link in self._links:
                link.cut = True
        logger.warning("proxy %d: link cut", self.port)

    def restore(self) -> None:
        """Reset every connection that lived through the cut, then forward again."""
        with self._lock:
            dead = [link for link in self._links if link.cut]
            self._links = [link for link in self._links if not link.cut]
            self._cut.clear()
        for link in dead:
            link.close()
        logger.warning("proxy %d: link restored (%d dead connections reset, %d bytes dropped)",
                       self.port, len(dead), self.dropped_bytes)

    def close(self) -> None:
        """Stop listening and close every connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    # -- threads ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            upstream: socket.socket | None = None
            if not self._cut.is_set():
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError as err:
                    logger.warning("proxy %d: upstream %s:%d refused: %s", self.port, *self.target, err)
                    _reset(client)
                    continue
            link = _Link(client, upstream, cut=upstream is None)
            with self._lock:
                self._links.append(link)
            for src, dst in ((client, upstream), (upstream, client)):
                if src is not None:
                    threading.Thread(target=self._pump, args=(link, src, dst), daemon=True,
                                     name=f"proxy-pump-{self.port}").start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket | None) -> None:
        src.settimeout(_RECV_TIMEOUT_S)
        while not link.closed.is_set() and not self._stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            if link.cut or dst is None:
                self.dropped_bytes += len(data)
                continue
            try:
                dst.sendall(data)
            except OSError:
                break
        if not link.cut:  # an orderly end of a live connection: pass it on
            link.close()
