"""One replica: an AsyncEngine behind a gRPC server.

Started by the deployment process as ``python -m mii.rpc.replica CONFIG_JSON``
(a ``ReplicaConfig``), with its deployment's internal token in ``MII_REPLICA_TOKEN``:
its port refuses every call that does not present it (:mod:`mii.rpc.auth`).
Its health reports NOT_SERVING until the model is loaded and has answered a
warm-up request. It exits when told to terminate or when the process that started
it goes away (while it loads too: :mod:`mii.rpc.parent_death`); it ignores SIGINT
and SIGHUP (the deployment drains first). SIGTERM while it loads ends it at once;
once it serves, SIGTERM drains it: new calls are refused, and it exits when its calls are
done, or ``shutdown_grace_s`` plus a margin later. A stop that signals every
process of the deployment at once (systemd's default, a process-group kill)
thereby leaves the deployment's own drain in charge: it ends what is left at its
grace period and then terminates the replica.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

import grpc

import mii.envs as envs
from mii.engine.async_engine import AsyncEngine
from mii.engine.distributed import TensorParallelError
from mii.errors import (
    DeploymentError,
    EngineClosedError,
    InvalidRequestError,
    ReplicaError,
    ServerOverloadedError,
    UnavailableError,
)
from mii.rpc import auth, mii_pb2, mii_pb2_grpc
from mii.rpc.convert import (
    ACCEPTED_METADATA,
    options_from_proto,
    piece_to_proto,
    prompts_from_proto,
    stream_prompt,
)
from mii.rpc.deployment_config import ReplicaConfig
from mii.rpc.fd_limit import raise_open_files_limit
from mii.rpc.health import add_standard_services, set_health
from mii.rpc.listen import listening_server
from mii.rpc.parent_death import die_with_parent
from mii.rpc.pool import stats_reply
from mii.rpc.proto_parse import add_mii_servicer
from mii.rpc.rank_workers import start_rank_workers, stop_rank_workers
from mii.rpc.startup_errors import run_reporting_errors
from mii.rpc.status import abort

# Seconds a replica draining on SIGTERM waits past the deployment's grace period.
DRAIN_MARGIN_S = 5.0


class ReplicaServicer(mii_pb2_grpc.MiiServicer):
    """Serves one engine. ``engine`` is None while the model loads (UNAVAILABLE)."""

    def __init__(self, stop: asyncio.Event):
        self.engine: AsyncEngine | None = None
        self.info = mii_pb2.ModelInfoReply()
        self.stop = stop
        self.in_flight = 0
        self.draining = False  # SIGTERM: new calls refused, the running ones finish

    async def _ready(self, context) -> None:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")

    async def _accepting(self, context) -> None:
        """Ready, and not draining: for the calls that start a request."""
        await self._ready(context)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica is shutting down")

    async def Generate(self, request, context):
        await self._accepting(context)
        params = options_from_proto(request.options)
        self.in_flight += 1
        try:
            responses = await self.engine.generate(prompts_from_proto(request), **params)
        except Exception as err:
            await abort(context, engine_error(err))
        finally:
            self.in_flight -= 1
        return mii_pb2.GenerateReply(responses=[piece_to_proto(r) for r in responses])

    async def GenerateStream(self, request, context):
        await self._accepting(context)
        try:
            prompt = stream_prompt(request)
        except InvalidRequestError as err:
            await abort(context, err)
        params = options_from_proto(request.options)
        self.in_flight += 1
        pieces = None
        try:
            pieces = await self.engine.open_stream(prompt, **params)
            # Accepted: said before any token (the gateway answers a request of several
            # streamed prompts once each is accepted, so a refusal is still its 400).
            await context.send_initial_metadata(ACCEPTED_METADATA)
            # A cancelled call or an exceeded deadline cancels this handler, which
            # closes the stream and so aborts the request in the engine.
            async for piece in pieces:
                yield piece_to_proto(piece)
        except Exception as err:
            await abort(context, engine_error(err))
        finally:
            if pieces is not None:
                pieces.close()
            self.in_flight -= 1

    async def ModelInfo(self, request, context):
        return self.info

    async def Stats(self, request, context):
        await self._ready(context)
        return stats_reply(self.engine.stats(), self.in_flight)

    async def Terminate(self, request, context):
        self.stop.set()
        return mii_pb2.TerminateReply()


def engine_error(err: Exception) -> Exception:
    """What a replica answers for its engine's exception: a request error as it is
    (INVALID_ARGUMENT naming the field), a refusal for overload as it is
    (RESOURCE_EXHAUSTED); a failed tensor-parallel rank or a closed engine as
    UnavailableError (UNAVAILABLE: the replica cannot serve, another or a retry
    can); anything else, a bug whatever its class, as this replica's failure
    (INTERNAL). The details name the class."""
    if isinstance(err, (InvalidRequestError, ServerOverloadedError)):
        return err
    if isinstance(err, (TensorParallelError, EngineClosedError)):
        return UnavailableError(f"{type(err).__name__}: {err}")
    return ReplicaError(f"{type(err).__name__}: {err}")


async def serve_replica(config: ReplicaConfig) -> None:
    raise_open_files_limit()
    stop = asyncio.Event()
    servicer = ReplicaServicer(stop)
    loop = asyncio.get_running_loop()

    # SIGTERM keeps its default action (end the process) until the model is up: the
    # kernel acts on it even while a load holds the GIL, and nothing needs draining.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Ctrl-C reaches the whole process group; the deployment process answers it by
    # draining, and stops its replicas once their requests are done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (a closed terminal's: the same)

    token = envs.REPLICA_TOKEN.get()
    if token is None:
        raise DeploymentError(
            f"{envs.REPLICA_TOKEN.name} is not set: a replica is started by its deployment "
            "(mii.serve, mii serve), which gives it the token its port requires"
        )
    os.environ.pop(envs.REPLICA_TOKEN.name)  # the rank workers started below need none
    # A busy port fails here, naming it; only the deployment's own pool gets through.
    server = listening_server(config.address, auth.replica_interceptors(token, config.port))
    health_servicer = add_standard_services(server)
    add_mii_servicer(servicer, server)
    await set_health(health_servicer, False)
    await server.start()

    deployment = config.deployment
    engine_config = deployment.engine_config()
    workers = []
    if engine_config.tensor_parallel > 1:
        workers = start_rank_workers(
            engine_config, deployment.tp_master_addr, config.tp_master_port
        )

    def load() -> AsyncEngine:
        options = engine_config.model_dump(exclude={"model"}, exclude_unset=True)
        return AsyncEngine(engine_config.model, **options)

    async def bring_up() -> AsyncEngine:
        engine = await asyncio.to_thread(load)
        # Its own seeds: another replica, or this one before a restart, drew others.
        engine.separate_sampling_stream(f"replica {config.index} start {config.start}")
        await engine.warm_up()  # compile/allocate before SERVING
        return engine

    starting = asyncio.ensure_future(bring_up())
    try:
        engine = await _unless_stopped(starting, stop, lambda: parent_gone(config))
    except BaseException:
        stop_rank_workers(workers)
        # (else the server's __del__ runs after the loop closed: "Event loop is closed")
        await server.stop(None)
        if not starting.done():  # stopped, or orphaned, while loading: exit now
            _exit_while_starting(config)
        raise
    servicer.info = mii_pb2.ModelInfoReply(
        deployment_name=deployment.deployment_name,
        model=deployment.model,
        max_length=engine.core.max_length,
        replicas=1,
    )
    servicer.engine = engine
    loop.add_signal_handler(signal.SIGTERM, functools.partial(setattr, servicer, "draining", True))
    await set_health(health_servicer, True)

    drain_deadline: float | None = None
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except asyncio.TimeoutError:
            if parent_gone(config):  # the deployment process died: do not linger
                break
            if engine.core.failure is not None:  # a tensor-parallel rank failed
                await set_health(health_servicer, False)
        if servicer.draining and drain_deadline is None:
            await set_health(health_servicer, False)
            # Later than the deployment's own grace period: where it drains too, it
            # ends the calls left and terminates this replica first.
            drain_deadline = loop.time() + deployment.shutdown_grace_s + DRAIN_MARGIN_S
        if drain_deadline is not None and (
            servicer.in_flight == 0 or loop.time() >= drain_deadline
        ):
            break
    await set_health(health_servicer, False)
    await server.stop(grace=2.0)
    await engine.aclose()
    stop_rank_workers(workers)


def parent_gone(config: ReplicaConfig) -> bool:
    """Whether the deployment process that started this replica has ended (its pid
    is in the config: one that died while this process was still starting left it
    to init, whose pid a later getppid() would have taken for the parent's)."""
    return config.parent_pid is not None and os.getppid() != config.parent_pid


class _StopWhileStarting(Exception):
    """Terminate, or the deployment's end, while the model loads."""


async def _unless_stopped(
    starting: asyncio.Future, stop: asyncio.Event, gone: Callable[[], bool]
) -> AsyncEngine:
    """The engine ``starting`` brings up, unless ``stop`` is set or ``gone()`` turns
    true first (checked every half second): then _StopWhileStarting."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not starting.done():
            await asyncio.wait({starting, stopped}, timeout=0.5, return_when="FIRST_COMPLETED")
            if not starting.done() and (stop.is_set() or gone()):
                raise _StopWhileStarting()
        return starting.result()
    finally:
        stopped.cancel()


def _exit_while_starting(config: ReplicaConfig) -> NoReturn:
    """End the process at once: a model load cannot be interrupted, and a normal exit
    would wait for its thread (seconds to minutes) with the GPU memory held."""
    why = "its deployment ended" if parent_gone(config) else "told to stop (Terminate)"
    print(f"[mii] replica {config.index}: {why} while loading its model; exiting", flush=True)
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    config = ReplicaConfig.model_validate_json((argv or sys.argv[1:])[0])
    die_with_parent(config.parent_pid)
    return run_reporting_errors(serve_replica(config), with_traceback=True)


if __name__ == "__main__":
    sys.exit(main())
