"""Clients of a running deployment: sync, streaming-callback, iterator and asyncio."""

from __future__ import annotations

import asyncio
import math
import numbers
import os
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import mii.envs as envs
from mii.errors import (
    AuthenticationError,
    DeploymentNotFoundError,
    DeploymentUnresponsiveError,
    EngineClosedError,
    InvalidRequestError,
    RequestTimeoutError,
    UnavailableError,
)
from mii.prompts import Prompt, one_streamed_prompt
from mii.response import Response, join_pieces
from mii.rpc import auth, mii_pb2, mii_pb2_grpc, registry
from mii.rpc.convert import (
    QUICK_RECONNECT,
    UNLIMITED_MESSAGES,
    piece_from_proto,
    prompt_list,
    request_for,
    validated,
)
from mii.rpc.health import SERVICE
from mii.rpc.listen import host_port, refuse_url_or_bad_port
from mii.rpc.loop_channels import LoopChannels
from mii.rpc.piece_stream import CallCanceller, PieceStream
from mii.rpc.status import error_from_grpc

TERMINATE_CALL_S = 10.0  # a deployment answers Terminate at once, even while draining


# What gRPC says when an HTTP/1 server answers at a client's address (uvicorn's, or
# any other): the REST port given where the gRPC one belongs.
_NOT_GRPC = ("Trying to connect an http1.x server", "Failed parsing HTTP/2")


class MiiClient:
    """Talks to one deployment (its load balancer) over gRPC.

    A prompt is a text or a list of token ids (taken as they are: no special token
    is added); ``generate`` takes one prompt or a list of prompts of one kind.

    Every call (sync, streaming, asyncio, health checks, terminate) presents
    ``api_key`` (default: ``MII_API_KEY``) as ``authorization: Bearer KEY``
    metadata when there is one; a deployment with a different key refuses it
    with ``mii.AuthenticationError``.

    >>> client = mii.client("mistral-deployment")
    >>> client.generate(["Deepspeed is", "Seattle is"], max_new_tokens=128)
    """

    def __init__(
        self, address: str, deployment_name: str | None = None, api_key: str | None = None
    ) -> None:
        self.address = address
        self.deployment_name = deployment_name
        self._api_key = api_key if api_key is not None else envs.API_KEY.get()
        options = (*UNLIMITED_MESSAGES, *QUICK_RECONNECT)
        self._channel = auth.channel(address, self._api_key, options)
        self._open_stub = mii_pb2_grpc.MiiStub(self._channel)
        self._aio = LoopChannels(
            lambda: auth.aio_channel(self.address, self._api_key, options),
            mii_pb2_grpc.MiiStub,
        )
        self._closed = False

    @property
    def _stub(self) -> mii_pb2_grpc.MiiStub:
        self._require_open()
        return self._open_stub

    def _require_open(self) -> None:
        if self._closed:  # (grpc's own words: "Cannot invoke RPC on closed channel!")
            raise self._closed_error()

    def _closed_error(self) -> EngineClosedError:
        return EngineClosedError(
            f"this client of {self.deployment_name or self.address} is closed (close() or "
            "the end of its with block); the deployment still runs: make a new client "
            "with mii.client(...)"
        )

    # ----- sync ---------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        streaming_fn: Callable[[list[Response]], None] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> list[Response]:
        """Whole answers, in order. With ``streaming_fn`` (one prompt only), the
        callback receives ``[piece]`` for every new piece of text as it arrives."""
        prompts, timeout = prompt_list(prompts), call_timeout(timeout)
        if streaming_fn is not None:
            if not callable(streaming_fn):
                raise InvalidRequestError(
                    "streaming_fn is a function called with [piece] for every piece "
                    f"(got {streaming_fn!r})",
                    field="streaming_fn",
                )
            if len(prompts) != 1:
                raise InvalidRequestError("streaming_fn works with one prompt", field="prompts")
            pieces = []
            with self.stream(prompts[0], timeout=timeout, **params) as stream:
                for piece in stream:  # (a streaming_fn that raises ends the request)
                    streaming_fn([piece])
                    pieces.append(piece)
            return [join_pieces(pieces)]
        request = request_for(prompts, validated(params))
        try:
            reply = self._stub.Generate(request, timeout=timeout)
        except grpc.RpcError as err:
            raise self._error(err) from None
        return [piece_from_proto(p) for p in reply.responses]

    __call__ = generate  # client(prompts, ...), as DeepSpeed-MII's client is called

    def __getattr__(self, name: str) -> Any:
        # Only for names not found otherwise: DeepSpeed-MII's legacy query() gets a hint.
        hint = ""
        if name == "query":
            hint = " (DeepSpeed-MII's legacy query({'query': [...]}): generate(prompts, ...) here)"
        raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}{hint}")

    def stream(
        self, prompt: Prompt, timeout: float | None = None, **params: Any
    ) -> PieceStream[Response]:
        """Pieces of one answer as they are generated (the request is checked here,
        sent at the first piece asked for). ``close()``, or leaving a ``with
        client.stream(...) as pieces:`` block, cancels the call, which aborts the
        request on the server; so does a ``for`` loop over ``client.stream(...)`` itself
        left early, but not one over a stream a variable still holds."""
        self._require_open()
        request = request_for([one_streamed_prompt(prompt, "prompts")], validated(params))
        canceller = CallCanceller()
        return PieceStream(self._pieces(request, call_timeout(timeout), canceller), canceller)

    def _pieces(
        self, request: mii_pb2.GenerateRequest, timeout: float | None, canceller: CallCanceller
    ) -> Generator[Response, None, None]:
        call = canceller.call = self._stub.GenerateStream(request, timeout=timeout)
        try:
            if canceller.requested:  # closed by another thread before the call began
                return
            for piece in call:
                yield piece_from_proto(piece)
        except grpc.RpcError as err:
            if canceller.requested and err.code() == grpc.StatusCode.CANCELLED:
                return  # closed from another thread: the stream ends
            raise self._error(err) from None
        finally:
            call.cancel()

    def model_info(self) -> mii_pb2.ModelInfoReply:
        """The deployment's name, model, maximum length and replica count (a protobuf
        message: read its fields as attributes)."""
        try:
            return self._stub.ModelInfo(mii_pb2.ModelInfoRequest(), timeout=10)
        except grpc.RpcError as err:
            raise self._error(err) from None

    def stats(self) -> mii_pb2.StatsReply:
        """The deployment's load now: requests running and waiting, KV cache usage,
        tokens processed and the prefix cache's queries and hits (in tokens), each
        replica's state (a protobuf message: read its fields as attributes)."""
        try:
            return self._stub.Stats(mii_pb2.StatsRequest(), timeout=10)
        except grpc.RpcError as err:
            raise self._error(err) from None

    def _gone_error(self, details: str) -> DeploymentNotFoundError | None:
        """When nothing answers at this client's address: the error for a deployment
        that no retry brings back here (terminated, ended, or started again at
        another address), from this machine's registry; None when it may return."""
        name = self.deployment_name
        if name is None:
            return None
        try:  # (one starting again, at this address, comes back: nothing to say)
            info = registry.lookup(name, include_starting=True)
        except OSError:  # the registry folder cannot be read: say only what gRPC said
            return None
        if info is None:
            # a background deployment's log (mii serve logs to its terminal)
            log = registry.log_path(name)
            where = f": its log is {log}" if log.is_file() else ""
            return DeploymentNotFoundError(
                f"the deployment {name!r} is not running any more (terminated, or its "
                f"processes ended{where}); start it again (mii.serve, or mii serve) and "
                f"connect a new client ({details})"
            )
        now = host_port(info["host"], info["port"])
        if now != self.address:  # (same port: another host name of it, [::1] for 127.0.0.1)
            moved = not self.address.endswith(f":{info['port']}")
            said = "no longer listens at {}: it was started again at {}" if moved else ""
            said = (said or "does not listen at {}: it listens at {}").format(self.address, now)
            return DeploymentNotFoundError(
                f"the deployment {name!r} {said}; connect a new client (mii.client({name!r}))"
            )
        return None

    def _error(self, err: grpc.RpcError) -> Exception:
        """The mii error of a failed call; a refused key says whether this client
        sent one (the server cannot tell a wrong key from a missing one)."""
        if self._closed:  # its channel closed under the call: close() from elsewhere
            return self._closed_error()
        code, details = err.code(), err.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:  # the call's own timeout
            return RequestTimeoutError(
                f"the deployment at {self.address} did not answer within the call's "
                f"timeout ({details})"
            )
        if code == grpc.StatusCode.UNAVAILABLE and any(m in details for m in _NOT_GRPC):
            return DeploymentNotFoundError(
                f"an HTTP server answers at {self.address}, not a deployment's gRPC "
                "port (its REST / OpenAI port?): mii.client takes a deployment's name, or "
                "host:port with its gRPC port (mii.serve's port=, mii serve --grpc-port; "
                f"mii list shows both) ({details})"
            )
        if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details:
            gone = self._gone_error(details)
            if gone is not None:
                return gone
            return UnavailableError(
                f"nothing answers at {self.address}: the deployment is not running "
                "(terminated? mii list shows the running ones and those that do not answer), "
                f"is stopped or wedged, or cannot be reached ({details})"
            )
        if code != grpc.StatusCode.UNAUTHENTICATED:
            return error_from_grpc(err)
        if self._api_key:
            return AuthenticationError(
                f"the deployment at {self.address} refused this API key (from api_key=, "
                "--api-key, the deployment's record or MII_API_KEY): it is not the one the "
                "deployment was started with"
            )
        return AuthenticationError(
            f"the deployment at {self.address} requires an API key: pass api_key=KEY "
            "(mii.client), --api-key KEY (mii generate / terminate) or set MII_API_KEY"
        )

    def is_healthy(self, timeout: float = 2.0) -> bool:
        """Whether the deployment answers SERVING. A deployment that refuses this
        client's key raises AuthenticationError (it is there: the key is wrong)."""
        self._require_open()
        try:
            # The Mii service's status, not the server's: that one takes no key (for
            # liveness probes), and would call a deployment that refuses it healthy.
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise self._error(err) from None
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def terminate_server(self, timeout: float = 60.0) -> None:
        """Stop every process of the deployment and wait until they are gone (a named
        deployment already gone: nothing to do); DeploymentNotFoundError when nothing
        answers at a client's ``host:port`` (stopped already, or a wrong address),
        DeploymentUnresponsiveError when something answers but does not stop."""
        info = registry.lookup(self.deployment_name) if self.deployment_name else None
        try:
            self._stub.Terminate(mii_pb2.TerminateRequest(), timeout=TERMINATE_CALL_S)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeploymentUnresponsiveError(
                    f"the deployment at {self.address} did not answer its Terminate call "
                    f"within {TERMINATE_CALL_S:g} s: it is stopped (SIGSTOP?), wedged or "
                    "overloaded (mii terminate NAME signals its processes)"
                ) from None
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise self._error(err) from None
            # Something took the connection but never spoke HTTP/2 (a stopped or wedged
            # process: its kernel still accepts). A channel whose earlier call failed so
            # answers at once, where a fresh one waits out the deadline above.
            if "timed out" in (err.details() or "").lower():
                raise DeploymentUnresponsiveError(
                    f"the deployment at {self.address} accepts connections but does not "
                    "answer (its connection attempt timed out): it is stopped (SIGSTOP?) or "
                    "wedged (mii terminate NAME signals its processes)"
                ) from None
            # (UNAVAILABLE is also how a stopping deployment's call ends: its socket
            # closes; and a named deployment already gone is stopped. Nothing to
            # connect to at an address given as host:port is an error.)
            unreachable = "failed to connect" in (err.details() or "").lower()
            if self.deployment_name is None and unreachable:
                raise DeploymentNotFoundError(
                    f"no deployment answers at {self.address}: nothing to stop (it was "
                    "already stopped, or the address is wrong; mii list shows the running ones)"
                ) from None
        if info is not None:
            # (a plain TimeoutError: it answered, and may still be draining; mii terminate
            # then says so rather than signal a deployment that is stopping)
            wait_gone([info["pid"], *info.get("replica_pids", [])], timeout)

    def close(self) -> None:
        """Close this client's connections (the deployment keeps running)."""
        self._closed = True
        self._channel.close()
        self._aio.close()

    def __enter__(self) -> MiiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()  # as close(): the deployment keeps running

    # ----- asyncio ------------------------------------------------------------

    def _async_stub(self) -> mii_pb2_grpc.MiiStub:
        self._require_open()
        return self._aio.stub(asyncio.get_running_loop())

    async def agenerate(
        self, prompts: Prompt | Sequence[Prompt], timeout: float | None = None, **params: Any
    ) -> list[Response]:
        request = request_for(prompts, validated(params))
        try:
            reply = await self._async_stub().Generate(request, timeout=call_timeout(timeout))
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None
        except asyncio.CancelledError:
            self._raise_if_closed_under_the_call()
            raise
        return [piece_from_proto(p) for p in reply.responses]

    def astream(
        self, prompt: Prompt, timeout: float | None = None, **params: Any
    ) -> AsyncIterator[Response]:
        """``stream`` for asyncio: ``async for piece in client.astream(...)``."""
        self._require_open()
        request = request_for([one_streamed_prompt(prompt, "prompts")], validated(params))
        return self._apieces(request, call_timeout(timeout))

    async def _apieces(
        self, request: mii_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[Response]:
        call = self._async_stub().GenerateStream(request, timeout=timeout)
        try:
            async for piece in call:
                yield piece_from_proto(piece)
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None
        except asyncio.CancelledError:
            self._raise_if_closed_under_the_call()
            raise
        finally:
            call.cancel()

    def _raise_if_closed_under_the_call(self) -> None:
        """A grpc.aio call whose channel close() closed ends as CancelledError: that
        is EngineClosedError, unless the caller's own task is being cancelled."""
        task = asyncio.current_task()
        if self._closed and not (task is not None and task.cancelling()):
            raise self._closed_error() from None


# A deadline this far off is none: grpc's overflows near 2**63 ns and failed every call
# at once as "did not answer within the call's timeout" (timeout=1e10, math.inf).
NO_DEADLINE_PAST_S = 1e9


def call_timeout(timeout: Any) -> float | None:
    """A call's ``timeout`` as grpc takes it: None, +inf or anything past 31 years is no
    deadline; anything but a positive number of seconds is InvalidRequestError."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise InvalidRequestError(
            f"timeout is a number of seconds, or None for no deadline (got {timeout!r})",
            field="timeout",
        )
    if math.isnan(timeout) or timeout <= 0:
        raise InvalidRequestError(
            f"timeout must be a positive number of seconds, or None for no deadline "
            f"(got {timeout!r})",
            field="timeout",
        )
    return None if timeout >= NO_DEADLINE_PAST_S else float(timeout)


def wait_gone(pids: list[int], timeout: float) -> None:
    """Wait until none of ``pids`` runs; TimeoutError naming them after ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    while running := [p for p in pids if registry.pid_alive(p)]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"deployment processes {running} still running after {timeout} s")
        time.sleep(0.05)


def client(
    model_or_deployment_name: str | os.PathLike[str], api_key: str | None = None
) -> MiiClient:
    """A client of a running deployment, found by deployment name, by model name
    (the default deployment name of that model:
    :func:`mii.rpc.registry.default_deployment_name`), by a name it serves the
    model under (``served_model_name``, the OpenAI API's model name) or the model
    it was started with (a hub id, or a path to the same checkpoint) when one
    deployment has it, or given as ``"host:port"``.

    Its API key: ``api_key``, else the one in the deployment's record on this
    machine (readable only by the user who started it), else ``MII_API_KEY``."""
    model_or_deployment_name = os.fspath(model_or_deployment_name)  # a path, as mii.serve takes
    info = registry.find(model_or_deployment_name)
    if info is None:
        registry.refuse_starting(model_or_deployment_name)
    if info is not None:
        key = api_key if api_key is not None else info.get("api_key")
        return MiiClient(
            host_port(info["host"], info["port"]), info["deployment_name"], api_key=key
        )
    refuse_url_or_bad_port(model_or_deployment_name)
    host, sep, port = model_or_deployment_name.rpartition(":")
    if sep and port.isdigit() and host:  # (one of this machine's: its name, for
        here = registry.at_address(host, int(port)) or {}  # terminate_server's wait)
        name = here.get("deployment_name")
        return MiiClient(model_or_deployment_name, name, api_key=api_key)
    logs = [registry.log_path(n) for n in registry.candidate_names(model_or_deployment_name)]
    last_log = next((log for log in logs if log.exists()), None)
    raise DeploymentNotFoundError(
        f"no running deployment named {model_or_deployment_name!r} is recorded in "
        f"{registry.cache_dir() / 'deployments'} (deployments record themselves under the "
        "MII_CACHE_DIR they were started with; start one with mii.serve, or pass 'host:port')"
        + (
            f"; a deployment of that name ran here (stopped, died, or is still starting): "
            f"its log is {last_log}"
            if last_log
            else ""
        )
    )
