"""The FastAPI application of ``framecap web``: pages, ``/api/v1``, ``/healthz``, ``/metrics``.

:func:`create_app` assembles it around a :class:`~cloud.web.deps.WebContext`; it binds nowhere
itself (``framecap web`` runs it under uvicorn). Every bad input answers a 4xx with a message
(JSON for the API and for clients that do not ask for HTML, the error page otherwise), never
a 500 or a traceback; a page without a login redirects to ``/login?next=...``.
"""

from __future__ import annotations

import html
import importlib
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud.web import api, auth
from cloud.web.deps import CtxDep, LoginRequired, UserDep, WebContext, is_api_request
from cloud.web.metrics import CONTENT_TYPE

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
SESSION_COOKIE = "framecap_session"
SESSION_MAX_AGE_S = 14 * 24 * 3600
"""A session lasts two weeks (then log in again)."""
API_TITLE = "framecap web"
API_VERSION = "1"

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


class SecurityHeadersMiddleware:
    """Adds ``nosniff``, ``DENY`` framing and a same-origin referrer policy to every answer
    (plain ASGI: streaming responses pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)


def wants_html(request: Request) -> bool:
    """True when the answer should be an HTML page: not ``/api/...`` and the client accepts
    HTML (a browser), so scripts get JSON errors everywhere."""
    if is_api_request(request) or request.url.path in ("/healthz", "/metrics"):
        return False
    return "text/html" in request.headers.get("accept", "")


def validation_message(err: RequestValidationError) -> str:
    """FastAPI's validation errors as one sentence per field: ``limit: Input should be less
    than or equal to 500``."""
    parts = []
    for e in err.errors():
        loc = [str(x) for x in e.get("loc", ()) if x not in ("query", "path", "body", "header", "cookie")]
        name = ".".join(loc) or "request"
        msg = str(e.get("msg", "is invalid"))
        given = e.get("input")
        if isinstance(given, (str, int, float)) and not isinstance(given, bool) and e.get("type") != "missing":
            text = repr(given) if len(repr(given)) <= 80 else repr(given)[:77] + "..."
            parts.append(f"{name}: {msg} (got {text})")
        else:
            parts.append(f"{name}: {msg}")
    return "; ".join(parts) or "the request is invalid"


def _html_error(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    render = getattr(request.app.state, "render_error", None)
    if render is not None:
        try:
            response: Response = render(request, status, message)
            if headers:
                response.headers.update(headers)
            return response
        except Exception:  # noqa: BLE001 - fall back to the plain page below
            logger.exception("rendering the error page failed")
    body = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{status}</title>"
            f"</head><body><h1>Error {status}</h1><p id=\"error-message\">{html.escape(message)}</p>"
            f"<p><a href=\"/\">Back</a></p></body></html>")
    return HTMLResponse(body, status, headers=headers)


def error_response(request: Request, status: int, message: str,
                   headers: dict[str, str] | None = None, errors: Any = None) -> Response:
    """The error answer: HTML page for a browser on a page route, JSON ``{"detail": ...}``
    otherwise (plus ``errors`` for validation)."""
    if wants_html(request) and status != 401:
        return _html_error(request, status, message, headers)
    content: dict[str, Any] = {"detail": message}
    if errors is not None:
        content["errors"] = errors
    return JSONResponse(content, status, headers=headers)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(exc.location, 303)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such page or API route: {request.url.path}"
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            detail = f"{request.method} is not allowed on {request.url.path}"
        return error_response(request, exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
                  for e in exc.errors()]
        return error_response(request, 422, validation_message(exc), errors=errors)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request, 500, "internal error: the server logged it; please report it")


def _include_pages(app: FastAPI) -> None:
    try:
        pages = importlib.import_module("cloud.web.pages")
    except ModuleNotFoundError as err:
        if err.name != "cloud.web.pages":
            raise
        logger.warning("cloud.web.pages is absent: serving the API only")
        return
    app.include_router(pages.router)
    if hasattr(pages, "render_error"):
        app.state.render_error = pages.render_error
    page_error = getattr(pages, "PageError", None)
    if page_error is not None:
        @app.exception_handler(page_error)
        async def _page_error(request: Request, exc: Any) -> Response:
            return error_response(request, int(exc.status), str(exc.message))


def route_table(app: FastAPI) -> list[tuple[str, str | None]]:
    """Every ``(path, method)`` the app serves, included routers flattened (a mount such as
    ``/static`` has method None). Works with FastAPI's older flat ``app.routes`` and with the
    newer included-router objects (``fastapi.routing.iter_route_contexts``)."""
    import fastapi.routing

    iterate = getattr(fastapi.routing, "iter_route_contexts", None)
    routes: Any = iterate(app.routes) if iterate is not None else app.routes
    out: list[tuple[str, str | None]] = []
    for route in routes:
        path = getattr(route, "path", None)
        if path is None:
            continue
        methods = getattr(route, "methods", None)
        if not methods:
            out.append((path, None))
            continue
        out.extend((path, m) for m in sorted(methods) if m != "HEAD")
    return out


def _has_route(app: FastAPI, path: str, method: str) -> bool:
    return (path, method) in route_table(app)


PUBLIC_PATHS = ("/healthz", "/metrics", "/login", "/logout")
"""Paths that answer without a login."""


def _document_security(app: FastAPI) -> None:
    """Declare HTTP Basic and the session cookie in the OpenAPI schema (every operation needs
    one, except :data:`PUBLIC_PATHS`)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {
            "basic": {"type": "http", "scheme": "basic",
                      "description": "An account's user name and password (for scripts)."},
            "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE,
                        "description": "The signed session cookie set by POST /login."},
        }
        schema["security"] = [{"basic": []}, {"session": []}]
        for path, operations in schema.get("paths", {}).items():
            if path in PUBLIC_PATHS:
                for operation in operations.values():
                    operation["security"] = []
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(ctx: WebContext, *, sse_heartbeat_s: float = api.SSE_HEARTBEAT_S,
               login_max_failures: int = 10, login_window_s: float = 300.0) -> FastAPI:
    """The application around ``ctx`` (stored as ``app.state.ctx``).

    Args:
        ctx: index, store, accounts, live hub, metrics... of this process.
        sse_heartbeat_s: seconds between heartbeats on a quiet live stream.
        login_max_failures, login_window_s: failed logins allowed per client address and window.
    """
    app = FastAPI(title=API_TITLE, version=API_VERSION, docs_url=None, redoc_url=None, openapi_url=None,
                  description="Browse, search, watch and get alerted by the captions of every framecap "
                              "device. Every route but /healthz and /metrics needs a login: the session "
                              "cookie of POST /login, or HTTP Basic.")
    app.state.ctx = ctx
    app.state.sse_heartbeat_s = sse_heartbeat_s
    app.state.login_limiter = auth.LoginRateLimiter(login_max_failures, login_window_s)
    app.add_middleware(SessionMiddleware, secret_key=ctx.session_secret, session_cookie=SESSION_COOKIE,
                       max_age=SESSION_MAX_AGE_S, same_site="strict", https_only=ctx.https_only)
    app.add_middleware(SecurityHeadersMiddleware)
    _install_handlers(app)

    @app.get("/healthz", tags=["ops"], summary="Liveness (no login)")
    def healthz() -> dict[str, Any]:
        """``{"status": "ok", ...}`` while the process serves; says whether the feed is current
        (no device names, no counts: it answers without a login)."""
        feed = ctx.feed()
        return {"status": "ok", "feed_current": not feed.get("behind"),
                "mqtt_connected": bool(feed.get("mqtt_connected")), "s3_ok": bool(feed.get("s3_ok"))}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (no login)", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition."}})
    def metrics() -> Response:
        """Captions indexed, index lag, searches and their latency, alerts sent and failed,
        invalid captions skipped, live clients."""
        def update() -> None:
            ctx.metrics.live_dropped.set(ctx.live.dropped)
            feed = ctx.feed()
            ctx.metrics.up.labels("mqtt").set(1 if feed.get("mqtt_connected") else 0)
            ctx.metrics.up.labels("s3").set(1 if feed.get("s3_ok") else 0)

        return Response(ctx.metrics.render(before=update), media_type=CONTENT_TYPE)

    @app.get("/api/v1/openapi.json", tags=["api"], summary="This API's OpenAPI schema")
    def openapi_schema(user: UserDep, request_ctx: CtxDep) -> dict[str, Any]:
        """The OpenAPI 3 schema of this API (also checked in as ``docs/openapi.json``)."""
        return app.openapi()

    app.include_router(auth.router)
    app.include_router(api.router)
    _document_security(app)
    _include_pages(app)
    if not _has_route(app, "/login", "GET"):
        app.add_api_route("/login", auth.login_page_fallback, methods=["GET"], include_in_schema=False,
                          response_class=HTMLResponse)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
