"""Who may call a deployment: API keys on the public port, an internal token on
the replicas' ports.

Every call carries ``authorization: Bearer SECRET`` (gRPC metadata; the HTTP
header of the same name on the REST gateway, see :mod:`mii.rpc.http.auth`):

- the deployment's public (balancer) port requires the deployment's ``api_key``
  when it has one, on every method, reflection and health checking's ``Watch``
  included, but not on health checking's ``Check`` of the whole server (service
  ``""``, :data:`KEYLESS_CHECK`): liveness probes (Kubernetes' ``grpc`` probe)
  cannot send a key, and the answer says only SERVING or NOT_SERVING (vLLM's
  health route takes no key either). ``Check`` of the ``mii.Mii`` service keeps
  the key, so that a client can learn that its key is refused;
- a replica's port requires, always, proof of the token its deployment drew at
  start (:func:`new_token`), handed over in the environment (``MII_REPLICA_TOKEN``):
  only the deployment's own pool can call a replica, so another local user
  cannot ``Terminate`` or ``Generate`` on a replica port. The token itself never
  travels: each call carries ``mii-proof: TIME.HMAC(token, port|method|TIME)``
  (:func:`call_proof`), which the replica checks against its own port and the
  clock (:data:`PROOF_WINDOW_S`). So a process that binds a dead replica's port
  while it restarts learns nothing it could use on another replica (a Bearer
  token sent there was good on every replica).

Secrets are compared in constant time (their SHA-256 digests with
``hmac.compare_digest``: neither the content nor the length of the expected one
leaks through timing).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import secrets
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence

import grpc

from mii.rpc.listen import bind_error

AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
BEARER = "bearer"

API_KEY_REFUSED = (
    "missing or wrong API key: this deployment requires 'authorization: Bearer KEY' "
    "(mii.client(name) reads the key from the deployment's record on this machine; "
    "else pass mii.client(..., api_key=KEY) or set MII_API_KEY)"
)
TOKEN_REFUSED = (
    "this port serves only its own deployment's processes (missing or wrong internal "
    "token); call the deployment's port instead"
)


def new_token() -> str:
    """A fresh random secret (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def secret_matches(presented: bytes | None, expected: bytes) -> bool:
    """Whether ``presented`` is ``expected``, in time independent of both."""
    if presented is None:
        presented = b""
    return hmac.compare_digest(_digest(presented), _digest(expected))


def bearer_secret(authorization: str | bytes | None) -> bytes | None:
    """The secret of an ``authorization`` value ``Bearer SECRET`` (the scheme in
    any case), or None when there is none."""
    if authorization is None:
        return None
    if isinstance(authorization, str):
        authorization = authorization.encode("utf-8", "surrogateescape")
    scheme, _, secret = authorization.strip().partition(b" ")
    if scheme.lower() != BEARER.encode() or not secret.strip():
        return None
    return secret.strip()


def bearer_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata that presents ``secret``."""
    return ((AUTHORIZATION, f"Bearer {secret}"),)


TERMINATE_REFUSED = (
    "Terminate is accepted only from this deployment's own machine while it has no API key: "
    "stop it there (mii terminate NAME, or SIGTERM to mii serve), or start it with "
    "--api-key / api_key= so that key holders may stop it from anywhere (and only they)"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address to bind or of a peer) is this
    machine's loopback; IPv4 loopback written as IPv6 (``::ffff:127.0.0.1``) too."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def peer_is_local(peer: str) -> bool:
    """Whether a gRPC peer (``ipv4:127.0.0.1:5000``, ``ipv6:%5B::1%5D:5000`` (grpc
    percent-encodes the brackets), ``unix:/path``) calls from this machine: a Unix
    socket, a loopback address, or an address of one of this machine's interfaces
    (``mii terminate`` of a deployment bound to it dials that address)."""
    kind, _, address = peer.partition(":")
    address = urllib.parse.unquote(address)
    if kind in ("unix", "unix-abstract"):
        return True
    if kind == "ipv6" and address.startswith("["):
        ip = address[1:].partition("]")[0]
    elif kind == "ipv4":
        ip = address.rpartition(":")[0]
    else:
        return False
    return is_loopback(ip) or _is_own_address(ip)


def _is_own_address(ip: str) -> bool:
    """Whether ``ip`` is assigned to this machine: only then can a socket bind it."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return not address.is_unspecified and bind_error(ip, 0) is None


def open_to_network_warning(host: str, ports: Sequence[int], api_key: str | None) -> str | None:
    """The start-up warning of a deployment that anyone on the network can use:
    bound beyond the loopback without an API key; None otherwise."""
    if api_key is not None or is_loopback(host):
        return None
    listed = " and ".join(str(p) for p in ports)
    return (
        f"[mii] warning: listening on {host!r} without an API key: anyone who can reach "
        f"port {listed} of this machine can generate, and anything on this machine (a local "
        "proxy too) can stop it; pass --api-key (api_key=) or bind --host 127.0.0.1"
    )


def warn_if_open_to_network(host: str, ports: Sequence[int], api_key: str | None) -> None:
    """Print :func:`open_to_network_warning`'s warning, when there is one, on stderr."""
    warning = open_to_network_warning(host, ports, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)


# ----- servers ---------------------------------------------------------------------


# The public port's one call that needs no key: the whole server's serving status.
KEYLESS_CHECK = "/grpc.health.v1.Health/Check"


class RequireSecret(grpc.aio.ServerInterceptor):
    """Refuse, with UNAUTHENTICATED and ``message``, every call of a server (every
    service and method; with ``keyless_check``, all but health checking's Check of
    the whole server) whose metadata does not present ``secret``."""

    def __init__(self, secret: str, message: str, keyless_check: bool = False) -> None:
        self._expected = secret.encode()
        self._message = message
        self._keyless_check = keyless_check

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        given = [v for k, v in details.invocation_metadata or () if k == AUTHORIZATION]
        # Exactly one (as the HTTP API): with two, a wrong key beside a right one,
        # which of them counted would be this server's choice.
        presented = bearer_secret(given[0]) if len(given) == 1 else None
        handler = await continuation(details)
        if secret_matches(presented, self._expected):
            return handler
        if handler is not None and self._keyless_check and details.method == KEYLESS_CHECK:
            return _server_status_only(handler, self._message)
        return None if handler is None else _refusing(handler, self._message)


def _server_status_only(check: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """Health checking's ``check`` handler answering the whole server's status
    (service ``""``) and refusing any service's with UNAUTHENTICATED."""

    async def status(request, context: grpc.aio.ServicerContext):
        if request.service:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        return await check.unary_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(
        status,
        request_deserializer=check.request_deserializer,
        response_serializer=check.response_serializer,
    )


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that answers UNAUTHENTICATED. It reads the
    request as raw bytes: nothing an unauthenticated caller sends is parsed."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    serialize = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, response_serializer=serialize)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, response_serializer=serialize)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=serialize)
    return grpc.stream_stream_rpc_method_handler(refuse, response_serializer=serialize)


def api_key_interceptors(api_key: str | None) -> tuple[grpc.aio.ServerInterceptor, ...]:
    """The interceptors of a deployment's public port: none without an API key."""
    if api_key is None:
        return ()
    return (RequireSecret(api_key, API_KEY_REFUSED, keyless_check=True),)


PROOF = "mii-proof"  # gRPC metadata key of a replica call's proof
PROOF_WINDOW_S = 60  # a proof older or newer than this (seconds) is refused


def call_proof(secret: str, port: int, method: str, now: float | None = None) -> str:
    """The proof that a call of ``method`` to the replica on ``port`` comes from a
    holder of ``secret``: ``TIME.HEX`` with HEX = HMAC-SHA256(secret, port|method|TIME)."""
    stamp = int(time.time() if now is None else now)
    message = f"{port}|{method}|{stamp}".encode()
    return f"{stamp}.{hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()}"


def proof_matches(presented: str | bytes | None, secret: str, port: int, method: str) -> bool:
    """Whether ``presented`` is a fresh :func:`call_proof` of ``secret`` for this
    ``port`` and ``method`` (compared in constant time)."""
    if isinstance(presented, bytes):
        presented = presented.decode("ascii", "replace")
    stamp, _, _ = (presented or "").partition(".")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > PROOF_WINDOW_S:
        return False
    expected = call_proof(secret, port, method, now=int(stamp))
    return hmac.compare_digest(presented.encode(), expected.encode())


class RequireProof(grpc.aio.ServerInterceptor):
    """Refuse, with UNAUTHENTICATED and ``message``, every call of a replica's server
    whose metadata carries no fresh proof of ``secret`` for ``port`` and the method."""

    def __init__(self, secret: str, port: int, message: str) -> None:
        self._secret, self._port, self._message = secret, port, message

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        presented = dict(details.invocation_metadata or ()).get(PROOF)
        handler = await continuation(details)
        if proof_matches(presented, self._secret, self._port, details.method):
            return handler
        return None if handler is None else _refusing(handler, self._message)


def replica_interceptors(token: str, port: int) -> tuple[grpc.aio.ServerInterceptor, ...]:
    """The interceptors of a replica's port: only proofs of its deployment's token pass."""
    return (RequireProof(token, port, TOKEN_REFUSED),)


# ----- clients ---------------------------------------------------------------------


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _Presenter:
    """What a client's calls present: ``authorization: Bearer SECRET``, or with
    ``proof_port`` a fresh :func:`call_proof` for that replica port instead."""

    def __init__(self, secret: str, proof_port: int | None = None) -> None:
        self._secret, self._port = secret, proof_port
        self._bearer = bearer_metadata(secret)

    def _extra(self, method: str | bytes) -> tuple[tuple[str, str], ...]:
        """The metadata a call of ``method`` adds."""
        if self._port is None:
            return self._bearer
        method = method.decode() if isinstance(method, bytes) else method
        return ((PROOF, call_proof(self._secret, self._port, method)),)


class SendSecret(
    _Presenter,
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds what :class:`_Presenter` presents to every call of a (sync) channel."""

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *self._extra(details.method)),
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _AsyncSecret(_Presenter):
    """Adds what :class:`_Presenter` presents to the calls of a ``grpc.aio`` channel."""

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._extra(details.method))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files an interceptor under the first call kind it implements only, so
# each kind needs an object of its own. mii's service and health checking have
# unary requests only.
class _AsyncUnaryUnary(_AsyncSecret, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AsyncUnaryStream(_AsyncSecret, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


def channel(
    address: str, secret: str | None, options: Sequence = (), proof: bool = False
) -> grpc.Channel:
    """A sync channel to ``address`` (with grpc channel ``options``) whose every call
    presents ``secret`` (if any); ``proof``: as a per-call proof for the replica at
    ``address`` (:func:`call_proof`), not the secret itself."""
    plain = grpc.insecure_channel(address, options=options)
    if secret is None:
        return plain
    port = int(address.rpartition(":")[2]) if proof else None
    return grpc.intercept_channel(plain, SendSecret(secret, port))


def aio_channel(
    address: str, secret: str | None, options: Sequence = (), proof: bool = False
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``address`` (with grpc channel ``options``) whose
    every call presents ``secret`` (if any); ``proof``: as a per-call proof for the
    replica at ``address`` (:func:`call_proof`), not the secret itself."""
    if secret is None:
        return grpc.aio.insecure_channel(address, options=options)
    port = int(address.rpartition(":")[2]) if proof else None
    interceptors = [_AsyncUnaryUnary(secret, port), _AsyncUnaryStream(secret, port)]
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
