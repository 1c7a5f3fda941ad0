"""Who may call the REST gateway, and from which pages: the API key, the Host
check and CORS, as ASGI middleware around every route.

In the order a request meets them:

1. **Host check** (DNS rebinding): bound to a loopback host, the gateway
   answers only requests addressed to ``localhost``, ``127.0.0.1`` or ``[::1]``
   (any port), plus the names of ``allowed_hosts``; any other ``Host`` header
   gets 400 naming the option. Bound elsewhere, it checks only when
   ``allowed_hosts`` is given; ``"*"`` turns it off. Without this, a web page of
   any site could make a browser on this machine send requests to the loopback
   server through a name that resolves to 127.0.0.1.
2. **Origin check** (cross-site requests): browsers send a POST with a
   ``text/plain`` or form body (or none) from any page without asking first (no
   preflight), and the gateway reads every body as JSON; without this, any page a
   user visits could make their browser run generations on a keyless local
   deployment. Such a request whose ``Origin`` header names neither an origin of
   ``allowed_origins`` nor the server itself gets 403 naming the option. Requests
   a browser preflights (JSON bodies, an ``Authorization`` header) meet CORS
   instead; clients other than browsers (curl, the SDKs) send no ``Origin``.
3. **CORS** (only with ``allowed_origins``): browsers' preflight requests carry
   no key, so they are answered before the key is checked.
4. **API key** (only with ``api_key``): every route (``/mii``, ``/v1``,
   ``/health``, ``/metrics``, unknown paths too) but ``/ping`` requires the header
   ``Authorization: Bearer KEY``, as OpenAI clients send their ``api_key``; a
   missing or wrong one gets 401 with ``WWW-Authenticate: Bearer`` and
   OpenAI's error body on every route (code ``invalid_api_key``; outside
   ``/v1`` also mii's ``field``, null), so that any client can read it.
   ``/ping`` (:data:`KEYLESS_PATHS`) answers only ``{"status": ...}``, for
   liveness probes, which cannot hold a secret (Kubernetes' ``httpGet`` probe
   takes header values written into the pod spec); vLLM's health routes take no
   key either. ``/health``, with its replicas' pids and addresses, keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from mii.errors import AuthenticationError, InvalidRequestError
from mii.rpc.auth import bearer_secret, is_loopback, secret_matches
from mii.rpc.deployment_config import DeploymentConfig
from mii.rpc.http.errors import api_error, error_response, is_openai_path, openai_error_body
from mii.rpc.status import STATUSES

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CORS_METHODS = ("GET", "POST")
# Any request header: the browser openai SDK sends its own (x-stainless-*,
# openai-organization), and an allowed origin is trusted with the API anyway.
CORS_HEADERS = ("*",)
# Answer headers a page's script may read: the wait a 429 / 503 asks for, the
# request id it sent (browsers hide all but a few unless they are listed).
CORS_EXPOSED_HEADERS = ("Retry-After", "X-Request-Id")

API_KEY_REFUSED = (
    "missing or wrong API key: this server requires the header 'Authorization: Bearer KEY' "
    "(the openai client sends its api_key so)"
)


def host_name(header: str) -> str:
    """The name of a ``Host`` header, without its port: ``[::1]:80`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):  # [IPv6]:port
        return header[1:].partition("]")[0]
    name, colon, port = header.rpartition(":")
    name = name if colon and port.isdigit() else header
    return name.rstrip(".")  # "localhost." is localhost


@dataclass(frozen=True)
class AccessPolicy:
    """The gateway's access rules (nothing checked by default)."""

    api_key: bytes | None = None
    allowed_hosts: frozenset[str] | None = None  # None: any Host header
    allowed_origins: tuple[str, ...] = ()  # empty: CORS off

    @classmethod
    def of(cls, config: DeploymentConfig) -> AccessPolicy:
        """The rules of ``config`` (see the module's docstring)."""
        # Configured names are names, without ports: "[::1]" and "::1" are both ::1.
        extra = [h.lower().strip("[]").rstrip(".") for h in config.allowed_hosts or ()]
        if "*" in extra:
            hosts = None
        elif extra or is_loopback(config.host):
            hosts = frozenset((*LOOPBACK_NAMES, *extra))
        else:
            hosts = None
        key = config.secret_api_key()
        return cls(
            api_key=None if key is None else key.encode(),
            allowed_hosts=hosts,
            allowed_origins=tuple(config.allowed_origins or ()),
        )


def install_access_control(app: FastAPI, policy: AccessPolicy) -> None:
    """Add ``policy``'s middleware to ``app``."""
    # Starlette runs the middleware added last first: Host, Origin, CORS, API key.
    if policy.api_key is not None:
        app.add_middleware(RequireApiKey, api_key=policy.api_key)
    if policy.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(policy.allowed_origins),
            allow_methods=list(CORS_METHODS),
            allow_headers=list(CORS_HEADERS),
            expose_headers=list(CORS_EXPOSED_HEADERS),
        )
    if "*" not in policy.allowed_origins:
        app.add_middleware(CheckOrigin, allowed=frozenset(policy.allowed_origins))
    if policy.allowed_hosts is not None:
        app.add_middleware(CheckHost, allowed=policy.allowed_hosts)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class CheckHost:
    """Answer 400 to a request whose ``Host`` is not one of ``allowed``. A request
    without a Host header (HTTP/1.0; browsers always send one) passes."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = _header(scope, b"host")
            name = None if raw is None else host_name(raw.decode("latin-1"))
            if name is not None and name not in self.allowed:
                response = error_response(Request(scope), api_error(self._refusal(name)))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, name: str) -> InvalidRequestError:
        shown = name[:100]
        return InvalidRequestError(
            f"Host {shown!r} is not allowed: this server answers requests addressed to "
            f"{', '.join(sorted(self.allowed))}; to accept this name, start the deployment "
            f"with allowed_hosts=[{shown!r}] (mii serve --allowed-hosts {shown})"
        )


def same_origin(origin: str, host: str) -> bool:
    """Whether a page of ``origin`` (``scheme://name[:port]``) is the server that
    a ``Host`` header of ``host`` names: its own pages (a UI it serves) may call it."""
    scheme, sep, rest = origin.partition("://")
    if not sep or not host:
        return False  # "null" (a sandboxed page, a file) is no server's origin
    default_port = {"http": "80", "https": "443"}.get(scheme.lower(), "")
    return _with_port(rest, default_port) == _with_port(host, default_port)


def _with_port(netloc: str, default_port: str) -> tuple[str, str]:
    name = host_name(netloc)
    tail = netloc.strip().rpartition("]")[2] if netloc.strip().startswith("[") else netloc
    _, colon, port = tail.rpartition(":")
    return name, port if colon and port.isdigit() else default_port


# The requests a page of any site can make a browser send without asking first (no
# CORS preflight): a method other than GET/HEAD (which change nothing here) with one
# of these body types, or none, and no Authorization header (which needs a preflight).
PREFLIGHT_FREE_TYPES = frozenset(
    {"", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}
)


def preflight_free(scope: Scope) -> bool:
    """Whether a browser may have sent this request cross-site without a preflight."""
    if scope["method"] in ("GET", "HEAD", "OPTIONS") or _header(scope, b"authorization"):
        return False
    kind = (_header(scope, b"content-type") or b"").decode("latin-1")
    return kind.partition(";")[0].strip().lower() in PREFLIGHT_FREE_TYPES


class CheckOrigin:
    """Answer 403 to a request that a web page (it has an ``Origin`` header) of an
    origin neither in ``allowed`` nor the server's own can have made a browser send
    without a preflight (``preflight_free``). Any other cross-site request from a
    browser is preflighted first, which CORS refuses unless the origin is allowed;
    so JSON clients in extensions, webviews or behind proxies are not affected."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and preflight_free(scope):
            raw = _header(scope, b"origin")
            origin = None if raw is None else raw.decode("latin-1").strip()
            host = (_header(scope, b"host") or b"").decode("latin-1")
            if origin is not None and origin not in self.allowed and not same_origin(origin, host):
                await self._refusal(origin, scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _refusal(origin: str, path: str) -> JSONResponse:
        shown = origin[:100]
        if shown == "null":  # a file or a sandboxed frame: any site can make one
            advice = "no allowed_origins entry can let pages without an origin in safely"
        else:
            advice = (
                f"to let that site's pages call this server, start the deployment with "
                f"allowed_origins=[{shown!r}] (mii serve --allowed-origins {shown})"
            )
        message = (
            f"a request from a web page of {shown!r} with a body a browser sends without "
            f"asking (text, form or none) is refused: send it as application/json, or {advice}"
        )
        body = openai_error_body(message, 403, "allowed_origins", "origin_not_allowed")
        if not is_openai_path(path):  # mii's routes name the field too
            body["error"]["field"] = "allowed_origins"
        return JSONResponse(body, status_code=403)


# Routes served without the key: the deployment's serving status, nothing else.
KEYLESS_PATHS = frozenset({"/ping"})


class RequireApiKey:
    """Answer 401 to a request without ``Authorization: Bearer <api_key>`` (but to
    one of KEYLESS_PATHS)."""

    def __init__(self, app: ASGIApp, api_key: bytes) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] not in KEYLESS_PATHS:
            given = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
            # Exactly one: with two (a proxy that appends its own), which one counts
            # would be this server's choice, and a wrong key must never pass beside
            # a right one, nor a right one fail by its order.
            presented = bearer_secret(given[0]) if len(given) == 1 else None
            if not secret_matches(presented, self.api_key):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await unauthorized(scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


def unauthorized(path: str) -> JSONResponse:
    """The 401 answer to a request for ``path`` without the right key."""
    status = STATUSES[AuthenticationError]
    body = openai_error_body(API_KEY_REFUSED, status.http, None, status.openai_code)
    if not is_openai_path(path):
        body["error"]["field"] = None  # mii's routes' shape has it too
    return JSONResponse(body, status_code=status.http, headers={"WWW-Authenticate": "Bearer"})
