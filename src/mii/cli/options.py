"""The option groups of the ``mii`` commands, derived from the configuration models:
engine options (:class:`mii.config.EngineConfig`), generation options
(:class:`mii.config.GenerateParams`) and deployment options
(:class:`mii.rpc.deployment_config.DeploymentConfig`). Shared with the Jupyter
magics in :mod:`mii.magic`.
"""

from __future__ import annotations

import argparse
import decimal
import re
from typing import Any

from mii.cli.model_options import add_field_options, given_options
from mii.config import CLI_MAX_NEW_TOKENS, EngineConfig, GenerateParams
from mii.errors import InvalidRequestError
from mii.rpc.deployment_config import DeploymentConfig

# The fields each group exposes, in the order of --help.
ENGINE_OPTIONS = (
    "dtype",
    "device",
    "max_length",
    "tokenizer",
    "revision",
    "kv_block_size",
    "kv_cache_dtype",
    "quantization",
    "num_kv_blocks",
    "kv_cache_memory_fraction",
    "cpu_kv_cache_bytes",
    "token_budget",
    "max_num_seqs",
    "short_prompt_reserve",
    "enable_prefix_caching",
    "cuda_graphs",
    "max_graph_batch",
    "async_scheduling",
    "compile",
    "load_format",
    "trust_remote_code",
)
# mii serve's engine options: also the engine's seed (mii generate's --seed is the request's).
SERVE_ENGINE_OPTIONS = (*ENGINE_OPTIONS, "seed")
# `vllm serve`'s names of options that mean the same (or nearly: docs/cli.md), as aliases.
ENGINE_FLAGS = {
    "max_length": ("--max-length", "--max-model-len"),
    "kv_cache_memory_fraction": ("--kv-cache-memory-fraction", "--gpu-memory-utilization"),
    "token_budget": ("--token-budget", "--max-num-batched-tokens"),
}
# --greedy (do_sample=False) comes between these two.
GENERATION_OPTIONS = ("max_new_tokens", "min_new_tokens", "ignore_eos", "truncate_prompt_tokens")
SAMPLING_OPTIONS = (
    "seed",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "stop_token_ids",
    "allowed_token_ids",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "skip_special_tokens",
    # structured output (mii.constraint_options): at most one of them
    "json_schema",
    "regex",
    "choice",
    "grammar",
    "json_object",
)
DEPLOYMENT_OPTIONS = (
    "deployment_name",
    "host",
    "restful_api_port",
    "port",
    "enable_restful_api",
    "served_model_name",
    "chat_template",
    "tool_call_parser",
    "replica_num",
    "tensor_parallel",
    "device_map",
    "startup_timeout",
    "api_key",
    "allowed_hosts",
    "allowed_origins",
    "max_request_bytes",
    "http_header_timeout",
    "http_keep_alive_timeout",
    "http_max_connections",
    "max_queued_requests",
    "replica_timeout_s",
    "replica_max_restarts",
    "replica_restart_window_s",
    "replica_restart_backoff_s",
    "replica_unresponsive_restart_s",
    "shutdown_grace_s",
    "stats_log_interval_s",
    "generation_config",
    "log_requests",
    "uvicorn_log_level",
    # on a Ray cluster (docs/multi_node.md)
    "backend",
    "ray_address",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
    "autoscaling_config",
    "ray_num_cpus",
    "ray_num_gpus",
)
# mii serve follows `vllm serve`: --port is the HTTP port (the OpenAI API is on by
# default), the gRPC port is --grpc-port; mii's older names stay as aliases.
DEPLOYMENT_FLAGS = {
    "restful_api_port": ("--port", "--restful-api-port"),
    "port": ("--grpc-port",),
    "tensor_parallel": ("--tensor-parallel-size", "-tp", "--tensor-parallel"),
    # vLLM's data parallelism of a dense model is what mii's replicas are: N engines
    # behind one API server, each on its own tensor-parallel group of GPUs.
    "replica_num": ("--replica-num", "--data-parallel-size", "-dp"),
    "log_requests": ("--enable-log-requests",),
}
CLI_HTTP_PORT = 8000  # vllm serve's
DEPLOYMENT_DEFAULTS = {"enable_restful_api": True, "restful_api_port": CLI_HTTP_PORT}
METAVARS = {
    "max_length": "TOKENS",
    "token_budget": "TOKENS",
    "short_prompt_reserve": "TOKENS",
    "device": "DEVICE",
    "temperature": "T",
    "top_p": "P",
    "top_k": "K",
    "min_p": "P",
    "stop_token_ids": "ID",
    "allowed_token_ids": "ID",
    "repetition_penalty": "X",
    "presence_penalty": "X",
    "frequency_penalty": "X",
    "logit_bias": "ID=BIAS",
    "stop": "TEXT",
    "deployment_name": "NAME",
    "generation_config": "auto|vllm|FOLDER",
    "host": "HOST",
    "port": "PORT",
    "restful_api_port": "PORT",
    "device_map": "GPUS",
    "startup_timeout": "SECONDS",
    "api_key": "KEY",
    "allowed_hosts": "HOSTS",
    "allowed_origins": "ORIGINS",
    "max_request_bytes": "BYTES",
    "http_header_timeout": "SECONDS",
    "http_keep_alive_timeout": "SECONDS",
    "http_max_connections": "N",
    "max_queued_requests": "N",
    "replica_timeout_s": "SECONDS",
    "replica_max_restarts": "N",
    "replica_restart_window_s": "SECONDS",
    "replica_restart_backoff_s": "SECONDS",
    "replica_unresponsive_restart_s": "SECONDS",
    "shutdown_grace_s": "SECONDS",
    "stats_log_interval_s": "SECONDS",
    "served_model_name": "NAME",
    "chat_template": "TEMPLATE",
    "tool_call_parser": "PARSER",
    "tokenizer": "TOKENIZER",
    "revision": "REVISION",
    "kv_cache_memory_fraction": "FRACTION",
    "seed": "N",
    "max_graph_batch": "ROWS",
    "ray_address": "ADDRESS",
    "autoscaling_config": "KEY=VALUE",
    "min_replicas": "N",
    "max_replicas": "N",
    "target_ongoing_requests": "N",
    "upscale_delay_s": "SECONDS",
    "downscale_delay_s": "SECONDS",
    "ray_num_cpus": "CPUS",
    "ray_num_gpus": "GPUS",
}


_TOKEN_COUNT = re.compile(r"(\d+(?:\.\d+)?)([kmg]?)", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}


def token_count(text: str) -> int:
    """A number of tokens as vllm serve reads it: ``4096``, ``4k`` (4,000), ``4K``
    (4,096), ``1.5k`` (1,500), ``2M`` (2 x 2**20)."""
    match = _TOKEN_COUNT.fullmatch(text.strip())
    # (exact decimals: 1.001k is 1001, which floats make 1000.9999999999999)
    value = None if match is None else decimal.Decimal(match[1]) * _UNITS[match[2]]
    if value is None or value != int(value):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of tokens: write e.g. 4096, 4k (4,000) or 4K (4,096)"
        )
    return int(value)


def add_engine_options(
    parser: argparse.ArgumentParser, names: tuple[str, ...] = ENGINE_OPTIONS
) -> None:
    """Engine options (validated by ``mii.EngineConfig``); unset ones keep its defaults."""
    group = parser.add_argument_group("engine options")
    add_field_options(
        group,
        EngineConfig,
        names,
        metavars=METAVARS,
        flags=ENGINE_FLAGS,
        parsers={n: token_count for n in ("max_length", "token_budget", "short_prompt_reserve")},
    )
    if "cuda_graphs" in names:  # vLLM's name for --no-cuda-graphs
        group.add_argument(
            "--enforce-eager",
            dest="cuda_graphs",
            action="store_const",
            const=False,
            help="decode passes without CUDA graphs (vLLM's name for --no-cuda-graphs)",
        )


def engine_options(
    args: argparse.Namespace, names: tuple[str, ...] = ENGINE_OPTIONS
) -> dict[str, Any]:
    """The engine options given on the command line (unset ones are left out)."""
    return given_options(args, names)


def add_generation_options(
    parser: argparse.ArgumentParser, max_new_tokens: int = CLI_MAX_NEW_TOKENS
) -> None:
    """Per-request generation options (validated by ``mii.GenerateParams``);
    ``max_new_tokens`` is this command line's default."""
    group = parser.add_argument_group("generation options")
    add_field_options(
        group,
        GenerateParams,
        GENERATION_OPTIONS,
        defaults={"max_new_tokens": max_new_tokens},
        metavars=METAVARS,
    )
    group.add_argument(
        "--greedy",
        action="store_true",
        help="greedy decoding (most likely token) instead of sampling",
    )
    add_field_options(group, GenerateParams, SAMPLING_OPTIONS, metavars=METAVARS)
    for action in group._group_actions:
        if action.dest == "stop":  # the shell passes '\n' as a backslash and an n
            action.help += r"; taken as typed: for a line break in bash write $'\n', not '\n'"


def generation_params(args: argparse.Namespace) -> dict[str, Any]:
    """Generation options as keyword arguments of ``stream``/``generate``."""
    params = given_options(args, GENERATION_OPTIONS + SAMPLING_OPTIONS)
    if args.greedy:
        # The request would take them and sample nothing (same text whatever the value).
        ignored = [name for name in ("temperature", "top_p", "top_k", "min_p") if name in params]
        if ignored:
            flag = "--" + ignored[0].replace("_", "-")
            raise InvalidRequestError(
                f"--greedy picks the most likely token, so {flag} would change nothing: "
                "drop one of them"
            )
        params["do_sample"] = False
    return params


def add_deployment_options(parser: argparse.ArgumentParser) -> None:
    """The options of a deployment (``mii.serve``'s), named as ``mii serve`` names them
    (DEPLOYMENT_FLAGS, DEPLOYMENT_DEFAULTS); unset ones keep their defaults."""
    add_field_options(
        parser,
        DeploymentConfig,
        DEPLOYMENT_OPTIONS,
        defaults=DEPLOYMENT_DEFAULTS,
        metavars=METAVARS,
        flags=DEPLOYMENT_FLAGS,
        multiple=("served_model_name",),
    )
    parser.add_argument(
        "--disable-log-stats",
        dest="stats_log_interval_s",
        action="store_const",
        const=0.0,
        help="no periodic throughput log lines (the same as --stats-log-interval-s 0)",
    )
    parser.add_argument(  # vllm serve's flag for what mii's gateway always does
        "--enable-request-id-headers",
        dest="request_id_headers",
        action="store_true",
        help="accepted for vllm serve's scripts: the gateway always echoes X-Request-Id",
    )
    for vllm_flag in ("--disable-log-requests", "--disable-uvicorn-access-log"):
        parser.add_argument(  # vllm serve's ways to say what mii does by default
            vllm_flag,
            dest="log_requests",
            action="store_const",
            const=False,
            help="no line per request (the default; see --enable-log-requests)",
        )


def deployment_options(args: argparse.Namespace) -> dict[str, Any]:
    """The deployment options given on the command line (unset ones are left out)."""
    return given_options(args, DEPLOYMENT_OPTIONS)
