"""The option groups of the ``mii`` commands, derived from the configuration models:
engine options (:class:`mii.config.EngineConfig`), generation options
(:class:`mii.config.GenerateParams`) and deployment options
(:class:`mii.rpc.deployment_config.DeploymentConfig`). Shared with the Jupyter
magics in :mod:`mii.magic`.
"""

from __future__ import annotations

import argparse
from typing import Any

from mii.cli.model_options import add_field_options, given_options
from mii.config import CLI_MAX_NEW_TOKENS, EngineConfig, GenerateParams
from mii.rpc.deployment_config import DeploymentConfig

# The fields each group exposes, in the order of --help.
ENGINE_OPTIONS = (
    "dtype",
    "device",
    "max_length",
    "kv_block_size",
    "kv_cache_dtype",
    "num_kv_blocks",
    "token_budget",
    "max_num_seqs",
    "load_format",
    "trust_remote_code",
)
# --greedy (do_sample=False) comes between these two.
GENERATION_OPTIONS = ("max_new_tokens", "min_new_tokens", "ignore_eos")
SAMPLING_OPTIONS = (
    "seed",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "stop_token_ids",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "skip_special_tokens",
)
DEPLOYMENT_OPTIONS = (
    "deployment_name",
    "port",
    "host",
    "replica_num",
    "tensor_parallel",
    "device_map",
    "enable_restful_api",
    "restful_api_port",
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
)
METAVARS = {
    "device": "DEVICE",
    "temperature": "T",
    "top_p": "P",
    "top_k": "K",
    "min_p": "P",
    "stop_token_ids": "ID",
    "repetition_penalty": "X",
    "presence_penalty": "X",
    "frequency_penalty": "X",
    "logit_bias": "ID=BIAS",
    "stop": "TEXT",
    "deployment_name": "NAME",
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
}


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Engine options (validated by ``mii.EngineConfig``); unset ones keep its defaults."""
    group = parser.add_argument_group("engine options")
    add_field_options(group, EngineConfig, ENGINE_OPTIONS, metavars=METAVARS)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options given on the command line (unset ones are left out)."""
    return given_options(args, ENGINE_OPTIONS)


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


def generation_params(args: argparse.Namespace) -> dict[str, Any]:
    """Generation options as keyword arguments of ``stream``/``generate``."""
    params = given_options(args, GENERATION_OPTIONS + SAMPLING_OPTIONS)
    if args.greedy:
        params["do_sample"] = False
    return params


def add_deployment_options(parser: argparse.ArgumentParser) -> None:
    """The options of a deployment (``mii.serve``'s); unset ones keep their defaults."""
    add_field_options(parser, DeploymentConfig, DEPLOYMENT_OPTIONS, metavars=METAVARS)


def deployment_options(args: argparse.Namespace) -> dict[str, Any]:
    """The deployment options given on the command line (unset ones are left out)."""
    return given_options(args, DEPLOYMENT_OPTIONS)
