"""One replica: an AsyncEngine behind a gRPC server.

Started by the deployment process as ``python -m mii.rpc.replica CONFIG_JSON``.
Its health reports NOT_SERVING until the model is loaded and has answered a
warm-up request. It exits when told to terminate, on SIGTERM, or when the
process that started it goes away.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import traceback
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mii.engine.async_engine import AsyncEngine
from mii.errors import InvalidRequestError, ReplicaError
from mii.rpc import mii_pb2, mii_pb2_grpc
from mii.rpc.convert import options_from_proto, piece_to_proto
from mii.rpc.status import abort

SERVICE = mii_pb2.DESCRIPTOR.services_by_name["Mii"].full_name
STARTUP_ERROR = "MII_STARTUP_ERROR"


class ReplicaServicer(mii_pb2_grpc.MiiServicer):
    """Serves one engine. ``engine`` is None while the model loads (UNAVAILABLE)."""

    def __init__(self, stop: asyncio.Event):
        self.engine: AsyncEngine | None = None
        self.info = mii_pb2.ModelInfoReply()
        self.stop = stop
        self.in_flight = 0

    async def _ready(self, context) -> None:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")

    async def Generate(self, request, context):
        await self._ready(context)
        params = options_from_proto(request.options)
        self.in_flight += 1
        try:
            responses = await self.engine.generate(list(request.prompts), **params)
        except Exception as err:
            await abort(context, engine_error(err))
        finally:
            self.in_flight -= 1
        return mii_pb2.GenerateReply(responses=[piece_to_proto(r) for r in responses])

    async def GenerateStream(self, request, context):
        await self._ready(context)
        if len(request.prompts) != 1:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "GenerateStream takes exactly one prompt"
            )
        params = options_from_proto(request.options)
        self.in_flight += 1
        try:
            # A cancelled call or an exceeded deadline cancels this handler, which
            # closes the stream and so aborts the request in the engine.
            async for piece in self.engine.stream(request.prompts[0], **params):
                yield piece_to_proto(piece)
        except Exception as err:
            await abort(context, engine_error(err))
        finally:
            self.in_flight -= 1

    async def ModelInfo(self, request, context):
        return self.info

    async def Stats(self, request, context):
        await self._ready(context)
        stats = self.engine.stats()
        return mii_pb2.StatsReply(
            running=int(stats["running"]),
            waiting=int(stats["waiting"]),
            kv_cache_usage=float(stats["kv_cache_usage"]),
            preemptions=int(stats["preemptions"]),
            in_flight=self.in_flight,
        )

    async def Terminate(self, request, context):
        self.stop.set()
        return mii_pb2.TerminateReply()


def engine_error(err: Exception) -> Exception:
    """What a replica answers for its engine's exception: a request error as it is
    (INVALID_ARGUMENT naming the field); anything else, whatever its class, as this
    replica's failure (INTERNAL, details naming the class)."""
    if isinstance(err, InvalidRequestError):
        return err
    return ReplicaError(f"{type(err).__name__}: {err}")


def add_standard_services(server: grpc.aio.Server) -> health.aio.HealthServicer:
    """Health checking and reflection, as every mii gRPC server offers them."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return health_servicer


async def set_health(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE):
        await servicer.set(name, status)


async def serve_replica(config: dict[str, Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    server = grpc.aio.server()
    address = f"{config['host']}:{config['port']}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as err:
        raise OSError(f"cannot listen on {address} (is the port in use?): {err}") from None
    health_servicer = add_standard_services(server)
    servicer = ReplicaServicer(stop)
    mii_pb2_grpc.add_MiiServicer_to_server(servicer, server)
    await set_health(health_servicer, False)
    await server.start()

    tensor_parallel = config.get("tensor_parallel", 1)
    workers = start_rank_workers(config) if tensor_parallel > 1 else []

    def load() -> AsyncEngine:
        options = {**config["engine_options"], "tensor_parallel": tensor_parallel}
        return AsyncEngine(config["model"], **options)

    try:
        engine = await asyncio.to_thread(load)
    except BaseException:
        stop_rank_workers(workers)
        raise
    await engine.generate("warm up", max_new_tokens=1)  # compile/allocate before SERVING
    servicer.info = mii_pb2.ModelInfoReply(
        deployment_name=config["deployment_name"],
        model=config["model"],
        max_length=engine.core.max_length,
        replicas=1,
    )
    servicer.engine = engine
    await set_health(health_servicer, True)

    parent = os.getppid()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except asyncio.TimeoutError:
            if os.getppid() != parent:  # the deployment process died: do not linger
                break
            if engine.core.failure is not None:  # a tensor-parallel rank failed
                await set_health(health_servicer, False)
    await set_health(health_servicer, False)
    await server.stop(grace=2.0)
    await engine.aclose()
    stop_rank_workers(workers)


def start_rank_workers(config: dict[str, Any]) -> list[subprocess.Popen]:
    """Start ranks 1..N-1 of this replica's tensor-parallel engine (this process is
    rank 0); they share this process's GPUs (CUDA_VISIBLE_DEVICES) and log."""
    world = config["tensor_parallel"]
    group_env = {
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": config.get("tp_master_addr", "127.0.0.1"),
        "MASTER_PORT": str(config["tp_master_port"]),
    }
    os.environ.update(group_env, RANK="0", LOCAL_RANK="0")
    workers = []
    for rank in range(1, world):
        env = {**os.environ, **group_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "mii.engine.tp_worker", json.dumps(config)],
                env=env,
                stdin=subprocess.DEVNULL,
            )
        )
    return workers


def stop_rank_workers(workers: list[subprocess.Popen], timeout: float = 5.0) -> None:
    """Wait for the ranks to leave (rank 0 told them to stop), then make sure."""
    for worker in workers:
        try:
            worker.wait(timeout)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def run_event_loop(main) -> None:
    """Run ``main`` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop

        uvloop.run(main)
    except ImportError:
        asyncio.run(main)


def main(argv: list[str] | None = None) -> int:
    config = json.loads((argv or sys.argv[1:])[0])
    try:
        run_event_loop(serve_replica(config))
    except Exception as err:
        traceback.print_exc()
        print(f"{STARTUP_ERROR} {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
