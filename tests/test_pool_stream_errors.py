"""How a replica pool reports a stream its replica dropped (no processes: a fake call)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mii.errors import UnavailableError
from mii.rpc import mii_pb2
from mii.rpc.pool import ReplicaPool


class DyingCall:
    """A GenerateStream call whose replica is killed after the first piece."""

    def __init__(self) -> None:
        self.cancelled = False

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    def __aiter__(self):
        return self._pieces()

    async def _pieces(self):
        yield mii_pb2.Piece(generated_text="Hel", prompt_length=3, generated_length=1)
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="Stream removed (Socket closed)",
        )

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def done(self) -> bool:
        return self.cancelled


class DyingStub:
    def GenerateStream(self, request, timeout=None):  # (gRPC stub method name)
        return DyingCall()


def test_a_replica_dying_mid_answer_is_said_so():
    """A replica killed mid-stream reached the client as gRPC's own 'UNAVAILABLE:
    Stream removed (Socket closed)' (user trial): it says the replica stopped and
    that the request can be sent again."""

    async def main() -> None:
        pool = ReplicaPool(["127.0.0.1:1"])
        [replica] = pool.replicas
        replica.healthy, replica.stub = True, DyingStub()
        pieces = []
        with pytest.raises(UnavailableError, match="replica serving this request stopped") as err:
            async for piece in pool.stream("Hello", {"max_new_tokens": 8}):
                pieces.append(piece)
        assert [p.generated_text for p in pieces] == ["Hel"]
        assert "Socket closed" in str(err.value) and "send the request again" in str(err.value)
        await replica.channel.close()

    asyncio.run(main())
