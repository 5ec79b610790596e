"""One ``framecap web`` process, as an object: index, accounts, rules, feed, alerts, HTTP server.

:class:`WebServer` is what ``framecap web serve`` runs (with signal handling around it) and what
``framecap demo --serve`` runs beside the pipeline in one process::

    server = WebServer(config)
    server.start()          # binds host:port (0: a free port), starts feed, alerts and uvicorn
    print(server.url)
    ...
    server.stop()

The HTTP server runs on a thread of its own (uvicorn handles no signals there); the feed reindexes
from S3 in the background at start when ``config.reindex_at_start``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from common.config import WebConfig

logger = logging.getLogger(__name__)


class WebStartError(RuntimeError):
    """The web process cannot start (port taken, index or accounts unreadable); says why."""


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def load_rules(config: WebConfig, index: Any, accounts: Any) -> None:
    """Save the rules of ``config.rules_file`` into the index (same id: replaced)."""
    if config.rules_file is None:
        return
    from cloud.web.alerts import load_rules_file

    rules = load_rules_file(config.rules_file)  # validated at start: RulesFileError is unlikely
    for rule in rules:
        if accounts.get(rule.owner) is None:
            logger.error("rule %s from %s belongs to %r, which is no account: it will see no device",
                         rule.rule_id, config.rules_file, rule.owner)
        index.save_rule(rule)
    logger.info("%d alert rules loaded from %s", len(rules), config.rules_file)


def optional_services(config: WebConfig) -> tuple[Any, Any]:
    """The query widener and the attention service, each None if it cannot be made."""
    widener = attention = None
    if config.widening:
        try:
            from cloud.web.widening import QueryWidener

            widener = QueryWidener.for_model(config.model)
        except Exception:  # noqa: BLE001 - search works without widening
            logger.exception("query widening is off")
    try:
        from cloud.web.attention import AttentionService

        attention = AttentionService(config.model, cache_dir=config.state_dir / "attention")
    except Exception:  # noqa: BLE001 - pages work without attention maps
        logger.exception("attention maps are off")
    return widener, attention


class WebServer:
    """Everything one web process runs, started and stopped as one.

    Args:
        config: the validated :class:`~common.config.WebConfig`.
        log_level: uvicorn's log level (``info``; the demo passes ``warning``).

    Attributes (after :meth:`start`): ``url`` (``http://host:port``), ``ctx`` (the app's
    :class:`~cloud.web.deps.WebContext`), ``feed``, ``alerts``, ``index``.
    """

    def __init__(self, config: WebConfig, *, log_level: str = "info") -> None:
        self.config = config
        self.log_level = log_level
        self.url = ""
        self._sock: socket.socket | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.index: Any = None
        self.feed: Any = None
        self.alerts: Any = None
        self.live: Any = None
        self.ctx: Any = None

    @property
    def running(self) -> bool:
        """True while the HTTP server thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = 30.0) -> None:
        """Bind, open the index, load accounts and rules, start the feed (and a background
        reindex), the alert manager and the HTTP server; returns once it accepts requests.

        Raises:
            WebStartError: the port, the index, the accounts or the rules file failed.
        """
        import uvicorn

        from cloud.web.alerts import AlertManager, RulesFileError
        from cloud.web.app import create_app
        from cloud.web.auth import Accounts, AccountsError
        from cloud.web.deps import WebContext
        from cloud.web.feed import CaptionFeed
        from cloud.web.index import CaptionIndexError, open_index
        from cloud.web.live import LiveHub
        from cloud.web.metrics import WebMetrics

        config = self.config
        try:
            session_secret = config.session_secret_value().get_secret_value()
            self._sock = listen(config.host, config.port)
        except OSError as err:
            raise WebStartError(f"cannot start on {config.host}:{config.port}: {err.strerror or err}") from err
        try:
            self.index = open_index(config.index_location())
        except CaptionIndexError as err:
            self._close_socket()
            raise WebStartError(f"cannot open the index {config.index_display()}: {err}") from err
        try:
            if config.accounts_path.exists():
                accounts = Accounts.load(config.accounts_path)
            else:
                accounts = Accounts(path=config.accounts_path)
                logger.warning("no accounts file %s: nobody can log in; add one with: "
                               "framecap web add-user NAME --role admin", config.accounts_path)
            load_rules(config, self.index, accounts)
        except (AccountsError, CaptionIndexError, RulesFileError) as err:
            self._close_socket()
            self.index.close()
            raise WebStartError(str(err)) from err

        metrics, live = WebMetrics(), LiveHub()
        widener, attention = optional_services(config)
        feed = CaptionFeed(config, self.index, on_new=[live.publish], metrics=metrics)
        alerts = AlertManager(self.index, feed.client, feed.topics, widener=widener,
                              webhook_secret=config.webhook_secret, public_url=config.base_url,
                              accounts=accounts, metrics=metrics)
        feed.add_listener(alerts.check)
        self.ctx = WebContext(
            index=self.index, accounts=accounts, session_secret=session_secret, store=feed.store,
            live=live, attention=attention, widener=widener, feed_status=feed.feed_status,
            alert_rules_changed=alerts.invalidate_rules, public_url=config.public_url,
            https_only=config.https_only_cookies, metrics=metrics)
        self.feed, self.alerts, self.live = feed, alerts, live
        self._server = uvicorn.Server(uvicorn.Config(
            create_app(self.ctx), log_level=self.log_level, access_log=False, timeout_graceful_shutdown=5,
            log_config=None))
        feed.start()
        if config.reindex_at_start:
            feed.reindex_in_background()

        def warm() -> None:  # load the widening encoder and compile the rules before they are needed
            try:
                if widener is not None:
                    widener.warm()
                alerts.warm()
            except Exception:  # noqa: BLE001 - both load lazily again on first use
                logger.exception("warming the query widener and alert rules failed")

        threading.Thread(target=warm, name="web-warm", daemon=True).start()
        sock = self._sock
        self._thread = threading.Thread(target=lambda: self._server.run(sockets=[sock]),
                                        name="web-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise WebStartError("the HTTP server did not start (see the log above)")
            time.sleep(0.02)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        logger.info("framecap web on %s (index %s, MQTT %s:%d as %s, prefix %s)", self.url,
                    config.index_display(), config.mqtt.host, config.mqtt.port, config.mqtt.username,
                    config.mqtt.topic_prefix)

    def stop(self) -> None:
        """Stop the HTTP server (open live streams end first), the feed, alerts and the index."""
        logger.info("framecap web: stopping")
        if self.live is not None:
            self.live.close()  # end the open live streams now, so shutdown does not wait on them
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        if self.feed is not None:
            self.feed.stop()
        if self.alerts is not None:
            self.alerts.close()
        if self.index is not None:
            self.index.close()
        self._close_socket()
        logger.info("framecap web: stopped")

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
