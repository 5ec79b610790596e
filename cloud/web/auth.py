"""Accounts, roles, sessions and HTTP Basic of ``framecap web``.

Accounts live in a YAML file (mode 0600)::

    users:
      alice: {password_hash: "$argon2id$...", role: admin, devices: []}
      bob:   {password_hash: "$argon2id$...", role: viewer, devices: [cam1, cam2]}

Passwords are hashed with Argon2id (argon2-cffi :class:`~argon2.PasswordHasher`, RFC 9106).
An admin sees every device; a viewer only the devices listed for it, everywhere (pages,
search, export, live, alerts).

Sessions are Starlette's signed cookie (``SessionMiddleware``, itsdangerous) holding the user
name; every request looks the name up again, so a removed account loses its session at once.
Scripts may use HTTP Basic instead of the cookie. ``POST /login`` (form) and ``POST /logout``
are in :data:`router`; failed logins are rate-limited per client address.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import yaml
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from common.topics import InvalidIdError, validate_id

logger = logging.getLogger(__name__)

Role = Literal["admin", "viewer"]
ROLES: tuple[str, ...] = ("admin", "viewer")
SESSION_USER_KEY = "user"
"""Key of the user name in the session cookie."""


class AccountsError(ValueError):
    """An accounts file that cannot be read or holds a bad entry (the message says which)."""


@dataclass(frozen=True)
class Account:
    """A logged-in user: its name, role and (for a viewer) the devices it may see."""

    name: str
    role: Role
    devices: tuple[str, ...] = ()

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def allowed(self) -> frozenset[str] | None:
        """The devices this account may see; None for an admin (every device)."""
        return None if self.is_admin else frozenset(self.devices)

    def may_see(self, device_id: str) -> bool:
        """Whether this account may see ``device_id``."""
        allowed = self.allowed
        return allowed is None or device_id in allowed


@dataclass(frozen=True)
class _Entry:
    account: Account
    password_hash: str


def _parse_entry(name: Any, raw: Any, source: str) -> _Entry:
    try:
        validate_id(name, "user name")
    except InvalidIdError as err:
        raise AccountsError(f"{source}: users: {err}") from err
    if not isinstance(raw, dict):
        raise AccountsError(f"{source}: users.{name} must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - {"password_hash", "role", "devices"}
    if unknown:
        raise AccountsError(f"{source}: users.{name}: unknown keys {sorted(unknown)}")
    password_hash = raw.get("password_hash")
    if not isinstance(password_hash, str) or not password_hash.startswith("$argon2"):
        raise AccountsError(f"{source}: users.{name}.password_hash must be an argon2 hash ($argon2id$...)")
    role = raw.get("role", "viewer")
    if role not in ROLES:
        raise AccountsError(f"{source}: users.{name}.role is {role!r}; expected one of {ROLES}")
    devices = raw.get("devices") or []
    if not isinstance(devices, list):
        raise AccountsError(f"{source}: users.{name}.devices must be a list of device ids")
    try:
        checked = tuple(validate_id(d, "device_id") for d in devices)
    except InvalidIdError as err:
        raise AccountsError(f"{source}: users.{name}.devices: {err}") from err
    return _Entry(Account(name=name, role=role, devices=checked), password_hash)


def _read_entries(path: Path) -> dict[str, _Entry]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise AccountsError(f"cannot read accounts file {path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise AccountsError(f"accounts file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("users", {}), dict):
        raise AccountsError(f"accounts file {path} must be a mapping with a 'users' mapping")
    return {str(n): _parse_entry(n, raw, str(path)) for n, raw in (data.get("users") or {}).items()}


class Accounts:
    """The accounts of one web process, verified with Argon2id. Thread-safe.

    Built from a file with :meth:`load` (re-read when the file changes, checked at most once
    a second) or from memory with :meth:`from_users` (tests, demo). Successful HTTP Basic
    checks are remembered for ``cache_s`` seconds under a keyed hash (a per-process random
    key), so a script's requests do not each pay for an Argon2 verification.
    """

    def __init__(self, entries: dict[str, _Entry] | None = None, *, path: Path | None = None,
                 hasher: PasswordHasher | None = None, cache_s: float = 300.0) -> None:
        self._hasher = hasher or PasswordHasher()
        self._entries: dict[str, _Entry] = dict(entries or {})
        self._path = path
        self._mtime = self._stat()
        self._checked_at = time.monotonic()
        self._lock = threading.Lock()
        self._cache_key = secrets.token_bytes(32)
        self._cache: dict[bytes, tuple[float, Account]] = {}
        self._cache_s = cache_s
        # a hash of a random password: verified against for unknown users (same cost)
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> Accounts:
        """Read the accounts file at ``path``.

        Raises:
            AccountsError: unreadable, not YAML, or an entry is invalid (the message names it).
        """
        p = Path(path)
        return cls(_read_entries(p), path=p, **kwargs)

    @classmethod
    def from_users(cls, users: dict[str, tuple[str, Role, list[str] | tuple[str, ...]]],
                   **kwargs: Any) -> Accounts:
        """In memory: ``{name: (password, role, devices)}`` (passwords hashed here)."""
        hasher = kwargs.pop("hasher", None) or PasswordHasher()
        entries = {
            name: _Entry(Account(validate_id(name, "user name"), role,
                                 tuple(validate_id(d, "device_id") for d in devices)),
                         hasher.hash(password))
            for name, (password, role, devices) in users.items()
        }
        return cls(entries, hasher=hasher, **kwargs)

    def _stat(self) -> float | None:
        if self._path is None:
            return None
        try:
            return self._path.stat().st_mtime
        except OSError:
            return None

    def _refresh(self) -> None:
        """Re-read the file if it changed (checked at most once a second); keeps the old
        accounts and logs why if the new file is invalid."""
        if self._path is None or time.monotonic() - self._checked_at < 1.0:
            return
        self._checked_at = time.monotonic()
        mtime = self._stat()
        if mtime == self._mtime:
            return
        try:
            entries = _read_entries(self._path)
        except AccountsError as err:
            logger.error("accounts file changed but is invalid, keeping the previous accounts: %s", err)
            self._mtime = mtime
            return
        with self._lock:
            self._entries = entries
            self._mtime = mtime
            self._cache.clear()
        logger.info("accounts reloaded from %s (%d users)", self._path, len(entries))

    def names(self) -> list[str]:
        """Every user name, sorted."""
        self._refresh()
        return sorted(self._entries)

    def get(self, name: str) -> Account | None:
        """The account named ``name`` (no password check), or None."""
        self._refresh()
        entry = self._entries.get(name)
        return entry.account if entry else None

    def verify(self, name: str, password: str) -> Account | None:
        """The account if ``password`` is right, else None.

        An unknown name is verified against a dummy hash, so the answer takes about as long
        either way (no user enumeration by timing).
        """
        self._refresh()
        key = hmac.new(self._cache_key, f"{name}\0{password}".encode(), hashlib.sha256).digest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self._cache_s:
            return hit[1]
        entry = self._entries.get(name)
        try:
            self._hasher.verify(entry.password_hash if entry else self._dummy_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if entry is None:
            return None
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (now, entry.account)
        return entry.account


def add_user(path: str | Path, name: str, password: str, role: Role = "viewer",
             devices: list[str] | tuple[str, ...] = ()) -> Account:
    """Create or replace user ``name`` in the accounts file at ``path`` (created if absent,
    written 0600 through a temporary file and an atomic rename).

    Raises:
        AccountsError: a bad name, role, device id, an empty password or an unreadable file.
    """
    p = Path(path)
    try:
        validate_id(name, "user name")
        checked = [validate_id(d, "device_id") for d in devices]
    except InvalidIdError as err:
        raise AccountsError(str(err)) from err
    if role not in ROLES:
        raise AccountsError(f"role is {role!r}; expected one of {ROLES}")
    if not password:
        raise AccountsError("the password is empty")
    data: dict[str, Any] = {"users": {}}
    if p.exists():
        _read_entries(p)  # refuse to rewrite a file we could not read back
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {"users": {}}
        data.setdefault("users", {})
    data["users"][name] = {"password_hash": PasswordHasher().hash(password), "role": role,
                           "devices": checked}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh, sort_keys=True)
    os.chmod(tmp, 0o600)
    os.replace(tmp, p)
    return Account(name=name, role=role, devices=tuple(checked))


# -- login rate limit -----------------------------------------------------------------


@dataclass
class LoginRateLimiter:
    """At most ``max_failures`` failed logins per client address in ``window_s`` seconds."""

    max_failures: int = 10
    window_s: float = 300.0
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            q = self._failures.get(client)
            if not q:
                return 0.0
            while q and now - q[0] > self.window_s:
                q.popleft()
            if len(q) < self.max_failures:
                return 0.0
            return max(0.0, self.window_s - (now - q[0]))

    def failed(self, client: str) -> None:
        with self._lock:
            if len(self._failures) > 10_000:
                self._failures.clear()
            self._failures.setdefault(client, deque()).append(time.monotonic())

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


# -- login / logout routes -------------------------------------------------------------

router = APIRouter(tags=["auth"])


def safe_next(target: str | None) -> str:
    """A redirect target after login: a local path only (no ``//host``, no scheme), else ``/``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(c) < 32 for c in target):
        return "/"
    return target


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


@router.post("/login", summary="Log in (form: username, password, next)",
             responses={303: {"description": "Logged in: redirect to `next`"},
                        401: {"description": "Wrong user name or password"},
                        429: {"description": "Too many failed logins from this address"}})
async def login(request: Request) -> Response:
    """Check the form's user name and password; on success set the session cookie and
    redirect to ``next`` (a local path). A failure redirects back to ``/login?error=...``
    (or answers 401 JSON to a client that accepts only JSON)."""
    from starlette.concurrency import run_in_threadpool

    from cloud.web.deps import get_ctx

    ctx = get_ctx(request)
    try:
        form = await request.form()
    except Exception as err:  # noqa: BLE001 - a malformed body is the client's error
        raise HTTPException(400, f"the login form could not be read: {err}") from err
    username = form.get("username")
    password = form.get("password")
    nxt = safe_next(str(form.get("next") or "/"))
    client = request.client.host if request.client else "?"
    limiter: LoginRateLimiter = request.app.state.login_limiter
    wait = limiter.retry_after(client)
    if wait > 0:
        msg = f"too many failed logins from this address; try again in {int(wait) + 1} s"
        if _wants_json(request):
            return JSONResponse({"detail": msg}, 429, headers={"Retry-After": str(int(wait) + 1)})
        return RedirectResponse(f"/login?error={quote(msg)}&next={quote(nxt)}", 303)
    if not isinstance(username, str) or not isinstance(password, str) or not username:
        raise HTTPException(400, "the login form needs 'username' and 'password'")
    account = await run_in_threadpool(ctx.accounts.verify, username, password)
    if account is None:
        limiter.failed(client)
        logger.warning("failed login for user %r from %s", username, client)
        msg = "wrong user name or password"
        if _wants_json(request):
            return JSONResponse({"detail": msg}, 401)
        return RedirectResponse(f"/login?error={quote(msg)}&next={quote(nxt)}", 303)
    limiter.succeeded(client)
    request.session.clear()
    request.session[SESSION_USER_KEY] = account.name
    logger.info("user %s logged in from %s", account.name, client)
    if _wants_json(request):
        return JSONResponse({"user": account.name, "role": account.role})
    return RedirectResponse(nxt, 303)


@router.post("/logout", summary="Log out (clears the session cookie)",
             responses={303: {"description": "Logged out: redirect to /login"}})
async def logout(request: Request) -> Response:
    """Forget the session and redirect to the login page."""
    request.session.clear()
    return RedirectResponse("/login", 303)


LOGIN_FALLBACK_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>framecap: log in</title></head>
<body><h1>framecap</h1>{error}
<form method="post" action="/login">
<input type="hidden" name="next" value="{next}">
<label>User <input name="username" autocomplete="username" required></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button></form></body></html>
"""


async def login_page_fallback(request: Request) -> HTMLResponse:
    """A minimal login form, used only when the pages module does not provide ``GET /login``."""
    import html

    err = request.query_params.get("error")
    nxt = safe_next(request.query_params.get("next"))
    return HTMLResponse(LOGIN_FALLBACK_HTML.format(
        error=f'<p role="alert">{html.escape(err)}</p>' if err else "",
        next=html.escape(nxt, quote=True)))
