"""The configuration of a persistent deployment, validated once, where it is made.

``mii.serve`` and ``mii serve`` build a :class:`DeploymentConfig` from their
options (:meth:`DeploymentConfig.parse`); the deployment process receives it as
JSON and gives each replica process a :class:`ReplicaConfig`, also as JSON:
the deployment's configuration plus the replica's own port and GPUs. Nothing
re-defaults an option on the way.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

import mii.envs as envs
from mii.config import DEPLOYMENT_MAX_QUEUED_REQUESTS, EngineConfig, GenerateParams, dtype_by_name
from mii.errors import InvalidRequestError, MiiError
from mii.option_errors import unknown_name_hint
from mii.rpc import registry
from mii.rpc.chat_template_option import chat_template_text, checked_template
from mii.rpc.gpu_layout import GpuLayout
from mii.rpc.ray_options import RayOptions, replica_bounds, starting_replicas

# Replicas listen on the loopback only: clients reach them through the deployment's
# load balancer, which listens on the deployment's host and port.
REPLICA_HOST = "127.0.0.1"
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
# Seconds an idle HTTP keep-alive connection stays open. Longer than the idle expiry
# of the common clients pointed at the gateway (httpx and the openai package: 5 s;
# aiohttp: 15 s; Go's net/http: 90 s; clients with no expiry, or a longer one, can
# still meet it): a server that closes first races a client reusing the connection,
# whose request then meets a reset (httpx.ReadError). uvicorn's 5 s,
# equal to httpx's, lost one of 480 streamed requests that way in an H200 serving
# run (docs/reliability.md). Idle connections stay bounded by http_max_connections.
DEFAULT_HTTP_KEEP_ALIVE_S = 100.0
# Above a replica's max_queued_requests (1,024), so that a burst of plain HTTP/1.1
# clients (one connection each) meets the queue's 429 before the cap's 503; the
# cap itself only protects descriptors (mii.rpc.fd_limit halves what is left).
DEFAULT_HTTP_MAX_CONNECTIONS = 4096
DEFAULT_RESTFUL_API_PORT = 28080


_API_KEY_RULE = (
    "must be a non-empty string of printable ASCII characters without spaces (clients "
    "send it in the header 'authorization: Bearer KEY')"
)


def _is_header_value(key: str) -> bool:
    return bool(key) and all("!" <= c <= "~" for c in key)


class DeploymentConfig(GpuLayout, RayOptions):
    """Everything a deployment runs with; the keyword options of ``mii.serve``.

    Options named like a field here configure the deployment; every other
    option of ``mii.serve`` is an engine option (``max_length``,
    ``kv_block_size``, ...), validated by :class:`mii.config.EngineConfig`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field(description="Hugging Face hub id, local checkpoint directory or .gguf file")
    deployment_name: str = Field(
        description="name clients use to find it (default: the last component of MODEL's "
        "path or id, then -mii-deployment: org/model -> model-mii-deployment)",
    )
    host: str = Field(default="127.0.0.1", description="address to listen on (HTTP and gRPC)")
    port: int = Field(default=50050, ge=1, le=65535, description="gRPC port")
    enable_restful_api: bool = Field(
        default=False,
        description="also serve the REST API (/mii/NAME) and the OpenAI-compatible API (/v1)",
    )
    restful_api_port: int = Field(
        default=DEFAULT_RESTFUL_API_PORT,
        ge=1,
        le=65535,
        description="HTTP port: the OpenAI-compatible API (/v1), the REST API (/mii/NAME), "
        "/health and /metrics",
    )
    startup_timeout: float = Field(
        default=600.0, gt=0, description="seconds to wait for the replicas to load"
    )
    max_queued_requests: int | None = Field(
        default=DEPLOYMENT_MAX_QUEUED_REQUESTS,
        gt=0,
        description="requests each replica holds, queued or being generated; beyond, a new "
        "request is refused at once with HTTP 429 / gRPC RESOURCE_EXHAUSTED and a "
        "Retry-After (a deployment of N replicas holds N times as many)",
    )
    replica_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds a replica may go without progress (no piece of a request in "
        "flight and no answer to its health probes) before its requests fail with "
        "UNAVAILABLE (HTTP 503) and it leaves rotation",
    )
    replica_max_restarts: int = Field(
        default=5,
        ge=0,
        description="restarts of a replica whose process exited allowed within "
        "replica_restart_window_s; after that it is reported failed and left down",
    )
    replica_restart_window_s: float = Field(
        default=600.0, gt=0, description="seconds over which replica_max_restarts counts"
    )
    replica_restart_backoff_s: float = Field(
        default=1.0,
        ge=0,
        description="seconds before the first restart of a replica; doubled for each "
        "recent restart (up to 60 s)",
    )
    replica_unresponsive_restart_s: float = Field(
        default=120.0,
        ge=0,
        description="seconds a replica that served may stay unresponsive (or NOT_SERVING) "
        "before it is killed and restarted; 0: never",
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="on SIGTERM, SIGINT or Terminate: seconds in-flight requests get to "
        "finish before they are ended (new requests are refused at once)",
    )
    served_model_name: list[str] | None = Field(
        default=None,
        description="names of the model in the OpenAI API: the first is what /v1/models "
        "reports and the model of every answer; requests may name any of them (and MODEL "
        "or the deployment name) (default: MODEL)",
    )
    chat_template: str | None = Field(
        default=None,
        description="chat template (Jinja) of /v1/chat/completions, replacing the "
        "tokenizer's: a file path, or the template itself (default: the tokenizer's)",
    )
    tool_call_parser: str | None = Field(
        default=None,
        description="how /v1/chat/completions finds tool calls in the model's text, for "
        "tool_choice 'auto': hermes (<tool_call> JSON: Hermes, Qwen2.5, Qwen3), "
        "llama3_json (Llama 3.1 JSON calls) or mistral ([TOOL_CALLS] JSON) (default: "
        "none; 'auto' is then refused, 'required' and named functions work without one)",
    )
    generation_config: str = Field(
        default="auto",
        description="defaults of the OpenAI routes' sampling options that a request leaves "
        "out: 'auto', the model's generation_config.json (temperature, top_p, top_k, min_p, "
        "repetition_penalty, max_new_tokens as max_tokens); 'vllm' or 'none', OpenAI's; or "
        "a folder holding a generation_config.json",
    )
    log_requests: bool = Field(
        default=False,
        description="one line per HTTP request on the deployment's standard error: client, "
        "method, path and status (the REST gateway's access log)",
    )
    uvicorn_log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        default="warning", description="log level of the REST gateway's HTTP server (uvicorn)"
    )
    stats_log_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="seconds between the deployment's log lines of throughput, requests "
        "and KV cache usage, while it is busy; 0: none",
    )
    tp_master_addr: str = Field(
        default="127.0.0.1",
        description="address of the rendezvous of each tensor-parallel replica's ranks",
    )
    engine_options: dict[str, Any] = Field(
        default_factory=dict, description="options of each replica's engine (EngineConfig)"
    )
    # Never serialized (exclude): the deployment process gets its configuration as
    # JSON on its command line, which every local user can read; the key travels
    # in its environment (MII_API_KEY) instead, where the validator below finds it.
    api_key: SecretStr | None = Field(
        default=None,
        exclude=True,
        description="require this key of every client: gRPC metadata and HTTP header "
        "'authorization: Bearer KEY' (default: $MII_API_KEY; unset: no key); prefer "
        "MII_API_KEY to --api-key, which other local users can see in ps",
    )
    allowed_hosts: list[str] | None = Field(
        default=None,
        description="Host header names the HTTP API answers besides localhost, 127.0.0.1 "
        "and ::1 ('*': any). Bound to a loopback host it refuses every other name "
        "(DNS rebinding); bound elsewhere it checks only when this is given",
    )
    allowed_origins: list[str] | None = Field(
        default=None,
        description="origins whose web pages may call the HTTP API (CORS), such as "
        "https://app.example.com ('*': any; default: none, CORS off, and a text or form "
        "POST from another site's page is refused with 403)",
    )
    # Limits of the serving layer (docs/reliability.md).
    max_request_bytes: int = Field(
        default=DEFAULT_MAX_REQUEST_BYTES,
        gt=0,
        description="largest request accepted, in bytes: an HTTP body (else 413) "
        "or a gRPC message (else RESOURCE_EXHAUSTED)",
    )
    http_header_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds an HTTP connection gets to send a request's headers before "
        "it is closed",
    )
    http_keep_alive_timeout: float = Field(
        default=DEFAULT_HTTP_KEEP_ALIVE_S,
        gt=0,
        description="seconds an idle HTTP keep-alive connection stays open (longer than "
        "common clients keep idle connections for reuse: httpx/openai 5 s, aiohttp 15 s, "
        "Go 90 s, so the server does not close one as its client reuses it)",
    )
    http_max_connections: int = Field(
        default=DEFAULT_HTTP_MAX_CONNECTIONS,
        gt=0,
        description="HTTP connections open at once (at most half the open-files limit); "
        "beyond it the longest-idle one is closed, or the new one gets 503",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        # (left out, None or empty: "" as DeepSpeed-MII's MIIConfig reads it)
        if isinstance(data, dict) and not data.get("deployment_name") and "model" in data:
            name = registry.default_deployment_name(str(data["model"]))
            data = {**data, "deployment_name": name}
        return data

    @model_validator(mode="before")
    @classmethod
    def _api_key_from_environment(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("api_key") is None:
            key = envs.API_KEY.get()
            if key is not None and not _is_header_value(key):  # (named: no --api-key was given)
                raise InvalidRequestError(
                    f"the environment variable MII_API_KEY {_API_KEY_RULE}", field="MII_API_KEY"
                )
            if key is not None:
                data = {**data, "api_key": key}
        return data

    @field_validator("api_key")
    @classmethod
    def _api_key_is_a_header_value(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        if not _is_header_value(value.get_secret_value()):
            raise InvalidRequestError(f"api_key {_API_KEY_RULE}", field="api_key")
        return value

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _names_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("chat_template")
    @classmethod
    def _template_is_jinja(cls, value: str | None) -> str | None:
        # The text itself: parse() has read a file path already (once, where the
        # user gave it), so the deployment process never reinterprets it.
        return None if value is None else checked_template(value)

    @field_validator("generation_config")
    @classmethod
    def _generation_config_folder(cls, value: str) -> str:
        if value in ("auto", "vllm", "none"):
            return value
        if not os.path.isfile(os.path.join(os.path.expanduser(value), "generation_config.json")):
            raise InvalidRequestError(
                f"generation_config {value!r} is not 'auto', 'vllm', 'none' or a folder "
                "holding a generation_config.json",
                field="generation_config",
            )
        return os.path.abspath(os.path.expanduser(value))  # the deployment may run elsewhere

    @field_validator("tool_call_parser")
    @classmethod
    def _known_parser(cls, value: str | None) -> str | None:
        from mii.rpc.http.tool_parsers import get_parser  # a plain module: no web framework

        if value is not None:
            try:
                get_parser(value)
            except ValueError as err:  # it lists the known names
                raise InvalidRequestError(str(err), field="tool_call_parser") from None
        return value

    @field_validator("host")
    @classmethod
    def _bare_host(cls, value: str) -> str:
        # "[::1]" as URLs write it: the address itself is ::1
        return value[1:-1] if value.startswith("[") and value.endswith("]") else value

    @field_validator("allowed_hosts", "allowed_origins", "served_model_name")
    @classmethod
    def _names(cls, value: list[str] | None, info) -> list[str] | None:
        if value is None:
            return None
        names = [v.strip() for v in value]
        if not all(names):
            raise InvalidRequestError(f"{info.field_name} has an empty entry", info.field_name)
        return names

    def secret_api_key(self) -> str | None:
        """The API key, or None when the deployment requires none."""
        return None if self.api_key is None else self.api_key.get_secret_value()

    @model_validator(mode="after")
    def _ports_differ(self) -> DeploymentConfig:
        if self.enable_restful_api and self.restful_api_port == self.port:
            raise InvalidRequestError(
                f"restful_api_port and port are both {self.port}: the HTTP API and gRPC "
                "need a port each (mii serve: --port is HTTP, --grpc-port gRPC)",
                field="restful_api_port",
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _start_at_min_replicas(cls, data: Any) -> Any:
        # Under autoscaling replica_num is the count to start with: left out, it is
        # min_replicas (so the banner, `mii list` and the saved config say what runs).
        if isinstance(data, dict) and data.get("replica_num") is None:
            start = starting_replicas(data)
            if start is not None:
                data = {**data, "replica_num": start}
        return data

    @model_validator(mode="after")
    def _replicas_within_autoscaling(self) -> DeploymentConfig:
        # One outside min..max was clamped without a word (user trials: the banner
        # said 3 replicas, Ray started 2; an explicit 1 under min_replicas 2 became 2).
        low, high = replica_bounds(self.min_replicas, self.max_replicas, self.autoscaling_config)
        start = self.replica_num
        if start > (high or start) or start < (low or 1):
            raise InvalidRequestError(
                f"replica_num ({start}) is the number of replicas to start with: it must "
                f"lie within min_replicas..max_replicas ({low or 1}..{high or 'no limit'}); "
                "change one of them",
                field="replica_num",
            )
        return self

    @model_validator(mode="after")
    def _engine_options_valid(self) -> DeploymentConfig:
        self.engine_config()  # raises InvalidRequestError naming the bad option
        return self

    def engine_config(self) -> EngineConfig:
        """The configuration of each replica's engine (split over ``tensor_parallel`` ranks)."""
        return EngineConfig.parse(
            self.model,
            **{
                **self.engine_options,
                "tensor_parallel": self.tensor_parallel,
                "max_queued_requests": self.max_queued_requests,
            },
        )

    @classmethod
    def parse(cls, model: str, **options: Any) -> DeploymentConfig:
        """Validate ``mii.serve``'s options, before anything starts.

        A bad option raises the ``InvalidRequestError`` (a ValueError) that names
        it; a name that a running deployment already has, ``DeploymentError``.
        """
        if isinstance(model, os.PathLike):  # a pathlib.Path to a checkpoint or .gguf file
            model = os.fspath(model)
        deployment_fields = set(cls.model_fields) - {"model", "engine_options"}
        for name in options:  # neither the deployment's nor the engine's: say which is meant
            if name not in deployment_fields and name not in EngineConfig.model_fields:
                known = [*deployment_fields, *EngineConfig.model_fields]
                raise InvalidRequestError(
                    f"unknown engine option {name!r}"
                    + unknown_name_hint(name, known, GenerateParams.model_fields),
                    field=name,
                )
        fields = {k: options.pop(k) for k in list(options) if k in deployment_fields}
        if "dtype" in options:  # (the options travel as JSON: a torch dtype by its name)
            options["dtype"] = dtype_by_name(options["dtype"])
        if isinstance(fields.get("chat_template"), str):  # a file path, or the template
            fields["chat_template"] = chat_template_text(fields["chat_template"])
        try:
            config = cls(model=model, engine_options=options, **fields)
        except ValidationError as err:
            raise _first_error(err) from None
        registry.require_available(config.deployment_name)
        return config


# What a busy front gRPC port's error adds (a single host's deployment and Ray's).
GRPC_PORT_IN_USE_HINT = " choose another: mii serve --grpc-port, mii.serve(port=...)"


class ReplicaConfig(BaseModel):
    """What one replica process runs: the deployment's engine, on its own port and GPUs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: DeploymentConfig
    port: int  # on REPLICA_HOST
    gpus: list[int] | None = None  # its CUDA_VISIBLE_DEVICES; None: no GPUs (CPU)
    tp_master_port: int | None = None  # the rendezvous port of its ranks (tensor_parallel > 1)
    index: int = 0  # which of the deployment's replicas (its own sampling stream)
    start: int = 0  # how many times it was restarted (a restart draws new seeds)
    parent_pid: int | None = None  # its deployment process: it exits once that is gone

    @property
    def address(self) -> str:
        return f"{REPLICA_HOST}:{self.port}"


def _first_error(err: ValidationError) -> Exception:
    """The exception to raise for pydantic's first error: the one a validator above
    raised, as it is; for a value of the wrong type, an InvalidRequestError naming it."""
    first = err.errors()[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, MiiError):
        return cause
    field = ".".join(str(p) for p in first["loc"])
    said = str(cause) if isinstance(cause, Exception) else first["msg"]  # (no "Value error, ")
    message = f"invalid deployment option {field!r}: {said} (got {first.get('input')!r})"
    return InvalidRequestError(message, field=field)
