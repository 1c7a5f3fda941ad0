"""What every route needs: the deployment's pool, names and tokenizer."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from mii.errors import CONTEXT_LENGTH_EXCEEDED
from mii.prompts import max_prompt_chars
from mii.rpc.deployment_config import DEFAULT_MAX_REQUEST_BYTES
from mii.rpc.http.auth import AccessPolicy
from mii.rpc.http.errors import ApiError
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
    # Requests each replica holds at most (max_queued_requests; None: no bound), and
    # how many replicas there are: a replica admits a call of several requests while it
    # holds fewer than its limit, whatever the call's size.
    max_queued_requests: int | None = None
    replicas: int = 1
    # The deployment's served_model_name: the OpenAI API's names of the model.
    served_model_names: list[str] = field(default_factory=list)
    # The deployment's tool_call_parser: what reads tool calls in answers to tool_choice
    # "auto" (None: "auto" is refused; "required" and named functions need none).
    tool_call_parser: str | None = None
    # Defaults of the sampling fields an OpenAI request leaves out (mii.rpc.http.sampling_defaults).
    sampling_defaults: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def max_prompt_chars(self) -> int | None:
        """Longer texts cannot fit in ``max_length`` tokens (mii.prompts.max_prompt_chars)."""
        return max_prompt_chars(self.tokenizer, self.max_length)

    def check_prompt_chars(self, chars: int, field: str) -> None:
        """400 naming ``field`` when ``chars`` characters of prompt text cannot fit in
        ``max_length`` tokens: refused before the seconds a huge text takes to tokenize."""
        limit = self.max_prompt_chars
        if limit is not None and chars > limit:
            raise ApiError(
                400,
                f"the prompt has {chars} characters: more than {self.max_length} tokens "
                f"(max_length) of this tokenizer can hold ({limit}); shorten it",
                field,
                CONTEXT_LENGTH_EXCEEDED,
            )

    def never_admitted(
        self, calls: int, requests_per_call: int, replicas: int | None = None
    ) -> bool:
        """Whether ``calls`` calls of ``requests_per_call`` requests each can never all
        be held at once by ``replicas`` replicas (default: all), however idle: each
        replica admits ceil(limit / size) such calls."""
        if self.max_queued_requests is None:
            return False
        per_replica = -(-self.max_queued_requests // max(1, requests_per_call))
        return calls > (self.replicas if replicas is None else replicas) * per_replica

    @property
    def served_model(self) -> str:
        """The model's name in the OpenAI API: the first served name, else the model."""
        return self.served_model_names[0] if self.served_model_names else self.model

    def names_model(self, name: str) -> bool:
        """Whether a request's ``model`` names this deployment's model: any served
        name, the model itself, or the deployment name."""
        return name in self.model_names()

    def model_names(self) -> list[str]:
        """Every name a request's ``model`` may use, the served one first."""
        names = [*self.served_model_names, self.model, self.deployment_name]
        return list(dict.fromkeys(n for n in names if n))


def get_state(request: Request) -> GatewayState:
    """The state of the app that serves ``request``."""
    return request.app.state.mii
