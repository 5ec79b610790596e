"""Alert rules checked against each new caption; delivery on MQTT and to webhooks.

A rule (:class:`~cloud.web.model.AlertRule`) is a saved search: a query in the search syntax
(:mod:`cloud.web.query`, widened like a search), the devices it watches (intersected with what
its owner may see), a minimum caption score and a cooldown. For each new caption
:meth:`AlertManager.check` evaluates every rule in Python (:func:`~cloud.web.query.match_caption`),
then asks the index to claim the alert (:meth:`~cloud.web.index.CaptionIndex.claim_alert`: once
per rule and frame across every replica, and consecutive matching frames of one device within
the cooldown fold into the first). A claimed alert is published as JSON
(:class:`~common.messages.AlertMessage`) with QoS 1 on ``{prefix}/{device_id}/alerts`` and, when
the rule has a webhook URL, POSTed there on a background thread:

- body: the same JSON bytes as the MQTT payload;
- ``X-Framecap-Signature: sha256=<hex HMAC-SHA256 of the body, keyed with webhook_secret>``
  (verify with :func:`verify_signature`; compare in constant time);
- ``X-Framecap-Timestamp``: Unix seconds when the POST was made;
- up to ``webhook_attempts`` tries with doubling backoff on a connection error, a 5xx or a 429;
  any other 4xx (or a redirect) is permanent: logged, counted, not retried.

:func:`load_rules_file` reads rules from YAML (a list of mappings, or ``{rules: [...]}``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from cloud.web.index import CaptionIndex, QueryError
from cloud.web.model import AlertEvent, AlertRule, CaptionDoc
from cloud.web.query import Query, apply_widenings, match_caption, parse_query, query_words
from common.messages import AlertMessage, AlertRuleRef
from common.topics import InvalidIdError, Topics, validate_id

if TYPE_CHECKING:
    from cloud.web.metrics import WebMetrics

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Framecap-Signature"
TIMESTAMP_HEADER = "X-Framecap-Timestamp"
FRAME_PATH = "/frames/{device_id}/{frame_id}"
"""Path of a frame's page, joined to the public URL for the ``url`` of an alert."""


class RulesFileError(ValueError):
    """A rules file that cannot be read or does not validate; the message names rule and key."""


class Publisher(Protocol):
    """What the manager needs of an MQTT client (:class:`common.mqtt.MqttClient`)."""

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False) -> Any: ...


class Widener(Protocol):
    """What the manager needs of :class:`cloud.web.widening.QueryWidener`."""

    def widen(self, words: list[str]) -> dict[str, list[str]]: ...


class AccountLookup(Protocol):
    """What the manager needs of :class:`cloud.web.auth.Accounts`: ``get(name)`` returning an
    account whose ``allowed`` is None (admin: every device) or a set of device ids."""

    def get(self, name: str) -> Any: ...


def sign(body: bytes, secret: str | bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``body`` keyed with ``secret`` (RFC 2104)."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header: str | None, secret: str | bytes) -> bool:
    """True if ``header`` (an ``X-Framecap-Signature`` value) signs ``body`` with ``secret``;
    compared in constant time. What a webhook receiver does."""
    return header is not None and hmac.compare_digest(header, sign(body, secret))


def frame_url(base_url: str | None, device_id: str, frame_id: str) -> str | None:
    """The link to a frame's page under ``base_url`` (None without one)."""
    if not base_url:
        return None
    path = FRAME_PATH.format(device_id=quote(device_id, safe=""), frame_id=quote(frame_id, safe=""))
    return base_url.rstrip("/") + path


def alert_message(rule: AlertRule, doc: CaptionDoc, matched_words: list[str],
                  base_url: str | None = None) -> AlertMessage:
    """The alert of ``rule`` on ``doc`` as published (and POSTed)."""
    return AlertMessage(
        rule=AlertRuleRef(id=rule.rule_id, name=rule.name),
        device_id=doc.device_id,
        frame_id=doc.frame_id,
        captured_at=doc.captured_at,
        caption=doc.caption,
        matched_words=matched_words,
        frame_key=doc.frame_key,
        caption_key=doc.caption_key,
        url=frame_url(base_url, doc.device_id, doc.frame_id),
    )


@dataclass(frozen=True)
class _Compiled:
    """A rule's query parsed and widened once (None query: a rule that matches everything)."""

    query: Query | None
    widenings: dict[str, list[str]]
    error: str | None = None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook that redirects is answered as the 3xx it is (permanent), never followed."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class AlertManager:
    """Checks each new caption against the rules and sends the alerts. Thread-safe.

    Args:
        index: holds the rules (:meth:`CaptionIndex.rules`, re-read every ``rules_refresh_s``
            or after :meth:`invalidate_rules`) and claims alerts across replicas.
        mqtt_client: publishes alerts (the feed's client, account ``web``); None: no MQTT.
        topics: the topic builder of the deployment's prefix.
        widener: widens query words outside the word map, like a search; None: no widening.
        webhook_secret: key of the webhook signature; a rule's webhook is not called without it
            (counted as failed, logged).
        public_url: base of the frame link in each alert.
        accounts: a rule sees only the devices its owner may see; None: no owner check.
        metrics: ``alerts_sent`` / ``alerts_failed`` by channel.
        webhook_attempts: tries per webhook POST (first included).
        webhook_timeout_s: timeout of one POST, seconds.
        webhook_backoff_s: wait before the second try, seconds, doubling after.
    """

    def __init__(
        self,
        index: CaptionIndex,
        mqtt_client: Publisher | None,
        topics: Topics,
        *,
        widener: Widener | None = None,
        webhook_secret: SecretStr | str | None = None,
        public_url: str | None = None,
        accounts: AccountLookup | None = None,
        metrics: WebMetrics | None = None,
        webhook_attempts: int = 3,
        webhook_timeout_s: float = 5.0,
        webhook_backoff_s: float = 0.5,
        rules_refresh_s: float = 2.0,
        webhook_threads: int = 4,
        keep_events: int = 100,
    ) -> None:
        self.index = index
        self.mqtt_client = mqtt_client
        self.topics = topics
        self.widener = widener
        self._webhook_secret = (webhook_secret.get_secret_value() if isinstance(webhook_secret, SecretStr)
                                else webhook_secret)
        self.public_url = public_url
        self.accounts = accounts
        self.metrics = metrics
        self.webhook_attempts = max(1, webhook_attempts)
        self.webhook_timeout_s = webhook_timeout_s
        self.webhook_backoff_s = webhook_backoff_s
        self.rules_refresh_s = rules_refresh_s
        self.events: deque[AlertEvent] = deque(maxlen=keep_events)
        """The latest alerts this manager sent, oldest first."""
        self._lock = threading.Lock()
        self._rules: list[AlertRule] = []
        self._rules_at = float("-inf")
        self._compiled: dict[str, _Compiled] = {}
        self._counts: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max(1, webhook_threads), thread_name_prefix="webhook")
        self._opener = urllib.request.build_opener(_NoRedirect())
        self._idle = threading.Condition()
        self._pending = 0

    # -- rules ------------------------------------------------------------------------------
    def invalidate_rules(self) -> None:
        """Re-read the rules from the index at the next check (call after a rule changes)."""
        with self._lock:
            self._rules_at = float("-inf")

    def rules(self) -> list[AlertRule]:
        """The rules, re-read from the index at most every ``rules_refresh_s`` seconds."""
        with self._lock:
            fresh = time.monotonic() - self._rules_at < self.rules_refresh_s
            if fresh:
                return self._rules
        rules = self.index.rules()
        with self._lock:
            self._rules = rules
            self._rules_at = time.monotonic()
        return rules

    def compile(self, query_text: str) -> _Compiled:
        """``query_text`` parsed and widened (cached per text); a query that does not parse
        gives ``error`` (the rule then never matches, and is logged once)."""
        with self._lock:
            cached = self._compiled.get(query_text)
        if cached is not None:
            return cached
        try:
            query = parse_query(query_text)
        except QueryError as err:
            compiled = _Compiled(None, {}, str(err))
        else:
            widenings: dict[str, list[str]] = {}
            if query is not None and self.widener is not None:
                try:
                    widenings = self.widener.widen(query_words(query))
                except Exception:  # noqa: BLE001 - widening is a help, never a blocker
                    logger.exception("alerts: widening %r failed; matching its words as they are", query_text)
            if query is not None and widenings:
                query = apply_widenings(query, widenings)
            compiled = _Compiled(query, widenings)
        with self._lock:
            if len(self._compiled) > 10_000:
                self._compiled.clear()
            self._compiled[query_text] = compiled
        return compiled

    def warm(self) -> None:
        """Compile every rule now (loads the widening encoder early instead of on a caption)."""
        for rule in self.rules():
            self.compile(rule.query)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(message, *args)

    def _owner_allows(self, rule: AlertRule, device_id: str) -> bool:
        if self.accounts is None:
            return True
        account = self.accounts.get(rule.owner)
        if account is None:
            self._warn_once(f"owner:{rule.rule_id}:{rule.owner}",
                            "alerts: rule %s belongs to %r, which is no account; it sees no device "
                            "(set its owner to an existing account)",
                            rule.rule_id, rule.owner)
            return False
        allowed = account.allowed
        return allowed is None or device_id in allowed

    def matches(self, rule: AlertRule, doc: CaptionDoc) -> list[str] | None:
        """The matched words if ``doc`` is one ``rule`` alerts on (device, owner, score, query),
        else None. Error records never match. No claim, no delivery."""
        if doc.error is not None or doc.score is None:
            return None
        if rule.devices is not None and doc.device_id not in rule.devices:
            return None
        if rule.min_score is not None and doc.score < rule.min_score:
            return None
        if not self._owner_allows(rule, doc.device_id):
            return None
        compiled = self.compile(rule.query)
        if compiled.error is not None:
            self._warn_once(f"query:{rule.rule_id}:{rule.query}",
                            "alerts: rule %s has a query that does not parse (%s); it never matches",
                            rule.rule_id, compiled.error)
            return None
        return match_caption(compiled.query, doc.caption)

    # -- checking -----------------------------------------------------------------------------
    def check(self, doc: CaptionDoc) -> list[AlertEvent]:
        """Check one new caption against every rule; send the alerts it raises (MQTT now, the
        webhook in the background). Returns the alerts sent. Never raises: a failing rule is
        logged and the others still run."""
        sent: list[AlertEvent] = []
        try:
            rules = self.rules()
        except Exception:  # noqa: BLE001 - the feed calls this; it must keep indexing
            logger.exception("alerts: cannot read the rules; caption %s/%s not checked",
                             doc.device_id, doc.frame_id)
            return sent
        for rule in rules:
            try:
                event = self._check_rule(rule, doc)
            except Exception:  # noqa: BLE001
                self._count("errors")
                logger.exception("alerts: rule %s failed on device %s frame %s",
                                 rule.rule_id, doc.device_id, doc.frame_id)
                continue
            if event is not None:
                sent.append(event)
        return sent

    def _check_rule(self, rule: AlertRule, doc: CaptionDoc) -> AlertEvent | None:
        words = self.matches(rule, doc)
        if words is None:
            return None
        self._count("matched")
        if not self.index.claim_alert(rule.rule_id, doc, rule.cooldown_s):
            self._count("folded")
            logger.debug("alerts: rule %s on %s/%s folded or claimed elsewhere",
                         rule.rule_id, doc.device_id, doc.frame_id)
            return None
        event = AlertEvent(rule=rule, doc=doc, matched_words=words, fired_at=datetime.now(timezone.utc))
        body = alert_message(rule, doc, words, self.public_url).to_json()
        logger.info("alert: rule %s (%s) matched device %s frame %s: %r (words %s)",
                    rule.rule_id, rule.name, doc.device_id, doc.frame_id, doc.caption, ", ".join(words))
        self._publish(rule, doc, body)
        if rule.webhook_url:
            self._queue_webhook(rule, doc, body)
        with self._lock:
            self.events.append(event)
        return event

    # -- delivery ---------------------------------------------------------------------------
    def _sent(self, channel: str) -> None:
        self._count(f"{channel}_sent")
        if self.metrics is not None:
            self.metrics.alerts_sent.labels(channel).inc()

    def _failed(self, channel: str) -> None:
        self._count(f"{channel}_failed")
        if self.metrics is not None:
            self.metrics.alerts_failed.labels(channel).inc()

    def _publish(self, rule: AlertRule, doc: CaptionDoc, body: bytes) -> None:
        if self.mqtt_client is None:
            return
        topic = self.topics.alerts(doc.device_id)
        try:
            info = self.mqtt_client.publish(topic, body, qos=1)
        except Exception as err:  # noqa: BLE001 - paho raises on a too-large payload, say
            self._failed("mqtt")
            logger.error("alert of rule %s on %s/%s not published on %s: %s",
                         rule.rule_id, doc.device_id, doc.frame_id, topic, err)
            return
        rc = getattr(info, "rc", 0)
        if rc not in (0, 4):  # MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN (queued until reconnect)
            self._failed("mqtt")
            logger.error("alert of rule %s on %s/%s not published on %s (paho rc %s)",
                         rule.rule_id, doc.device_id, doc.frame_id, topic, rc)
            return
        self._sent("mqtt")

    def _queue_webhook(self, rule: AlertRule, doc: CaptionDoc, body: bytes) -> None:
        if not self._webhook_secret:
            self._failed("webhook")
            self._warn_once(f"nosecret:{rule.rule_id}",
                            "alerts: rule %s has a webhook but no webhook_secret is configured "
                            "($FRAMECAP_WEBHOOK_SECRET); not calling it unsigned", rule.rule_id)
            return
        with self._idle:
            self._pending += 1
        try:
            self._pool.submit(self._run_webhook, rule, doc, body)
        except RuntimeError:  # shut down
            self._done_webhook()
            self._failed("webhook")

    def _done_webhook(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def _run_webhook(self, rule: AlertRule, doc: CaptionDoc, body: bytes) -> None:
        try:
            self._post_webhook(rule, doc, body)
        except Exception:  # noqa: BLE001 - a pool thread has nobody to raise to
            self._failed("webhook")
            logger.exception("webhook of rule %s failed", rule.rule_id)
        finally:
            self._done_webhook()

    def _post_webhook(self, rule: AlertRule, doc: CaptionDoc, body: bytes) -> bool:
        """POST ``body`` to the rule's webhook with bounded retries; True if a 2xx answered."""
        url = rule.webhook_url or ""
        secret = self._webhook_secret or ""
        where = urlsplit(url).netloc or url[:60]
        delay = self.webhook_backoff_s
        for attempt in range(1, self.webhook_attempts + 1):
            request = urllib.request.Request(url, data=body, method="POST", headers={
                "Content-Type": "application/json",
                "User-Agent": "framecap-web-alerts",
                SIGNATURE_HEADER: sign(body, secret),
                TIMESTAMP_HEADER: str(int(time.time())),
            })
            retry_after: float | None = None
            try:
                with self._opener.open(request, timeout=self.webhook_timeout_s) as answer:
                    answer.read(1024)
                self._sent("webhook")
                logger.info("alert of rule %s on %s/%s posted to %s", rule.rule_id, doc.device_id,
                            doc.frame_id, where)
                return True
            except urllib.error.HTTPError as err:
                status = err.code
                if status != 429 and (300 <= status < 500):
                    self._failed("webhook")
                    logger.error("webhook of rule %s at %s answered HTTP %d; not retried",
                                 rule.rule_id, where, status)
                    return False
                reason = f"HTTP {status}"
                header = err.headers.get("Retry-After") if err.headers else None
                if header and header.strip().isdigit():
                    retry_after = min(float(header), 30.0)
            except (urllib.error.URLError, OSError, ValueError) as err:
                reason = str(getattr(err, "reason", err))
            if attempt == self.webhook_attempts:
                self._failed("webhook")
                logger.error("webhook of rule %s at %s failed after %d attempts: %s",
                             rule.rule_id, where, attempt, reason)
                return False
            logger.warning("webhook of rule %s at %s: attempt %d failed (%s); retrying",
                           rule.rule_id, where, attempt, reason)
            if self._stop.wait(retry_after if retry_after is not None else delay):
                self._failed("webhook")
                return False
            delay *= 2
        return False  # pragma: no cover - the loop returns

    # -- state ------------------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    @property
    def counters(self) -> dict[str, int]:
        """``matched``, ``folded``, ``mqtt_sent``/``mqtt_failed``, ``webhook_sent``/
        ``webhook_failed``, ``errors``."""
        with self._lock:
            return dict(self._counts)

    def wait_webhooks(self, timeout_s: float = 30.0) -> bool:
        """Wait until no webhook POST is queued or running (tests, shutdown); True if idle."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop retrying, finish the POSTs under way (at most about ``timeout_s``)."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


# -- rules file -------------------------------------------------------------------------------


class RuleSpec(BaseModel):
    """One rule of a rules file."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Rule id: letters, digits, '.', '_' and '-'.")
    name: str | None = Field(default=None, description="Shown on pages and in alerts; the id when empty.")
    query: str = Field(min_length=1, description="Search syntax: words, \"phrases\", NOT/-, OR, parentheses.")
    devices: list[str] | None = Field(default=None, description="Devices watched; every device the owner may see when empty.")
    min_score: float | None = Field(default=None, le=0, description="Minimum caption log-probability (<= 0).")
    cooldown_s: float = Field(default=300.0, ge=0, description="Matching frames of a device within this many seconds of its last alert fold into it.")
    webhook_url: str | None = Field(default=None, description="http(s) URL to POST each alert to (HMAC-SHA256 signed).")
    owner: str = Field(default="admin", description="Account whose devices bound the rule.")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        try:
            return validate_id(value, "id")
        except InvalidIdError as err:
            raise ValueError(str(err)) from None

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        try:
            return [validate_id(d, "device_id") for d in value]
        except InvalidIdError as err:
            raise ValueError(str(err)) from None

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        try:
            parse_query(value)
        except QueryError as err:
            raise ValueError(str(err)) from None
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("must be an http:// or https:// URL")
        return value

    def to_rule(self) -> AlertRule:
        """As the index stores it."""
        return AlertRule(
            rule_id=self.id, name=self.name or self.id, query=self.query,
            devices=tuple(self.devices) if self.devices else None, min_score=self.min_score,
            cooldown_s=self.cooldown_s, webhook_url=self.webhook_url, owner=self.owner,
            created_at=datetime.now(timezone.utc),
        )


def parse_rules(data: Any, source: str = "rules") -> list[AlertRule]:
    """Rules from parsed YAML: a list of mappings, or ``{"rules": [...]}``.

    Raises:
        RulesFileError: one line per problem, naming the rule (number and id) and the key.
    """
    if isinstance(data, dict) and set(data) == {"rules"}:
        data = data["rules"]
    if data is None:
        return []
    if not isinstance(data, list):
        raise RulesFileError(f"{source}: expected a list of rules, got {type(data).__name__}")
    rules: list[AlertRule] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, item in enumerate(data, start=1):
        label = f"rule {number}"
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            label += f" ({item['id']!r})"
        if not isinstance(item, dict):
            problems.append(f"{source}: {label}: expected a mapping of keys, got {type(item).__name__}")
            continue
        try:
            spec = RuleSpec.model_validate(item)
        except ValidationError as err:
            for e in err.errors():
                key = ".".join(str(x) for x in e["loc"]) or "(rule)"
                if e["type"] == "missing":
                    problems.append(f"{source}: {label}: {key}: required key is missing")
                elif e["type"] == "extra_forbidden":
                    problems.append(f"{source}: {label}: {key}: unknown key (typo?)")
                else:
                    problems.append(f"{source}: {label}: {key} = {e.get('input')!r}: "
                                    f"{str(e['msg']).removeprefix('Value error, ')}")
            continue
        if spec.id in seen:
            problems.append(f"{source}: {label}: id {spec.id!r} is also rule {seen[spec.id]}")
            continue
        seen[spec.id] = number
        rules.append(spec.to_rule())
    if problems:
        raise RulesFileError("\n".join(problems))
    return rules


def load_rules_file(path: str | Path) -> list[AlertRule]:
    """Read alert rules from a YAML file::

        - id: trucks-at-night
          name: Trucks at night
          query: truck OR lorry
          devices: [cam1, cam2]
          min_score: -12
          cooldown_s: 600
          webhook_url: https://hooks.example.org/framecap

    Raises:
        RulesFileError: unreadable, not YAML, or a rule does not validate (naming rule and key).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise RulesFileError(f"{path}: cannot read the rules file: {err.strerror or err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RulesFileError(f"{path}: not valid YAML: {err}") from err
    return parse_rules(data, str(path))


def rules_to_yaml(rules: list[AlertRule]) -> str:
    """Rules as a rules file (the inverse of :func:`load_rules_file`, for export)."""
    items = []
    for r in rules:
        item: dict[str, Any] = {"id": r.rule_id, "name": r.name, "query": r.query}
        if r.devices is not None:
            item["devices"] = list(r.devices)
        if r.min_score is not None:
            item["min_score"] = r.min_score
        item["cooldown_s"] = r.cooldown_s
        if r.webhook_url:
            item["webhook_url"] = r.webhook_url
        item["owner"] = r.owner
        items.append(item)
    return yaml.safe_dump(items, sort_keys=False, allow_unicode=True)


def message_dict(event: AlertEvent, base_url: str | None = None) -> dict[str, Any]:
    """An alert event as the JSON object its MQTT payload holds."""
    return dict(json.loads(alert_message(event.rule, event.doc, event.matched_words, base_url).to_json()))
