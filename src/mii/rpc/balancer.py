"""The deployment's front door: a gRPC server that speaks the same service as a
replica and forwards each call to the least-loaded replica through the pool."""

from __future__ import annotations

import asyncio

import grpc

from mii.errors import InvalidRequestError, UnavailableError
from mii.rpc import mii_pb2, mii_pb2_grpc
from mii.rpc.auth import TERMINATE_REFUSED, peer_is_local
from mii.rpc.convert import options_from_proto, piece_to_proto, prompts_from_proto, stream_prompt
from mii.rpc.pool import ReplicaPool
from mii.rpc.replica_health import add_replica_health
from mii.rpc.status import abort


class BalancerServicer(mii_pb2_grpc.MiiServicer):
    """The deployment's gRPC service: each call goes to a replica of ``pool``. It
    answers from the moment the deployment binds its port: until ``ready()`` (the
    replicas are loading the model) a call is UNAVAILABLE saying so, where it hung
    until the client's deadline; Terminate stops a deployment that is starting."""

    def __init__(self, name: str, stop: asyncio.Event, has_api_key: bool = False):
        self.name = name
        self.pool: ReplicaPool | None = None
        self.info: mii_pb2.ModelInfoReply | None = None
        self.stop = stop
        # Without an API key a deployment bound to 0.0.0.0 would let anyone who can
        # reach its port stop it: Terminate then comes only from this machine.
        self.remote_terminate = has_api_key

    def ready(self, pool: ReplicaPool, info: mii_pb2.ModelInfoReply) -> None:
        """Serve calls from now on: the replicas have loaded the model."""
        self.pool, self.info = pool, info

    async def _started(self, context) -> ReplicaPool:
        if self.pool is None:
            await abort(
                context,
                UnavailableError(
                    f"deployment {self.name!r} is starting: its replicas are loading the "
                    "model; retry once it serves (mii list shows it ok)"
                ),
            )
        return self.pool

    async def Generate(self, request, context):
        pool = await self._started(context)
        try:
            responses = await pool.generate(
                prompts_from_proto(request),
                options_from_proto(request.options),
                context.time_remaining(),
            )
        except Exception as err:
            await abort(context, err)
        return mii_pb2.GenerateReply(responses=[piece_to_proto(r) for r in responses])

    async def GenerateStream(self, request, context):
        pool = await self._started(context)
        try:
            prompt = stream_prompt(request)
        except InvalidRequestError as err:
            await abort(context, err)
        stream = pool.stream(prompt, options_from_proto(request.options), context.time_remaining())
        try:
            async for piece in stream:
                yield piece_to_proto(piece)
        except Exception as err:
            await abort(context, err)
        finally:
            await stream.aclose()  # cancels the replica's call when our client left

    async def ModelInfo(self, request, context):
        await self._started(context)
        return self.info

    async def Stats(self, request, context):
        pool = await self._started(context)
        # Ask the replicas now: the watcher's figures may be half a second old,
        # long enough to miss a short request entirely.
        await pool.check_all()
        return add_replica_health(pool.stats(), pool)

    async def Terminate(self, request, context):
        if not (self.remote_terminate or peer_is_local(context.peer())):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, TERMINATE_REFUSED)
        self.stop.set()
        return mii_pb2.TerminateReply()
