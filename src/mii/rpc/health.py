"""The standard gRPC services every mii server offers: health checking and reflection.

A server starts NOT_SERVING and reports SERVING once it can answer (a replica:
its model is warm; the deployment: at least one replica is). The status is set
both for the whole server ("") and for the ``mii.Mii`` service.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mii.rpc import mii_pb2

SERVICE = mii_pb2.DESCRIPTOR.services_by_name["Mii"].full_name


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
    """Report SERVING or NOT_SERVING, for the server and for the Mii service."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE):
        await servicer.set(name, status)
