"""What every route needs: the deployment's pool, names and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from mii.rpc.deployment_config import DEFAULT_MAX_REQUEST_BYTES
from mii.rpc.http.auth import AccessPolicy
from mii.rpc.pool import ReplicaPool


@dataclass
class GatewayState:
    """What every route needs, stored as ``app.state.mii``."""

    pool: ReplicaPool
    deployment_name: str
    model: str
    max_length: int
    tokenizer: Any  # a transformers tokenizer (chat templates)
    created: int  # start time, reported as the model's ``created``
    access: AccessPolicy = field(default_factory=AccessPolicy)  # API key, Host check, CORS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # longer bodies: 413
    # Requests the replicas hold at most (max_queued_requests x replicas; None: no bound).
    max_admitted_requests: int | None = None


def get_state(request: Request) -> GatewayState:
    """The state of the app that serves ``request``."""
    return request.app.state.mii
